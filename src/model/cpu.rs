//! The CPU inference engine for the deploy form: large depthwise layers on lkconv's fast CPU
//! path, the stem's and transitions' small convs on `cpu::small_conv`, 1x1 convs as SGEMM (the
//! `gemm` crate, AVX-512) with fused bias, activation (`cpu::activation`) and residual add;
//! NCHW, batch >= 1, any input size, buffers reused across layers.

use rayon::prelude::*;

use super::deploy::{
    dims_of, Affine, Backend, Block, DenseConv, DeployModel, Depthwise, Dims, FfnBlock, Head,
    Output, Pointwise, RepLkBlock, Stem, Transition,
};
use crate::cpu::activation::{bias_act, Activation as Act};
use crate::cpu::small_conv::GroupedConv;
use crate::error::{Error, Result};
use crate::tensor::Tensor;

/// Buffers reused across layers (and across calls when the caller keeps it).
#[derive(Default, Debug)]
pub struct CpuBuffers {
    /// Where the depthwise layers run (`Cpu`, or `CudaDepthwise`).
    pub backend: Backend,
    a: Vec<f32>,
    b: Vec<f32>,
    t1: Vec<f32>,
    t2: Vec<f32>,
    col: Vec<f32>,
}

impl CpuBuffers {
    pub fn new() -> Self {
        Self::default()
    }

    pub fn with_backend(backend: Backend) -> Self {
        CpuBuffers {
            backend,
            ..Self::default()
        }
    }
}

/// Per-layer-kind wall time, collected when `LKCONV_PROFILE` is set (printed by `run`).
mod profile {
    use std::sync::atomic::{AtomicU64, Ordering};
    use std::sync::OnceLock;
    use std::time::Instant;

    /// Slots 0..TOP partition the forward pass; the rest split the stem and the transitions.
    pub const NAMES: [&str; 14] = [
        "stem",
        "replk pw1",
        "replk large dw",
        "replk pw2",
        "ffn pw1+gelu",
        "ffn pw2",
        "transitions",
        "head",
        "stem conv0",
        "stem dw1",
        "stem pw",
        "stem dw2",
        "transition pw",
        "transition dw",
    ];
    const TOP: usize = 8;
    static NANOS: [AtomicU64; 14] = [const { AtomicU64::new(0) }; 14];
    /// Sums over every reported run, and the number of runs (for [`super::profile_ms`]).
    static TOTALS: [AtomicU64; 14] = [const { AtomicU64::new(0) }; 14];
    static RUNS: AtomicU64 = AtomicU64::new(0);

    /// Mean wall time per run of each top-level layer kind, in ms (None when profiling is off or
    /// no run finished).
    pub fn mean_ms() -> Option<Vec<(&'static str, f64)>> {
        let runs = RUNS.load(Ordering::Relaxed);
        (enabled() && runs > 0).then(|| {
            let per_run = |t: &AtomicU64| t.load(Ordering::Relaxed) as f64 / 1e6 / runs as f64;
            NAMES[..TOP]
                .iter()
                .copied()
                .zip(TOTALS[..TOP].iter().map(per_run))
                .collect()
        })
    }

    pub fn enabled() -> bool {
        static ON: OnceLock<bool> = OnceLock::new();
        *ON.get_or_init(|| std::env::var_os("LKCONV_PROFILE").is_some())
    }

    /// Runs `f`, adding its wall time to slot `i` when profiling.
    pub fn time<T>(i: usize, f: impl FnOnce() -> T) -> T {
        if !enabled() {
            return f();
        }
        let t = Instant::now();
        let r = f();
        NANOS[i].fetch_add(t.elapsed().as_nanos() as u64, Ordering::Relaxed);
        r
    }

