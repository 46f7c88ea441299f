//! The fast CPU path: register-blocked direct convolution with AVX-512 or AVX2 + FMA micro-kernels
//! (detected at run time, with a portable fallback of the same structure), rayon over
//! (plane, row band) tasks.
//!
//! Forward (stride 1, dilation 1): each task zero-pads the input rows of its band once, then
//! computes register blocks of R output rows x (vectors x lanes) columns. For every input row a
//! block touches, each filter tap loads the block's input vectors once and feeds each of them to
//! R outputs (one broadcast weight each), so the loop is FMA-bound, not load-bound. A row is
//! covered by as few blocks as possible (up to 4 x 16 lanes), narrow remainders take 8 rows so
//! that enough accumulators hide the FMA latency. Input rows outside the image are skipped; the
//! filter is padded with zero rows on both ends so that every output row of a block may use every
//! input row without bounds checks.
//! Data gradient (stride 1, dilation 1) is the forward pass with the filter rotated 180 degrees.
//! Weight gradient: per channel, blocks of `WG_ROWS x WG_COLS` taps accumulated over the plane
//! in vector registers; the result is reduced over the batch in a fixed order, so it is
//! bit-identical run after run. Other strides and dilations take a simple direct loop.
//! Small planes (and, with 16+ channels, mid-size ones; `lane_per_channel` decides) take the
//! lane-per-channel kernels of `small.rs` (AVX-512 or AVX2) instead, for all three passes.
//! Non-finite values: the blocks read zero padding, so a NaN/Inf operand can add a spurious
//! NaN; every non-finite result is recomputed exactly (`naive::repair_nonfinite`).

// The register-block loops index several fixed-size arrays in step; ranges read best there.
#![allow(clippy::needless_range_loop)]

use rayon::prelude::*;

use super::naive::{repair_nonfinite, weight_grad_exact, Correlation};
use super::simd::{run_on, Simd, SimdOp};
use crate::conv::{ConvShape, DwConv2d};
use crate::dtype::Element;
use crate::error::{Error, Result};
use crate::op::Op;
use crate::tensor::Tensor;

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

pub(crate) use super::simd::{detect_isa, Isa};
pub use super::simd::{has_avx2_fma, uses_avx512, uses_vector_isa};

/// A description of the instruction set the fast path uses on this machine.
pub fn simd_description() -> &'static str {
    if uses_avx512() {
        "AVX-512F (16 x f32 per FMA; AVX2 + FMA for 8-column tails)"
    } else if has_avx2_fma() {
        "AVX2 + FMA (8 x f32 per instruction)"
    } else {
        "portable (no AVX2/FMA detected)"
    }
}

// ---------------------------------------------------------------------------------------------
// Forward micro-kernels

/// Most output rows in one register block; filters are padded with this many minus one zero
/// rows above and below, so that every row of a block may read every input row unchecked.
const MAX_ROWS: usize = 8;
const FILTER_PAD: usize = MAX_ROWS - 1;

/// One forward block: `R` output rows x `cols` columns starting at column `c0`.
struct FwdBlock<'a> {
    /// Zero-padded input rows of the band, `x_stride` floats apart.
    x: &'a [f32],
    x_stride: usize,
    /// Input rows [r_lo, r_hi) (band-buffer coordinates) that touch the block.
    r_lo: usize,
    r_hi: usize,
    /// The channel's filter with FILTER_PAD zero rows above and below, `kw` floats per row.
    w: &'a [f32],
    kw: usize,
    /// Padded-filter row for output row 0 of the block and input row `r_lo`:
    /// row(i, r) = w_base + (r - r_lo) - i.
    w_base: usize,
    c0: usize,
    bias: f32,
}

/// Where a block's results go: output rows from the block's first row, `ow` floats apart.
struct BlockOut<'a> {
    y: &'a mut [f32],
    ow: usize,
    rows: usize,
}

impl BlockOut<'_> {
    /// Writes the lanes of output row `i` starting at column `col`, clipped to the image.
    fn store(&mut self, i: usize, col: usize, lanes: &[f32]) {
        if i < self.rows && col < self.ow {
            let n = (self.ow - col).min(lanes.len());
            self.y[i * self.ow + col..][..n].copy_from_slice(&lanes[..n]);
        }
    }
}

