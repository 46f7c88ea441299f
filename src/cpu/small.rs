//! Small planes (RepLKNet's 7x7 and 14x14 stages, and with enough channels larger ones; see
//! `direct.rs`'s `lane_per_channel`): one channel per vector lane. One body over `cpu::simd`:
//! 16 channels per group on AVX-512, 8 on AVX2.
//!
//! On small planes most of a large filter falls outside the image and a row is narrower than a
//! vector, so the row kernels of `direct.rs` waste most of their lanes and FMAs. Here a group of
//! consecutive channels of one image, one per lane, is transposed (LANES x LANES register
//! transposes) to pixel-major order `[pixel][lane]`: every FMA is a full vector whatever the plane width, and
//! only filter rows and input columns that touch the image are visited. The filter rows are
//! padded with zero columns on both sides, so a block of outputs needs no per-tap bounds checks
//! at the image's left and right edges; a NaN/Inf input times such a zero adds a spurious NaN,
//! which the caller's `repair` recomputes exactly.
//!
//! The weight gradient is the same correlation with dy in the filter's place and the kh x kw taps
//! as its output; each task owns one group of channels and reduces the batch in image order in
//! f64, so the result is bit-identical for any number of threads.
//!
//! A group is as wide as a vector (16 channels on AVX-512, 8 on AVX2): the rayon tasks pick the instruction set once per call and run each group's body inside its
//! `#[target_feature]` wrapper (`simd::run_on`).

// The register-block loops index several fixed-size arrays in step; ranges read best there.
#![allow(clippy::needless_range_loop)]

use rayon::prelude::*;

use super::simd::{self, Isa, Simd, SimdOp};

/// Channels per group on the widest instruction set (one per AVX-512 lane); a group holds
/// `S::LANES` of them.
const MAX_LANES: usize = 16;
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

    /// Floats per transposed, zero-padded filter row of a group of `lanes` channels.
    fn filter_stride(&self, lanes: usize) -> usize {
        (self.kw + 2 * PAD) * lanes
    }

    fn filter_len(&self, lanes: usize) -> usize {
        self.kh * self.filter_stride(lanes)
    }
}

/// The vector instruction set these kernels run on, and its group width: the engine's ISA
/// (`direct.rs` takes them only where it has vectors).
fn group_isa() -> (Isa, usize) {
    let isa = simd::detect_isa();
    assert!(
        isa >= Isa::Avx2,
        "the lane-per-channel kernels need AVX2 or AVX-512"
    );
    (isa, isa.lanes())
}

/// A thread's buffers, kept from call to call so that the many short tasks of a call neither
/// allocate nor clear memory. Every task writes all it reads, except the filter's padding
/// columns, which are cleared whenever the filter size changes and never written otherwise.
#[derive(Default)]
struct Scratch {
    input: Vec<f32>,
    filter: Vec<f32>,
    /// The filter size (kh, kw, group width) whose padding columns are zero in `filter`.
    filter_size: (usize, usize, usize),
    /// Which filters `filter` holds: (call, channel group) of a forward-form call.
    filter_key: Option<(u64, usize)>,
    out: Vec<f32>,
    total: Vec<f64>,
}

/// One task's view of the buffers, the f32 ones aligned to cache lines (a vector load that
/// straddles two lines costs two).
struct Buffers<'a> {
    input: &'a mut [f32],
    filter: &'a mut [f32],
    filter_key: &'a mut Option<(u64, usize)>,
    out: &'a mut [f32],
    total: &'a mut [f64],
}

impl Buffers<'_> {
    /// Whether the filter buffer must be filled for `key` (it does not already hold the filters
    /// of a task of the same call and channel group that ran last on this thread; `None`:
    /// always). Records `key` as what it will hold.
    fn needs_filter(&mut self, key: Option<(u64, usize)>) -> bool {
        let fill = key.is_none() || *self.filter_key != key;
        *self.filter_key = key;
        fill
    }
}

/// Numbers the forward-form calls, so that a thread's filter buffer is known to be current.
static CALLS: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);

thread_local! {
    static SCRATCH: std::cell::RefCell<Scratch> = std::cell::RefCell::default();
}

/// `len` floats of `v` starting at a 64-byte boundary (`v` grown as needed).
fn aligned(v: &mut Vec<f32>, len: usize) -> &mut [f32] {
    if v.len() < len + MAX_LANES {
        v.resize(len + MAX_LANES, 0.0);
    }
    let first = v.as_ptr().align_offset(64);
    &mut v[first..first + len]
}