    pub fn report() {
        if !enabled() {
            return;
        }
        let v: Vec<u64> = NANOS.iter().map(|a| a.swap(0, Ordering::Relaxed)).collect();
        for (t, &ns) in TOTALS.iter().zip(&v) {
            t.fetch_add(ns, Ordering::Relaxed);
        }
        RUNS.fetch_add(1, Ordering::Relaxed);
        let total: u64 = v[..TOP].iter().sum();
        let parts = |range: std::ops::Range<usize>| -> String {
            NAMES[range.clone()]
                .iter()
                .zip(&v[range])
                .map(|(n, &ns)| format!("{n} {:.1} ms", ns as f64 / 1e6))
                .collect::<Vec<_>>()
                .join(", ")
        };
        eprintln!(
            "profile: {} (total {:.1} ms; of which {})",
            parts(0..TOP),
            total as f64 / 1e6,
            parts(TOP..NAMES.len())
        );
    }
}

/// With `LKCONV_PROFILE` set: each layer kind's mean wall time per forward pass so far, in ms.
pub fn profile_ms() -> Option<Vec<(&'static str, f64)>> {
    profile::mean_ms()
}

/// A buffer of at least `len` elements (grown once, then reused), as a slice of exactly `len`.
fn take(buf: &mut Vec<f32>, len: usize) -> Result<&mut [f32]> {
    crate::tensor::try_grow(buf, len, 0.0, "a RepLKNet activation buffer")?;
    Ok(&mut buf[..len])
}

const SQRT_PI_INV2: f64 = std::f64::consts::FRAC_2_SQRT_PI;

/// erf(x), absolute error below 1e-7 over the whole line: a Taylor series for |x| < 0.5 and
/// the Chebyshev-fitted erfc of Numerical Recipes (relative error < 1.2e-7) above.
pub fn erf(x: f64) -> f64 {
    let z = x.abs();
    let r = if z < 0.5 {
        let z2 = z * z;
        // 2/sqrt(pi) * (z - z^3/3 + z^5/10 - z^7/42 + z^9/216 - z^11/1320 + z^13/9360 - z^15/75600)
        SQRT_PI_INV2
            * z
            * (1.0
                + z2 * (-1.0 / 3.0
                    + z2 * (1.0 / 10.0
                        + z2 * (-1.0 / 42.0
                            + z2 * (1.0 / 216.0
                                + z2 * (-1.0 / 1320.0 + z2 * (1.0 / 9360.0 - z2 / 75600.0)))))))
    } else {
        1.0 - erfc_pos(z)
    };
    if x < 0.0 {
        -r
    } else {
        r
    }
}

/// erfc(z) for z >= 0 (relative error < 1.2e-7).
fn erfc_pos(z: f64) -> f64 {
    let t = 1.0 / (1.0 + 0.5 * z);
    t * (-z * z - 1.265_512_23
        + t * (1.000_023_68
            + t * (0.374_091_96
                + t * (0.096_784_18
                    + t * (-0.186_288_06
                        + t * (0.278_868_07
                            + t * (-1.135_203_98
                                + t * (1.488_515_87 + t * (-0.822_152_23 + t * 0.170_872_77)))))))))
        .exp()
}

/// Exact GELU: x * Phi(x) = 0.5 x (1 + erf(x / sqrt 2)).
pub fn gelu(x: f32) -> f32 {
    let v = x as f64;
    let z = v * std::f64::consts::FRAC_1_SQRT_2;
    let r = if z.abs() < 0.5 {
        0.5 * v * (1.0 + erf(z))
    } else if z > 0.0 {
        v * (1.0 - 0.5 * erfc_pos(z))
    } else {
        0.5 * v * erfc_pos(-z)
    };
    r as f32
}

/// The engine's GELU of one value (vectorised in [`crate::cpu::activation`]), as checked
/// against [`gelu`] by the tests.
pub use crate::cpu::activation::gelu as gelu_fast;

/// Rows per task when a `rows` x `hw` output is split for `n` images over the thread pool.
fn rows_per_task(rows: usize, n: usize) -> usize {
    let threads = rayon::current_num_threads().max(1);
    let per_image = threads.div_ceil(n).max(1);
    let r = rows.div_ceil(per_image);
    // Keep chunks a multiple of the GEMM micro-kernel height.
    r.div_ceil(8).max(1) * 8
}

