//! Small planes (RepLKNet's 7x7 and 14x14 stages, and with enough channels larger ones; see
//! `direct.rs`'s `lane_per_channel`): one channel per AVX-512 lane.
//!
//! On small planes most of a large filter falls outside the image and a row is narrower than a
//! vector, so the row kernels of `direct.rs` waste most of their lanes and FMAs. Here 16
//! consecutive channels of one image are transposed (16 x 16 register transposes) to
//! pixel-major order `[pixel][lane]`: every FMA is a full vector whatever the plane width, and
//! only filter rows and input columns that touch the image are visited. The filter rows are
//! padded with zero columns on both sides, so a block of outputs needs no per-tap bounds checks
//! at the image's left and right edges; a NaN/Inf input times such a zero adds a spurious NaN,
//! which the caller's `repair` recomputes exactly.
//!
//! The weight gradient is the same correlation with dy in the filter's place and the kh x kw taps
//! as its output; each task owns 16 channels and reduces the batch in image order in f64, so the
//! result is bit-identical for any number of threads.

// The register-block loops index several fixed-size arrays in step; ranges read best there.
#![allow(clippy::needless_range_loop)]

use std::arch::x86_64::*;

use rayon::prelude::*;

/// Channels per group: one per AVX-512 lane.
const LANES: usize = 16;
/// Most outputs of one row in one register block.
const MAX_BLOCK: usize = 8;
/// Zero columns on each side of a transposed filter row: a block of up to MAX_BLOCK outputs
/// may read this far outside the filter.
const PAD: usize = MAX_BLOCK - 1;

/// A stride-1 correlation with signed padding (negative values crop), per plane:
/// `out[oy, ox] = sum in[oy - top + ky, ox - left + kx] * filter[ky, kx]` over the taps whose
/// input lies inside the `h x w` image.
#[derive(Clone, Copy, Debug)]
pub(super) struct Geom {
    /// Filter size.
    pub kh: usize,
    pub kw: usize,
    pub top: isize,
    pub left: isize,
    /// Input size.
    pub h: usize,
    pub w: usize,
    /// Output size.
    pub oh: usize,
    pub ow: usize,
}

impl Geom {
    /// The weight gradient of the forward pass `self` as a correlation: input x, filter dy,
    /// output the kh x kw taps.
    fn weight_grad(&self) -> Geom {
        Geom {
            kh: self.oh,
            kw: self.ow,
            top: self.top,
            left: self.left,
            h: self.h,
            w: self.w,
            oh: self.kh,
            ow: self.kw,
        }
    }

    /// Floats per transposed, zero-padded filter row.
    fn filter_stride(&self) -> usize {
        (self.kw + 2 * PAD) * LANES
    }

    fn filter_len(&self) -> usize {
        self.kh * self.filter_stride()
    }
}

/// A thread's buffers, kept from call to call so that the many short tasks of a call neither
/// allocate nor clear memory. Every task writes all it reads, except the filter's padding
/// columns, which are cleared whenever the filter size changes and never written otherwise.
#[derive(Default)]
struct Scratch {
    input: Vec<f32>,
    filter: Vec<f32>,
    /// The filter size (kh, kw) whose padding columns are zero in `filter`.
    filter_size: (usize, usize),
    /// Which filters `filter` holds: (call, channel group) of a forward-form call.
    filter_key: Option<(u64, usize)>,
    out: Vec<f32>,
    total: Vec<f64>,
}

/// One task's view of the buffers, the f32 ones aligned to cache lines (a 16-lane load that
/// straddles two lines costs two).
struct Buffers<'a> {
    input: &'a mut [f32],
    filter: &'a mut [f32],
    filter_key: &'a mut Option<(u64, usize)>,
    out: &'a mut [f32],
    total: &'a mut [f64],
}

impl Buffers<'_> {
    /// Fills the filter buffer by `fill` unless it already holds the filters of `key` (a task of
    /// the same call and channel group ran last on this thread); `None`: always fill.
    fn filter_for(&mut self, key: Option<(u64, usize)>, fill: impl FnOnce(&mut [f32])) {
        if key.is_none() || *self.filter_key != key {
            fill(self.filter);
            *self.filter_key = key;
        }
    }
}