impl Scratch {
    /// Runs `task` with this thread's buffers, sized for `g` with groups of `lanes` channels
    /// (`total`: for a batch reduction).
    fn with<R>(g: &Geom, lanes: usize, total: bool, task: impl FnOnce(Buffers) -> R) -> R {
        SCRATCH.with_borrow_mut(|scr| {
            if scr.filter_size != (g.kh, g.kw, lanes) {
                scr.filter.clear();
                scr.filter_size = (g.kh, g.kw, lanes);
                scr.filter_key = None;
            }
            let out_len = g.oh * g.ow * lanes;
            if total && scr.total.len() < out_len {
                scr.total.resize(out_len, 0.0);
            }
            task(Buffers {
                input: aligned(&mut scr.input, g.h * g.w * lanes),
                filter: aligned(&mut scr.filter, g.filter_len(lanes)),
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
    let (isa, lanes) = group_isa();
    let groups = c.div_ceil(lanes);
    let call = CALLS.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    // One task per (group of channels, image), the images of a group next to each other: a
    // thread that runs them in a row transposes the group's filters once.
    let mut by_group: Vec<Vec<&mut [f32]>> = (0..groups).map(|_| Vec::new()).collect();
    for y_img in y.chunks_mut(c * ohw) {
        for (group, y_grp) in y_img.chunks_mut(lanes * ohw).enumerate() {
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
        Scratch::with(g, lanes, false, |scr| {
            let c0 = group * lanes;
            let used = y_grp.len() / ohw;
            let mut init = [0.0f32; MAX_LANES];
            if let Some(b) = bias {
                init[..used].copy_from_slice(&b[c0..c0 + used]);
            }
            let p0 = img * c + c0;
            let task = CorrelateGroup {
                g,
                x: &x[p0 * hw..],
                w: &w[c0 * kk..],
                rotate,
                key: (call, group),
                init: &init,
                scr,
                y: &mut *y_grp,
            };
            if !simd::run_on(isa, task) {
                for (l, y_plane) in y_grp.chunks_mut(ohw).enumerate() {
                    repair(p0 + l, y_plane);
                }
            }
        })
    });
}

/// One group of `correlate`: the group's planes (channel l at `x[l * hw..]`, `y[l * ohw..]`,
/// as many as `y` holds) and filters (`w[l * kh * kw..]`).
struct CorrelateGroup<'a> {
    g: &'a Geom,
    x: &'a [f32],
    w: &'a [f32],
    rotate: bool,
    key: (u64, usize),
    init: &'a [f32; MAX_LANES],
    scr: Buffers<'a>,
    y: &'a mut [f32],
}

impl SimdOp for CorrelateGroup<'_> {
    /// Whether every output is finite.
    type Output = bool;

    #[inline(always)]
    fn vector<S: Simd>(self, s: S) -> bool {
        let CorrelateGroup {
            g,
            x,
            w,
            rotate,
            key,
            init,
            mut scr,
            y,
        } = self;
        let (hw, ohw, kk) = (g.h * g.w, g.oh * g.ow, g.kh * g.kw);
        let lanes = y.len() / ohw;
        to_lanes(s, x, hw, lanes, hw, scr.input, Layout::dense(hw));
        if scr.needs_filter(Some(key)) {
            filter_to_lanes(s, g, w, kk, lanes, rotate, scr.filter);
        }
        let finite = correlate_lanes(s, g, scr.input, scr.filter, init, scr.out);
        from_lanes(s, scr.out, lanes, ohw, y, ohw);
        finite
    }

    fn portable(self) -> bool {
        unreachable!("group_isa asserts a vector instruction set")
    }
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
    let (isa, lanes) = group_isa();
    dw.par_chunks_mut(lanes * kk)
        .enumerate()
        .for_each(|(group, dw_grp)| {
            Scratch::with(&t, lanes, n > 1, |scr| {
                let c0 = group * lanes;
                let task = WeightGradGroup {
                    t: &t,
                    n,
                    c,
                    c0,
                    x,
                    dy,
                    scr,
                    dw: &mut *dw_grp,
                };
                if !simd::run_on(isa, task) {
                    for (l, dw_c) in dw_grp.chunks_mut(kk).enumerate() {
                        repair(c0 + l, dw_c);
                    }
                }
            })
        });
}

/// One group of `weight_grad`: channels c0.. (as many as `dw` holds filters for) of every image.
struct WeightGradGroup<'a> {
    /// The weight gradient's correlation.
    t: &'a Geom,
    n: usize,
    c: usize,
    c0: usize,
    x: &'a [f32],
    dy: &'a [f32],
    scr: Buffers<'a>,
    dw: &'a mut [f32],
}

impl SimdOp for WeightGradGroup<'_> {
    /// Whether every tap is finite.
    type Output = bool;

    #[inline(always)]
    fn vector<S: Simd>(self, s: S) -> bool {
        let WeightGradGroup {
            t,
            n,
            c,
            c0,
            x,
            dy,
            mut scr,
            dw,
        } = self;
        // t's input is the forward input, its filter dy, its output the taps.
        let (hw, ohw, kk) = (t.h * t.w, t.kh * t.kw, t.oh * t.ow);
        let lanes = dw.len() / kk;
        let pairs = all_pairs_width(t);
        let mut finite = true;
        for img in 0..n {
            let p0 = img * c + c0;
            to_lanes(
                s,
                &x[p0 * hw..],
                hw,
                lanes,
                hw,
                scr.input,
                Layout::dense(hw),
            );
            if scr.needs_filter(None) {
                filter_to_lanes(s, t, &dy[p0 * ohw..], ohw, lanes, false, scr.filter);
            }
            finite &= match pairs {
                Some(width) => wgrad_pairs(s, t, width, scr.input, scr.filter, scr.out),
                None => correlate_lanes(s, t, scr.input, scr.filter, &[0.0; MAX_LANES], scr.out),
            };
            if n > 1 {
                accumulate(scr.total, scr.out, img == 0);
            }
        }
        if n > 1 {
            for (o, t) in scr.out.iter_mut().zip(&*scr.total) {
                *o = *t as f32;
            }
        }
        from_lanes(s, scr.out, lanes, kk, dw, kk);
        finite
    }

    fn portable(self) -> bool {
        unreachable!("group_isa asserts a vector instruction set")
    }
}

/// `total (+)= part` in f64 (`first`: overwrite), in a fixed order.
#[inline(always)]
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
/// `at` is `layout`'s vector index of pixel i (vectors of `S::LANES` floats).
#[inline(always)]
fn to_lanes<S: Simd>(
    s: S,
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
    let width = S::LANES;
    assert!((1..=width).contains(&lanes) && (lanes - 1) * stride + len <= src.len());
    assert!(len.is_multiple_of(row_len) && row_len <= row_stride);
    let rows = len / row_len;
    assert!(len == 0 || ((rows - 1) * row_stride + first + row_len) * width <= dst.len());
    let dense = !rotate && row_stride == row_len && first == 0;
    // Pixel i = r * row_len + c, walked in order.
    let (mut r, mut c) = (0, 0);
    for i0 in (0..len).step_by(width) {
        let count = (len - i0).min(width);
        let mut v = [s.zero(); MAX_LANES];
        // Whole vectors of a whole group (the common case) with plain loads in a loop of fixed
        // length; masked loads only for the tail or a partial group.
        if count == width && lanes == width {
            for l in 0..width {
                // SAFETY: the `width` floats at l * stride + i0 lie in src (asserted).
                v[l] = unsafe { s.load(src.as_ptr().add(l * stride + i0)) };
            }
        } else {
            let mask = s.tail(count);
            for l in 0..lanes {
                // SAFETY: the `count` floats at l * stride + i0 lie in src (asserted); the
                // masked load touches no others.
                v[l] = unsafe { s.load_masked(src.as_ptr().add(l * stride + i0), mask) };
            }
        }
        s.transpose(&mut v[..width]);
        if dense {
            for p in 0..count {
                // SAFETY: i0 + p < len = rows * row_len, inside the bound asserted above.
                unsafe { s.store(dst.as_mut_ptr().add((i0 + p) * width), v[p]) };
            }
            continue;
        }
        for p in 0..count {
            let at = if rotate {
                (rows - 1 - r) * row_stride + first + row_len - 1 - c
            } else {
                r * row_stride + first + c
            };
            // SAFETY: r < rows and c < row_len, so `at` is below the bound asserted above.
            unsafe { s.store(dst.as_mut_ptr().add(at * width), v[p]) };
            c += 1;
            if c == row_len {
                (r, c) = (r + 1, 0);
            }
        }
    }
}

/// `dst[l * stride + i] = src[i][l]` for i < len, l < lanes (vectors of `S::LANES` floats).
#[inline(always)]
fn from_lanes<S: Simd>(
    s: S,
    src: &[f32],
    lanes: usize,
    len: usize,
    dst: &mut [f32],
    stride: usize,
) {
    let width = S::LANES;
    assert!((1..=width).contains(&lanes) && (lanes - 1) * stride + len <= dst.len());
    assert!(len * width <= src.len());
    for i0 in (0..len).step_by(width) {
        let count = (len - i0).min(width);
        let mut r = [s.zero(); MAX_LANES];
        // As in `to_lanes`: whole vectors in loops of fixed length, the tail apart.
        if count == width {
            for p in 0..width {
                // SAFETY: (i0 + p + 1) * width <= len * width <= src.len() (asserted).
                r[p] = unsafe { s.load(src.as_ptr().add((i0 + p) * width)) };
            }
        } else {
            for p in 0..count {
                // SAFETY: as above.
                r[p] = unsafe { s.load(src.as_ptr().add((i0 + p) * width)) };
            }
        }
        s.transpose(&mut r[..width]);
        if count == width {
            for l in 0..lanes {
                // SAFETY: the `width` floats at l * stride + i0 lie in dst (asserted).
                unsafe { s.store(dst.as_mut_ptr().add(l * stride + i0), r[l]) };
            }
        } else {
            let mask = s.tail(count);
            for l in 0..lanes {
                // SAFETY: the `count` floats at l * stride + i0 lie in dst (asserted); the
                // masked store touches no others.
                unsafe { s.store_masked(dst.as_mut_ptr().add(l * stride + i0), mask, r[l]) };
            }
        }
    }
}

/// The filters of `lanes` channels (channel l at `src[l * stride..]`, `g.kh x g.kw`), rotated
/// by 180 degrees when `rotate`, into the transposed layout `[ky][PAD + kx][lane]` (only the
/// interior is written: the PAD columns on both sides of every row stay as they are, zero).
#[inline(always)]
fn filter_to_lanes<S: Simd>(
    s: S,
    g: &Geom,
    src: &[f32],
    stride: usize,
    lanes: usize,
    rotate: bool,
    dst: &mut [f32],
) {
    let layout = Layout {
        row_len: g.kw,
        row_stride: g.kw + 2 * PAD,
        first: PAD,
        rotate,
    };
    to_lanes(s, src, stride, lanes, g.kh * g.kw, dst, layout);
}

// ---------------------------------------------------------------------------------------------
// The correlation on [pixel][lane] data.

/// All outputs of one group: per output row, blocks of up to MAX_BLOCK outputs in registers.
/// Returns whether every output is finite.
#[inline(always)]
fn correlate_lanes<S: Simd>(
    s: S,
    g: &Geom,
    input: &[f32],
    filter: &[f32],
    init: &[f32; MAX_LANES],
    out: &mut [f32],
) -> bool {
    let width = S::LANES;
    assert!(input.len() >= g.h * g.w * width && filter.len() >= g.filter_len(width));
    assert!(out.len() >= g.oh * g.ow * width);
    let mut probe = s.zero();
    for oy in 0..g.oh {
        let mut ox0 = 0;
        while ox0 < g.ow {
            let nb = (g.ow - ox0).min(MAX_BLOCK);
            let args = (g, input, filter, init, &mut *out, &mut probe, oy, ox0);
            // SAFETY (every arm): the extents asserted above.
            unsafe {
                match nb {
                    8 => block::<S, 8>(s, args),
                    7 => block::<S, 7>(s, args),
                    6 => block::<S, 6>(s, args),
                    5 => block::<S, 5>(s, args),
                    4 => block::<S, 4>(s, args),
                    3 => block::<S, 3>(s, args),
                    2 => block::<S, 2>(s, args),
                    _ => block::<S, 1>(s, args),
                }
            }
            ox0 += nb;
        }
    }
    s.reduce_add(probe) == 0.0
}

/// Geometry, input, filter, initial value, output, non-finite probe (a sum of `output * 0`
/// terms: NaN once any output was Inf or NaN), output row, first output column.
type BlockArgs<'a, V> = (
    &'a Geom,
    &'a [f32],
    &'a [f32],
    &'a [f32; MAX_LANES],
    &'a mut [f32],
    &'a mut V,
    usize,
    usize,
);