impl FwdBlock<'_> {
    /// Asserts the extents that the unchecked SIMD loads rely on (once per block).
    fn check(&self, rows: usize, cols: usize) {
        assert!(self.c0 + self.kw - 1 + cols <= self.x_stride);
        if self.r_hi > self.r_lo {
            assert!(self.r_hi * self.x_stride <= self.x.len());
            assert!(self.w_base + 1 >= rows);
            assert!((self.w_base + self.r_hi - self.r_lo) * self.kw <= self.w.len());
        }
    }

    /// Portable version with the same blocking (the compiler vectorises the lane loops).
    fn run_portable<const R: usize, const V: usize>(&self, out: &mut BlockOut) {
        let mut acc = [[[self.bias; 8]; V]; R];
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
        for (i, row) in acc.iter().enumerate() {
            for (v, lanes) in row.iter().enumerate() {
                out.store(i, self.c0 + 8 * v, lanes);
            }
        }
    }
}

/// One register block on one instruction set: `R` rows x `V` vectors of `S::LANES` columns;
/// each input vector feeds `R` FMAs.
struct SimdBlock<'a, 'b, 'c, const R: usize, const V: usize> {
    blk: &'a FwdBlock<'b>,
    out: &'a mut BlockOut<'c>,
}

impl<const R: usize, const V: usize> SimdOp for SimdBlock<'_, '_, '_, R, V> {
    type Output = ();

    #[inline(always)]
    fn vector<S: Simd>(self, s: S) {
        let blk = self.blk;
        blk.check(R, S::LANES * V);
        let mut acc = [[s.splat(blk.bias); V]; R];
        let kw = blk.kw;
        for r in blk.r_lo..blk.r_hi {
            let xr = blk.x[r * blk.x_stride + blk.c0..].as_ptr();
            // Filter row of output row R-1; output row i uses the row R-1-i below it.
            let w0 = blk.w[(blk.w_base + (r - blk.r_lo) + 1 - R) * kw..].as_ptr();
            for kx in 0..kw {
                // SAFETY: column c0 + kx + LANES (v + 1) - 1 < x_stride and row r < r_hi
                // (`check`).
                let xv: [S::V; V] =
                    std::array::from_fn(|v| unsafe { s.load(xr.add(kx + S::LANES * v)) });
                for (i, acc_i) in acc.iter_mut().enumerate() {
                    // SAFETY: filter row w_base + (r - r_lo) - i is in bounds (`check`).
                    let wb = s.splat(unsafe { *w0.add((R - 1 - i) * kw + kx) });
                    for (a, &x) in acc_i.iter_mut().zip(&xv) {
                        *a = s.fma(x, wb, *a);
                    }
                }
            }
        }
        let mut lanes = [0.0f32; 16];
        for (i, acc_i) in acc.iter().enumerate() {
            for (v, &a) in acc_i.iter().enumerate() {
                // SAFETY: `lanes` holds 16 >= LANES floats.
                unsafe { s.store(lanes.as_mut_ptr(), a) };
                self.out.store(i, blk.c0 + S::LANES * v, &lanes[..S::LANES]);
            }
        }
    }

    fn portable(self) {
        self.blk.run_portable::<R, V>(self.out)
    }
}

/// A register-block shape: rows x columns, and which micro-kernel computes it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct BlockShape {
    isa: Isa,
    rows: usize,
    /// Vectors per row (8 lanes for Portable/Avx2, 16 for Avx512).
    vecs: usize,
}

impl BlockShape {
    /// The block for the `remaining` columns of a row: as many vectors as cover them (up to 4
    /// x 16 or 2 x 8 lanes); narrow blocks take 8 rows so that 8 accumulators hide the FMA latency.
    fn for_columns(isa: Isa, remaining: usize) -> BlockShape {
        match isa {
            Isa::Avx512 if remaining > 8 => {
                let vecs = remaining.div_ceil(16).min(4);
                BlockShape {
                    isa,
                    rows: if vecs == 1 { 8 } else { 4 },
                    vecs,
                }
            }
            Isa::Avx512 | Isa::Avx2 => {
                let vecs = remaining.div_ceil(8).min(2);
                BlockShape {
                    isa: Isa::Avx2,
                    rows: if vecs == 1 { 8 } else { 4 },
                    vecs,
                }
            }
            Isa::Portable => {
                let vecs = remaining.div_ceil(8).min(2);
                BlockShape {
                    isa,
                    rows: if vecs == 1 { 8 } else { 4 },
                    vecs,
                }
            }
        }
    }