/// Numbers the forward-form calls, so that a thread's filter buffer is known to be current.
static CALLS: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);

thread_local! {
    static SCRATCH: std::cell::RefCell<Scratch> = std::cell::RefCell::default();
}

/// `len` floats of `v` starting at a 64-byte boundary (`v` grown as needed).
fn aligned(v: &mut Vec<f32>, len: usize) -> &mut [f32] {
    if v.len() < len + LANES {
        v.resize(len + LANES, 0.0);
    }
    let first = v.as_ptr().align_offset(64);
    &mut v[first..first + len]
}

impl Scratch {
    /// Runs `task` with this thread's buffers, sized for `g` (`total`: for a batch reduction).
    fn with<R>(g: &Geom, total: bool, task: impl FnOnce(Buffers) -> R) -> R {
        SCRATCH.with_borrow_mut(|scr| {
            if scr.filter_size != (g.kh, g.kw) {
                scr.filter.clear();
                scr.filter_size = (g.kh, g.kw);
                scr.filter_key = None;
            }
            let out_len = g.oh * g.ow * LANES;
            if total && scr.total.len() < out_len {
                scr.total.resize(out_len, 0.0);
            }
            task(Buffers {
                input: aligned(&mut scr.input, g.h * g.w * LANES),
                filter: aligned(&mut scr.filter, g.filter_len()),
                filter_key: &mut scr.filter_key,
                out: aligned(&mut scr.out, out_len),
                total: &mut scr.total[..if total { out_len } else { 0 }],
            })
        })
    }
}

/// Forward-form correlation of every plane of `x` [n][c][h][w] with its channel's filter
/// `w` [c][kh][kw] (rotated by 180 degrees when `rotate`: the data gradient) plus `bias`, into
/// `y` [n][c][oh][ow]. `repair(plane, y_plane)` fixes the non-finite values of a plane.
#[allow(clippy::too_many_arguments)]
pub(super) fn correlate(
    g: &Geom,
    c: usize,
    x: &[f32],
    w: &[f32],
    rotate: bool,
    bias: Option<&[f32]>,
    y: &mut [f32],
    repair: &(dyn Fn(usize, &mut [f32]) + Sync),
) {
    let (hw, ohw, kk) = (g.h * g.w, g.oh * g.ow, g.kh * g.kw);
    assert!(x.len() / hw == y.len() / ohw && w.len() >= c * kk);
    let groups = c.div_ceil(LANES);
    let call = CALLS.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    // One task per (group of 16 channels, image), the images of a group next to each other:
    // a thread that runs them in a row transposes the group's filters once.
    let mut by_group: Vec<Vec<&mut [f32]>> = (0..groups).map(|_| Vec::new()).collect();
    for y_img in y.chunks_mut(c * ohw) {
        for (group, y_grp) in y_img.chunks_mut(LANES * ohw).enumerate() {
            by_group[group].push(y_grp);
        }
    }
    let tasks: Vec<(usize, usize, &mut [f32])> = by_group
        .into_iter()
        .enumerate()
        .flat_map(|(group, ys)| {
            ys.into_iter()
                .enumerate()
                .map(move |(img, y)| (group, img, y))
        })
        .collect();
    tasks.into_par_iter().for_each(|(group, img, y_grp)| {
        Scratch::with(g, false, |mut scr| {
            let c0 = group * LANES;
            let lanes = y_grp.len() / ohw;
            let mut init = [0.0f32; LANES];
            if let Some(b) = bias {
                init[..lanes].copy_from_slice(&b[c0..c0 + lanes]);
            }
            let p0 = img * c + c0;
            // SAFETY (whole block): only called when AVX-512F was detected; each call asserts
            // the extents its unchecked loads and stores rely on.
            let finite = unsafe {
                to_lanes(&x[p0 * hw..], hw, lanes, hw, scr.input, Layout::dense(hw));
                scr.filter_for(Some((call, group)), |f| {
                    filter_to_lanes(g, &w[c0 * kk..], kk, lanes, rotate, f)
                });
                let finite = correlate_lanes(g, scr.input, scr.filter, &init, scr.out);
                from_lanes(scr.out, lanes, ohw, y_grp, ohw);
                finite
            };
            if !finite {
                for (l, y_plane) in y_grp.chunks_mut(ohw).enumerate() {
                    repair(p0 + l, y_plane);
                }
            }
        })
    });
}

