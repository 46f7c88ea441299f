//! Depthwise forward and data gradient in bf16: input and filter rounded to bf16, products
//! summed in f32.
//!
//! Two kernels ([`DwKernel`]). `F32` runs the f32 fast path (`direct.rs`) on the rounded
//! operands: the f32 kernels are bound by FMA throughput, not memory, so reading bf16 directly
//! and converting on load would save nothing there. `PairedDot` uses `vdpbf16ps` (AVX-512 BF16),
//! which multiplies two taps per f32 lane: each input row is stored once as pair words (word j
//! holds the bf16 values of padded columns j and j + 1), so the 16 outputs ox..ox + 16 at the
//! tap pair (2q, 2q + 1) read one 64-byte load at word ox + 2q and the filter pair is one
//! broadcast word, half the instructions of the f32 kernel per tap, blocked like `direct.rs`
//! (R output rows x Z 16-lane vectors, filters padded with zero rows). On this project's Xeon
//! (AMX, AVX-512 BF16) `vdpbf16ps` issues at about half the rate of the f32 FMA, and the paired
//! kernel measured 0.3-0.55x the f32 kernel's speed (BENCHMARKS.md, "CPU bf16"), so `F32` is
//! the default; `PairedDot` stays for CPUs where `vdpbf16ps` issues as fast as an FMA. (For
//! bf16 tensors the fast path's f32 kernels on the exactly converted values are `F32` already.)

#![allow(clippy::needless_range_loop)]

use rayon::prelude::*;

use super::bf16::{pack_pairs, round_slice, to_bf16_bits, Bf16Isa};
use super::direct::check_len;
use super::naive::Correlation;
use crate::conv::{ConvShape, DwConv2d};
use crate::error::Result;

/// Planes up to this many pixels take the f32 lane-per-plane kernel (as in `direct.rs`).
const SMALL_PLANE: usize = 100;
/// Most output rows in one block; filters get this many minus one zero rows on each side.
const MAX_ROWS: usize = 8;
const FILTER_PAD: usize = MAX_ROWS - 1;
/// Output rows per parallel task.
const BAND: usize = 16;

/// The depthwise bf16 kernel.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum DwKernel {
    /// The f32 fast path on bf16-rounded operands (any CPU; the default).
    F32,
    /// `vdpbf16ps`, two taps per lane (AVX-512 BF16 only).
    PairedDot,
}

impl DwKernel {
    /// The kernels this CPU can run.
    pub fn available() -> Vec<DwKernel> {
        let mut v = vec![DwKernel::F32];
        if Bf16Isa::Avx512Bf16.available() {
            v.push(DwKernel::PairedDot);
        }
        v
    }

    /// The faster kernel on the CPUs measured (see the module comment).
    pub fn best() -> DwKernel {
        DwKernel::F32
    }
}

/// y = conv(x, w) + bias with x and w rounded to bf16 and f32 sums, on f32 buffers; `shape`
/// from `conv.resolve`. Bias is added in f32 (not rounded). `PairedDot` where this CPU lacks
/// AVX-512 BF16, and on strided/dilated or small (up to 10 x 10) planes, runs `F32`.
pub fn forward_f32_into(
    kernel: DwKernel,
    conv: &DwConv2d,
    shape: &ConvShape,
    x: &[f32],
    w: &[f32],
    bias: Option<&[f32]>,
    y: &mut [f32],
) -> Result<()> {
    let s = conv.resolve(shape.n, shape.c, shape.h, shape.w)?;
    let (kh, kw) = conv.kernel;
    check_len("x", x.len(), s.input_len())?;
    check_len("w", w.len(), s.c * kh * kw)?;
    if let Some(b) = bias {
        check_len("bias", b.len(), s.c)?;
    }
    check_len("y", y.len(), s.output_len())?;
    if uses_dp(kernel, conv, &s) {
        let (top, left) = (conv.padding.top as isize, conv.padding.left as isize);
        correlate_dp(&s, kh, kw, top, left, x, w, bias, y);
        Ok(())
    } else {
        with_rounded(x, w, |xr, wr| {
            super::direct::forward_f32_into(conv, &s, xr, wr, bias, y)
        })
    }
}

