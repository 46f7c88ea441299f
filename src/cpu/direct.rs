//! The fast CPU path: register-blocked direct convolution on AVX2 + FMA (runtime-detected, with a
//! portable fallback of the same structure), rayon over (plane, row band) tasks.
//!
//! Forward (stride 1, dilation 1): each task zero-pads the input rows of its band once, then
//! computes blocks of `ROWS` output rows x `8 * VECS` columns. For every input row the block
//! touches, each filter tap loads `VECS` input vectors once and feeds them to `ROWS` outputs
//! (one broadcast weight each), so the loop is FMA-bound, not load-bound. Input rows outside the
//! image are skipped; the filter is padded with `ROWS - 1` zero rows on both ends so that every
//! output row of a block may use every input row without bounds checks.
//! Data gradient (stride 1, dilation 1) is the forward pass with the filter rotated 180 degrees.
//! Weight gradient: per channel, blocks of `WG_ROWS x WG_COLS` taps accumulated over the plane
//! in vector registers; the result is reduced over the batch in a fixed order, so it is
//! bit-identical run after run. Other strides and dilations take a simple direct loop.

use rayon::prelude::*;

use crate::conv::{ConvShape, DwConv2d};
use crate::dtype::Element;
use crate::error::{Error, Result};
use crate::tensor::Tensor;

/// Output rows per register block.
const ROWS: usize = 4;
/// Output rows per parallel task (a multiple of ROWS).
const BAND: usize = 16;
/// Weight-gradient block: filter rows x filter columns held in registers.
const WG_ROWS: usize = 3;
const WG_COLS: usize = 4;

pub(crate) fn check_len(what: &str, got: usize, expected: usize) -> Result<()> {
    if got != expected {
        return Err(Error::BufferLength {
            what: what.into(),
            expected,
            got,
        });
    }
    Ok(())
}

/// Whether the AVX2 + FMA kernels can run on this CPU.
pub fn has_avx2_fma() -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        std::is_x86_feature_detected!("avx2") && std::is_x86_feature_detected!("fma")
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        false
    }
}

/// A description of the instruction set the fast path uses on this machine.
pub fn simd_description() -> &'static str {
    if has_avx2_fma() {
        "AVX2 + FMA (8 x f32 per instruction)"
    } else {
        "portable (no AVX2/FMA detected)"
    }
}

// ---------------------------------------------------------------------------------------------
// Forward micro-kernel

/// One forward block: `ROWS` output rows x `8 * V` columns starting at column `c0`.
struct FwdBlock<'a> {
    /// Padded input rows of the band, `x_stride` floats apart; row `r` of the image at `r - r0`.
    x: &'a [f32],
    x_stride: usize,
    /// Image rows [r_lo, r_hi) that touch the block, in band-buffer coordinates.
    r_lo: usize,
    r_hi: usize,
    /// Filter padded with ROWS-1 zero rows on top and bottom, `kw` floats per row.
    w: &'a [f32],
    kw: usize,
    /// Padded-filter row used by output row 0 of the block for buffer row `r_lo`:
    /// row(i, r) = w_base + (r - r_lo) - i, always >= ROWS - 1 - i.
    w_base: usize,
    c0: usize,
    bias: f32,
}