    fn cols(&self) -> usize {
        self.vecs * if self.isa == Isa::Avx512 { 16 } else { 8 }
    }

    fn run(&self, blk: &FwdBlock, out: &mut BlockOut) {
        // The block's ISA, not the engine's: AVX-512 machines take 8-lane blocks for narrow tails.
        match (self.isa, self.rows, self.vecs) {
            (Isa::Avx512, 8, 1) => run_on(Isa::Avx512, SimdBlock::<8, 1> { blk, out }),
            (Isa::Avx512, 4, 2) => run_on(Isa::Avx512, SimdBlock::<4, 2> { blk, out }),
            (Isa::Avx512, 4, 3) => run_on(Isa::Avx512, SimdBlock::<4, 3> { blk, out }),
            (Isa::Avx512, 4, 4) => run_on(Isa::Avx512, SimdBlock::<4, 4> { blk, out }),
            (isa, 8, 1) => run_on(isa, SimdBlock::<8, 1> { blk, out }),
            (isa, 4, 2) => run_on(isa, SimdBlock::<4, 2> { blk, out }),
            other => unreachable!("no micro-kernel for block {other:?}"),
        }
    }
}

/// Output rows per parallel task (a multiple of every block's row count).
const BAND: usize = 16;

/// The stride-1, dilation-1 correlation `corr` (signed padding: negative values crop) of every
/// plane: `y[p, oy, ox] = sum x[p, oy - top + ky, ox - left + kx] * w'[c, ky, kx] + bias[c]`,
/// where `w'` is `w` rotated by 180 degrees when `rotate` (the data gradient), else `w`.
fn correlate_unit(
    s: &ConvShape,
    corr: &Correlation,
    x: &[f32],
    w: &[f32],
    rotate: bool,
    bias: Option<&[f32]>,
    y: &mut [f32],
) {
    let isa = detect_isa();
    if lane_per_channel(isa, Op::Forward, s) {
        return correlate_lanes(s, corr, x, w, rotate, bias, y);
    }
    let (kh, kw, top, left) = (corr.kh, corr.kw, corr.top, corr.left);
    // Column blocks of a row, the same for every row.
    let mut blocks = Vec::new();
    let mut c0 = 0;
    while c0 < s.ow {
        let shape = BlockShape::for_columns(isa, s.ow - c0);
        blocks.push((c0, shape));
        c0 += shape.cols();
    }
    let x_stride = c0 + kw - 1;
    let wp_rows = kh + 2 * FILTER_PAD;
    let (h, oh, ow) = (s.h as isize, s.oh, s.ow);
    y.par_chunks_mut(oh * ow)
        .enumerate()
        .for_each(|(plane, y_plane)| {
            let c = plane % s.c;
            let x_plane = &x[plane * s.h * s.w..(plane + 1) * s.h * s.w];
            // The channel's filter with zero rows above and below (small: stays off fresh pages).
            let mut w_c = vec![0.0f32; wp_rows * kw];
            let taps = &mut w_c[FILTER_PAD * kw..][..kh * kw];
            taps.copy_from_slice(&w[c * kh * kw..(c + 1) * kh * kw]);
            if rotate {
                taps.reverse();
            }
            let w_c = &w_c;
            let b = bias.map_or(0.0, |b| b[c]);
            y_plane
                .par_chunks_mut(BAND * ow)
                .enumerate()
                .for_each(|(band, y_band)| {
                    let oy0 = band * BAND;
                    let band_rows = y_band.len() / ow;
                    // Image rows this band can touch.
                    let r_first = (oy0 as isize - top).max(0);
                    let r_last =
                        ((oy0 + band_rows) as isize - 1 - top + kh as isize - 1).min(h - 1);
                    if r_first > r_last {
                        // Only padding under this band: the output is the bias.
                        y_band.fill(b);
                        return;
                    }
                    let n_rows = (r_last - r_first + 1) as usize;
                    let mut xbuf = vec![0.0f32; n_rows * x_stride];
                    // Buffer column j holds image column j - left.
                    let j0 = left.max(0) as usize;
                    let ix0 = (-left).max(0) as usize;
                    let count = s.w.saturating_sub(ix0).min(x_stride.saturating_sub(j0));
                    for (k, row) in xbuf.chunks_mut(x_stride).enumerate() {
                        let r = r_first as usize + k;
                        row[j0..j0 + count].copy_from_slice(&x_plane[r * s.w + ix0..][..count]);
                    }
                    for &(c0, shape) in &blocks {
                        for rb in (0..band_rows).step_by(shape.rows) {
                            let oy = oy0 + rb;
                            // Image rows feeding output rows oy..oy+rows.
                            let lo = (oy as isize - top).max(r_first);
                            let hi = ((oy + shape.rows) as isize - 1 - top + kh as isize - 1)
                                .min(r_last);
                            let (r_lo, r_hi, w_base) = if lo > hi {
                                (0, 0, FILTER_PAD)
                            } else {
                                // Filter row for output row i and image row r: r - (oy + i) + top.
                                (
                                    (lo - r_first) as usize,
                                    (hi - r_first + 1) as usize,
                                    (lo - oy as isize + top) as usize + FILTER_PAD,
                                )
                            };
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
                            let mut out = BlockOut {
                                y: &mut y_band[rb * ow..],
                                ow,
                                rows: band_rows - rb,
                            };
                            shape.run(&blk, &mut out);
                        }
                    }
                });
            let w_c = &w_c[FILTER_PAD * kw..][..kh * kw];
            repair_nonfinite(y_plane, |i| corr.point(x_plane, w_c, i / ow, i % ow) + b);
        });
}

