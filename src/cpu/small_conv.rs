//! Small-kernel convolutions of RepLKNet's stem and transitions (the dense 3x3 stride-2 stem
//! conv, the 3x3 depthwise convs with stride 1 and 2), with the bias and activation fused:
//! `y = act(conv(x, w) + b)`, NCHW, K x K, any stride, zero padding, `groups` groups
//! (1 = dense, C = depthwise), dilation 1.
//!
//! Each input plane is first split into `stride` column phases (zero-padded rows, phase q of
//! padded row r holds the padded columns q, q + s, q + 2s, ...), so that every tap reads a
//! contiguous run: output row `oy`, tap (ky, kx) reads phase `kx % s` of padded row
//! `oy * s + ky` from column `ox + kx / s`. An output row is accumulated in place, one
//! vectorisable multiply-add sweep per tap. Only taps inside the image are summed (the padding
//! is never read), so non-finite values propagate exactly as in the reference. The same code is
//! written once over `cpu::simd` for AVX-512 and AVX2 + FMA, with the exact loop as the
//! portable path, and picked at run time.

use rayon::prelude::*;

use super::activation::{act_lanes, bias_act, Activation};
use super::direct::check_len;
use super::simd::{dispatch, Simd, SimdOp};
use crate::error::{Error, Result};
use crate::plan::model::DenseConvShape;

/// A K x K grouped convolution (dilation 1, `pad` zeros on every side).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct GroupedConv {
    pub cin: usize,
    pub cout: usize,
    pub groups: usize,
    pub k: usize,
    pub stride: usize,
    pub pad: usize,
}

/// The geometry of one call on an `h x w` image.
struct Geom {
    k: usize,
    s: usize,
    h: usize,
    oh: usize,
    ow: usize,
    /// Floats per phase row.
    len: usize,
    /// Output columns [lo, hi) whose tap kx lands inside the image.
    ox_range: Vec<(usize, usize)>,
    /// Offset of tap kx's run from the start of its padded row's phases: (kx % s) * len + kx / s.
    tap_off: Vec<usize>,
    /// Padded rows.
    rows: usize,
    pad: usize,
}

impl Geom {
    fn new(c: &GroupedConv, h: usize, w: usize, oh: usize, ow: usize) -> Self {
        let (k, s, p) = (c.k, c.stride, c.pad);
        let ox_range = (0..k)
            .map(|kx| {
                // Image column ox * s + kx - p must lie in [0, w).
                let lo = p.saturating_sub(kx).div_ceil(s).min(ow);
                let hi = if w + p > kx {
                    ((w + p - kx - 1) / s + 1).min(ow)
                } else {
                    0
                };
                (lo, hi.max(lo))
            })
            .collect();
        let len = (w + 2 * p).div_ceil(s).max(ow + (k - 1) / s);
        Geom {
            k,
            s,
            h,
            oh,
            ow,
            len,
            ox_range,
            tap_off: (0..k).map(|kx| (kx % s) * len + kx / s).collect(),
            rows: h + 2 * p,
            pad: p,
        }
    }

    /// Floats in one plane's phases.
    fn plane_len(&self) -> usize {
        self.rows * self.s * self.len
    }

