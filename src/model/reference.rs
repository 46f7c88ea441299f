//! The training-form graph evaluated as written (no folding), in f64 with naive loops: the
//! oracle the re-parameterisation tests compare the deploy form against. Small inputs only.

use super::config::Form;
use super::cpu::gelu;
use super::deploy::Dims;
use super::weights::Checkpoint;
use crate::error::{Error, Result};
use crate::tensor::Tensor;

/// An f64 activation.
#[derive(Clone, Debug)]
pub struct Act64 {
    pub d: Dims,
    pub v: Vec<f64>,
}

impl Act64 {
    pub fn from_tensor(t: &Tensor<f32>) -> Result<Self> {
        let [n, c, h, w] = crate::conv::dims4("reference input", t.shape())?;
        Ok(Act64 {
            d: Dims { n, c, h, w },
            v: t.data().iter().map(|&x| x as f64).collect(),
        })
    }
    pub fn to_tensor(&self) -> Result<Tensor<f32>> {
        Tensor::from_vec(
            &[self.d.n, self.d.c, self.d.h, self.d.w],
            self.v.iter().map(|&x| x as f32).collect(),
        )
    }
}

fn bn(ck: &Checkpoint, p: &str, x: &mut Act64) -> Result<()> {
    let g = ck.get(&format!("{p}.weight"))?.data();
    let b = ck.get(&format!("{p}.bias"))?.data();
    let m = ck.get(&format!("{p}.running_mean"))?.data();
    let v = ck.get(&format!("{p}.running_var"))?.data();
    let hw = x.d.h * x.d.w;
    let c = x.d.c;
    for (i, val) in x.v.iter_mut().enumerate() {
        let ch = (i / hw) % c;
        *val = (*val - m[ch] as f64) / (v[ch] as f64 + super::config::BN_EPS).sqrt() * g[ch] as f64
            + b[ch] as f64;
    }
    Ok(())
}

/// PyTorch conv2d (cross-correlation) with groups, zero padding, optional bias, in f64 (also
/// the oracle of `cpu::small_conv`'s tests).
pub fn conv(
    x: &Act64,
    w: &Tensor<f32>,
    bias: Option<&[f32]>,
    stride: usize,
    pad: usize,
    groups: usize,
) -> Result<Act64> {
    let [cout, cpg, kh, kw] = crate::conv::dims4("reference weight", w.shape())?;
    let d = x.d;
    if d.c != cpg * groups || cout % groups != 0 {
        return Err(Error::shape(
            "reference conv weight",
            format!("[?, {}, ?, ?]", d.c / groups),
            w.shape(),
        ));
    }
    let oh = (d.h + 2 * pad - kh) / stride + 1;
    let ow = (d.w + 2 * pad - kw) / stride + 1;
    let opg = cout / groups;
    let wd = w.data();
    let mut y = vec![0.0f64; d.n * cout * oh * ow];
    for n in 0..d.n {
        for o in 0..cout {
            let g = o / opg;
            for oy in 0..oh {
                for ox in 0..ow {
                    let mut acc = bias.map_or(0.0, |b| b[o] as f64);
                    for ci in 0..cpg {
                        let c = g * cpg + ci;
                        for ky in 0..kh {
                            let iy = (oy * stride + ky) as isize - pad as isize;
                            if iy < 0 || iy as usize >= d.h {
                                continue;
                            }
                            for kx in 0..kw {
                                let ix = (ox * stride + kx) as isize - pad as isize;
                                if ix < 0 || ix as usize >= d.w {
                                    continue;
                                }
                                acc += x.v[((n * d.c + c) * d.h + iy as usize) * d.w + ix as usize]
                                    * wd[((o * cpg + ci) * kh + ky) * kw + kx] as f64;
                            }
                        }
                    }
                    y[((n * cout + o) * oh + oy) * ow + ox] = acc;
                }
            }
        }
    }
    Ok(Act64 {
        d: Dims {
            n: d.n,
            c: cout,
            h: oh,
            w: ow,
        },
        v: y,
    })
}

/// conv (no bias) + BN, as `conv_bn` builds it; `groups` = channels for depthwise.
fn conv_bn(ck: &Checkpoint, p: &str, x: &Act64, stride: usize, depthwise: bool) -> Result<Act64> {
    let w = ck.get(&format!("{p}.conv.weight"))?;
    let k = w.shape()[2];
    let groups = if depthwise { x.d.c } else { 1 };
    let bias = ck.tensors.get(&format!("{p}.conv.bias")).map(|b| b.data());
    let mut y = conv(x, w, bias, stride, k / 2, groups)?;
    bn(ck, &format!("{p}.bn"), &mut y)?;
    Ok(y)
}

fn relu(x: &mut Act64) {
    x.v.iter_mut().for_each(|v| *v = v.max(0.0));
}

fn gelu64(x: &mut Act64) {
    // The f32 GELU's error (~1e-7 relative) is far below what the tests resolve.
    x.v.iter_mut().for_each(|v| *v = gelu(*v as f32) as f64);
}