/// Output rows and columns of one 1x1-conv task: the block (about 256 KiB) stays in the core's
/// L2 cache from the GEMM's last write to the epilogue, and the tasks balance the pool.
const PW_BLOCK_ROWS: usize = 128;
const PW_BLOCK_FLOATS: usize = 64 * 1024;

impl Pointwise {
    /// One 1x1 layer on the CPU engine, exactly as a forward pass runs it (the benchmarks time
    /// it): `y = act(W x + b)`, or `y += W x + b` with `accumulate`, for `n` images of `hw`
    /// pixels (`x`: `[n, cin, hw]`, `y`: `[n, cout, hw]`), in bf16 when the layer holds bf16
    /// weights.
    pub fn forward_into(
        &self,
        x: &[f32],
        n: usize,
        hw: usize,
        y: &mut [f32],
        act: Act,
        accumulate: bool,
    ) -> Result<()> {
        let len = |c: usize| {
            n.checked_mul(c)
                .and_then(|v| v.checked_mul(hw))
                .ok_or_else(|| Error::Overflow(format!("1x1 layer of {n} x {c} x {hw}")))
        };
        for (what, expected, got) in [
            ("1x1 weights", self.cin * self.cout, self.w.len()),
            ("1x1 bias", self.cout, self.b.len()),
            ("1x1 input", len(self.cin)?, x.len()),
            ("1x1 output", len(self.cout)?, y.len()),
        ] {
            if expected != got {
                return Err(Error::BufferLength {
                    what: what.into(),
                    expected,
                    got,
                });
            }
        }
        self.run(x, n, hw, y, act, accumulate);
        Ok(())
    }

    /// y[n] = act(W x[n] + b) (or y[n] += W x[n] + b with `accumulate`), over the batch: tasks
    /// of (image, row block, column block), each a single-threaded AVX-512 GEMM followed by
    /// the bias/activation pass on its still-cached block (the residual add is the GEMM's
    /// `beta = 1`).
    fn run(&self, x: &[f32], n: usize, hw: usize, y: &mut [f32], act: Act, accumulate: bool) {
        use crate::cpu::gemm::{sgemm_view_raw, MatRef, Threads};
        let (cin, cout) = (self.cin, self.cout);
        if n == 0 || hw == 0 || cout == 0 {
            return;
        }
        let rows = PW_BLOCK_ROWS.min(cout);
        let cols = (PW_BLOCK_FLOATS / rows).max(16).min(hw);
        let (row_blocks, col_blocks) = (cout.div_ceil(rows), hw.div_ceil(cols));
        let beta = if accumulate { 1.0 } else { 0.0 };
        let bf16 = self.bf16_operands(x, n, hw);
        let y_ptr = SendPtr(y[..n * cout * hw].as_mut_ptr());
        (0..n * row_blocks * col_blocks)
            .into_par_iter()
            .for_each(|task| {
                let (img, rest) = (
                    task / (row_blocks * col_blocks),
                    task % (row_blocks * col_blocks),
                );
                let (rb, cb) = (rest / col_blocks, rest % col_blocks);
                let (r0, c0) = (rb * rows, cb * cols);
                let (m, nc) = (rows.min(cout - r0), cols.min(hw - c0));
                let xb = &x[img * cin * hw + c0..(img + 1) * cin * hw];
                // SAFETY: task blocks are disjoint (rows [r0, r0 + m) x columns [c0, c0 + nc) of
                // image `img`) and lie inside y (sliced to n * cout * hw above).
                let yb = unsafe { y_ptr.get().add((img * cout + r0) * hw + c0) };
                if let Some(op) = &bf16 {
                    // SAFETY: as above; the block's rows are hw >= nc floats apart.
                    unsafe { op.gemm(img, r0, m, c0, nc, beta, yb, hw) }
                } else {
                    // SAFETY: as above; the block's rows are hw >= nc floats apart.
                    unsafe {
                        sgemm_view_raw(
                            m,
                            cin,
                            nc,
                            MatRef::rows(&self.w[r0 * cin..(r0 + m) * cin], cin),
                            MatRef::rows(xb, hw),
                            beta,
                            yb,
                            hw,
                            Threads::Single,
                        )
                    };
                }
                for (i, &b) in self.b[r0..r0 + m].iter().enumerate() {
                    // SAFETY: row i of this task's block: nc floats, written by no other task.
                    let row = unsafe { std::slice::from_raw_parts_mut(yb.add(i * hw), nc) };
                    bias_act(row, b, act);
                }
            });
    }
}

