//! Structural re-parameterisation: training-form (or merged-form) weights into the deploy form
//! that runs. Every BN folds into the conv before it; the small kernel merges into the large one
//! (zero-padded to K at the centre, biases summed); the pre-BNs (`prelkb_bn`, `preffn_bn`) fold
//! into the following 1x1 conv (exact: a 1x1 conv has no padding, so every input it sees went
//! through the BN). All folding is done in f64 and rounded once to f32.

use super::config::{Form, BN_EPS};
use super::deploy::{
    Affine, Block, DenseConv, DeployModel, Depthwise, FfnBlock, Head, Pointwise, RepLkBlock, Stage,
    Stem, Transition,
};
use super::weights::Checkpoint;
use crate::error::{Error, Result};

/// A BN as a per-channel affine map y = scale * x + shift (f64).
#[derive(Clone, Debug)]
pub struct Bn64 {
    pub scale: Vec<f64>,
    pub shift: Vec<f64>,
}

/// A conv with its output bias, f64, weight `[cout, rest]` row-major.
#[derive(Clone, Debug)]
pub struct Conv64 {
    pub cout: usize,
    pub w: Vec<f64>,
    pub b: Vec<f64>,
}

impl Conv64 {
    fn row_len(&self) -> usize {
        self.w.len() / self.cout.max(1)
    }

    /// Applies a BN after this conv: w' = w * s, b' = b * s + t.
    pub fn then_bn(mut self, bn: &Bn64) -> Self {
        let r = self.row_len();
        for o in 0..self.cout {
            for v in &mut self.w[o * r..(o + 1) * r] {
                *v *= bn.scale[o];
            }
            self.b[o] = self.b[o] * bn.scale[o] + bn.shift[o];
        }
        self
    }

    /// Folds a BN applied *before* this 1x1 conv (input channels):
    /// `w'[o,i] = w[o,i] * s[i]`, `b'[o] = b[o] + sum_i w[o,i] * t[i]`.
    pub fn after_bn(mut self, bn: &Bn64) -> Self {
        let cin = self.row_len();
        for o in 0..self.cout {
            let row = &mut self.w[o * cin..(o + 1) * cin];
            let mut acc = 0.0;
            for (i, v) in row.iter_mut().enumerate() {
                acc += *v * bn.shift[i];
                *v *= bn.scale[i];
            }
            self.b[o] += acc;
        }
        self
    }

    fn to_f32(&self) -> (Vec<f32>, Vec<f32>) {
        (
            self.w.iter().map(|&v| v as f32).collect(),
            self.b.iter().map(|&v| v as f32).collect(),
        )
    }
}

fn to64(v: &[f32]) -> Vec<f64> {
    v.iter().map(|&x| x as f64).collect()
}

/// Reads the BN `prefix.{weight,bias,running_mean,running_var}` as an affine map.
pub fn bn(ck: &Checkpoint, prefix: &str) -> Result<Bn64> {
    let g = ck.get(&format!("{prefix}.weight"))?.data();
    let b = ck.get(&format!("{prefix}.bias"))?.data();
    let m = ck.get(&format!("{prefix}.running_mean"))?.data();
    let v = ck.get(&format!("{prefix}.running_var"))?.data();
    let mut scale = Vec::with_capacity(g.len());
    let mut shift = Vec::with_capacity(g.len());
    for i in 0..g.len() {
        let var = v[i] as f64;
        if var + BN_EPS <= 0.0 || !var.is_finite() {
            return Err(Error::Weights(format!(
                "{prefix}.running_var[{i}] = {var} is negative or not finite"
            )));
        }
        let s = g[i] as f64 / (var + BN_EPS).sqrt();
        scale.push(s);
        shift.push(b[i] as f64 - m[i] as f64 * s);
    }
    Ok(Bn64 { scale, shift })
}

/// `prefix.conv.weight` (+ optional `prefix.conv.bias`) followed by `prefix.bn`, folded.
pub fn conv_bn(ck: &Checkpoint, prefix: &str) -> Result<Conv64> {
    let w = ck.get(&format!("{prefix}.conv.weight"))?;
    let cout = w.shape()[0];
    let b = match ck.tensors.get(&format!("{prefix}.conv.bias")) {
        Some(b) if b.shape() == [cout] => to64(b.data()),
        Some(b) => {
            return Err(Error::Weights(format!(
                "{prefix}.conv.bias: expected [{cout}], got {:?}",
                b.shape()
            )))
        }
        None => vec![0.0; cout],
    };
    let conv = Conv64 {
        cout,
        w: to64(w.data()),
        b,
    };
    Ok(conv.then_bn(&bn(ck, &format!("{prefix}.bn"))?))
}