/// Outputs (oy, ox0 .. ox0 + NB): for every input pixel of the rows they read, one vector load
/// feeds all NB outputs (one filter-vector operand per FMA; the padding columns make every
/// output's tap index valid, so the loop has no branches).
///
/// # Safety
/// The extents asserted in `correlate_lanes` must hold.
#[inline(always)]
unsafe fn block<S: Simd, const NB: usize>(
    s: S,
    (g, input, filter, init, out, probe, oy, ox0): BlockArgs<S::V>,
) {
    let width = S::LANES;
    // SAFETY: `init` holds MAX_LANES >= width floats.
    let b = unsafe { s.load(init.as_ptr()) };
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
        let x_row = unsafe { input.as_ptr().add(iy * g.w * width) };
        // SAFETY: ky < kh, as above.
        let f_row = unsafe { filter.as_ptr().add(ky * g.filter_stride(width)) };
        for ix in ix_lo..ix_hi {
            // SAFETY: 0 <= ix < w; the padded column col0 + ix - j is in range (see above).
            unsafe {
                let xv = s.load(x_row.offset(ix * width as isize));
                let f0 = f_row.offset((col0 + ix) * width as isize);
                for (j, a) in acc.iter_mut().enumerate() {
                    *a = s.fma(xv, s.load(f0.sub(j * width)), *a);
                }
            }
        }
    }
    for (j, a) in acc.iter().enumerate() {
        let off = (oy * g.ow + ox0 + j) * width;
        assert!(off + width <= out.len());
        // SAFETY: asserted just above.
        unsafe { s.store(out.as_mut_ptr().add(off), *a) };
        *probe = s.fma(*a, s.zero(), *probe);
    }
}