/// dx from dy and w, both rounded to bf16, f32 sums, on f32 buffers (kernels as in
/// [`forward_f32_into`]).
pub fn data_grad_f32_into(
    kernel: DwKernel,
    conv: &DwConv2d,
    shape: &ConvShape,
    dy: &[f32],
    w: &[f32],
    dx: &mut [f32],
) -> Result<()> {
    let s = conv.resolve(shape.n, shape.c, shape.h, shape.w)?;
    let (kh, kw) = conv.kernel;
    check_len("dy", dy.len(), s.output_len())?;
    check_len("w", w.len(), s.c * kh * kw)?;
    check_len("dx", dx.len(), s.input_len())?;
    // dx = dy correlated with the filter rotated 180 degrees, padding K-1-p (may be negative).
    let t = ConvShape {
        n: s.n,
        c: s.c,
        h: s.oh,
        w: s.ow,
        oh: s.h,
        ow: s.w,
    };
    if uses_dp(kernel, conv, &t) {
        let mut flipped = w.to_vec();
        flipped.chunks_mut(kh * kw).for_each(<[f32]>::reverse);
        let top = kh as isize - 1 - conv.padding.top as isize;
        let left = kw as isize - 1 - conv.padding.left as isize;
        correlate_dp(&t, kh, kw, top, left, dy, &flipped, None, dx);
        Ok(())
    } else {
        with_rounded(dy, w, |dyr, wr| {
            super::direct::data_grad_f32_into(conv, &s, dyr, wr, dx)
        })
    }
}

/// Whether the `vdpbf16ps` kernel runs this correlation (`s`: source h x w -> oh x ow).
fn uses_dp(kernel: DwKernel, conv: &DwConv2d, s: &ConvShape) -> bool {
    kernel == DwKernel::PairedDot
        && Bf16Isa::Avx512Bf16.available()
        && conv.is_unit()
        && !(s.oh * s.ow <= SMALL_PLANE && s.h * s.w <= SMALL_PLANE)
}

thread_local! {
    /// The rounded copies of the last call on this thread, kept so that the next call (the next
    /// layer) reuses their memory instead of faulting in fresh pages.
    static ROUNDED: std::cell::RefCell<(Vec<f32>, Vec<f32>)> = Default::default();
}

/// Runs `f` on bf16-rounded copies of `a` and `b` (buffers reused per thread).
fn with_rounded<R>(a: &[f32], b: &[f32], f: impl FnOnce(&[f32], &[f32]) -> R) -> R {
    // Taken out of the cell for the call, so that a nested call finds it empty, not borrowed.
    let (mut ra, mut rb) = ROUNDED.with(|c| std::mem::take(&mut *c.borrow_mut()));
    ra.resize(a.len(), 0.0);
    rb.resize(b.len(), 0.0);
    ra.par_chunks_mut(1 << 16)
        .zip(a.par_chunks(1 << 16))
        .for_each(|(d, s)| round_slice(s, d));
    round_slice(b, &mut rb);
    let r = f(&ra[..a.len()], &rb[..b.len()]);
    ROUNDED.with(|c| *c.borrow_mut() = (ra, rb));
    r
}

fn rounded(v: &[f32]) -> Vec<f32> {
    let mut r = vec![0.0; v.len()];
    round_slice(v, &mut r);
    r
}

/// A block shape: R rows x Z vectors of 16 columns.
#[derive(Clone, Copy, Debug)]
struct Shape {
    rows: usize,
    vecs: usize,
}

impl Shape {
    fn for_columns(remaining: usize) -> Shape {
        let vecs = remaining.div_ceil(16).min(4);
        Shape {
            rows: if vecs == 1 { 8 } else { 4 },
            vecs,
        }
    }
}

/// One block's operands (see `FwdBlock` in `direct.rs`; here in pair words).
struct Block<'a> {
    /// Pair rows of the band, `p_stride` words apart.
    p: &'a [u32],
    p_stride: usize,
    r_lo: usize,
    r_hi: usize,
    /// The channel's filter pairs with FILTER_PAD zero rows above and below, `kwp` words a row.
    w: &'a [u32],
    kwp: usize,
    w_base: usize,
    c0: usize,
    bias: f32,
}