/// A raw pointer that rayon tasks may share; each task writes a disjoint block through it.
#[derive(Clone, Copy)]
struct SendPtr(*mut f32);
// SAFETY: only used to hand disjoint output blocks to parallel tasks (see Pointwise::run).
unsafe impl Send for SendPtr {}
// SAFETY: as above.
unsafe impl Sync for SendPtr {}
impl SendPtr {
    fn get(self) -> *mut f32 {
        self.0
    }
}

/// Depthwise kernels up to this size run on `cpu::small_conv` (any stride, fused activation);
/// larger ones on the large-kernel fast path.
const SMALL_DEPTHWISE_K: usize = 5;

impl Depthwise {
    /// y = act(dwconv(x) + b).
    fn run(&self, x: &[f32], d: Dims, y: &mut [f32], act: Act, be: Backend) -> Result<Dims> {
        if d.c != self.c {
            return Err(Error::shape(
                "depthwise layer input",
                format!("{} channels", self.c),
                &d.to_vec(),
            ));
        }
        let conv = self.conv();
        let shape = conv.resolve(d.n, d.c, d.h, d.w)?;
        match be {
            Backend::Cpu if self.k <= SMALL_DEPTHWISE_K => {
                // The stem's and transitions' 3x3 convs, bias and activation fused.
                let small = GroupedConv {
                    cin: self.c,
                    cout: self.c,
                    groups: self.c,
                    k: self.k,
                    stride: self.stride,
                    pad: self.k / 2,
                };
                small.forward_into(
                    &x[..shape.input_len()],
                    [d.n, d.h, d.w],
                    &self.w,
                    &self.b,
                    act,
                    &mut y[..shape.output_len()],
                )?;
                return Ok(Dims {
                    h: shape.oh,
                    w: shape.ow,
                    ..d
                });
            }
            Backend::Cpu if self.bf16 => {
                crate::cpu::bf16_dw::forward_f32_into(&conv, &shape, x, &self.w, Some(&self.b), y)?
            }
            Backend::Cpu => {
                crate::cpu::forward_f32_into(&conv, &shape, x, &self.w, Some(&self.b), y)?
            }
            Backend::Sim | Backend::CudaDepthwise(_) | Backend::Cuda(_) => {
                let xt = Tensor::from_vec(&shape.input_dims(), x[..shape.input_len()].to_vec())?;
                let wt = Tensor::from_vec(&conv.weight_dims(self.c), self.w.clone())?;
                let bt = Tensor::from_vec(&[self.c], self.b.clone())?;
                use crate::device::{forward, Device, Impl};
                let dev = match be {
                    Backend::CudaDepthwise(i) | Backend::Cuda(i) => Device::Cuda(i),
                    _ => Device::Sim,
                };
                let out = forward(dev, Impl::Fast, &conv, &xt, &wt, Some(&bt))?;
                y[..shape.output_len()].copy_from_slice(out.data());
            }
        }
        if act != Act::Identity {
            y[..shape.output_len()]
                .par_chunks_mut(4096)
                .for_each(|c| bias_act(c, 0.0, act));
        }
        Ok(Dims {
            h: shape.oh,
            w: shape.ow,
            ..d
        })
    }
}