    /// Splits one `h x w` input plane into its zero-padded column phases.
    fn split(&self, plane: &[f32], w: usize, out: &mut [f32]) {
        out.fill(0.0);
        let (s, p, len) = (self.s, self.pad, self.len);
        for (iy, src) in plane.chunks_exact(w).enumerate() {
            let r = iy + p;
            if s == 2 {
                // One pass over column pairs: image column ix is padded column ix + p, entry
                // (ix + p) / 2 of phase (ix + p) % 2 (a strided copy per phase ran at 3 cycles
                // a float and took 70% of a stride-2 3x3 conv).
                let row = &mut out[r * 2 * len..(r + 1) * 2 * len];
                let (phase0, phase1) = row.split_at_mut(len);
                let (dst_even_ix, dst_odd_ix) = if p.is_multiple_of(2) {
                    (&mut phase0[p / 2..], &mut phase1[p / 2..])
                } else {
                    (&mut phase1[p / 2..], &mut phase0[p.div_ceil(2)..])
                };
                for ((de, d_o), pair) in dst_even_ix
                    .iter_mut()
                    .zip(dst_odd_ix.iter_mut())
                    .zip(src.chunks_exact(2))
                {
                    *de = pair[0];
                    *d_o = pair[1];
                }
                if !w.is_multiple_of(2) {
                    dst_even_ix[w / 2] = src[w - 1];
                }
                continue;
            }
            for q in 0..s {
                // Phase q, entry j holds padded column j * s + q = image column j * s + q - p.
                let j0 = p.saturating_sub(q).div_ceil(s);
                let Some(ix0) = (j0 * s + q).checked_sub(p).filter(|&ix| ix < w) else {
                    continue;
                };
                let dst = &mut out[(r * s + q) * len + j0..(r * s + q + 1) * len];
                if s == 1 {
                    let n = (w - ix0).min(dst.len());
                    dst[..n].copy_from_slice(&src[ix0..ix0 + n]);
                } else {
                    for (d, &v) in dst.iter_mut().zip(src[ix0..].iter().step_by(s)) {
                        *d = v;
                    }
                }
            }
        }
    }
}

impl GroupedConv {
    fn shape(&self) -> DenseConvShape {
        DenseConvShape {
            cout: self.cout,
            k: self.k,
            stride: self.stride,
            pad: self.pad,
        }
    }

    /// Output (OH, OW) for an input of (H, W).
    pub fn out_hw(&self, h: usize, w: usize) -> Result<(usize, usize)> {
        self.shape().out_hw(h, w)
    }

    /// `y = act(conv(x, w) + b)` for `x` of `[n, cin, h, w]`, `weight` of
    /// `[cout, cin / groups, k, k]`, `bias` of `[cout]`, `y` of `[n, cout, oh, ow]`.
    /// Returns (OH, OW).
    #[allow(clippy::too_many_arguments)]
    pub fn forward_into(
        &self,
        x: &[f32],
        [n, h, w]: [usize; 3],
        weight: &[f32],
        bias: &[f32],
        act: Activation,
        y: &mut [f32],
    ) -> Result<(usize, usize)> {
        if self.groups == 0
            || self.cin == 0
            || !self.cin.is_multiple_of(self.groups)
            || !self.cout.is_multiple_of(self.groups)
        {
            return Err(Error::InvalidArgument(format!(
                "grouped conv: {} groups must divide {} (>= 1) input and {} output channels",
                self.groups, self.cin, self.cout
            )));
        }
        let (oh, ow) = self.out_hw(h, w)?;
        let cpg = self.cin / self.groups;
        let overflow = || Error::Overflow("grouped conv sizes".into());
        let x_len = [n, self.cin, h, w]
            .iter()
            .try_fold(1usize, |a, &b| a.checked_mul(b))
            .ok_or_else(overflow)?;
        let y_len = [n, self.cout, oh, ow]
            .iter()
            .try_fold(1usize, |a, &b| a.checked_mul(b))
            .ok_or_else(overflow)?;
        check_len("x", x.len(), x_len)?;
        check_len("weight", weight.len(), self.cout * cpg * self.k * self.k)?;
        check_len("bias", bias.len(), self.cout)?;
        check_len("y", y.len(), y_len)?;
        if y_len == 0 {
            return Ok((oh, ow));
        }
        let g = Geom::new(self, h, w, oh, ow);
        let (hw, ohw, kk) = (h * w, oh * ow, self.k * self.k);
        let opg = self.cout / self.groups;
        let finite = weight.iter().all(|v| v.is_finite());
        if cpg == 1 && opg == 1 {
            // Depthwise: each task splits its own plane (stays in the core's cache).
            y.par_chunks_mut(ohw)
                .enumerate()
                .for_each_init(Vec::new, |buf, (plane, yp)| {
                    let c = plane % self.cout;
                    let ph = grow(buf, g.plane_len());
                    g.split(&x[plane * hw..(plane + 1) * hw], w, ph);
                    let taps = &weight[c * kk..(c + 1) * kk];
                    ConvPlane {
                        g: &g,
                        ph,
                        taps,
                        bias: bias[c],
                        act,
                        y: yp,
                    }
                    .run(finite);
                });
        } else {
            let mut phases = vec![0.0f32; self.cin * g.plane_len()];
            for (xi, yi) in x
                .chunks_exact(self.cin * hw)
                .zip(y.chunks_exact_mut(self.cout * ohw))
            {
                phases
                    .par_chunks_mut(g.plane_len())
                    .zip(xi.par_chunks(hw))
                    .for_each(|(ph, plane)| g.split(plane, w, ph));
                let phases = &phases;
                yi.par_chunks_mut(ohw).enumerate().for_each(|(o, yp)| {
                    let grp = o / opg;
                    let ph = &phases[grp * cpg * g.plane_len()..(grp + 1) * cpg * g.plane_len()];
                    let taps = &weight[o * cpg * kk..(o + 1) * cpg * kk];
                    ConvPlane {
                        g: &g,
                        ph,
                        taps,
                        bias: bias[o],
                        act,
                        y: yp,
                    }
                    .run(finite);
                });
            }
        }
        Ok((oh, ow))
    }
}