/// Weight gradient of every channel: `dw[c][ky][kx] = sum over images and outputs of
/// dy[oy][ox] * x[oy - top + ky][ox - left + kx]` (in-image taps only), reduced over the batch
/// in image order (f64). `g` is the forward pass's geometry; `repair(c, dw_c)` fixes the
/// non-finite taps of a channel.
#[allow(clippy::too_many_arguments)]
pub(super) fn weight_grad(
    g: &Geom,
    n: usize,
    c: usize,
    x: &[f32],
    dy: &[f32],
    dw: &mut [f32],
    repair: &(dyn Fn(usize, &mut [f32]) + Sync),
) {
    let t = g.weight_grad();
    let (hw, ohw, kk) = (g.h * g.w, g.oh * g.ow, g.kh * g.kw);
    assert!(x.len() == n * c * hw && dy.len() == n * c * ohw && dw.len() == c * kk);
    let pairs = all_pairs_width(&t);
    dw.par_chunks_mut(LANES * kk)
        .enumerate()
        .for_each(|(group, dw_grp)| {
            Scratch::with(&t, n > 1, |mut scr| {
                let c0 = group * LANES;
                let lanes = dw_grp.len() / kk;
                let mut finite = true;
                for img in 0..n {
                    let p0 = img * c + c0;
                    // SAFETY (whole block): only called when AVX-512F was detected; each call
                    // asserts the extents its unchecked loads and stores rely on.
                    unsafe {
                        to_lanes(&x[p0 * hw..], hw, lanes, hw, scr.input, Layout::dense(hw));
                        scr.filter_for(None, |f| {
                            filter_to_lanes(&t, &dy[p0 * ohw..], ohw, lanes, false, f)
                        });
                        finite &= match pairs {
                            Some(width) => wgrad_pairs(&t, width, scr.input, scr.filter, scr.out),
                            None => {
                                correlate_lanes(&t, scr.input, scr.filter, &[0.0; LANES], scr.out)
                            }
                        };
                        if n > 1 {
                            accumulate(scr.total, scr.out, img == 0);
                        }
                    }
                }
                if n > 1 {
                    for (o, t) in scr.out.iter_mut().zip(&*scr.total) {
                        *o = *t as f32;
                    }
                }
                // SAFETY: AVX-512F was detected; `from_lanes` asserts its extents.
                unsafe { from_lanes(scr.out, lanes, kk, dw_grp, kk) };
                if !finite {
                    for (l, dw_c) in dw_grp.chunks_mut(kk).enumerate() {
                        repair(c0 + l, dw_c);
                    }
                }
            })
        });
}