// ---------------------------------------------------------------------------------------------
// Weight gradient when every pair of a row meets inside the filter (RepLKNet's 7x7 K13).

/// Widest rows `wgrad_pairs` holds in registers (7 dy + 7 x + 13 sums of AVX-512's 32 vector
/// registers; AVX2's 16 spill some, still ahead of the padded correlation).
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
#[inline(always)]
fn wgrad_pairs<S: Simd>(
    s: S,
    t: &Geom,
    width: usize,
    input: &[f32],
    filter: &[f32],
    out: &mut [f32],
) -> bool {
    let lanes = S::LANES;
    assert_eq!(all_pairs_width(t), Some(width));
    assert!(input.len() >= t.h * t.w * lanes && filter.len() >= t.filter_len(lanes));
    assert!(out.len() >= t.oh * t.ow * lanes);
    // SAFETY (every arm): extents asserted above.
    unsafe {
        match width {
            7 => pairs::<S, 7, 13>(s, t, input, filter, out),
            6 => pairs::<S, 6, 11>(s, t, input, filter, out),
            5 => pairs::<S, 5, 9>(s, t, input, filter, out),
            4 => pairs::<S, 4, 7>(s, t, input, filter, out),
            3 => pairs::<S, 3, 5>(s, t, input, filter, out),
            2 => pairs::<S, 2, 3>(s, t, input, filter, out),
            _ => pairs::<S, 1, 1>(s, t, input, filter, out),
        }
    }
}