// ---------------------------------------------------------------------------------------------
// Which kernel a stride-1 pass takes.

/// Planes (input and output) up to this many pixels (16 x 16) take the lane-per-channel kernels
/// of `small.rs` (AVX-512 or AVX2) whatever the channel count: there most of a large filter falls
/// outside the image and a row is narrower than a vector, which the row kernels pay for.
const SMALL_PLANE: usize = 256;
/// With at least `LANE_CHANNELS` channels (so that few lanes idle), larger planes take them too:
/// up to this many pixels (28 x 28) in the forward pass and the data gradient ...
const LANE_PLANE: usize = 784;
/// ... and up to this many (64 x 64) in the weight gradient, whose row kernel computes every
/// padded tap and reduces in registers (measured, BENCHMARKS.md 2026-12-01: the lane kernels
/// win every pass up to 14x14, the weight gradient and about even the forward at 28x28, the
/// weight gradient at 56x56; the forward at 56x56 is faster on rows).
const LANE_PLANE_WGRAD: usize = 4096;
const LANE_CHANNELS: usize = 16;

/// Whether a stride-1, dilation-1 pass on planes of `s` takes the lane-per-channel kernels.
fn lane_per_channel(isa: Isa, op: Op, s: &ConvShape) -> bool {
    let (inp, out) = (s.h * s.w, s.oh * s.ow);
    let limit = match op {
        _ if s.c < LANE_CHANNELS => SMALL_PLANE,
        Op::Forward | Op::DataGrad => LANE_PLANE,
        Op::WeightGrad => LANE_PLANE_WGRAD,
    };
    cfg!(target_arch = "x86_64") && isa >= Isa::Avx2 && inp.max(out) <= limit && inp.min(out) > 0
}

/// The kernel a pass of the fast path takes on this machine.
#[doc(hidden)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum KernelPath {
    /// Strides or dilations other than 1: the plain loops of `naive.rs`.
    Plain,
    /// Register blocks along image rows.
    Rows,
    /// One channel per vector lane (`small.rs`).
    Lanes,
    /// The weight gradient with one channel per lane, every row pair in registers (`small.rs`).
    LanesPairs,
}

/// Which kernel `op` on these sizes takes on this machine (the tests assert that their shapes
/// reach every kernel).
#[doc(hidden)]
pub fn kernel_path(op: Op, conv: &DwConv2d, s: &ConvShape) -> KernelPath {
    if !conv.is_unit() {
        return KernelPath::Plain;
    }
    if !lane_per_channel(detect_isa(), op, s) {
        return KernelPath::Rows;
    }
    #[cfg(target_arch = "x86_64")]
    if op == Op::WeightGrad
        && super::small::weight_grad_takes_pairs(&lanes_geom(&Correlation::forward(conv, s), s))
    {
        return KernelPath::LanesPairs;
    }
    let _ = op;
    KernelPath::Lanes
}