/// `total (+)= part` in f64 (`first`: overwrite), in a fixed order.
#[target_feature(enable = "avx512f")]
fn accumulate(total: &mut [f64], part: &[f32], first: bool) {
    if first {
        for (t, p) in total.iter_mut().zip(part) {
            *t = *p as f64;
        }
    } else {
        for (t, p) in total.iter_mut().zip(part) {
            *t += *p as f64;
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Transposes between planes and [pixel][lane] order.

/// Transposes a 16 x 16 block held in 16 registers: afterwards `r[j]` lane `i` is the old
/// `r[i]` lane `j`.
#[target_feature(enable = "avx512f")]
fn transpose16(r: &mut [__m512; 16]) {
    // Pairs of rows interleaved per 128-bit lane, then pairs of pairs: t[4k + m] holds, in
    // 128-bit lane q, column 4q + m of rows 4k..4k + 4.
    let mut s = [_mm512_setzero_ps(); 16];
    for k in 0..8 {
        s[2 * k] = _mm512_unpacklo_ps(r[2 * k], r[2 * k + 1]);
        s[2 * k + 1] = _mm512_unpackhi_ps(r[2 * k], r[2 * k + 1]);
    }
    let mut t = [_mm512_setzero_ps(); 16];
    for k in 0..4 {
        let pd = |v: __m512| _mm512_castps_pd(v);
        let (a, b) = (pd(s[4 * k]), pd(s[4 * k + 2]));
        let (c, d) = (pd(s[4 * k + 1]), pd(s[4 * k + 3]));
        t[4 * k] = _mm512_castpd_ps(_mm512_unpacklo_pd(a, b));
        t[4 * k + 1] = _mm512_castpd_ps(_mm512_unpackhi_pd(a, b));
        t[4 * k + 2] = _mm512_castpd_ps(_mm512_unpacklo_pd(c, d));
        t[4 * k + 3] = _mm512_castpd_ps(_mm512_unpackhi_pd(c, d));
    }
    // A 4 x 4 transpose of 128-bit lanes among t[m], t[4 + m], t[8 + m], t[12 + m].
    for m in 0..4 {
        let u0 = _mm512_shuffle_f32x4::<0x44>(t[m], t[4 + m]);
        let u1 = _mm512_shuffle_f32x4::<0xEE>(t[m], t[4 + m]);
        let u2 = _mm512_shuffle_f32x4::<0x44>(t[8 + m], t[12 + m]);
        let u3 = _mm512_shuffle_f32x4::<0xEE>(t[8 + m], t[12 + m]);
        r[m] = _mm512_shuffle_f32x4::<0x88>(u0, u2);
        r[4 + m] = _mm512_shuffle_f32x4::<0xDD>(u0, u2);
        r[8 + m] = _mm512_shuffle_f32x4::<0x88>(u1, u3);
        r[12 + m] = _mm512_shuffle_f32x4::<0xDD>(u1, u3);
    }
}

/// Where `to_lanes` stores the pixels of a plane of rows of `row_len` pixels: pixel (r, c) goes
/// to vector `r * row_stride + first + c` of the destination, or, when `rotate`, pixel
/// (rows - 1 - r, row_len - 1 - c) does (the plane rotated by 180 degrees).
#[derive(Clone, Copy, Debug)]
struct Layout {
    row_len: usize,
    row_stride: usize,
    first: usize,
    rotate: bool,
}

impl Layout {
    /// Dense, in order.
    fn dense(len: usize) -> Self {
        Layout {
            row_len: len.max(1),
            row_stride: len,
            first: 0,
            rotate: false,
        }
    }
}

/// `dst[at(i)][l] = src[l * stride + i]` for i < len, l < lanes (lanes beyond: zero), where
/// `at` is `layout`'s vector index of pixel i.
///
/// # Safety
/// AVX-512F must be present.
#[target_feature(enable = "avx512f")]
unsafe fn to_lanes(
    src: &[f32],
    stride: usize,
    lanes: usize,
    len: usize,
    dst: &mut [f32],
    layout: Layout,
) {
    let Layout {
        row_len,
        row_stride,
        first,
        rotate,
    } = layout;
    assert!((1..=LANES).contains(&lanes) && (lanes - 1) * stride + len <= src.len());
    assert!(len.is_multiple_of(row_len) && row_len <= row_stride);
    let rows = len / row_len;
    assert!(len == 0 || ((rows - 1) * row_stride + first + row_len) * LANES <= dst.len());
    // Pixel i = r * row_len + c, walked in order.
    let (mut r, mut c) = (0, 0);
    for i0 in (0..len).step_by(LANES) {
        let count = (len - i0).min(LANES);
        let mask = (u32::MAX >> (32 - count)) as __mmask16;
        let mut v = [_mm512_setzero_ps(); LANES];
        for l in 0..lanes {
            // SAFETY: the `count` floats at l * stride + i0 lie in src (asserted); the masked
            // load touches no others.
            v[l] = unsafe { _mm512_maskz_loadu_ps(mask, src.as_ptr().add(l * stride + i0)) };
        }
        transpose16(&mut v);
        for p in 0..count {
            let at = if rotate {
                (rows - 1 - r) * row_stride + first + row_len - 1 - c
            } else {
                r * row_stride + first + c
            };
            // SAFETY: r < rows and c < row_len, so `at` is below the bound asserted above.
            unsafe { _mm512_storeu_ps(dst.as_mut_ptr().add(at * LANES), v[p]) };
            c += 1;
            if c == row_len {
                (r, c) = (r + 1, 0);
            }
        }
    }
}

/// `dst[l * stride + i] = src[i][l]` for i < len, l < lanes.
///
/// # Safety
/// AVX-512F must be present.
#[target_feature(enable = "avx512f")]
unsafe fn from_lanes(src: &[f32], lanes: usize, len: usize, dst: &mut [f32], stride: usize) {
    assert!((1..=LANES).contains(&lanes) && (lanes - 1) * stride + len <= dst.len());
    assert!(len * LANES <= src.len());
    for i0 in (0..len).step_by(LANES) {
        let count = (len - i0).min(LANES);
        let mask = (u32::MAX >> (32 - count)) as __mmask16;
        let mut r = [_mm512_setzero_ps(); LANES];
        for p in 0..count {
            // SAFETY: (i0 + p) * 16 + 16 <= len * 16 <= src.len() (asserted).
            r[p] = unsafe { _mm512_loadu_ps(src.as_ptr().add((i0 + p) * LANES)) };
        }
        transpose16(&mut r);
        for l in 0..lanes {
            // SAFETY: the `count` floats at l * stride + i0 lie in dst (asserted); the masked
            // store touches no others.
            unsafe { _mm512_mask_storeu_ps(dst.as_mut_ptr().add(l * stride + i0), mask, r[l]) };
        }
    }
}

/// The filters of `lanes` channels (channel l at `src[l * stride..]`, `g.kh x g.kw`), rotated
/// by 180 degrees when `rotate`, into the transposed layout `[ky][PAD + kx][lane]` (only the
/// interior is written: the PAD columns on both sides of every row stay as they are, zero).
///
/// # Safety
/// AVX-512F must be present.
#[target_feature(enable = "avx512f")]
unsafe fn filter_to_lanes(
    g: &Geom,
    src: &[f32],
    stride: usize,
    lanes: usize,
    rotate: bool,
    dst: &mut [f32],
) {
    let layout = Layout {
        row_len: g.kw,
        row_stride: g.filter_stride() / LANES,
        first: PAD,
        rotate,
    };
    // SAFETY: AVX-512F is present (this function's contract).
    unsafe { to_lanes(src, stride, lanes, g.kh * g.kw, dst, layout) };
}

// ---------------------------------------------------------------------------------------------
// The correlation on [pixel][lane] data.

/// All outputs of one group: per output row, blocks of up to MAX_BLOCK outputs in registers.
///
/// # Safety
/// AVX-512F must be present.
#[target_feature(enable = "avx512f")]
unsafe fn correlate_lanes(
    g: &Geom,
    input: &[f32],
    filter: &[f32],
    init: &[f32; LANES],
    out: &mut [f32],
) -> bool {
    assert!(input.len() >= g.h * g.w * LANES && filter.len() >= g.filter_len());
    assert!(out.len() >= g.oh * g.ow * LANES);
    let mut probe = _mm512_setzero_ps();
    for oy in 0..g.oh {
        let mut ox0 = 0;
        while ox0 < g.ow {
            let nb = (g.ow - ox0).min(MAX_BLOCK);
            let args = (g, input, filter, init, &mut *out, &mut probe, oy, ox0);
            // SAFETY (every arm): AVX-512F is present; extents asserted above.
            unsafe {
                match nb {
                    8 => block::<8>(args),
                    7 => block::<7>(args),
                    6 => block::<6>(args),
                    5 => block::<5>(args),
                    4 => block::<4>(args),
                    3 => block::<3>(args),
                    2 => block::<2>(args),
                    _ => block::<1>(args),
                }
            }
            ox0 += nb;
        }
    }
    is_zero(probe)
}

/// Whether a probe (a sum of `output * 0` terms) is still zero: NaN once any output was
/// Inf or NaN.
#[target_feature(enable = "avx512f")]
fn is_zero(probe: __m512) -> bool {
    _mm512_reduce_add_ps(probe) == 0.0
}

/// Geometry, input, filter, initial value, output, non-finite probe, output row, first output
/// column.
type BlockArgs<'a> = (
    &'a Geom,
    &'a [f32],
    &'a [f32],
    &'a [f32; LANES],
    &'a mut [f32],
    &'a mut __m512,
    usize,
    usize,
);

/// Outputs (oy, ox0 .. ox0 + NB): for every input pixel of the rows they read, one vector load
/// feeds all NB outputs (one filter-vector operand per FMA; the padding columns make every
/// output's tap index valid, so the loop has no branches).
///
/// # Safety
/// AVX-512F must be present; the extents asserted in `correlate_lanes` must hold.
#[target_feature(enable = "avx512f")]
unsafe fn block<const NB: usize>((g, input, filter, init, out, probe, oy, ox0): BlockArgs) {
    // SAFETY: `init` holds 16 floats.
    let b = unsafe { _mm512_loadu_ps(init.as_ptr()) };
    let mut acc = [b; NB];
    // Filter rows whose input row iy = oy - top + ky lies inside the image.
    let ky_lo = (g.top - oy as isize).max(0) as usize;
    let ky_hi = (g.h as isize + g.top - oy as isize).clamp(0, g.kh as isize) as usize;
    // Input columns any output of the block reads: ix = ox - left + kx, kx in [0, kw).
    let ix_lo = (ox0 as isize - g.left).max(0);
    let ix_hi = ((ox0 + NB) as isize - g.left + g.kw as isize - 1).min(g.w as isize);
    // Padded filter column of output ox0 + j and input column ix: PAD + ix - ox0 - j + left,
    // within [0, kw + 2 PAD) for every j < NB <= PAD + 1 and ix in [ix_lo, ix_hi).
    let col0 = PAD as isize + g.left - ox0 as isize;
    for ky in ky_lo..ky_hi {
        let iy = (oy as isize - g.top + ky as isize) as usize;
        // SAFETY: iy < h and ky < kh (the ranges above), so the rows lie inside input and filter.
        let x_row = unsafe { input.as_ptr().add(iy * g.w * LANES) };
        // SAFETY: ky < kh, as above.
        let f_row = unsafe { filter.as_ptr().add(ky * g.filter_stride()) };
        for ix in ix_lo..ix_hi {
            // SAFETY: 0 <= ix < w; the padded column col0 + ix - j is in range (see above).
            unsafe {
                let xv = _mm512_loadu_ps(x_row.offset(ix * LANES as isize));
                let f0 = f_row.offset((col0 + ix) * LANES as isize);
                for (j, a) in acc.iter_mut().enumerate() {
                    *a = _mm512_fmadd_ps(xv, _mm512_loadu_ps(f0.sub(j * LANES)), *a);
                }
            }
        }
    }
    for (j, a) in acc.iter().enumerate() {
        let off = (oy * g.ow + ox0 + j) * LANES;
        assert!(off + LANES <= out.len());
        // SAFETY: asserted just above.
        unsafe { _mm512_storeu_ps(out.as_mut_ptr().add(off), *a) };
        *probe = _mm512_fmadd_ps(*a, _mm512_setzero_ps(), *probe);
    }
}

// ---------------------------------------------------------------------------------------------
// Weight gradient when every pair of a row meets inside the filter (RepLKNet's 7x7 K13).

/// Widest rows `wgrad_pairs` holds in registers (7 dy + 7 x + 13 sums of 32 vector registers).
const PAIRS_MAX_WIDTH: usize = 7;

/// Whether the weight gradient of the forward pass `g` takes `wgrad_pairs`.
pub(super) fn weight_grad_takes_pairs(g: &Geom) -> bool {
    all_pairs_width(&g.weight_grad()).is_some()
}

/// The row width W when the weight gradient's correlation `t` (input x, filter dy, output the
/// taps) has x and dy rows of the same width W <= PAIRS_MAX_WIDTH and every pair (dy column ox,
/// x column ix) of two rows meets at a tap column inside the filter: k = ix - ox + left in
/// [0, kw) for all of them (padding >= W - 1 on both sides, as "same" padding with K >= 2W - 1).
fn all_pairs_width(t: &Geom) -> Option<usize> {
    let w = t.w;
    let fits = t.kw == w
        && (1..=PAIRS_MAX_WIDTH).contains(&w)
        && t.left >= w as isize - 1
        && t.left + (w as isize - 1) < t.ow as isize;
    fits.then_some(w)
}

/// The weight-gradient correlation `t` for `all_pairs_width(t) == Some(width)`: per tap row and
/// dy row, both rows in registers and all W x W products added exactly where they belong (no
/// padded taps computed), the 2W - 1 tap sums in registers. Returns whether all are finite.
///
/// # Safety
/// AVX-512F must be present.
#[target_feature(enable = "avx512f")]
unsafe fn wgrad_pairs(
    t: &Geom,
    width: usize,
    input: &[f32],
    filter: &[f32],
    out: &mut [f32],
) -> bool {
    assert_eq!(all_pairs_width(t), Some(width));
    assert!(input.len() >= t.h * t.w * LANES && filter.len() >= t.filter_len());
    assert!(out.len() >= t.oh * t.ow * LANES);
    // SAFETY (every arm): AVX-512F is present; extents asserted above.
    unsafe {
        match width {
            7 => pairs::<7, 13>(t, input, filter, out),
            6 => pairs::<6, 11>(t, input, filter, out),
            5 => pairs::<5, 9>(t, input, filter, out),
            4 => pairs::<4, 7>(t, input, filter, out),
            3 => pairs::<3, 5>(t, input, filter, out),
            2 => pairs::<2, 3>(t, input, filter, out),
            _ => pairs::<1, 1>(t, input, filter, out),
        }
    }
}

/// `wgrad_pairs` for rows of W columns (S = 2W - 1 tap sums).
///
/// # Safety
/// AVX-512F must be present; the extents asserted in `wgrad_pairs` must hold.
#[target_feature(enable = "avx512f")]
unsafe fn pairs<const W: usize, const S: usize>(
    t: &Geom,
    input: &[f32],
    filter: &[f32],
    out: &mut [f32],
) -> bool {
    let mut probe = _mm512_setzero_ps();
    // Tap column of sum m: k = left - (W - 1) + m; the other tap columns meet no pair.
    let k0 = (t.left - (W as isize - 1)) as usize;
    for a in 0..t.oh {
        let mut acc = [_mm512_setzero_ps(); S];
        // dy rows whose x row iy = a - top + b lies inside the image.
        let b_lo = (t.top - a as isize).max(0) as usize;
        let b_hi = (t.h as isize + t.top - a as isize).clamp(0, t.kh as isize) as usize;
        for b in b_lo..b_hi {
            let iy = (a as isize - t.top + b as isize) as usize;
            let mut d = [_mm512_setzero_ps(); W];
            let mut x = [_mm512_setzero_ps(); W];
            for i in 0..W {
                // SAFETY: b < kh and iy < h, i < W = kw = w: inside filter and input (asserted).
                unsafe {
                    d[i] = _mm512_loadu_ps(
                        filter
                            .as_ptr()
                            .add(b * t.filter_stride() + (PAD + i) * LANES),
                    );
                    x[i] = _mm512_loadu_ps(input.as_ptr().add((iy * W + i) * LANES));
                }
            }
            for ox in 0..W {
                for ix in 0..W {
                    let m = ix + W - 1 - ox;
                    acc[m] = _mm512_fmadd_ps(d[ox], x[ix], acc[m]);
                }
            }
        }
        let row = &mut out[a * t.ow * LANES..][..t.ow * LANES];
        row.fill(0.0);
        for (m, v) in acc.iter().enumerate() {
            // SAFETY: k0 + m < ow (`all_pairs_width`), so the 16 floats lie inside `row`.
            unsafe { _mm512_storeu_ps(row.as_mut_ptr().add((k0 + m) * LANES), *v) };
            probe = _mm512_fmadd_ps(*v, _mm512_setzero_ps(), probe);
        }
    }
    is_zero(probe)
}
