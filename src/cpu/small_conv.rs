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
//! compiled for AVX-512, AVX2 + FMA and portable targets and picked at run time.

use rayon::prelude::*;

#[cfg(target_arch = "x86_64")]
use super::activation::{act16, act8, tail_mask8};
use super::activation::{bias_act, Activation};
use super::direct::{check_len, detect_isa, Isa};
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
        let isa = detect_isa();
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
                    conv_plane(isa, finite, &g, ph, taps, bias[c], act, yp);
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
                    conv_plane(isa, finite, &g, ph, taps, bias[o], act, yp);
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

/// One output plane from the phases of its group's input channels. With `finite_weights`
/// the vector kernels run (they multiply the zero padding by the weights, harmless only for
/// finite weights); otherwise, and without AVX2, the exact loop.
#[allow(clippy::too_many_arguments)]
fn conv_plane(
    isa: Isa,
    finite_weights: bool,
    g: &Geom,
    ph: &[f32],
    taps: &[f32],
    bias: f32,
    act: Activation,
    y: &mut [f32],
) {
    #[cfg(target_arch = "x86_64")]
    if finite_weights {
        match isa {
            // SAFETY: AVX-512F was detected at run time.
            Isa::Avx512 => return unsafe { conv_plane_avx512(g, ph, taps, bias, act, y) },
            // SAFETY: AVX2 and FMA were detected at run time.
            Isa::Avx2 => return unsafe { conv_plane_avx2(g, ph, taps, bias, act, y) },
            Isa::Portable => {}
        }
    }
    let _ = (isa, finite_weights);
    conv_plane_exact(g, ph, taps, bias, act, y)
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

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
fn conv_plane_avx512(
    g: &Geom,
    ph: &[f32],
    taps: &[f32],
    bias: f32,
    act: Activation,
    y: &mut [f32],
) {
    for oy in 0..g.oh {
        let mut c0 = 0;
        while c0 < g.ow {
            let vecs = (g.ow - c0).div_ceil(16).min(BLOCK_VECS);
            match vecs {
                1 => block_avx512::<1>(g, ph, taps, bias, act, y, oy, c0),
                2 => block_avx512::<2>(g, ph, taps, bias, act, y, oy, c0),
                3 => block_avx512::<3>(g, ph, taps, bias, act, y, oy, c0),
                _ => block_avx512::<4>(g, ph, taps, bias, act, y, oy, c0),
            }
            c0 += 16 * vecs;
        }
    }
}

/// Output row `oy`, columns [c0, c0 + 16 Z) clipped to the row: Z accumulators over every tap.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
#[allow(clippy::too_many_arguments)]
fn block_avx512<const Z: usize>(
    g: &Geom,
    ph: &[f32],
    taps: &[f32],
    bias: f32,
    act: Activation,
    y: &mut [f32],
    oy: usize,
    c0: usize,
) {
    use std::arch::x86_64::*;
    let (k, s, len) = (g.k, g.s, g.len);
    let plane = g.plane_len();
    let mut masks = [0u16; Z];
    for (z, m) in masks.iter_mut().enumerate() {
        let n = g.ow.saturating_sub(c0 + 16 * z).min(16);
        *m = ((1u32 << n) - 1) as u16;
    }
    let mut acc = [_mm512_set1_ps(bias); Z];
    let (ky_lo, ky_hi) = tap_rows(g, oy);
    for (chan, ctaps) in ph.chunks_exact(plane).zip(taps.chunks_exact(k * k)) {
        for ky in ky_lo..ky_hi {
            let r = oy * s + ky;
            for kx in 0..k {
                let wv = _mm512_set1_ps(ctaps[ky * k + kx]);
                let row = &chan[(r * s + kx % s) * len..][..len];
                let base = row.as_ptr();
                for z in 0..Z {
                    // SAFETY: unmasked lanes are columns kx/s + c0 + 16z + lane with
                    // c0 + 16z + lane < ow, and ow + (k-1)/s <= len: inside `row`.
                    let v =
                        unsafe { _mm512_maskz_loadu_ps(masks[z], base.add(kx / s + c0 + 16 * z)) };
                    acc[z] = _mm512_fmadd_ps(wv, v, acc[z]);
                }
            }
        }
    }
    let out = &mut y[oy * g.ow..(oy + 1) * g.ow];
    for z in 0..Z {
        // SAFETY: unmasked lanes are columns c0 + 16z + lane < ow of this output row.
        unsafe {
            _mm512_mask_storeu_ps(
                out.as_mut_ptr().add(c0 + 16 * z),
                masks[z],
                act16(acc[z], act),
            )
        };
    }
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
fn conv_plane_avx2(g: &Geom, ph: &[f32], taps: &[f32], bias: f32, act: Activation, y: &mut [f32]) {
    for oy in 0..g.oh {
        let mut c0 = 0;
        while c0 < g.ow {
            let vecs = (g.ow - c0).div_ceil(8).min(BLOCK_VECS);
            match vecs {
                1 => block_avx2::<1>(g, ph, taps, bias, act, y, oy, c0),
                2 => block_avx2::<2>(g, ph, taps, bias, act, y, oy, c0),
                3 => block_avx2::<3>(g, ph, taps, bias, act, y, oy, c0),
                _ => block_avx2::<4>(g, ph, taps, bias, act, y, oy, c0),
            }
            c0 += 8 * vecs;
        }
    }
}

/// `block_avx512` with 8-lane vectors.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
#[allow(clippy::too_many_arguments)]
fn block_avx2<const Z: usize>(
    g: &Geom,
    ph: &[f32],
    taps: &[f32],
    bias: f32,
    act: Activation,
    y: &mut [f32],
    oy: usize,
    c0: usize,
) {
    use std::arch::x86_64::*;
    let (k, s, len) = (g.k, g.s, g.len);
    let plane = g.plane_len();
    let mut masks = [_mm256_setzero_si256(); Z];
    for (z, m) in masks.iter_mut().enumerate() {
        *m = tail_mask8(g.ow.saturating_sub(c0 + 8 * z).min(8));
    }
    let mut acc = [_mm256_set1_ps(bias); Z];
    let (ky_lo, ky_hi) = tap_rows(g, oy);
    for (chan, ctaps) in ph.chunks_exact(plane).zip(taps.chunks_exact(k * k)) {
        for ky in ky_lo..ky_hi {
            let row = &chan[(oy * s + ky) * s * len..][..s * len];
            for (&wk, &off) in ctaps[ky * k..(ky + 1) * k].iter().zip(&g.tap_off) {
                let wv = _mm256_set1_ps(wk);
                let base = row.as_ptr().wrapping_add(off + c0);
                for z in 0..Z {
                    // SAFETY: as in `block_avx512` (masked lanes are not read).
                    let v = unsafe { _mm256_maskload_ps(base.add(8 * z), masks[z]) };
                    acc[z] = _mm256_fmadd_ps(wv, v, acc[z]);
                }
            }
        }
    }
    let out = &mut y[oy * g.ow..(oy + 1) * g.ow];
    for z in 0..Z {
        // SAFETY: unmasked lanes are columns c0 + 8z + lane < ow of this output row.
        unsafe {
            _mm256_maskstore_ps(
                out.as_mut_ptr().add(c0 + 8 * z),
                masks[z],
                act8(acc[z], act),
            )
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