/// The lane-per-channel kernels' geometry of the unit correlation `corr` on planes of `s`.
#[cfg(target_arch = "x86_64")]
fn lanes_geom(corr: &Correlation, s: &ConvShape) -> super::small::Geom {
    super::small::Geom {
        kh: corr.kh,
        kw: corr.kw,
        top: corr.top,
        left: corr.left,
        h: s.h,
        w: s.w,
        oh: s.oh,
        ow: s.ow,
    }
}

/// The lane-per-channel correlation (AVX-512 or AVX2): `correlate_unit`'s contract.
fn correlate_lanes(
    s: &ConvShape,
    corr: &Correlation,
    x: &[f32],
    w: &[f32],
    rotate: bool,
    bias: Option<&[f32]>,
    y: &mut [f32],
) {
    let (hw, kk, ow) = (s.h * s.w, corr.kh * corr.kw, s.ow);
    let repair = |plane: usize, y_plane: &mut [f32]| {
        let c = plane % s.c;
        if y_plane.iter().all(|v| v.is_finite()) {
            return;
        }
        let mut w_c = w[c * kk..][..kk].to_vec();
        if rotate {
            w_c.reverse();
        }
        let (x_plane, b) = (&x[plane * hw..][..hw], bias.map_or(0.0, |b| b[c]));
        repair_nonfinite(y_plane, |i| corr.point(x_plane, &w_c, i / ow, i % ow) + b);
    };
    #[cfg(target_arch = "x86_64")]
    {
        let g = lanes_geom(corr, s);
        super::small::correlate(&g, s.c, x, w, rotate, bias, y, &repair);
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        let _ = (repair, y);
        unreachable!("the lane-per-channel kernels need x86-64 vectors");
    }
}

// ---------------------------------------------------------------------------------------------
// Weight gradient, stride 1 / dilation 1: register-blocked over taps.

/// Padded operands of one plane for the weight gradient.
struct WgradPlane {
    /// Image rows; buffer column j holds image column j - left (zeros elsewhere).
    x: Vec<f32>,
    x_stride: usize,
    /// dy rows oy in [oy_min, oy_min + rows), zero outside [0, OH); columns padded with zeros.
    dy: Vec<f32>,
    dy_stride: usize,
    oy_min: isize,
    h: usize,
    top: usize,
}

/// Filter rows x columns one weight-gradient block holds in registers (12 accumulators; wider
/// blocks measured slower with AVX-512 here).
const WG_ROWS: usize = 3;
const WG_COLS: usize = 4;

impl WgradPlane {
    #[allow(clippy::too_many_arguments)]
    fn new(
        s: &ConvShape,
        kh: usize,
        kw: usize,
        top: usize,
        left: usize,
        x: &[f32],
        dy: &[f32],
    ) -> Self {
        // Output columns in whole 16-lane vectors; tap kx of output ox reads buffer column ox + kx.
        let dy_stride = s.ow.div_ceil(16) * 16;
        let x_stride = dy_stride + kw + WG_COLS + 16;
        let mut xb = vec![0.0f32; s.h * x_stride];
        let count = s.w.min(x_stride.saturating_sub(left));
        for (r, dst) in xb.chunks_mut(x_stride).enumerate() {
            dst[left..left + count].copy_from_slice(&x[r * s.w..r * s.w + count]);
        }
        // Image row r and tap ky use output row oy = r + top - ky, for ky < kh + WG_ROWS - 1.
        let oy_min = (top as isize - (kh + WG_ROWS) as isize).min(0);
        let oy_max = ((s.h + top) as isize).max(s.oh as isize) + 1;
        let rows = (oy_max - oy_min) as usize;
        let mut db = vec![0.0f32; rows * dy_stride];
        for oy in 0..s.oh {
            let k = (oy as isize - oy_min) as usize;
            db[k * dy_stride..k * dy_stride + s.ow]
                .copy_from_slice(&dy[oy * s.ow..(oy + 1) * s.ow]);
        }
        WgradPlane {
            x: xb,
            x_stride,
            dy: db,
            dy_stride,
            oy_min,
            h: s.h,
            top,
        }
    }

    fn dy_row(&self, oy: isize) -> &[f32] {
        let k = (oy - self.oy_min) as usize;
        &self.dy[k * self.dy_stride..(k + 1) * self.dy_stride]
    }

    /// dy row used by image row r for filter row ky.
    fn dy_row_for(&self, r: usize, ky: usize) -> &[f32] {
        self.dy_row((r + self.top) as isize - ky as isize)
    }