impl Block<'_> {
    fn check(&self, rows: usize, cols: usize) {
        assert!(self.c0 + 2 * (self.kwp - 1) + cols <= self.p_stride);
        if self.r_hi > self.r_lo {
            assert!(self.r_hi * self.p_stride <= self.p.len());
            assert!(self.w_base + 1 >= rows);
            assert!((self.w_base + self.r_hi - self.r_lo) * self.kwp <= self.w.len());
        }
    }

    /// R x Z block; results into `acc` rows of 64 floats.
    #[cfg(target_arch = "x86_64")]
    #[target_feature(enable = "avx512f,avx512bf16")]
    fn run<const R: usize, const Z: usize>(&self, acc_out: &mut [[f32; 64]; MAX_ROWS]) {
        use super::bf16::as_bf16_pairs;
        use std::arch::x86_64::*;
        self.check(R, 16 * Z);
        let mut acc = [[_mm512_set1_ps(self.bias); Z]; R];
        let kwp = self.kwp;
        for r in self.r_lo..self.r_hi {
            let pr = self.p[r * self.p_stride + self.c0..].as_ptr();
            let w0 = self.w[(self.w_base + (r - self.r_lo) + 1 - R) * kwp..].as_ptr();
            for q in 0..kwp {
                let mut xv = [_mm512_setzero_si512(); Z];
                for (z, v) in xv.iter_mut().enumerate() {
                    // SAFETY: word c0 + 2q + 16z + 15 < p_stride and row r < r_hi (`check`).
                    *v = unsafe { _mm512_loadu_si512(pr.add(2 * q + 16 * z) as *const __m512i) };
                }
                for i in 0..R {
                    // SAFETY: filter row w_base + (r - r_lo) - i is in bounds (`check`).
                    let wv = _mm512_set1_epi32(unsafe { *w0.add((R - 1 - i) * kwp + q) } as i32);
                    let wb = as_bf16_pairs(wv);
                    for z in 0..Z {
                        acc[i][z] = _mm512_dpbf16_ps(acc[i][z], as_bf16_pairs(xv[z]), wb);
                    }
                }
            }
        }
        for i in 0..R {
            for z in 0..Z {
                // SAFETY: each row of acc_out holds 64 >= 16 Z floats.
                unsafe { _mm512_storeu_ps(acc_out[i].as_mut_ptr().add(16 * z), acc[i][z]) };
            }
        }
    }

    fn dispatch(&self, shape: Shape, acc: &mut [[f32; 64]; MAX_ROWS]) {
        #[cfg(target_arch = "x86_64")]
        // SAFETY (every arm): only reached when `uses_dp` found AVX-512 BF16.
        unsafe {
            match (shape.rows, shape.vecs) {
                (8, 1) => self.run::<8, 1>(acc),
                (4, 2) => self.run::<4, 2>(acc),
                (4, 3) => self.run::<4, 3>(acc),
                (4, 4) => self.run::<4, 4>(acc),
                other => unreachable!("no bf16 block {other:?}"),
            }
        }
        #[cfg(not(target_arch = "x86_64"))]
        {
            let _ = (shape, acc);
            unreachable!("AVX-512 BF16 is x86-64 only");
        }
    }
}