impl DenseConv {
    /// y = relu(conv(x) + b) via im2col + sgemm, one image at a time (measured 2.6x faster than
    /// `cpu::small_conv`'s direct loop for the stem's 3 -> 128 3x3/2 conv: its 27 taps per
    /// output make a GEMM with K = 27, while the direct loop is bound by its accumulator chains).
    fn run(&self, x: &[f32], d: Dims, col: &mut Vec<f32>, y: &mut [f32]) -> Result<Dims> {
        let (oh, ow) = self.out_hw(d.h, d.w)?;
        let ohw = oh * ow;
        let kk = self.k * self.k;
        let rows = self.cin * kk;
        let col = take(col, rows * ohw)?;
        let rows_out = rows_per_task(self.cout, 1).min(self.cout.max(1));
        for (xi, yi) in x
            .chunks(self.cin * d.hw())
            .zip(y.chunks_mut(self.cout * ohw))
            .take(d.n)
        {
            col.par_chunks_mut(ohw).enumerate().for_each(|(r, dst)| {
                let ci = r / kk;
                let ky = (r % kk) / self.k;
                let kx = r % self.k;
                let plane = &xi[ci * d.hw()..(ci + 1) * d.hw()];
                for oy in 0..oh {
                    let iy = (oy * self.stride + ky) as isize - self.pad as isize;
                    let drow = &mut dst[oy * ow..(oy + 1) * ow];
                    if iy < 0 || iy as usize >= d.h {
                        drow.fill(0.0);
                        continue;
                    }
                    let srow = &plane[iy as usize * d.w..(iy as usize + 1) * d.w];
                    for (ox, v) in drow.iter_mut().enumerate() {
                        let ix = (ox * self.stride + kx) as isize - self.pad as isize;
                        *v = if ix < 0 || ix as usize >= d.w {
                            0.0
                        } else {
                            srow[ix as usize]
                        };
                    }
                }
            });
            let col = &*col;
            yi.par_chunks_mut(rows_out * ohw)
                .enumerate()
                .for_each(|(ci, yc)| {
                    let r0 = ci * rows_out;
                    let m = yc.len() / ohw;
                    crate::cpu::gemm::sgemm(
                        m,
                        rows,
                        ohw,
                        &self.w[r0 * rows..(r0 + m) * rows],
                        false,
                        col,
                        0.0,
                        yc,
                    );
                    for (row, &b) in yc.chunks_mut(ohw).zip(&self.b[r0..r0 + m]) {
                        bias_act(row, b, Act::Relu);
                    }
                });
        }
        Ok(Dims {
            n: d.n,
            c: self.cout,
            h: oh,
            w: ow,
        })
    }
}

impl Affine {
    fn apply(&self, x: &mut [f32], d: Dims) {
        let hw = d.hw();
        for plane in x.chunks_mut(d.c * hw) {
            for (c, row) in plane.chunks_mut(hw).enumerate() {
                let (s, t) = (self.scale[c], self.shift[c]);
                row.iter_mut().for_each(|v| *v = *v * s + t);
            }
        }
    }
}

impl Stem {
    /// Input (external) -> `ws.a` (the result); uses `ws.b` and `ws.col`.
    fn run_ws(&self, x: &[f32], d: Dims, ws: &mut CpuBuffers) -> Result<Dims> {
        let c = self.conv0.cout;
        let (oh, ow) = self.conv0.out_hw(d.h, d.w)?;
        let d0 = Dims {
            n: d.n,
            c,
            h: oh,
            w: ow,
        };
        let a = take(&mut ws.a, d0.len())?;
        let d0 = profile::time(8, || self.conv0.run(x, d, &mut ws.col, a))?;
        let b = take(&mut ws.b, d0.len())?;
        let be = ws.backend;
        let d1 = profile::time(9, || self.conv1.run(a, d0, b, Act::Relu, be))?;
        profile::time(10, || self.conv2.run(b, d1.n, d1.hw(), a, Act::Relu, false));
        let d3 = self.conv3.out_dims(d1)?;
        let b = take(&mut ws.b, d3.len())?;
        let d3 = profile::time(11, || self.conv3.run(a, d1, b, Act::Relu, be))?;
        std::mem::swap(&mut ws.a, &mut ws.b);
        Ok(d3)
    }