    /// Sums for taps (ky0 + a, kx0 + b), a < RA, b < RB, over the plane, into `out[a * RB + b]`:
    /// sum over r, ox of dy[r + top - ky0 - a][ox] * x[r][ox + kx0 + b].
    fn block_portable<const RA: usize, const RB: usize>(
        &self,
        ky0: usize,
        kx0: usize,
        out: &mut [f32],
    ) {
        let mut acc = [[[0.0f32; 8]; RB]; RA];
        for r in 0..self.h {
            let xr = &self.x[r * self.x_stride..(r + 1) * self.x_stride];
            for ox in (0..self.dy_stride).step_by(8) {
                for (a, acc_row) in acc.iter_mut().enumerate() {
                    let g = &self.dy_row_for(r, ky0 + a)[ox..ox + 8];
                    for (b, acc_vec) in acc_row.iter_mut().enumerate() {
                        let xs = &xr[ox + kx0 + b..ox + kx0 + b + 8];
                        for lane in 0..8 {
                            acc_vec[lane] += g[lane] * xs[lane];
                        }
                    }
                }
            }
        }
        for a in 0..RA {
            for b in 0..RB {
                out[a * RB + b] = acc[a][b].iter().sum();
            }
        }
    }

    /// Asserts the extents the unchecked loads rely on.
    fn check(&self, ra: usize, rb: usize, ky0: usize, kx0: usize) {
        assert!(kx0 + rb - 1 + self.dy_stride <= self.x_stride);
        assert!(self.h * self.x_stride <= self.x.len());
        let lowest = (self.top as isize) - (ky0 + ra - 1) as isize;
        assert!(lowest >= self.oy_min);
        assert!(
            ((self.h - 1 + self.top) as isize - ky0 as isize - self.oy_min + 1) as usize
                * self.dy_stride
                <= self.dy.len()
        );
    }

    #[cfg(target_arch = "x86_64")]
    #[target_feature(enable = "avx2,fma")]
    fn block_avx2<const RA: usize, const RB: usize>(
        &self,
        ky0: usize,
        kx0: usize,
        out: &mut [f32],
    ) {
        use std::arch::x86_64::*;
        self.check(RA, RB, ky0, kx0);
        let mut acc = [[_mm256_setzero_ps(); RB]; RA];
        for r in 0..self.h {
            let xr = self.x[r * self.x_stride..].as_ptr();
            let mut g_rows = [xr; RA];
            for (a, row) in g_rows.iter_mut().enumerate() {
                *row = self.dy_row_for(r, ky0 + a).as_ptr();
            }
            for ox in (0..self.dy_stride).step_by(8) {
                let mut g = [_mm256_setzero_ps(); RA];
                for a in 0..RA {
                    // SAFETY: each dy row holds dy_stride floats; ox + 7 < dy_stride.
                    g[a] = unsafe { _mm256_loadu_ps(g_rows[a].add(ox)) };
                }
                for b in 0..RB {
                    // SAFETY: ox + kx0 + b + 7 < x_stride (`check`), row r < h.
                    let xv = unsafe { _mm256_loadu_ps(xr.add(ox + kx0 + b)) };
                    for a in 0..RA {
                        acc[a][b] = _mm256_fmadd_ps(g[a], xv, acc[a][b]);
                    }
                }
            }
        }
        let mut lanes = [0.0f32; 8];
        for a in 0..RA {
            for b in 0..RB {
                // SAFETY: `lanes` holds 8 floats; storeu has no alignment need.
                unsafe { _mm256_storeu_ps(lanes.as_mut_ptr(), acc[a][b]) };
                out[a * RB + b] = lanes.iter().sum();
            }
        }
    }