/// Stem, un-folded.
pub fn stem(ck: &Checkpoint, x: &Act64) -> Result<Act64> {
    let mut y = conv_bn(ck, "stem.0", x, 2, false)?;
    relu(&mut y);
    let mut y = conv_bn(ck, "stem.1", &y, 1, true)?;
    relu(&mut y);
    let mut y = conv_bn(ck, "stem.2", &y, 1, false)?;
    relu(&mut y);
    let mut y = conv_bn(ck, "stem.3", &y, 2, true)?;
    relu(&mut y);
    Ok(y)
}

/// RepLKBlock `stages.{s}.blocks.{2i}`, un-folded.
pub fn replk_block(ck: &Checkpoint, s: usize, i: usize, x: &Act64) -> Result<Act64> {
    let p = format!("stages.{s}.blocks.{}", 2 * i);
    let mut h = x.clone();
    bn(ck, &format!("{p}.prelkb_bn"), &mut h)?;
    let mut h = conv_bn(ck, &format!("{p}.pw1"), &h, 1, false)?;
    relu(&mut h);
    let lk = format!("{p}.large_kernel");
    let mut h = match ck.forms[s][i] {
        Form::Training => {
            let mut a = conv_bn(ck, &format!("{lk}.lkb_origin"), &h, 1, true)?;
            if ck
                .tensors
                .contains_key(&format!("{lk}.small_conv.conv.weight"))
            {
                let b = conv_bn(ck, &format!("{lk}.small_conv"), &h, 1, true)?;
                a.v.iter_mut().zip(&b.v).for_each(|(u, v)| *u += v);
            }
            a
        }
        Form::Merged => {
            let w = ck.get(&format!("{lk}.lkb_reparam.weight"))?;
            let b = ck.get(&format!("{lk}.lkb_reparam.bias"))?;
            let k = w.shape()[2];
            conv(&h, w, Some(b.data()), 1, k / 2, h.d.c)?
        }
    };
    relu(&mut h);
    let h = conv_bn(ck, &format!("{p}.pw2"), &h, 1, false)?;
    let mut y = x.clone();
    y.v.iter_mut().zip(&h.v).for_each(|(u, v)| *u += v);
    Ok(y)
}

/// ConvFFN `stages.{s}.blocks.{2i+1}`, un-folded.
pub fn ffn_block(ck: &Checkpoint, s: usize, i: usize, x: &Act64) -> Result<Act64> {
    let p = format!("stages.{s}.blocks.{}", 2 * i + 1);
    let mut h = x.clone();
    bn(ck, &format!("{p}.preffn_bn"), &mut h)?;
    let mut h = conv_bn(ck, &format!("{p}.pw1"), &h, 1, false)?;
    gelu64(&mut h);
    let h = conv_bn(ck, &format!("{p}.pw2"), &h, 1, false)?;
    let mut y = x.clone();
    y.v.iter_mut().zip(&h.v).for_each(|(u, v)| *u += v);
    Ok(y)
}

/// Transition `t`, un-folded.
pub fn transition(ck: &Checkpoint, t: usize, x: &Act64) -> Result<Act64> {
    let mut y = conv_bn(ck, &format!("transitions.{t}.0"), x, 1, false)?;
    relu(&mut y);
    let mut y = conv_bn(ck, &format!("transitions.{t}.1"), &y, 2, true)?;
    relu(&mut y);
    Ok(y)
}

/// Logits (when the checkpoint has a head) and every stage's output.
pub type RefOutput = (Option<Tensor<f32>>, Vec<Tensor<f32>>);

/// The whole model un-folded: (logits when the checkpoint has a head, every stage's output).
pub fn forward(ck: &Checkpoint, x: &Tensor<f32>) -> Result<RefOutput> {
    let cfg = &ck.config;
    let mut h = stem(ck, &Act64::from_tensor(x)?)?;
    let mut stages = Vec::new();
    for s in 0..cfg.num_stages() {
        for i in 0..cfg.layers[s] {
            h = replk_block(ck, s, i, &h)?;
            h = ffn_block(ck, s, i, &h)?;
        }
        let mut o = h.clone();
        if ck.stage_norms[s] {
            bn(ck, &format!("stages.{s}.norm"), &mut o)?;
        }
        stages.push(o.to_tensor()?);
        if s + 1 < cfg.num_stages() {
            h = transition(ck, s, &h)?;
        }
    }
    let logits = if ck.has_head {
        bn(ck, "norm", &mut h)?;
        let hw = h.d.h * h.d.w;
        let fc = ck.get("head.weight")?;
        let fb = ck.get("head.bias")?.data();
        let nc = fc.shape()[0];
        let mut out = Vec::new();
        for n in 0..h.d.n {
            let feat: Vec<f64> = (0..h.d.c)
                .map(|c| {
                    let base = (n * h.d.c + c) * hw;
                    h.v[base..base + hw].iter().sum::<f64>() / hw as f64
                })
                .collect();
            for (row, &bias) in fc.data().chunks(h.d.c).zip(fb).take(nc) {
                let dot: f64 = row.iter().zip(&feat).map(|(&a, &b)| a as f64 * b).sum();
                out.push((dot + bias as f64) as f32);
            }
        }
        Some(Tensor::from_vec(&[h.d.n, nc], out)?)
    } else {
        None
    };
    Ok((logits, stages))
}