/// The large-kernel layer of a RepLKBlock in deploy form: [dw, K, K] weight + bias.
pub fn large_kernel(ck: &Checkpoint, prefix: &str, form: Form) -> Result<Conv64> {
    match form {
        Form::Merged => {
            let w = ck.get(&format!("{prefix}.lkb_reparam.weight"))?;
            let b = ck.get(&format!("{prefix}.lkb_reparam.bias"))?;
            Ok(Conv64 {
                cout: w.shape()[0],
                w: to64(w.data()),
                b: to64(b.data()),
            })
        }
        Form::Training => {
            let mut big = conv_bn(ck, &format!("{prefix}.lkb_origin"))?;
            let k = ck.get(&format!("{prefix}.lkb_origin.conv.weight"))?.shape()[2];
            if ck
                .tensors
                .contains_key(&format!("{prefix}.small_conv.conv.weight"))
            {
                let small = conv_bn(ck, &format!("{prefix}.small_conv"))?;
                let sk = ck.get(&format!("{prefix}.small_conv.conv.weight"))?.shape()[2];
                merge_small(&mut big, k, &small, sk)?;
            }
            Ok(big)
        }
    }
}

/// Adds a small depthwise kernel (zero-padded to K at the centre) into a large one, biases summed.
pub fn merge_small(big: &mut Conv64, k: usize, small: &Conv64, sk: usize) -> Result<()> {
    if sk > k || !(k - sk).is_multiple_of(2) || small.cout != big.cout {
        return Err(Error::Weights(format!(
            "cannot merge a {sk}x{sk} kernel into a {k}x{k} one (sizes must differ by an even number)"
        )));
    }
    let off = (k - sk) / 2;
    for c in 0..big.cout {
        for y in 0..sk {
            for x in 0..sk {
                big.w[c * k * k + (y + off) * k + x + off] += small.w[c * sk * sk + y * sk + x];
            }
        }
        big.b[c] += small.b[c];
    }
    Ok(())
}

fn pointwise(conv: &Conv64) -> Pointwise {
    let (w, b) = conv.to_f32();
    Pointwise {
        cin: conv.row_len(),
        cout: conv.cout,
        w,
        b,
        bf16: None,
    }
}

fn depthwise(conv: &Conv64, k: usize, stride: usize) -> Depthwise {
    let (w, b) = conv.to_f32();
    Depthwise {
        c: conv.cout,
        k,
        stride,
        w,
        b,
        bf16: false,
    }
}

/// Stem in deploy form.
pub fn fold_stem(ck: &Checkpoint) -> Result<Stem> {
    let c0 = conv_bn(ck, "stem.0")?;
    let (w, b) = c0.to_f32();
    Ok(Stem {
        conv0: DenseConv {
            cin: ck.config.in_channels,
            cout: c0.cout,
            k: 3,
            stride: 2,
            pad: 1,
            w,
            b,
        },
        conv1: depthwise(&conv_bn(ck, "stem.1")?, 3, 1),
        conv2: pointwise(&conv_bn(ck, "stem.2")?),
        conv3: depthwise(&conv_bn(ck, "stem.3")?, 3, 2),
    })
}

/// A block's `pw1` conv_bn with the block's pre-BN (`{prefix}.{pre}`) folded in:
/// pw1(bn(x)), the pre-BN acting on pw1's input and pw1's own BN on its output.
fn pw1_with_pre_bn(ck: &Checkpoint, prefix: &str, pre: &str) -> Result<Conv64> {
    let pre = bn(ck, &format!("{prefix}.{pre}"))?;
    let w1 = ck.get(&format!("{prefix}.pw1.conv.weight"))?;
    let b = match ck.tensors.get(&format!("{prefix}.pw1.conv.bias")) {
        Some(b) => to64(b.data()),
        None => vec![0.0; w1.shape()[0]],
    };
    Ok(Conv64 {
        cout: w1.shape()[0],
        w: to64(w1.data()),
        b,
    }
    .after_bn(&pre)
    .then_bn(&bn(ck, &format!("{prefix}.pw1.bn"))?))
}