impl FwdBlock<'_> {
    fn check(&self, v: usize) {
        // Bounds the unchecked loads of the SIMD kernel (cheap, once per block).
        assert!(self.r_hi * self.x_stride <= self.x.len() || self.r_hi == self.r_lo);
        assert!(self.c0 + self.kw - 1 + 8 * v <= self.x_stride);
        if self.r_hi > self.r_lo {
            assert!(self.w_base >= ROWS - 1);
            assert!((self.w_base + self.r_hi - self.r_lo) * self.kw <= self.w.len());
        }
    }

    /// Portable version with the same blocking (the compiler vectorises the lane loops).
    fn run_portable<const V: usize>(&self, out: &mut [[[f32; 8]; V]; ROWS]) {
        let mut acc = [[[self.bias; 8]; V]; ROWS];
        for r in self.r_lo..self.r_hi {
            let xr = &self.x[r * self.x_stride + self.c0..];
            for kx in 0..self.kw {
                for (i, acc_row) in acc.iter_mut().enumerate() {
                    let wv = self.w[(self.w_base + (r - self.r_lo) - i) * self.kw + kx];
                    for (v, acc_vec) in acc_row.iter_mut().enumerate() {
                        for (lane, a) in acc_vec.iter_mut().enumerate() {
                            *a += xr[kx + 8 * v + lane] * wv;
                        }
                    }
                }
            }
        }
        *out = acc;
    }

    #[cfg(target_arch = "x86_64")]
    #[target_feature(enable = "avx2,fma")]
    fn run_avx2<const V: usize>(&self, out: &mut [[[f32; 8]; V]; ROWS]) {
        use std::arch::x86_64::*;
        // Every pointer below stays inside `x` and `w`: `check` asserts the extents once.
        self.check(V);
        let mut acc = [[_mm256_set1_ps(self.bias); V]; ROWS];
        let kw = self.kw;
        for r in self.r_lo..self.r_hi {
            let xr = self.x[r * self.x_stride + self.c0..].as_ptr();
            let w0 = self.w[(self.w_base + (r - self.r_lo) + 1 - ROWS) * kw..].as_ptr();
            for kx in 0..kw {
                let mut xv = [_mm256_setzero_ps(); V];
                for (v, x) in xv.iter_mut().enumerate() {
                    // SAFETY: column c0 + kx + 8v + 7 < x_stride and row r < r_hi (checked).
                    *x = unsafe { _mm256_loadu_ps(xr.add(kx + 8 * v)) };
                }
                for i in 0..ROWS {
                    // SAFETY: filter row w_base + (r - r_lo) - i lies in [0, w.len() / kw) (checked).
                    let wb = unsafe { _mm256_broadcast_ss(&*w0.add((ROWS - 1 - i) * kw + kx)) };
                    for v in 0..V {
                        acc[i][v] = _mm256_fmadd_ps(xv[v], wb, acc[i][v]);
                    }
                }
            }
        }
        for i in 0..ROWS {
            for v in 0..V {
                // SAFETY: `out[i][v]` is an 8-float array; storeu has no alignment need.
                unsafe { _mm256_storeu_ps(out[i][v].as_mut_ptr(), acc[i][v]) };
            }
        }
    }

    /// Computes the block and writes its rows (at most `rows`) and columns (below `ow`) to `y`,
    /// whose row 0 is the block's first output row.
    fn emit<const V: usize>(&self, simd: bool, ow: usize, rows: usize, y: &mut [f32]) {
        let mut block = [[[0.0f32; 8]; V]; ROWS];
        self.run::<V>(simd, &mut block);
        for (i, acc_row) in block.iter().enumerate().take(rows) {
            let dst = &mut y[i * ow..(i + 1) * ow];
            for (v, lanes) in acc_row.iter().enumerate() {
                let start = self.c0 + 8 * v;
                if start >= ow {
                    break;
                }
                let n = (ow - start).min(8);
                dst[start..start + n].copy_from_slice(&lanes[..n]);
            }
        }
    }

    fn run<const V: usize>(&self, simd: bool, out: &mut [[[f32; 8]; V]; ROWS]) {
        #[cfg(target_arch = "x86_64")]
        if simd {
            // SAFETY: `simd` is true only when AVX2 and FMA were detected at run time.
            unsafe { self.run_avx2::<V>(out) };
            return;
        }
        let _ = simd;
        self.run_portable::<V>(out);
    }
}