    /// Tensor in, tensor out (tests and tools).
    pub fn forward(&self, x: &Tensor<f32>) -> Result<Tensor<f32>> {
        let d = dims_of("stem input", x.shape())?;
        if d.c != self.conv0.cin {
            return Err(Error::shape(
                "stem input",
                format!("[N, {}, H, W]", self.conv0.cin),
                x.shape(),
            ));
        }
        let mut ws = CpuBuffers::new();
        let out = self.run_ws(x.data(), d, &mut ws)?;
        Tensor::from_vec(&out.to_vec(), ws.a[..out.len()].to_vec())
    }
}

impl RepLkBlock {
    fn run_ws(
        &self,
        x: &mut [f32],
        d: Dims,
        t1: &mut Vec<f32>,
        t2: &mut Vec<f32>,
        be: Backend,
    ) -> Result<()> {
        let dw = self.pw1.cout;
        let inner = Dims { c: dw, ..d };
        let t1 = take(t1, inner.len())?;
        profile::time(1, || self.pw1.run(x, d.n, d.hw(), t1, Act::Relu, false));
        let t2 = take(t2, inner.len())?;
        profile::time(2, || self.lk.run(t1, inner, t2, Act::Relu, be))?;
        profile::time(3, || self.pw2.run(t2, d.n, d.hw(), x, Act::Identity, true));
        Ok(())
    }

    /// Tensor in, tensor out (tests and tools).
    pub fn forward(&self, x: &Tensor<f32>) -> Result<Tensor<f32>> {
        let d = dims_of("RepLKBlock input", x.shape())?;
        check_channels("RepLKBlock input", x.shape(), self.pw1.cin)?;
        let mut y = x.clone();
        let (mut t1, mut t2) = (Vec::new(), Vec::new());
        self.run_ws(y.data_mut(), d, &mut t1, &mut t2, Backend::Cpu)?;
        Ok(y)
    }
}

impl FfnBlock {
    fn run_ws(&self, x: &mut [f32], d: Dims, t1: &mut Vec<f32>) -> Result<()> {
        let inner = Dims {
            c: self.pw1.cout,
            ..d
        };
        let t1 = take(t1, inner.len())?;
        profile::time(4, || self.pw1.run(x, d.n, d.hw(), t1, Act::Gelu, false));
        profile::time(5, || self.pw2.run(t1, d.n, d.hw(), x, Act::Identity, true));
        Ok(())
    }

    /// Tensor in, tensor out (tests and tools).
    pub fn forward(&self, x: &Tensor<f32>) -> Result<Tensor<f32>> {
        let d = dims_of("ConvFFN input", x.shape())?;
        check_channels("ConvFFN input", x.shape(), self.pw1.cin)?;
        let mut y = x.clone();
        let mut t1 = Vec::new();
        self.run_ws(y.data_mut(), d, &mut t1)?;
        Ok(y)
    }
}

impl Transition {
    /// `ws.a` -> `ws.a` (through `ws.t1`).
    fn run_ws(&self, d: Dims, ws: &mut CpuBuffers) -> Result<Dims> {
        let mid = Dims {
            c: self.pw.cout,
            ..d
        };
        let t1 = take(&mut ws.t1, mid.len())?;
        let a = &ws.a[..d.len()];
        profile::time(12, || self.pw.run(a, d.n, d.hw(), t1, Act::Relu, false));
        let od = self.dw.out_dims(mid)?;
        let a = take(&mut ws.a, od.len())?;
        let be = ws.backend;
        profile::time(13, || self.dw.run(t1, mid, a, Act::Relu, be))
    }

    /// Tensor in, tensor out (tests and tools).
    pub fn forward(&self, x: &Tensor<f32>) -> Result<Tensor<f32>> {
        let d = dims_of("transition input", x.shape())?;
        check_channels("transition input", x.shape(), self.pw.cin)?;
        let mut ws = CpuBuffers::new();
        ws.a = x.data().to_vec();
        let od = self.run_ws(d, &mut ws)?;
        Tensor::from_vec(&od.to_vec(), ws.a[..od.len()].to_vec())
    }
}

fn check_channels(what: &str, shape: &[usize], c: usize) -> Result<()> {
    if shape[1] != c {
        return Err(Error::shape(what, format!("[N, {c}, H, W]"), shape));
    }
    Ok(())
}