/// A buffer of exactly `len` floats (grown once per thread, then reused).
fn grow(buf: &mut Vec<f32>, len: usize) -> &mut [f32] {
    if buf.len() < len {
        buf.resize(len, 0.0);
    }
    &mut buf[..len]
}

/// Taps rows [lo, hi) of output row `oy` that land inside the image.
fn tap_rows(g: &Geom, oy: usize) -> (usize, usize) {
    let r0 = oy * g.s;
    let lo = g.pad.saturating_sub(r0).min(g.k);
    let hi = (g.pad + g.h).saturating_sub(r0).min(g.k);
    (lo, hi.max(lo))
}

/// Output columns per register block: 4 vectors, independent FMA chains.
const BLOCK_VECS: usize = 4;

/// One output plane `y` from the phases `ph` of its group's input channels and their taps.
/// `Y` is the plane's storage, handed back by the kernel (a slice of the output tensor, or a
/// test's own vector).
struct ConvPlane<'a, Y> {
    g: &'a Geom,
    ph: &'a [f32],
    taps: &'a [f32],
    bias: f32,
    act: Activation,
    y: Y,
}

impl<Y: AsMut<[f32]>> ConvPlane<'_, Y> {
    /// With `finite_weights` the vector kernel (it multiplies the zero padding by the weights,
    /// harmless only for finite weights); otherwise, and without AVX2, the exact loop.
    fn run(self, finite_weights: bool) -> Y {
        if finite_weights {
            dispatch(self)
        } else {
            self.portable()
        }
    }
}

impl<Y: AsMut<[f32]>> SimdOp for ConvPlane<'_, Y> {
    type Output = Y;

    #[inline(always)]
    fn vector<S: Simd>(self, s: S) -> Y {
        let ConvPlane {
            g,
            ph,
            taps,
            bias,
            act,
            y: mut plane,
        } = self;
        let y = plane.as_mut();
        for oy in 0..g.oh {
            let mut c0 = 0;
            while c0 < g.ow {
                let vecs = (g.ow - c0).div_ceil(S::LANES).min(BLOCK_VECS);
                // Whole vectors use plain loads and stores: AVX2's masked ones are slow on
                // AMD cores (the stem's stride-1 3x3 conv ran 1.3-1.9x slower with masks
                // everywhere). Only a block that reaches the row's end has a partial vector,
                // its last one.
                if c0 + S::LANES * vecs <= g.ow {
                    match vecs {
                        1 => block::<S, 1, false>(s, g, ph, taps, bias, act, y, oy, c0),
                        2 => block::<S, 2, false>(s, g, ph, taps, bias, act, y, oy, c0),
                        3 => block::<S, 3, false>(s, g, ph, taps, bias, act, y, oy, c0),
                        _ => block::<S, 4, false>(s, g, ph, taps, bias, act, y, oy, c0),
                    }
                } else {
                    match vecs {
                        1 => block::<S, 1, true>(s, g, ph, taps, bias, act, y, oy, c0),
                        2 => block::<S, 2, true>(s, g, ph, taps, bias, act, y, oy, c0),
                        3 => block::<S, 3, true>(s, g, ph, taps, bias, act, y, oy, c0),
                        _ => block::<S, 4, true>(s, g, ph, taps, bias, act, y, oy, c0),
                    }
                }
                c0 += S::LANES * vecs;
            }
        }
        plane
    }

    fn portable(mut self) -> Y {
        conv_plane_exact(
            self.g,
            self.ph,
            self.taps,
            self.bias,
            self.act,
            self.y.as_mut(),
        );
        self.y
    }
}