/// Stride-1, dilation-1 correlation of every plane, with signed padding (negative values crop):
/// `y[p, oy, ox] = sum x[p, oy - top + ky, ox - left + kx] * w[c, ky, kx] + bias[c]`.
/// Columns go in chunks of 16 (two vectors) and a final chunk of 8, so at most 7 columns of a
/// row are computed in vain.
#[allow(clippy::too_many_arguments)]
fn correlate_unit(s: &ConvShape, kh: usize, kw: usize, top: isize, left: isize, x: &[f32], w: &[f32], bias: Option<&[f32]>, y: &mut [f32]) {
    let simd = has_avx2_fma();
    let ow_pad = s.ow.div_ceil(8) * 8;
    let x_stride = ow_pad + kw - 1 + 8;
    // Filters padded with ROWS-1 zero rows above and below.
    let wp_rows = kh + 2 * (ROWS - 1);
    let mut wpad = vec![0.0f32; s.c * wp_rows * kw];
    for c in 0..s.c {
        let dst = &mut wpad[(c * wp_rows + ROWS - 1) * kw..][..kh * kw];
        dst.copy_from_slice(&w[c * kh * kw..(c + 1) * kh * kw]);
    }
    let (h, wd, oh, ow) = (s.h as isize, s.w as isize, s.oh, s.ow);
    y.par_chunks_mut(oh * ow).enumerate().for_each(|(plane, y_plane)| {
        let c = plane % s.c;
        let x_plane = &x[plane * s.h * s.w..(plane + 1) * s.h * s.w];
        let w_c = &wpad[c * wp_rows * kw..(c + 1) * wp_rows * kw];
        let b = bias.map_or(0.0, |b| b[c]);
        y_plane.par_chunks_mut(BAND * ow).enumerate().for_each(|(band, y_band)| {
            let oy0 = band * BAND;
            let band_rows = y_band.len() / ow;
            // Image rows this band can touch.
            let r_first = (oy0 as isize - top).max(0);
            let r_last = ((oy0 + band_rows.div_ceil(ROWS) * ROWS) as isize - 1 - top + kh as isize - 1).min(h - 1);
            if r_first > r_last {
                // Only padding under this band: the output is the bias.
                y_band.fill(b);
                return;
            }
            let n_rows = (r_last - r_first + 1) as usize;
            let mut xbuf = vec![0.0f32; n_rows * x_stride];
            for (k, row) in xbuf.chunks_mut(x_stride).enumerate() {
                let r = r_first as usize + k;
                let src = &x_plane[r * s.w..(r + 1) * s.w];
                // Buffer column j holds image column j - left.
                let j0 = left.max(0) as usize;
                let ix0 = (-left).max(0) as usize;
                let count = (wd as usize).saturating_sub(ix0).min(x_stride.saturating_sub(j0));
                row[j0..j0 + count].copy_from_slice(&src[ix0..ix0 + count]);
            }
            for rb in (0..band_rows).step_by(ROWS) {
                let oy = oy0 + rb;
                // Image rows feeding output rows oy..oy+ROWS.
                let lo = (oy as isize - top).max(r_first);
                let hi = ((oy + ROWS) as isize - 1 - top + kh as isize - 1).min(r_last);
                let (r_lo, r_hi) = if lo > hi {
                    (0, 0)
                } else {
                    ((lo - r_first) as usize, (hi - r_first + 1) as usize)
                };
                // Filter row for output row i and buffer row k: (k + r_first) - (oy + i) + top.
                let w_base = if r_hi > r_lo {
                    (r_lo as isize + r_first - oy as isize + top) as usize + ROWS - 1
                } else {
                    ROWS - 1
                };
                let mut c0 = 0;
                while c0 < ow_pad {
                    let blk = FwdBlock {
                        x: &xbuf,
                        x_stride,
                        r_lo,
                        r_hi,
                        w: w_c,
                        kw,
                        w_base,
                        c0,
                        bias: b,
                    };
                    let y_rows = &mut y_band[rb * ow..];
                    if c0 + 16 <= ow_pad {
                        blk.emit::<2>(simd, ow, band_rows - rb, y_rows);
                        c0 += 16;
                    } else {
                        blk.emit::<1>(simd, ow, band_rows - rb, y_rows);
                        c0 += 8;
                    }
                }
            }
        });
    });
}

// ---------------------------------------------------------------------------------------------
// Weight gradient, stride 1 / dilation 1: register-blocked over taps.

/// Padded operands of one plane for the weight gradient.
struct WgradPlane {
    /// Image rows, zero-padded columns: image column ix at ix + left_pad.
    x: Vec<f32>,
    x_stride: usize,
    left_pad: usize,
    /// dy rows oy in [oy_min, oy_max), columns padded to a multiple of 8 with zeros.
    dy: Vec<f32>,
    dy_stride: usize,
    oy_min: isize,
}