/// `wgrad_pairs` for rows of W columns (SUMS = 2W - 1 tap sums).
///
/// # Safety
/// The extents asserted in `wgrad_pairs` must hold.
#[inline(always)]
unsafe fn pairs<S: Simd, const W: usize, const SUMS: usize>(
    s: S,
    t: &Geom,
    input: &[f32],
    filter: &[f32],
    out: &mut [f32],
) -> bool {
    let lanes = S::LANES;
    let mut probe = s.zero();
    // Tap column of sum m: k = left - (W - 1) + m; the other tap columns meet no pair.
    let k0 = (t.left - (W as isize - 1)) as usize;
    for a in 0..t.oh {
        let mut acc = [s.zero(); SUMS];
        // dy rows whose x row iy = a - top + b lies inside the image.
        let b_lo = (t.top - a as isize).max(0) as usize;
        let b_hi = (t.h as isize + t.top - a as isize).clamp(0, t.kh as isize) as usize;
        for b in b_lo..b_hi {
            let iy = (a as isize - t.top + b as isize) as usize;
            let mut d = [s.zero(); W];
            let mut x = [s.zero(); W];
            for i in 0..W {
                // SAFETY: b < kh and iy < h, i < W = kw = w: inside filter and input (asserted).
                unsafe {
                    d[i] = s.load(
                        filter
                            .as_ptr()
                            .add(b * t.filter_stride(lanes) + (PAD + i) * lanes),
                    );
                    x[i] = s.load(input.as_ptr().add((iy * W + i) * lanes));
                }
            }
            for ox in 0..W {
                for ix in 0..W {
                    let m = ix + W - 1 - ox;
                    acc[m] = s.fma(d[ox], x[ix], acc[m]);
                }
            }
        }
        let row = &mut out[a * t.ow * lanes..][..t.ow * lanes];
        row.fill(0.0);
        for (m, v) in acc.iter().enumerate() {
            // SAFETY: k0 + m < ow (`all_pairs_width`), so the vector lies inside `row`.
            unsafe { s.store(row.as_mut_ptr().add((k0 + m) * lanes), *v) };
            probe = s.fma(*v, s.zero(), probe);
        }
    }
    s.reduce_add(probe) == 0.0
}