impl DeployModel {
    /// The forward pass on the CPU engine for a request checked by
    /// [`DeployModel::check_request`] (input dims `d`).
    pub(crate) fn run_cpu(
        &self,
        x: &Tensor<f32>,
        d: Dims,
        indices: &[usize],
        want_logits: bool,
        ws: &mut CpuBuffers,
    ) -> Result<Output> {
        let ns = self.stages.len();
        let mut d = profile::time(0, || self.stem.run_ws(x.data(), d, ws))?;
        let mut stage_out: Vec<(usize, Tensor<f32>)> = Vec::new();
        // The last stage whose output anyone needs.
        let last_needed = if want_logits {
            ns - 1
        } else {
            indices.iter().copied().max().unwrap_or(0)
        };
        for (s, stage) in self.stages.iter().enumerate() {
            if d.c != self.config.channels[s] {
                return Err(Error::shape(
                    format!("stage {s} input"),
                    format!("{} channels", self.config.channels[s]),
                    &d.to_vec(),
                ));
            }
            let be = ws.backend;
            let CpuBuffers { a, t1, t2, .. } = ws;
            let xa = &mut a[..d.len()];
            for block in &stage.blocks {
                match block {
                    Block::RepLk(b) => b.run_ws(xa, d, t1, t2, be)?,
                    Block::Ffn(b) => b.run_ws(xa, d, t1)?,
                }
            }
            if indices.contains(&s) {
                let mut v = xa.to_vec();
                if let Some(norm) = &stage.norm {
                    norm.apply(&mut v, d);
                }
                stage_out.push((s, Tensor::from_vec(&d.to_vec(), v)?));
            }
            if s == last_needed {
                break;
            }
            if s + 1 < ns {
                d = profile::time(6, || self.transitions[s].run_ws(d, ws))?;
            }
        }
        // Order the stage outputs as requested.
        let stages = indices
            .iter()
            .filter_map(|&i| stage_out.iter().find(|(s, _)| *s == i).cloned())
            .collect();
        let logits = if want_logits {
            let head = self.head.as_ref().expect("checked above");
            Some(profile::time(7, || head.run(&ws.a[..d.len()], d))?)
        } else {
            None
        };
        profile::report();
        Ok(Output { logits, stages })
    }
}

impl Head {
    fn run(&self, x: &[f32], d: Dims) -> Result<Tensor<f32>> {
        let hw = d.hw();
        let mut logits = Vec::with_capacity(d.n * self.classes);
        for plane in x.chunks(d.c * hw).take(d.n) {
            let feat: Vec<f32> = plane
                .chunks(hw)
                .enumerate()
                .map(|(c, row)| {
                    let mean = row.iter().map(|&v| v as f64).sum::<f64>() / hw as f64;
                    (mean * self.norm.scale[c] as f64 + self.norm.shift[c] as f64) as f32
                })
                .collect();
            // Classes in parallel; each dot product in f64 over 4 independent partial sums
            // (vectorisable, a fixed order: the result does not depend on the thread count).
            let row: Vec<f32> = self
                .w
                .par_chunks(d.c)
                .zip(&self.b)
                .take(self.classes)
                .map(|(wrow, &b)| {
                    let mut part = [0.0f64; 4];
                    let (wc, fc) = (wrow.chunks_exact(4), feat.chunks_exact(4));
                    let tail: f64 = wc
                        .remainder()
                        .iter()
                        .zip(fc.remainder())
                        .map(|(&a, &f)| a as f64 * f as f64)
                        .sum();
                    for (w4, f4) in wc.zip(fc) {
                        for ((p, &a), &f) in part.iter_mut().zip(w4).zip(f4) {
                            *p += a as f64 * f as f64;
                        }
                    }
                    ((part[0] + part[1]) + (part[2] + part[3]) + tail + b as f64) as f32
                })
                .collect();
            logits.extend(row);
        }
        Tensor::from_vec(&[d.n, self.classes], logits)
    }
}