/// Output row `oy`, columns [c0, c0 + Z LANES) clipped to the row: Z accumulators over every
/// tap. Without `TAIL` the Z vectors lie wholly inside the row; with it the last one is cut by
/// the row's end and masked.
#[inline(always)]
#[allow(clippy::too_many_arguments)]
fn block<S: Simd, const Z: usize, const TAIL: bool>(
    s: S,
    g: &Geom,
    ph: &[f32],
    taps: &[f32],
    bias: f32,
    act: Activation,
    y: &mut [f32],
    oy: usize,
    c0: usize,
) {
    let lanes = S::LANES;
    let last = c0 + lanes * (Z - 1);
    // The bounds every load and store below relies on.
    assert!(if TAIL {
        last < g.ow && g.ow < last + lanes
    } else {
        last + lanes <= g.ow
    });
    let (k, st, len) = (g.k, g.s, g.len);
    let tail = s.tail(g.ow.saturating_sub(last).min(lanes));
    let mut acc = [s.splat(bias); Z];
    let (ky_lo, ky_hi) = tap_rows(g, oy);
    // hoisted with its length k: otherwise reloaded per filter row (3% on the AVX2 stem conv)
    let tap_off = &g.tap_off[..k];
    for (chan, ctaps) in ph.chunks_exact(g.plane_len()).zip(taps.chunks_exact(k * k)) {
        for ky in ky_lo..ky_hi {
            let row = &chan[(oy * st + ky) * st * len..][..st * len];
            for (&wk, &off) in ctaps[ky * k..(ky + 1) * k].iter().zip(tap_off) {
                let wv = s.splat(wk);
                let base = row.as_ptr().wrapping_add(off + c0);
                for (z, acc) in acc.iter_mut().enumerate() {
                    // SAFETY: the lanes read (all but the masked-off ones of a tail vector) are
                    // columns kx/s + c0 + LANES z + lane of phase kx % s with
                    // c0 + LANES z + lane < ow (asserted above), and ow + (k-1)/s <= len:
                    // inside `row`.
                    let v = unsafe {
                        if TAIL && z == Z - 1 {
                            s.load_masked(base.add(lanes * z), tail)
                        } else {
                            s.load(base.add(lanes * z))
                        }
                    };
                    *acc = s.fma(wv, v, *acc);
                }
            }
        }
    }
    let out = &mut y[oy * g.ow..(oy + 1) * g.ow];
    for (z, &acc) in acc.iter().enumerate() {
        let v = act_lanes(s, acc, act);
        let dst = out.as_mut_ptr().wrapping_add(c0 + lanes * z);
        // SAFETY: the lanes written are columns c0 + LANES z + lane < ow of this output row
        // (asserted above; a tail vector's others are masked off).
        unsafe {
            if TAIL && z == Z - 1 {
                s.store_masked(dst, tail, v)
            } else {
                s.store(dst, v)
            }
        };
    }
}

/// The exact loop: only taps inside the image, one multiply-add sweep per tap.
fn conv_plane_exact(g: &Geom, ph: &[f32], taps: &[f32], bias: f32, act: Activation, y: &mut [f32]) {
    let (k, s, len) = (g.k, g.s, g.len);
    let plane = g.plane_len();
    for (oy, yrow) in y.chunks_exact_mut(g.ow).enumerate().take(g.oh) {
        yrow.fill(0.0);
        let (ky_lo, ky_hi) = tap_rows(g, oy);
        for (chan, ctaps) in ph.chunks_exact(plane).zip(taps.chunks_exact(k * k)) {
            for ky in ky_lo..ky_hi {
                let r = oy * s + ky;
                for (kx, &wv) in ctaps[ky * k..(ky + 1) * k].iter().enumerate() {
                    let (lo, hi) = g.ox_range[kx];
                    let src = &chan[(r * s + kx % s) * len + kx / s..][lo..hi];
                    for (o, &v) in yrow[lo..hi].iter_mut().zip(src) {
                        *o += wv * v;
                    }
                }
            }
        }
        bias_act(yrow, bias, act);
    }
}