/// RepLKBlock `stages.{s}.blocks.{2i}` in deploy form.
pub fn fold_replk_block(ck: &Checkpoint, s: usize, i: usize) -> Result<RepLkBlock> {
    let p = format!("stages.{s}.blocks.{}", 2 * i);
    let conv1 = pw1_with_pre_bn(ck, &p, "prelkb_bn")?;
    let form = ck.forms[s][i];
    let k = ck.config.large_kernel_sizes[s];
    let lk = large_kernel(ck, &format!("{p}.large_kernel"), form)?;
    Ok(RepLkBlock {
        pw1: pointwise(&conv1),
        lk: depthwise(&lk, k, 1),
        pw2: pointwise(&conv_bn(ck, &format!("{p}.pw2"))?),
    })
}

/// ConvFFN `stages.{s}.blocks.{2i+1}` in deploy form.
pub fn fold_ffn_block(ck: &Checkpoint, s: usize, i: usize) -> Result<FfnBlock> {
    let p = format!("stages.{s}.blocks.{}", 2 * i + 1);
    let conv1 = pw1_with_pre_bn(ck, &p, "preffn_bn")?;
    Ok(FfnBlock {
        pw1: pointwise(&conv1),
        pw2: pointwise(&conv_bn(ck, &format!("{p}.pw2"))?),
    })
}

/// Transition `t` in deploy form.
pub fn fold_transition(ck: &Checkpoint, t: usize) -> Result<Transition> {
    Ok(Transition {
        pw: pointwise(&conv_bn(ck, &format!("transitions.{t}.0"))?),
        dw: depthwise(&conv_bn(ck, &format!("transitions.{t}.1"))?, 3, 2),
    })
}

fn affine(b: &Bn64) -> Affine {
    Affine {
        scale: b.scale.iter().map(|&v| v as f32).collect(),
        shift: b.shift.iter().map(|&v| v as f32).collect(),
    }
}

/// The whole model in deploy form.
pub fn fold(ck: &Checkpoint) -> Result<DeployModel> {
    fold_from(ck)
}

/// The whole model in deploy form from a checkpoint it consumes: each part's tensors are dropped
/// once folded, so that the checkpoint and the deploy model are never both whole in memory.
pub fn fold_owned(ck: Checkpoint) -> Result<DeployModel> {
    fold_from(ck)
}

/// Where `fold_from` reads the tensors, and whether it may drop those it has folded.
trait Source {
    fn ck(&self) -> &Checkpoint;
    /// Drops the tensors named `{part}.*` (a no-op for a borrowed checkpoint).
    fn done(&mut self, part: &str);
}

impl Source for &Checkpoint {
    fn ck(&self) -> &Checkpoint {
        self
    }
    fn done(&mut self, _part: &str) {}
}

impl Source for Checkpoint {
    fn ck(&self) -> &Checkpoint {
        self
    }
    fn done(&mut self, part: &str) {
        let prefix = format!("{part}.");
        self.tensors.retain(|name, _| !name.starts_with(&prefix));
    }
}

fn fold_from(mut src: impl Source) -> Result<DeployModel> {
    let cfg = src.ck().config.clone();
    let stem = fold_stem(src.ck())?;
    src.done("stem");
    let mut stages = Vec::with_capacity(cfg.num_stages());
    let mut transitions = Vec::new();
    for s in 0..cfg.num_stages() {
        let mut blocks = Vec::with_capacity(2 * cfg.layers[s]);
        for i in 0..cfg.layers[s] {
            blocks.push(Block::RepLk(fold_replk_block(src.ck(), s, i)?));
            src.done(&format!("stages.{s}.blocks.{}", 2 * i));
            blocks.push(Block::Ffn(fold_ffn_block(src.ck(), s, i)?));
            src.done(&format!("stages.{s}.blocks.{}", 2 * i + 1));
        }
        let norm = if src.ck().stage_norms[s] {
            Some(affine(&bn(src.ck(), &format!("stages.{s}.norm"))?))
        } else {
            None
        };
        stages.push(Stage { blocks, norm });
        if s + 1 < cfg.num_stages() {
            transitions.push(fold_transition(src.ck(), s)?);
            src.done(&format!("transitions.{s}"));
        }
    }
    let ck = src.ck();
    let head = if ck.has_head {
        let fc = ck.get("head.weight")?;
        Some(Head {
            norm: affine(&bn(ck, "norm")?),
            classes: fc.shape()[0],
            w: fc.data().to_vec(),
            b: ck.get("head.bias")?.data().to_vec(),
        })
    } else {
        None
    };
    Ok(DeployModel {
        config: cfg,
        stem,
        stages,
        transitions,
        head,
    })
}