impl WgradPlane {
    fn new(s: &ConvShape, kh: usize, kw: usize, top: usize, left: usize, x: &[f32], dy: &[f32]) -> Self {
        let ow_pad = s.ow.div_ceil(8) * 8;
        // Column j of the buffer = image column (j - left); tap kx of output ox reads j = ox + kx.
        let x_stride = ow_pad + kw + WG_COLS + 8;
        let mut xb = vec![0.0f32; s.h * x_stride];
        for r in 0..s.h {
            let dst = &mut xb[r * x_stride..(r + 1) * x_stride];
            for ix in 0..s.w {
                let j = ix + left;
                if j < x_stride {
                    dst[j] = x[r * s.w + ix];
                }
            }
        }
        // Output row used by image row r and tap ky: oy = r + top - ky, over ky < kh + WG_ROWS - 1.
        let oy_min = (top as isize - (kh + WG_ROWS) as isize).min(0);
        let oy_max = ((s.h + top) as isize).max(s.oh as isize) + 1;
        let rows = (oy_max - oy_min) as usize;
        let mut db = vec![0.0f32; rows * ow_pad];
        for oy in 0..s.oh {
            let k = (oy as isize - oy_min) as usize;
            db[k * ow_pad..k * ow_pad + s.ow].copy_from_slice(&dy[oy * s.ow..(oy + 1) * s.ow]);
        }
        WgradPlane {
            x: xb,
            x_stride,
            left_pad: left,
            dy: db,
            dy_stride: ow_pad,
            oy_min,
        }
    }

    fn dy_row(&self, oy: isize) -> &[f32] {
        let k = (oy - self.oy_min) as usize;
        &self.dy[k * self.dy_stride..(k + 1) * self.dy_stride]
    }

    /// Sums for taps (ky0.., kx0..) over the plane: out[a][b] = sum over r, ox of
    /// dy[r + top - ky0 - a][ox] * x[r][ox + kx0 + b].
    fn block(&self, simd: bool, h: usize, top: usize, ky0: usize, kx0: usize, out: &mut [[f32; WG_COLS]; WG_ROWS]) {
        let _ = self.left_pad;
        #[cfg(target_arch = "x86_64")]
        if simd {
            // SAFETY: `simd` is true only when AVX2 and FMA were detected at run time.
            unsafe { self.block_avx2(h, top, ky0, kx0, out) };
            return;
        }
        let _ = simd;
        let mut acc = [[[0.0f32; 8]; WG_COLS]; WG_ROWS];
        for r in 0..h {
            let xr = &self.x[r * self.x_stride..(r + 1) * self.x_stride];
            for ox in (0..self.dy_stride).step_by(8) {
                for (a, acc_row) in acc.iter_mut().enumerate() {
                    let g = &self.dy_row((r + top) as isize - (ky0 + a) as isize)[ox..ox + 8];
                    for (b, acc_vec) in acc_row.iter_mut().enumerate() {
                        let xs = &xr[ox + kx0 + b..ox + kx0 + b + 8];
                        for lane in 0..8 {
                            acc_vec[lane] += g[lane] * xs[lane];
                        }
                    }
                }
            }
        }
        for a in 0..WG_ROWS {
            for b in 0..WG_COLS {
                out[a][b] = acc[a][b].iter().sum();
            }
        }
    }