#[cfg(all(test, target_arch = "x86_64"))]
mod tests {
    use super::*;
    use crate::cpu::activation::GELU_REL_ERROR;
    use crate::cpu::simd::each_vector_isa;
    use crate::rng::Rng;

    /// Every vector body this CPU can run, in this process, against the exact loop on random
    /// planes: strides 1 and 2, odd kernels, several input channels, a kernel larger than the
    /// image, a 1 x 1 image, widths around the vector lengths.
    #[test]
    fn every_vector_isa_matches_the_exact_loop() {
        let mut rng = Rng::for_test("every_vector_isa_matches_the_exact_loop");
        let mut isas = Vec::new();
        let cases = [
            (3, 3, 2, 1, 17, 23),
            (1, 3, 1, 1, 15, 40),
            (1, 3, 2, 1, 15, 33),
            (1, 5, 1, 2, 9, 70),
            (1, 7, 2, 3, 5, 6),
            (2, 9, 1, 4, 3, 4),
            (1, 3, 1, 1, 1, 1),
            // Output widths of 1-4 whole vectors on each ISA (no tail), and RepLKNet's 28, 14
            // and 7 (a masked last vector after whole ones).
            (1, 3, 1, 1, 3, 16),
            (1, 3, 1, 1, 3, 24),
            (1, 3, 1, 1, 2, 32),
            (1, 3, 1, 1, 3, 48),
            (1, 3, 1, 1, 2, 64),
            (2, 3, 2, 1, 5, 56),
            (1, 3, 1, 1, 3, 28),
            (1, 3, 2, 1, 4, 14),
            (4, 3, 2, 1, 12, 129),
        ];
        for (cpg, k, stride, pad, h, w) in cases {
            let conv = GroupedConv {
                cin: cpg,
                cout: 1,
                groups: 1,
                k,
                stride,
                pad,
            };
            let (oh, ow) = conv.out_hw(h, w).unwrap();
            let g = Geom::new(&conv, h, w, oh, ow);
            let x = rng.vec_pm1(cpg * h * w);
            let split = |x: &[f32]| {
                let mut ph = vec![f32::NAN; cpg * g.plane_len()];
                for (src, dst) in x
                    .chunks_exact(h * w)
                    .zip(ph.chunks_exact_mut(g.plane_len()))
                {
                    g.split(src, w, dst);
                }
                ph
            };
            let ph = split(&x);
            let taps = rng.vec_pm1(cpg * k * k);
            let bias = rng.uniform_pm1();
            // sum |w x| + |b| per output: the scale of the rounding error
            let abs = |v: &[f32]| v.iter().map(|f| f.abs()).collect::<Vec<_>>();
            let mut scale = vec![f32::NAN; oh * ow];
            conv_plane_exact(
                &g,
                &split(&abs(&x)),
                &abs(&taps),
                bias.abs(),
                Activation::Identity,
                &mut scale,
            );
            let terms = (cpg * k * k + 1) as f64;
            for act in [Activation::Identity, Activation::Relu, Activation::Gelu] {
                let op = || ConvPlane {
                    g: &g,
                    ph: &ph,
                    taps: &taps,
                    bias,
                    act,
                    y: vec![f32::NAN; oh * ow],
                };
                let want = op().portable();
                each_vector_isa(op, |isa, got| {
                    isas.push(isa.to_string());
                    for (i, (&gv, &wv)) in got.iter().zip(&want).enumerate() {
                        // GELU's slope is below 1.13; both sides carry its rounding error.
                        let tol = 1.2 * 2.0 * terms * f32::EPSILON as f64 * scale[i] as f64
                            + 3.0 * GELU_REL_ERROR * wv.abs() as f64
                            + 1e-30;
                        assert!(
                            (gv as f64 - wv as f64).abs() <= tol,
                            "{isa} {act:?} {conv:?} on {h}x{w}: output {i} = {gv}, want {wv}"
                        );
                    }
                });
            }
        }
        isas.sort();
        isas.dedup();
        println!("checked in-process: {isas:?}");
    }
}