    #[cfg(target_arch = "x86_64")]
    #[target_feature(enable = "avx512f")]
    fn block_avx512<const RA: usize, const RB: usize>(
        &self,
        ky0: usize,
        kx0: usize,
        out: &mut [f32],
    ) {
        use std::arch::x86_64::*;
        self.check(RA, RB, ky0, kx0);
        let mut acc = [[_mm512_setzero_ps(); RB]; RA];
        for r in 0..self.h {
            let xr = self.x[r * self.x_stride..].as_ptr();
            let mut g_rows = [xr; RA];
            for (a, row) in g_rows.iter_mut().enumerate() {
                *row = self.dy_row_for(r, ky0 + a).as_ptr();
            }
            for ox in (0..self.dy_stride).step_by(16) {
                let mut g = [_mm512_setzero_ps(); RA];
                for a in 0..RA {
                    // SAFETY: each dy row holds dy_stride (a multiple of 16) floats.
                    g[a] = unsafe { _mm512_loadu_ps(g_rows[a].add(ox)) };
                }
                for b in 0..RB {
                    // SAFETY: ox + kx0 + b + 15 < x_stride (`check`), row r < h.
                    let xv = unsafe { _mm512_loadu_ps(xr.add(ox + kx0 + b)) };
                    for a in 0..RA {
                        acc[a][b] = _mm512_fmadd_ps(g[a], xv, acc[a][b]);
                    }
                }
            }
        }
        for a in 0..RA {
            for b in 0..RB {
                out[a * RB + b] = _mm512_reduce_add_ps(acc[a][b]);
            }
        }
    }

    fn block(&self, isa: Isa, ky0: usize, kx0: usize, out: &mut [f32]) {
        #[cfg(target_arch = "x86_64")]
        // SAFETY (both arms): the ISA was detected at run time by `detect_isa`.
        unsafe {
            match isa {
                Isa::Avx512 => return self.block_avx512::<WG_ROWS, WG_COLS>(ky0, kx0, out),
                Isa::Avx2 => return self.block_avx2::<WG_ROWS, WG_COLS>(ky0, kx0, out),
                Isa::Portable => {}
            }
        }
        let _ = isa;
        self.block_portable::<WG_ROWS, WG_COLS>(ky0, kx0, out)
    }
}

fn weight_grad_unit(conv: &DwConv2d, s: &ConvShape, x: &[f32], dy: &[f32], dw: &mut [f32]) {
    let (kh, kw) = conv.kernel;
    let (top, left) = (conv.padding.top, conv.padding.left);
    let isa = detect_isa();
    if lane_per_channel(isa, Op::WeightGrad, s) {
        return weight_grad_lanes(conv, s, x, dy, dw);
    }
    let (ra, rb) = (WG_ROWS, WG_COLS);
    dw.par_chunks_mut(kh * kw).enumerate().for_each(|(c, out)| {
        // Batch reduced in a fixed order in f64: deterministic, and accurate for long sums.
        let mut total = vec![0.0f64; kh * kw];
        let mut block = vec![0.0f32; ra * rb];
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
            for ky0 in (0..kh).step_by(ra) {
                for kx0 in (0..kw).step_by(rb) {
                    p.block(isa, ky0, kx0, &mut block);
                    for a in 0..ra.min(kh - ky0) {
                        for b in 0..rb.min(kw - kx0) {
                            total[(ky0 + a) * kw + kx0 + b] += block[a * rb + b] as f64;
                        }
                    }
                }
            }
        }
        for (o, t) in out.iter_mut().zip(total) {
            *o = t as f32;
        }
        repair_nonfinite(out, |tap| weight_grad_exact(conv, s, x, dy, c, tap));
    });
}

/// The lane-per-channel weight gradient (AVX-512 or AVX2): `weight_grad_unit`'s contract.
fn weight_grad_lanes(conv: &DwConv2d, s: &ConvShape, x: &[f32], dy: &[f32], dw: &mut [f32]) {
    let repair = |c: usize, dw_c: &mut [f32]| {
        repair_nonfinite(dw_c, |tap| weight_grad_exact(conv, s, x, dy, c, tap));
    };
    #[cfg(target_arch = "x86_64")]
    super::small::weight_grad(
        &lanes_geom(&Correlation::forward(conv, s), s),
        s.n,
        s.c,
        x,
        dy,
        dw,
        &repair,
    );
    #[cfg(not(target_arch = "x86_64"))]
    {
        let _ = (repair, dw);
        unreachable!("the lane-per-channel kernels need x86-64 vectors");
    }
}

// ---------------------------------------------------------------------------------------------
// Public entry points

/// The forward pass on validated sizes.
fn forward_kernel(
    conv: &DwConv2d,
    s: &ConvShape,
    x: &[f32],
    w: &[f32],
    bias: Option<&[f32]>,
    y: &mut [f32],
) {
    if conv.is_unit() {
        correlate_unit(s, &Correlation::forward(conv, s), x, w, false, bias, y);
    } else {
        super::naive::forward_plain(conv, s, x, w, bias, y);
    }
}