    #[cfg(target_arch = "x86_64")]
    #[target_feature(enable = "avx2,fma")]
    fn block_avx2(&self, h: usize, top: usize, ky0: usize, kx0: usize, out: &mut [[f32; WG_COLS]; WG_ROWS]) {
        use std::arch::x86_64::*;
        let mut acc = [[_mm256_setzero_ps(); WG_COLS]; WG_ROWS];
        for r in 0..h {
            let xr = &self.x[r * self.x_stride..(r + 1) * self.x_stride];
            let g_rows: [&[f32]; WG_ROWS] = {
                let mut rows = [&self.dy[..0]; WG_ROWS];
                for (a, row) in rows.iter_mut().enumerate() {
                    *row = self.dy_row((r + top) as isize - (ky0 + a) as isize);
                }
                rows
            };
            for ox in (0..self.dy_stride).step_by(8) {
                let mut g = [_mm256_setzero_ps(); WG_ROWS];
                for a in 0..WG_ROWS {
                    let src: &[f32; 8] = g_rows[a][ox..ox + 8].try_into().expect("8 lanes");
                    // SAFETY: `src` is a checked 8-element slice; loadu has no alignment need.
                    g[a] = unsafe { _mm256_loadu_ps(src.as_ptr()) };
                }
                for b in 0..WG_COLS {
                    let src: &[f32; 8] = xr[ox + kx0 + b..ox + kx0 + b + 8].try_into().expect("8 lanes");
                    // SAFETY: as above.
                    let xv = unsafe { _mm256_loadu_ps(src.as_ptr()) };
                    for a in 0..WG_ROWS {
                        acc[a][b] = _mm256_fmadd_ps(g[a], xv, acc[a][b]);
                    }
                }
            }
        }
        for a in 0..WG_ROWS {
            for b in 0..WG_COLS {
                let mut lanes = [0.0f32; 8];
                // SAFETY: `lanes` holds 8 floats; storeu has no alignment need.
                unsafe { _mm256_storeu_ps(lanes.as_mut_ptr(), acc[a][b]) };
                out[a][b] = lanes.iter().sum();
            }
        }
    }
}

fn weight_grad_unit(conv: &DwConv2d, s: &ConvShape, x: &[f32], dy: &[f32], dw: &mut [f32]) {
    let (kh, kw) = conv.kernel;
    let (top, left) = (conv.padding.top, conv.padding.left);
    let simd = has_avx2_fma();
    dw.par_chunks_mut(kh * kw).enumerate().for_each(|(c, out)| {
        // Batch reduced in a fixed order in f64: deterministic, and accurate for long sums.
        let mut total = vec![0.0f64; kh * kw];
        let mut block = [[0.0f32; WG_COLS]; WG_ROWS];
        for n in 0..s.n {
            let plane = n * s.c + c;
            let p = WgradPlane::new(
                s,
                kh,
                kw,
                top,
                left,
                &x[plane * s.h * s.w..(plane + 1) * s.h * s.w],
                &dy[plane * s.oh * s.ow..(plane + 1) * s.oh * s.ow],
            );
            for ky0 in (0..kh).step_by(WG_ROWS) {
                for kx0 in (0..kw).step_by(WG_COLS) {
                    p.block(simd, s.h, top, ky0, kx0, &mut block);
                    for (a, row) in block.iter().enumerate() {
                        for (b, &v) in row.iter().enumerate() {
                            if ky0 + a < kh && kx0 + b < kw {
                                total[(ky0 + a) * kw + kx0 + b] += v as f64;
                            }
                        }
                    }
                }
            }
        }
        for (o, t) in out.iter_mut().zip(total) {
            *o = t as f32;
        }
    });
}

// ---------------------------------------------------------------------------------------------
// Public entry points

/// y [N,C,OH,OW] = conv(x [N,C,H,W], w [C,1,KH,KW]) + bias [C], into a caller's buffer.
/// `shape` comes from `conv.resolve`/`conv.check_forward`.
pub fn forward_f32_into(conv: &DwConv2d, shape: &ConvShape, x: &[f32], w: &[f32], bias: Option<&[f32]>, y: &mut [f32]) -> Result<()> {
    let s = conv.resolve(shape.n, shape.c, shape.h, shape.w)?;
    check_len("x", x.len(), s.input_len())?;
    check_len("w", w.len(), s.c * conv.kernel.0 * conv.kernel.1)?;
    if let Some(b) = bias {
        check_len("bias", b.len(), s.c)?;
    }
    check_len("y", y.len(), s.output_len())?;
    if conv.is_unit() {
        let (kh, kw) = conv.kernel;
        correlate_unit(&s, kh, kw, conv.padding.top as isize, conv.padding.left as isize, x, w, bias, y);
    } else {
        super::naive::forward_plain(conv, &s, x, w, bias, y);
    }
    Ok(())
}