/// Stride-1 correlation of every plane with signed padding (see `correlate_unit` in direct.rs).
#[allow(clippy::too_many_arguments)]
fn correlate_dp(
    s: &ConvShape,
    kh: usize,
    kw: usize,
    top: isize,
    left: isize,
    x: &[f32],
    w: &[f32],
    bias: Option<&[f32]>,
    y: &mut [f32],
) {
    let mut blocks = Vec::new();
    let mut c0 = 0;
    while c0 < s.ow {
        let shape = Shape::for_columns(s.ow - c0);
        blocks.push((c0, shape));
        c0 += 16 * shape.vecs;
    }
    let kwp = kw.div_ceil(2);
    // Word j pairs padded columns j and j + 1; a block reads words up to c0 + 2(kwp-1) + 16Z.
    let p_stride = c0 + 2 * kwp;
    let wp_rows = kh + 2 * FILTER_PAD;
    let (h, oh, ow) = (s.h as isize, s.oh, s.ow);
    y.par_chunks_mut(oh * ow)
        .enumerate()
        .for_each(|(plane, y_plane)| {
            let c = plane % s.c;
            let x_plane = &x[plane * s.h * s.w..(plane + 1) * s.h * s.w];
            let w_plane = &w[c * kh * kw..(c + 1) * kh * kw];
            let mut w_c = vec![0u32; wp_rows * kwp];
            for ky in 0..kh {
                let row = &w_plane[ky * kw..(ky + 1) * kw];
                for q in 0..kwp {
                    let hi = if 2 * q + 1 < kw { row[2 * q + 1] } else { 0.0 };
                    w_c[(FILTER_PAD + ky) * kwp + q] =
                        to_bf16_bits(row[2 * q]) as u32 | (to_bf16_bits(hi) as u32) << 16;
                }
            }
            let w_c = &w_c;
            let b = bias.map_or(0.0, |b| b[c]);
            // The plane's rows as pair words, once (the bands' row ranges overlap).
            let pbuf = &pair_rows(x_plane, s.w, 0, s.h, left, p_stride);
            y_plane
                .par_chunks_mut(BAND * ow)
                .enumerate()
                .for_each(|(band, y_band)| {
                    let oy0 = band * BAND;
                    let band_rows = y_band.len() / ow;
                    let r_first = (oy0 as isize - top).max(0);
                    let r_last =
                        ((oy0 + band_rows) as isize - 1 - top + kh as isize - 1).min(h - 1);
                    if r_first > r_last {
                        y_band.fill(b);
                        return;
                    }
                    let n_rows = (r_last - r_first + 1) as usize;
                    let pbuf = &pbuf[r_first as usize * p_stride..][..n_rows * p_stride];
                    let mut acc = [[0.0f32; 64]; MAX_ROWS];
                    for &(c0, shape) in &blocks {
                        for rb in (0..band_rows).step_by(shape.rows) {
                            let oy = oy0 + rb;
                            let lo = (oy as isize - top).max(r_first);
                            let hi = ((oy + shape.rows) as isize - 1 - top + kh as isize - 1)
                                .min(r_last);
                            let (r_lo, r_hi, w_base) = if lo > hi {
                                (0, 0, FILTER_PAD)
                            } else {
                                (
                                    (lo - r_first) as usize,
                                    (hi - r_first + 1) as usize,
                                    (lo - oy as isize + top) as usize + FILTER_PAD,
                                )
                            };
                            let blk = Block {
                                p: pbuf,
                                p_stride,
                                r_lo,
                                r_hi,
                                w: w_c,
                                kwp,
                                w_base,
                                c0,
                                bias: b,
                            };
                            blk.dispatch(shape, &mut acc);
                            let cols = (16 * shape.vecs).min(ow - c0);
                            for i in 0..shape.rows.min(band_rows - rb) {
                                y_band[(rb + i) * ow + c0..][..cols]
                                    .copy_from_slice(&acc[i][..cols]);
                            }
                        }
                    }
                });
            if y_plane.iter().any(|v| !v.is_finite()) {
                // Padding (zero) times a non-finite input adds a NaN the definition does not
                // have: recompute the non-finite outputs exactly on the rounded operands.
                let corr = Correlation {
                    kh,
                    kw,
                    stride: (1, 1),
                    dilation: (1, 1),
                    top,
                    left,
                    h: s.h,
                    w: s.w,
                };
                let (xr, wr) = (rounded(x_plane), rounded(w_plane));
                super::naive::repair_nonfinite(y_plane, |i| {
                    corr.point(&xr, &wr, i / ow, i % ow) + b
                });
            }
        });
}

/// Image rows r0..r0 + n as pair words: word j = (bf16 of padded column j, of column j + 1),
/// padded column j holding image column j - left (zero outside the image).
fn pair_rows(x: &[f32], w: usize, r0: usize, n: usize, left: isize, stride: usize) -> Vec<u32> {
    let mut out = vec![0u32; n * stride];
    let mut padded = vec![0.0f32; stride + 1];
    let j0 = left.max(0) as usize;
    let ix0 = (-left).max(0) as usize;
    let count = w.saturating_sub(ix0).min((stride + 1).saturating_sub(j0));
    for (k, row) in out.chunks_mut(stride).enumerate() {
        let src = &x[(r0 + k) * w..(r0 + k + 1) * w];
        padded[j0..j0 + count]
            .iter_mut()
            .zip(&src[ix0..ix0 + count])
            .for_each(|(d, s)| *d = *s);
        pack_pairs(row, &padded[..stride], Some(&padded[1..]));
    }
    out
}