/// y [N,C,OH,OW] = conv(x [N,C,H,W], w [C,1,KH,KW]) + bias [C], into a caller's buffer.
/// `shape` comes from `conv.resolve`/`conv.check_forward`.
pub fn forward_f32_into(
    conv: &DwConv2d,
    shape: &ConvShape,
    x: &[f32],
    w: &[f32],
    bias: Option<&[f32]>,
    y: &mut [f32],
) -> Result<()> {
    let s = conv.resolve(shape.n, shape.c, shape.h, shape.w)?;
    check_len("x", x.len(), s.input_len())?;
    check_len("w", w.len(), s.c * conv.kernel.0 * conv.kernel.1)?;
    if let Some(b) = bias {
        check_len("bias", b.len(), s.c)?;
    }
    check_len("y", y.len(), s.output_len())?;
    forward_kernel(conv, &s, x, w, bias, y);
    Ok(())
}

/// The data gradient on validated sizes.
fn data_grad_kernel(conv: &DwConv2d, s: &ConvShape, dy: &[f32], w: &[f32], dx: &mut [f32]) {
    let (kh, kw) = conv.kernel;
    if conv.is_unit() {
        // dx = dy correlated with the filter rotated 180 degrees, padding K-1-p (may be negative).
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
        let corr = Correlation {
            kh,
            kw,
            stride: (1, 1),
            dilation: (1, 1),
            top,
            left,
            h: t.h,
            w: t.w,
        };
        correlate_unit(&t, &corr, dy, w, true, None, dx);
    } else {
        super::naive::data_grad_plain(conv, s, dy, w, dx);
    }
}

/// dx [N,C,H,W] from dy [N,C,OH,OW] and w, into a caller's buffer.
pub fn data_grad_f32_into(
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
    data_grad_kernel(conv, &s, dy, w, dx);
    Ok(())
}

/// The weight gradient on validated sizes.
fn weight_grad_kernel(conv: &DwConv2d, s: &ConvShape, x: &[f32], dy: &[f32], dw: &mut [f32]) {
    if conv.is_unit() {
        weight_grad_unit(conv, s, x, dy, dw);
    } else {
        super::naive::weight_grad_plain(conv, s, x, dy, dw);
    }
}

/// dw [C,1,KH,KW] from x and dy, into a caller's buffer; bit-identical run after run.
pub fn weight_grad_f32_into(
    conv: &DwConv2d,
    shape: &ConvShape,
    x: &[f32],
    dy: &[f32],
    dw: &mut [f32],
) -> Result<()> {
    let s = conv.resolve(shape.n, shape.c, shape.h, shape.w)?;
    let (kh, kw) = conv.kernel;
    check_len("x", x.len(), s.input_len())?;
    check_len("dy", dy.len(), s.output_len())?;
    check_len("dw", dw.len(), s.c * kh * kw)?;
    weight_grad_kernel(conv, &s, x, dy, dw);
    Ok(())
}

/// Forward on the fast path (f16/bf16 computed in f32).
pub fn forward<T: Element>(
    conv: &DwConv2d,
    x: &Tensor<T>,
    w: &Tensor<T>,
    bias: Option<&Tensor<T>>,
) -> Result<Tensor<T>> {
    super::wrap::tensor_forward(conv, x, w, bias, |c, s, x, w, b, y| {
        forward_kernel(c, s, x, w, b, y);
        Ok(())
    })
}

/// Data gradient on the fast path.
pub fn data_grad<T: Element>(
    conv: &DwConv2d,
    dy: &Tensor<T>,
    w: &Tensor<T>,
    input_hw: (usize, usize),
) -> Result<Tensor<T>> {
    super::wrap::tensor_data_grad(conv, dy, w, input_hw, |c, s, a, b, out| {
        data_grad_kernel(c, s, a, b, out);
        Ok(())
    })
}

/// Weight gradient on the fast path (deterministic).
pub fn weight_grad<T: Element>(
    conv: &DwConv2d,
    x: &Tensor<T>,
    dy: &Tensor<T>,
) -> Result<Tensor<T>> {
    super::wrap::tensor_weight_grad(conv, x, dy, |c, s, a, b, out| {
        weight_grad_kernel(c, s, a, b, out);
        Ok(())
    })
}