/// dx [N,C,H,W] from dy [N,C,OH,OW] and w, into a caller's buffer.
pub fn data_grad_f32_into(conv: &DwConv2d, shape: &ConvShape, dy: &[f32], w: &[f32], dx: &mut [f32]) -> Result<()> {
    let s = conv.resolve(shape.n, shape.c, shape.h, shape.w)?;
    let (kh, kw) = conv.kernel;
    check_len("dy", dy.len(), s.output_len())?;
    check_len("w", w.len(), s.c * kh * kw)?;
    check_len("dx", dx.len(), s.input_len())?;
    if conv.is_unit() {
        // dx = dy correlated with the filter rotated 180 degrees, padding K-1-p (may be negative).
        let mut flipped = w.to_vec();
        flipped.chunks_mut(kh * kw).for_each(<[f32]>::reverse);
        let t = ConvShape {
            n: s.n,
            c: s.c,
            h: s.oh,
            w: s.ow,
            oh: s.h,
            ow: s.w,
        };
        let top = kh as isize - 1 - conv.padding.top as isize;
        let left = kw as isize - 1 - conv.padding.left as isize;
        correlate_unit(&t, kh, kw, top, left, dy, &flipped, None, dx);
    } else {
        super::naive::data_grad_plain(conv, &s, dy, w, dx);
    }
    Ok(())
}

/// dw [C,1,KH,KW] from x and dy, into a caller's buffer; bit-identical run after run.
pub fn weight_grad_f32_into(conv: &DwConv2d, shape: &ConvShape, x: &[f32], dy: &[f32], dw: &mut [f32]) -> Result<()> {
    let s = conv.resolve(shape.n, shape.c, shape.h, shape.w)?;
    let (kh, kw) = conv.kernel;
    check_len("x", x.len(), s.input_len())?;
    check_len("dy", dy.len(), s.output_len())?;
    check_len("dw", dw.len(), s.c * kh * kw)?;
    if conv.is_unit() {
        weight_grad_unit(conv, &s, x, dy, dw);
    } else {
        super::naive::weight_grad_plain(conv, &s, x, dy, dw);
    }
    Ok(())
}

/// Converts to f32 unless the data already is f32 (no copy then).
pub(crate) fn as_f32<T: Element>(t: &Tensor<T>) -> std::borrow::Cow<'_, [f32]> {
    match (t as &dyn std::any::Any).downcast_ref::<Tensor<f32>>() {
        Some(v) => std::borrow::Cow::Borrowed(v.data()),
        None => std::borrow::Cow::Owned(t.to_f32_vec()),
    }
}

pub(crate) fn from_f32<T: Element>(shape: &[usize], v: Vec<f32>) -> Result<Tensor<T>> {
    Tensor::from_vec(shape, crate::dtype::from_f32_vec(&v))
}

/// Forward on the fast path (f16/bf16 computed in f32).
pub fn forward<T: Element>(conv: &DwConv2d, x: &Tensor<T>, w: &Tensor<T>, bias: Option<&Tensor<T>>) -> Result<Tensor<T>> {
    let s = conv.check_forward(x.shape(), w.shape(), bias.map(|b| b.shape()))?;
    let mut y = vec![0.0f32; s.output_len()];
    let b = bias.map(as_f32);
    forward_f32_into(conv, &s, &as_f32(x), &as_f32(w), b.as_deref(), &mut y)?;
    from_f32(&s.output_dims(), y)
}

/// Data gradient on the fast path.
pub fn data_grad<T: Element>(conv: &DwConv2d, dy: &Tensor<T>, w: &Tensor<T>, input_hw: (usize, usize)) -> Result<Tensor<T>> {
    let s = conv.check_data_grad(dy.shape(), w.shape(), input_hw)?;
    let mut dx = vec![0.0f32; s.input_len()];
    data_grad_f32_into(conv, &s, &as_f32(dy), &as_f32(w), &mut dx)?;
    from_f32(&s.input_dims(), dx)
}

/// Weight gradient on the fast path (deterministic).
pub fn weight_grad<T: Element>(conv: &DwConv2d, x: &Tensor<T>, dy: &Tensor<T>) -> Result<Tensor<T>> {
    let s = conv.check_weight_grad(x.shape(), dy.shape())?;
    let mut dw = vec![0.0f32; s.c * conv.kernel.0 * conv.kernel.1];
    weight_grad_f32_into(conv, &s, &as_f32(x), &as_f32(dy), &mut dw)?;
    from_f32(&conv.weight_dims(s.c), dw)
}
