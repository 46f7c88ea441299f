//! RepLKNet's forward pass resident on a device: the deploy-form layer sequence written once as
//! a program of steps (kernel launches and GEMMs over device addresses), run by one of two
//! back-ends behind the [`Exec`] trait:
//! - **CUDA**: weights uploaded once, activations in four pre-allocated buffers reused across
//!   layers, the depthwise layers on lkconv's tiled kernels (planned by `crate::kernels::plan`,
//!   the same plans as `crate::cuda::forward`, with bias), the 1x1 convs and the head's linear
//!   layer as cuBLAS strided-batched GEMMs (per image `Y[Cout x HW] = W[Cout x Cin] X[Cin x
//!   HW]`, batched over N with W shared; f32 accumulation, no TF32), and the element-wise
//!   epilogues, the stem's dense conv and the head's pooling as the small kernels of
//!   `kernels/lk_model.cu`. Everything is queued on one stream; the host waits only for the
//!   final copies out.
//! - **Sim**: the same launches in the kernel simulator, on host buffers (poisoned with NaN when
//!   allocated, so that a read of something never written shows up), the GEMMs on the host
//!   (`crate::cpu::gemm::sgemm`, half-precision operands widened to f32 and the result rounded
//!   back, as cuBLAS does with f32 compute).
//!
//! Storage is f32 (the default) or, for benchmarks, bf16 / f16 end to end (weights,
//! activations, residual stream; arithmetic always in f32).

use std::collections::HashMap;
use std::sync::Arc;

use half::{bf16, f16};

use super::cpu::{Block, DeployModel, Depthwise, Dims, Output, Pointwise};
use crate::device::{Impl, Op};
use crate::dtype::DType;
use crate::error::{Error, Result};
use crate::kernels::{self, Launch, ModelAct};
use crate::tensor::Tensor;

/// A buffer owned by an executor: its address (device or host) and size in bytes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct Buf {
    pub addr: u64,
    pub bytes: usize,
}

/// `C_b[m x n] = A[m x k] * B_b[k x n]` for `b < batch`, row-major, contiguous, all of `dtype`,
/// `A` shared by every batch entry, `B_b = b + b * stride_b` and `C_b = c + b * stride_c`
/// (strides in elements).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct Gemm {
    pub dtype: DType,
    pub m: usize,
    pub k: usize,
    pub n: usize,
    pub a: u64,
    pub b: u64,
    pub stride_b: usize,
    pub c: u64,
    pub stride_c: usize,
    pub batch: usize,
}

/// One step of a program.
#[derive(Clone, Debug, PartialEq)]
pub(crate) enum Step {
    /// A kernel launch with its buffer addresses bound.
    Kernel(Launch),
    Gemm(Gemm),
}

/// What a back-end provides: buffers, running steps, copies.
pub(crate) trait Exec: Send {
    /// A new buffer of `bytes` (contents unspecified: NaN in the simulator).
    fn alloc(&mut self, bytes: usize) -> Result<Buf>;
    /// Frees every buffer allocated after the first `keep`.
    fn truncate(&mut self, keep: usize);
    /// The number of live buffers.
    fn count(&self) -> usize;
    /// Copies `data` into the start of `dst`.
    fn upload(&mut self, dst: Buf, data: &[u8]) -> Result<()>;
    /// Checks every launch against the device and loads its kernel (before anything runs).
    fn prepare(&mut self, steps: &[Step]) -> Result<()>;
    /// Queues (CUDA) or runs (simulator) the steps in order.
    fn run(&mut self, steps: &[Step]) -> Result<()>;
    /// Copies the first `bytes` of `src` to the host (waits for the queued work).
    fn download(&mut self, src: Buf, bytes: usize) -> Result<Vec<u8>>;
    /// Milliseconds of each of `reps` runs of `steps` (CUDA events on the GPU, wall time in the
    /// simulator), after one untimed run.
    fn time(&mut self, steps: &[Step], reps: usize) -> Result<Vec<f64>>;
    /// "sim" or "cuda:N".
    fn name(&self) -> String;
}

/// f32 values as little-endian `dtype` bytes (rounded to nearest even).
pub(crate) fn encode(v: &[f32], dtype: DType) -> Vec<u8> {
    let mut out = Vec::with_capacity(v.len() * dtype.size_bytes());
    for &x in v {
        match dtype {
            DType::F32 => out.extend_from_slice(&x.to_le_bytes()),
            DType::Bf16 => out.extend_from_slice(&bf16::from_f32(x).to_le_bytes()),
            DType::F16 => out.extend_from_slice(&f16::from_f32(x).to_le_bytes()),
        }
    }
    out
}

/// Little-endian `dtype` bytes as f32 values.
pub(crate) fn decode(b: &[u8], dtype: DType) -> Vec<f32> {
    match dtype {
        DType::F32 => b
            .chunks_exact(4)
            .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
            .collect(),
        DType::Bf16 => b
            .chunks_exact(2)
            .map(|c| bf16::from_le_bytes([c[0], c[1]]).to_f32())
            .collect(),
        DType::F16 => b
            .chunks_exact(2)
            .map(|c| f16::from_le_bytes([c[0], c[1]]).to_f32())
            .collect(),
    }
}

// ---- the simulator back-end -------------------------------------------------------------------

/// NaN as f32, and as each of its two 16-bit halves read as bf16 or f16.
const POISON: u32 = 0x7fc0_7fc0;

/// Host buffers (u32 words: 4-byte aligned, and 16-byte aligned by the system allocator for
/// the sizes used); launches through the kernel simulator, GEMMs on the host.
struct SimExec {
    bufs: Vec<Vec<u32>>,
}

/// `len` bytes at byte offset `off` of little-endian words (only the words touched are read).
fn get_bytes(words: &[u32], off: usize, len: usize) -> Vec<u8> {
    let (w0, w1) = (off / 4, (off + len).div_ceil(4));
    let bytes: Vec<u8> = words[w0..w1].iter().flat_map(|w| w.to_le_bytes()).collect();
    bytes[off - 4 * w0..off - 4 * w0 + len].to_vec()
}

/// Writes `data` at byte offset `off` of little-endian words (read-modify-write of the words
/// touched).
fn put_bytes(words: &mut [u32], off: usize, data: &[u8]) {
    let (w0, w1) = (off / 4, (off + data.len()).div_ceil(4));
    let mut bytes: Vec<u8> = words[w0..w1].iter().flat_map(|w| w.to_le_bytes()).collect();
    bytes[off - 4 * w0..off - 4 * w0 + data.len()].copy_from_slice(data);
    for (w, c) in words[w0..w1].iter_mut().zip(bytes.chunks_exact(4)) {
        *w = u32::from_le_bytes([c[0], c[1], c[2], c[3]]);
    }
}

impl SimExec {
    /// (buffer index, byte offset) of an address.
    fn find(&self, addr: u64) -> Result<(usize, usize)> {
        self.bufs
            .iter()
            .position(|b| {
                let base = b.as_ptr() as u64;
                addr >= base && addr < base + 4 * b.len() as u64
            })
            .map(|i| (i, (addr - self.bufs[i].as_ptr() as u64) as usize))
            .ok_or_else(|| Error::Simulator(format!("address {addr:#x} is in no buffer")))
    }

    /// `len` elements of `dtype` at byte offset `off` of buffer `i`, widened to f32.
    fn read(&self, i: usize, off: usize, len: usize, dtype: DType) -> Result<Vec<f32>> {
        let es = dtype.size_bytes();
        let b = &self.bufs[i];
        if !off.is_multiple_of(es) || off + len * es > 4 * b.len() {
            return Err(Error::Simulator("GEMM operand outside its buffer".into()));
        }
        Ok(decode(&get_bytes(b, off, len * es), dtype))
    }

    /// Writes f32 values as `dtype` at byte offset `off` of buffer `i`.
    fn write(&mut self, i: usize, off: usize, v: &[f32], dtype: DType) -> Result<()> {
        let es = dtype.size_bytes();
        let b = &mut self.bufs[i];
        if !off.is_multiple_of(es) || off + v.len() * es > 4 * b.len() {
            return Err(Error::Simulator("GEMM output outside its buffer".into()));
        }
        put_bytes(b, off, &encode(v, dtype));
        Ok(())
    }

    fn gemm(&mut self, g: &Gemm) -> Result<()> {
        let (ci, coff) = self.find(g.c)?;
        let (ai, aoff) = self.find(g.a)?;
        let (bi, boff) = self.find(g.b)?;
        if ai == ci || bi == ci {
            return Err(Error::Simulator("GEMM output overlaps an input".into()));
        }
        let a = self.read(ai, aoff, g.m * g.k, g.dtype)?;
        let last = g.batch.saturating_sub(1);
        let b = self.read(bi, boff, last * g.stride_b + g.k * g.n, g.dtype)?;
        let clen = last * g.stride_c + g.m * g.n;
        let mut c = self.read(ci, coff, clen, g.dtype)?;
        for i in 0..g.batch {
            let bo = i * g.stride_b;
            let co = i * g.stride_c;
            crate::cpu::gemm::sgemm(
                g.m,
                g.k,
                g.n,
                &a,
                false,
                &b[bo..bo + g.k * g.n],
                0.0,
                &mut c[co..co + g.m * g.n],
            );
        }
        self.write(ci, coff, &c, g.dtype)
    }
}

impl Exec for SimExec {
    fn alloc(&mut self, bytes: usize) -> Result<Buf> {
        let v = vec![POISON; bytes.div_ceil(4).max(1)];
        let addr = v.as_ptr() as u64;
        self.bufs.push(v);
        Ok(Buf { addr, bytes })
    }
    fn truncate(&mut self, keep: usize) {
        self.bufs.truncate(keep);
    }
    fn count(&self) -> usize {
        self.bufs.len()
    }
    fn upload(&mut self, dst: Buf, data: &[u8]) -> Result<()> {
        let (i, off) = self.find(dst.addr)?;
        let b = &mut self.bufs[i];
        if off + data.len() > 4 * b.len() {
            return Err(Error::Simulator("upload past the end of a buffer".into()));
        }
        put_bytes(b, off, data);
        Ok(())
    }
    fn prepare(&mut self, _steps: &[Step]) -> Result<()> {
        if !crate::sim::available() {
            return Err(Error::Simulator("built without the simulator".into()));
        }
        Ok(())
    }
    fn run(&mut self, steps: &[Step]) -> Result<()> {
        for s in steps {
            match s {
                // SAFETY: every address in a program's launches was bound by `GpuModel::build`
                // to a buffer of this executor (host Vecs that are neither moved nor resized
                // while the program lives: `alloc` only pushes new Vecs, whose heap storage stays
                // put) sized for the launch's problem; no Rust reference to them is live during
                // the call (`self` is borrowed mutably, nothing else holds them).
                Step::Kernel(l) => unsafe { crate::sim::launch_bound(l) }?,
                Step::Gemm(g) => self.gemm(g)?,
            }
        }
        Ok(())
    }
    fn download(&mut self, src: Buf, bytes: usize) -> Result<Vec<u8>> {
        let (i, off) = self.find(src.addr)?;
        let b = &self.bufs[i];
        if off + bytes > 4 * b.len() {
            return Err(Error::Simulator("download past the end of a buffer".into()));
        }
        Ok(get_bytes(b, off, bytes))
    }
    fn time(&mut self, steps: &[Step], reps: usize) -> Result<Vec<f64>> {
        self.run(steps)?;
        (0..reps)
            .map(|_| {
                let t = std::time::Instant::now();
                self.run(steps)?;
                Ok(t.elapsed().as_secs_f64() * 1e3)
            })
            .collect()
    }
    fn name(&self) -> String {
        "sim".into()
    }
}

// ---- the CUDA back-end ------------------------------------------------------------------------

/// Device buffers on one stream; kernels launched by name, GEMMs through cuBLAS.
struct CudaExec {
    dev: Arc<crate::cuda::CudaDevice>,
    stream: Arc<cudarc::driver::CudaStream>,
    bufs: Vec<(u64, cudarc::driver::CudaSlice<u8>)>,
    funcs: HashMap<&'static str, cudarc::driver::CudaFunction>,
}

fn cu_err(what: &'static str) -> impl Fn(cudarc::driver::DriverError) -> Error {
    move |e| Error::Cuda(format!("{what}: {e}"))
}

impl CudaExec {
    fn new(ordinal: usize) -> Result<Self> {
        let dev = crate::cuda::CudaDevice::shared(ordinal)?;
        if !dev.kernels_loaded() {
            // Fetching any kernel reports why (no nvcc at build time, or a fatbin load error).
            dev.kernel("lk_bias_act_f32", 0)?;
        }
        let stream = dev.new_stream()?;
        Ok(CudaExec {
            dev,
            stream,
            bufs: Vec::new(),
            funcs: HashMap::new(),
        })
    }

    fn find(&self, addr: u64) -> Result<(usize, usize)> {
        self.bufs
            .iter()
            .position(|(base, b)| addr >= *base && addr < base + b.len() as u64)
            .map(|i| (i, (addr - self.bufs[i].0) as usize))
            .ok_or_else(|| Error::Cuda(format!("address {addr:#x} is in no model buffer")))
    }

    fn event(&self) -> Result<cudarc::driver::CudaEvent> {
        self.dev
            .context()
            .new_event(Some(cudarc::driver::sys::CUevent_flags::CU_EVENT_DEFAULT))
            .map_err(cu_err("creating a timing event"))
    }
}

impl Exec for CudaExec {
    fn alloc(&mut self, bytes: usize) -> Result<Buf> {
        use cudarc::driver::DevicePtr;
        let buf = self
            .stream
            .alloc_zeros::<u8>(bytes.max(1))
            .map_err(cu_err("allocating a model buffer"))?;
        // Every use of the buffer is on `self.stream`, so no cross-stream tracking is needed
        // after this point.
        let addr = {
            let (p, _guard) = buf.device_ptr(&self.stream);
            p
        };
        self.bufs.push((addr, buf));
        Ok(Buf { addr, bytes })
    }
    fn truncate(&mut self, keep: usize) {
        self.bufs.truncate(keep);
    }
    fn count(&self) -> usize {
        self.bufs.len()
    }
    fn upload(&mut self, dst: Buf, data: &[u8]) -> Result<()> {
        let (i, off) = self.find(dst.addr)?;
        let stream = self.stream.clone();
        let b = &mut self.bufs[i].1;
        if off + data.len() > b.len() {
            return Err(Error::Cuda("upload past the end of a model buffer".into()));
        }
        let mut view = b.slice_mut(off..off + data.len());
        stream
            .memcpy_htod(data, &mut view)
            .map_err(cu_err("copying to the device"))
    }
    fn prepare(&mut self, steps: &[Step]) -> Result<()> {
        // Every launch is checked against the device's limits; kernels are fetched once.
        let all: Vec<Launch> = steps
            .iter()
            .filter_map(|s| match s {
                Step::Kernel(l) => Some(l.clone()),
                Step::Gemm(_) => None,
            })
            .collect();
        let funcs = crate::cuda::prepare_launches(&self.dev, &all)?;
        for (l, f) in all.iter().zip(funcs) {
            self.funcs.entry(l.kernel).or_insert(f);
        }
        Ok(())
    }
    fn run(&mut self, steps: &[Step]) -> Result<()> {
        use cudarc::driver::{LaunchConfig, PushKernelArg};
        for s in steps {
            match s {
                Step::Kernel(l) => {
                    let func = self.funcs.get(l.kernel).ok_or_else(|| {
                        Error::Cuda(format!("kernel '{}' was not prepared", l.kernel))
                    })?;
                    let cfg = LaunchConfig {
                        grid_dim: l.grid,
                        block_dim: l.block,
                        shared_mem_bytes: l.shared_bytes,
                    };
                    // SAFETY: every kernel is `extern "C" __global__ void NAME(const DwArgs)`;
                    // `prepare` checked the configuration against the device and the kernel's
                    // shared memory; the addresses in `l.args` were bound by `GpuModel::build`
                    // to buffers of this executor sized for the launch's problem, alive until
                    // the executor is dropped (cudarc frees them stream-ordered after the queued
                    // work), and the planners size every grid for its problem.
                    unsafe { self.stream.launch_builder(func).arg(&l.args).launch(cfg) }
                        .map_err(|e| Error::Cuda(format!("launching '{}': {e}", l.kernel)))?;
                }
                Step::Gemm(g) => {
                    let bg = crate::cuda::BatchedGemm {
                        trans_a: false,
                        trans_b: false,
                        m: g.m,
                        n: g.n,
                        k: g.k,
                        a: g.a,
                        lda: g.k,
                        stride_a: 0,
                        a_type: g.dtype,
                        b: g.b,
                        ldb: g.n,
                        stride_b: g.stride_b,
                        b_type: g.dtype,
                        c: g.c,
                        ldc: g.n,
                        stride_c: g.stride_c,
                        c_type: g.dtype,
                        batch: g.batch,
                        alpha: 1.0,
                        beta: 0.0,
                    };
                    // SAFETY: A, B and C were bound by `GpuModel::build` to buffers of this
                    // executor (this device's context) that hold every element of the batched
                    // GEMM in `g.dtype`, C in a buffer distinct from A's and B's; they stay
                    // alive until the queued work completes (see above).
                    unsafe { crate::cuda::gemm_run(&self.dev, &self.stream, &bg) }?;
                }
            }
        }
        Ok(())
    }
    fn download(&mut self, src: Buf, bytes: usize) -> Result<Vec<u8>> {
        let (i, off) = self.find(src.addr)?;
        let b = &self.bufs[i].1;
        if off + bytes > b.len() {
            return Err(Error::Cuda(
                "download past the end of a model buffer".into(),
            ));
        }
        let v = self
            .stream
            .clone_dtoh(&b.slice(off..off + bytes))
            .map_err(cu_err("copying to the host"))?;
        self.stream
            .synchronize()
            .map_err(cu_err("synchronising after a copy to the host"))?;
        Ok(v)
    }
    fn time(&mut self, steps: &[Step], reps: usize) -> Result<Vec<f64>> {
        self.run(steps)?;
        let mut events = Vec::with_capacity(reps);
        for _ in 0..reps {
            let (a, b) = (self.event()?, self.event()?);
            a.record(&self.stream)
                .map_err(cu_err("recording an event"))?;
            self.run(steps)?;
            b.record(&self.stream)
                .map_err(cu_err("recording an event"))?;
            events.push((a, b));
        }
        self.stream
            .synchronize()
            .map_err(cu_err("synchronising after timing"))?;
        events
            .iter()
            .map(|(a, b)| {
                a.elapsed_ms(b)
                    .map(|ms| ms as f64)
                    .map_err(cu_err("reading an event timer"))
            })
            .collect()
    }
    fn name(&self) -> String {
        format!("cuda:{}", self.dev.ordinal())
    }
}

// ---- the program: the layer sequence, written once --------------------------------------------

/// Where a model runs on the device path.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum GpuTarget {
    /// The kernel simulator (small inputs).
    Sim,
    /// CUDA GPU `ordinal`.
    Cuda(usize),
}

/// A program bound to buffers for one input size and one set of requested outputs.
struct Program {
    key: (Dims, Vec<usize>, bool),
    /// Buffers allocated for this program start at this executor count.
    first_buf: usize,
    input: Buf,
    stages: Vec<(usize, Buf, Dims)>,
    /// `[classes x N]` logits (transposed) and (N, classes).
    logits: Option<(Buf, usize, usize)>,
    steps: Vec<Step>,
}

/// A deploy-form model resident on a device (weights uploaded once) with its last program.
pub struct GpuModel {
    target: GpuTarget,
    dtype: DType,
    exec: Box<dyn Exec>,
    fingerprint: Vec<(usize, usize, u32, u32)>,
    weights: Buf,
    /// (host address, length) of each weight array -> element offset in `weights`.
    offsets: HashMap<(usize, usize), usize>,
    prog: Option<Program>,
}

impl std::fmt::Debug for GpuModel {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("GpuModel")
            .field("device", &self.exec.name())
            .field("dtype", &self.dtype)
            .field("weight_bytes", &self.weights.bytes)
            .field("steps", &self.prog.as_ref().map_or(0, |p| p.steps.len()))
            .finish()
    }
}

/// Every weight array of the deploy form, in a fixed order.
fn weight_arrays(m: &DeployModel) -> Vec<&[f32]> {
    let mut v: Vec<&[f32]> = Vec::new();
    let st = &m.stem;
    v.extend([&st.conv0.w[..], &st.conv0.b[..]]);
    v.extend([
        &st.conv1.w[..],
        &st.conv1.b[..],
        &st.conv2.w[..],
        &st.conv2.b[..],
    ]);
    v.extend([&st.conv3.w[..], &st.conv3.b[..]]);
    for stage in &m.stages {
        for b in &stage.blocks {
            match b {
                Block::RepLk(b) => v.extend([
                    &b.pw1.w[..],
                    &b.pw1.b[..],
                    &b.lk.w[..],
                    &b.lk.b[..],
                    &b.pw2.w[..],
                    &b.pw2.b[..],
                ]),
                Block::Ffn(b) => v.extend([&b.pw1.w[..], &b.pw1.b[..], &b.pw2.w[..], &b.pw2.b[..]]),
            }
        }
        if let Some(n) = &stage.norm {
            v.extend([&n.scale[..], &n.shift[..]]);
        }
    }
    for t in &m.transitions {
        v.extend([&t.pw.w[..], &t.pw.b[..], &t.dw.w[..], &t.dw.b[..]]);
    }
    if let Some(h) = &m.head {
        v.extend([&h.norm.scale[..], &h.norm.shift[..], &h.w[..], &h.b[..]]);
    }
    v
}

fn fingerprint(m: &DeployModel) -> Vec<(usize, usize, u32, u32)> {
    weight_arrays(m)
        .iter()
        .map(|a| {
            let first = a.first().map_or(0, |v| v.to_bits());
            let last = a.last().map_or(0, |v| v.to_bits());
            (a.as_ptr() as usize, a.len(), first, last)
        })
        .collect()
}

/// Appends program steps; resolves weight addresses.
struct Builder<'a> {
    dt: DType,
    steps: Vec<Step>,
    weights: Buf,
    offsets: &'a HashMap<(usize, usize), usize>,
}

impl Builder<'_> {
    fn w(&self, a: &[f32]) -> Result<u64> {
        let off = self
            .offsets
            .get(&(a.as_ptr() as usize, a.len()))
            .ok_or_else(|| Error::InvalidArgument("a weight array was not uploaded".into()))?;
        Ok(self.weights.addr + (self.dt.size_bytes() * *off) as u64)
    }

    fn launch(&mut self, mut l: Launch, in0: u64, in1: u64, bias: u64, out: u64) {
        l.args.in0 = in0;
        l.args.in1 = in1;
        l.args.bias = bias;
        l.args.out = out;
        l.args.workspace = 0;
        self.steps.push(Step::Kernel(l));
    }

    /// `y = act(y + bias) + res` over `d` (in place on `y`; `res` 0 for none).
    fn bias_act(&mut self, y: u64, d: Dims, bias: u64, act: ModelAct, res: u64) -> Result<()> {
        let l = kernels::model_bias_act_launch(self.dt, [d.n, d.c, d.h, d.w], act)?;
        self.launch(l, y, res, bias, y);
        Ok(())
    }

    /// `y = act(W x + b)` for a 1x1 conv; with `res`, `res += W x + b` written into `res`
    /// (through `y` as scratch).
    fn pointwise(
        &mut self,
        p: &Pointwise,
        x: u64,
        d: Dims,
        y: u64,
        act: ModelAct,
        res: Option<u64>,
    ) -> Result<Dims> {
        if d.c != p.cin {
            return Err(Error::shape(
                "1x1 conv input",
                format!("{} channels", p.cin),
                &d.to_vec(),
            ));
        }
        let hw = d.hw();
        self.steps.push(Step::Gemm(Gemm {
            dtype: self.dt,
            m: p.cout,
            k: p.cin,
            n: hw,
            a: self.w(&p.w)?,
            b: x,
            stride_b: p.cin * hw,
            c: y,
            stride_c: p.cout * hw,
            batch: d.n,
        }));
        let od = Dims { c: p.cout, ..d };
        let b = self.w(&p.b)?;
        match res {
            None => self.bias_act(y, od, b, act, 0)?,
            Some(r) => {
                let l = kernels::model_bias_act_launch(self.dt, [od.n, od.c, od.h, od.w], act)?;
                self.launch(l, y, r, b, r);
            }
        }
        Ok(od)
    }

    /// `y = act(dwconv(x) + b)` on the tiled depthwise kernels.
    fn depthwise(&mut self, l: &Depthwise, x: u64, d: Dims, y: u64, act: ModelAct) -> Result<Dims> {
        if d.c != l.c {
            return Err(Error::shape(
                "depthwise layer input",
                format!("{} channels", l.c),
                &d.to_vec(),
            ));
        }
        let conv = l.conv();
        let shape = conv.resolve(d.n, d.c, d.h, d.w)?;
        let mut plan = kernels::plan(Op::Forward, Impl::Fast, self.dt, &conv, &shape)?;
        if plan.workspace_bytes > 0 || plan.gemm.is_some() {
            return Err(Error::Unsupported(
                "depthwise forward plan needs a workspace".into(),
            ));
        }
        plan.bind(x, self.w(&l.w)?, self.w(&l.b)?, y, 0);
        self.steps
            .extend(plan.launches.into_iter().map(Step::Kernel));
        let od = Dims {
            h: shape.oh,
            w: shape.ow,
            ..d
        };
        if act != ModelAct::None {
            self.bias_act(y, od, 0, act, 0)?;
        }
        Ok(od)
    }
}

/// The largest activation (elements) anywhere in the forward pass for input `d`.
fn max_activation(m: &DeployModel, d: Dims) -> Result<usize> {
    let (oh, ow) = m.stem.conv0.out_hw(d.h, d.w)?;
    let d0 = Dims {
        n: d.n,
        c: m.stem.conv0.cout,
        h: oh,
        w: ow,
    };
    let mut cap = d0.len().max(
        Dims {
            c: m.stem.conv2.cout,
            ..d0
        }
        .len(),
    );
    let mut d = m.stem.conv3.out_dims(d0)?;
    for (s, stage) in m.stages.iter().enumerate() {
        cap = cap.max(d.len());
        for b in &stage.blocks {
            let inner = match b {
                Block::RepLk(b) => b.pw1.cout,
                Block::Ffn(b) => b.pw1.cout,
            };
            cap = cap.max(Dims { c: inner, ..d }.len());
        }
        if let Some(t) = m.transitions.get(s) {
            let mid = Dims { c: t.pw.cout, ..d };
            cap = cap.max(mid.len());
            d = t.dw.out_dims(mid)?;
        }
    }
    Ok(cap)
}

impl GpuModel {
    /// Uploads the deploy-form weights to the target (once), stored as `dtype`; activations
    /// are stored as `dtype` too (f32 for results comparable with the CPU engine).
    pub fn new(m: &DeployModel, target: GpuTarget, dtype: DType) -> Result<Self> {
        let mut exec: Box<dyn Exec> = match target {
            GpuTarget::Sim => {
                if !crate::sim::available() {
                    return Err(Error::Simulator("built without the simulator".into()));
                }
                Box::new(SimExec { bufs: Vec::new() })
            }
            GpuTarget::Cuda(i) => Box::new(CudaExec::new(i)?),
        };
        let mut offsets = HashMap::new();
        let mut packed: Vec<f32> = Vec::new();
        for a in weight_arrays(m) {
            offsets
                .entry((a.as_ptr() as usize, a.len()))
                .or_insert_with(|| {
                    // 128-element (256-byte or more) alignment for every array
                    let off = packed.len().next_multiple_of(128);
                    packed.resize(off, 0.0);
                    packed.extend_from_slice(a);
                    off
                });
        }
        let bytes = encode(&packed, dtype);
        drop(packed);
        let weights = exec.alloc(bytes.len())?;
        exec.upload(weights, &bytes)?;
        Ok(GpuModel {
            target,
            dtype,
            exec,
            fingerprint: fingerprint(m),
            weights,
            offsets,
            prog: None,
        })
    }

    /// Where it runs.
    pub fn target(&self) -> GpuTarget {
        self.target
    }

    /// The storage type of weights and activations.
    pub fn dtype(&self) -> DType {
        self.dtype
    }

    /// True when this holds `m`'s weights (same arrays, same values at their ends).
    pub fn holds(&self, m: &DeployModel) -> bool {
        self.fingerprint == fingerprint(m)
    }

    /// Builds (or reuses) the program for input `d` and the requested outputs.
    fn program(
        &mut self,
        m: &DeployModel,
        d: Dims,
        indices: &[usize],
        want_logits: bool,
    ) -> Result<()> {
        let key = (d, indices.to_vec(), want_logits);
        if self.prog.as_ref().is_some_and(|p| p.key == key) {
            return Ok(());
        }
        if let Some(p) = self.prog.take() {
            self.exec.truncate(p.first_buf);
        }
        let first_buf = self.exec.count();
        let r = self.build(m, d, indices, want_logits, first_buf);
        match r {
            Ok(p) => {
                self.prog = Some(p);
                Ok(())
            }
            Err(e) => {
                self.exec.truncate(first_buf);
                Err(e)
            }
        }
    }

    fn build(
        &mut self,
        m: &DeployModel,
        d: Dims,
        indices: &[usize],
        want_logits: bool,
        first_buf: usize,
    ) -> Result<Program> {
        let d_in = d;
        let dt = self.dtype;
        let es = dt.size_bytes();
        let cap = max_activation(m, d)?
            .checked_mul(es)
            .ok_or_else(|| Error::Overflow("activation buffer".into()))?;
        let ex = &mut self.exec;
        let input = ex.alloc(d.len() * es)?;
        let (ba, bb, t1, t2) = (
            ex.alloc(cap)?,
            ex.alloc(cap)?,
            ex.alloc(cap)?,
            ex.alloc(cap)?,
        );
        let mut bl = Builder {
            dt,
            steps: Vec::new(),
            weights: self.weights,
            offsets: &self.offsets,
        };
        // Stem: dense 3x3/2 + ReLU, dw 3x3 + ReLU, 1x1 + ReLU, dw 3x3/2 + ReLU.
        let st = &m.stem;
        let c0 = &st.conv0;
        let l = kernels::model_dense_conv_launch(
            dt,
            [d.n, d.c, d.h, d.w],
            c0.cout,
            c0.k,
            c0.stride,
            c0.pad,
            ModelAct::Relu,
        )?;
        let (oh, ow) = c0.out_hw(d.h, d.w)?;
        bl.launch(l, input.addr, bl.w(&c0.w)?, bl.w(&c0.b)?, ba.addr);
        let d0 = Dims {
            n: d.n,
            c: c0.cout,
            h: oh,
            w: ow,
        };
        let d1 = bl.depthwise(&st.conv1, ba.addr, d0, bb.addr, ModelAct::Relu)?;
        let d2 = bl.pointwise(&st.conv2, bb.addr, d1, ba.addr, ModelAct::Relu, None)?;
        let mut d = bl.depthwise(&st.conv3, ba.addr, d2, bb.addr, ModelAct::Relu)?;
        let cur = bb.addr;
        let ns = m.stages.len();
        let last_needed = if want_logits {
            ns - 1
        } else {
            indices.iter().copied().max().unwrap_or(0)
        };
        let mut stage_bufs = Vec::new();
        for (s, stage) in m.stages.iter().enumerate() {
            if d.c != m.config.channels[s] {
                return Err(Error::shape(
                    format!("stage {s} input"),
                    format!("{} channels", m.config.channels[s]),
                    &d.to_vec(),
                ));
            }
            for block in &stage.blocks {
                match block {
                    Block::RepLk(b) => {
                        let di = bl.pointwise(&b.pw1, cur, d, t1.addr, ModelAct::Relu, None)?;
                        bl.depthwise(&b.lk, t1.addr, di, t2.addr, ModelAct::Relu)?;
                        bl.pointwise(&b.pw2, t2.addr, di, t1.addr, ModelAct::None, Some(cur))?;
                    }
                    Block::Ffn(b) => {
                        let di = bl.pointwise(&b.pw1, cur, d, t1.addr, ModelAct::Gelu, None)?;
                        bl.pointwise(&b.pw2, t1.addr, di, t2.addr, ModelAct::None, Some(cur))?;
                    }
                }
            }
            if indices.contains(&s) {
                let out = ex.alloc(d.len() * es)?;
                let l = kernels::model_affine_launch(dt, [d.n, d.c, d.h, d.w])?;
                let (scale, shift) = match &stage.norm {
                    Some(n) => (bl.w(&n.scale)?, bl.w(&n.shift)?),
                    None => (0, 0),
                };
                bl.launch(l, cur, scale, shift, out.addr);
                stage_bufs.push((s, out, d));
            }
            if s == last_needed {
                break;
            }
            if let Some(t) = m.transitions.get(s) {
                let mid = bl.pointwise(&t.pw, cur, d, t1.addr, ModelAct::Relu, None)?;
                d = bl.depthwise(&t.dw, t1.addr, mid, cur, ModelAct::Relu)?;
            }
        }
        let logits = if want_logits {
            let head = m
                .head
                .as_ref()
                .ok_or_else(|| Error::Unsupported("the model has no head".into()))?;
            let feat = ex.alloc(d.n * d.c * es)?;
            let out = ex.alloc(d.n * head.classes * es)?;
            let l = kernels::model_avgpool_launch(dt, [d.n, d.c, d.h, d.w], true)?;
            bl.launch(
                l,
                cur,
                bl.w(&head.norm.scale)?,
                bl.w(&head.norm.shift)?,
                feat.addr,
            );
            // logits^T [classes x N] = W [classes x C] * feat^T [C x N]
            bl.steps.push(Step::Gemm(Gemm {
                dtype: dt,
                m: head.classes,
                k: d.c,
                n: d.n,
                a: bl.w(&head.w)?,
                b: feat.addr,
                stride_b: 0,
                c: out.addr,
                stride_c: 0,
                batch: 1,
            }));
            let hb = bl.w(&head.b)?;
            bl.bias_act(
                out.addr,
                Dims {
                    n: 1,
                    c: head.classes,
                    h: 1,
                    w: d.n,
                },
                hb,
                ModelAct::None,
                0,
            )?;
            Some((out, d.n, head.classes))
        } else {
            None
        };
        let steps = bl.steps;
        ex.prepare(&steps)?;
        Ok(Program {
            key: (d_in, indices.to_vec(), want_logits),
            first_buf,
            input,
            stages: stage_bufs,
            logits,
            steps,
        })
    }

    /// Runs the forward pass (the model must be the one uploaded: see [`GpuModel::holds`]).
    pub fn run(
        &mut self,
        m: &DeployModel,
        x: &Tensor<f32>,
        indices: &[usize],
        want_logits: bool,
    ) -> Result<Output> {
        self.load_input(m, x, indices, want_logits)?;
        let p = self.prog.as_ref().expect("built by load_input");
        let dt = self.dtype;
        let es = dt.size_bytes();
        self.exec.run(&p.steps)?;
        let mut stages = Vec::new();
        for &(s, buf, sd) in &p.stages {
            let v = decode(&self.exec.download(buf, sd.len() * es)?, dt);
            stages.push((s, Tensor::from_vec(&sd.to_vec(), v)?));
        }
        let stages = indices
            .iter()
            .filter_map(|&i| stages.iter().find(|(s, _)| *s == i).cloned())
            .collect();
        let logits = match p.logits {
            Some((buf, n, classes)) => {
                let t = decode(&self.exec.download(buf, n * classes * es)?, dt);
                let mut v = vec![0f32; n * classes];
                for j in 0..classes {
                    for i in 0..n {
                        v[i * classes + j] = t[j * n + i];
                    }
                }
                Some(Tensor::from_vec(&[n, classes], v)?)
            }
            None => None,
        };
        Ok(Output { logits, stages })
    }

    /// Milliseconds of each of `reps` logits-only forward passes on `x` (after one warm-up;
    /// CUDA events on the GPU).
    pub fn time_forward(
        &mut self,
        m: &DeployModel,
        x: &Tensor<f32>,
        reps: usize,
    ) -> Result<Vec<f64>> {
        self.load_input(m, x, &[], true)?;
        let p = self.prog.as_ref().expect("built by load_input");
        self.exec.time(&p.steps, reps.max(1))
    }

    /// Checks the input, builds the program for it, copies it in.
    fn load_input(
        &mut self,
        m: &DeployModel,
        x: &Tensor<f32>,
        indices: &[usize],
        want_logits: bool,
    ) -> Result<()> {
        let d = super::cpu::dims_of("input", x.shape())?;
        self.program(m, d, indices, want_logits)?;
        let p = self.prog.as_ref().expect("just built");
        let input = p.input;
        self.exec.upload(input, &encode(x.data(), self.dtype))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::cpu::gelu;
    use crate::rng::Rng;

    fn random(len: usize, scale: f32, rng: &mut Rng) -> Vec<f32> {
        (0..len).map(|_| scale * rng.uniform_pm1()).collect()
    }

    /// Uploads `data` into a new simulator buffer.
    fn buf(ex: &mut SimExec, data: &[f32]) -> Buf {
        let b = ex.alloc(4 * data.len()).unwrap();
        ex.upload(b, &encode(data, DType::F32)).unwrap();
        b
    }

    /// The first `len` f32 values of a buffer.
    fn get(ex: &mut SimExec, b: Buf, len: usize) -> Vec<f32> {
        decode(&ex.download(b, 4 * len).unwrap(), DType::F32)
    }

    fn bind(mut l: Launch, in0: u64, in1: u64, bias: u64, out: u64) -> Step {
        l.args.in0 = in0;
        l.args.in1 = in1;
        l.args.bias = bias;
        l.args.out = out;
        Step::Kernel(l)
    }

    fn close(what: &str, got: &[f32], want: &[f32], tol: f32) {
        assert_eq!(got.len(), want.len());
        for (i, (g, w)) in got.iter().zip(want).enumerate() {
            assert!(
                (g - w).abs() <= tol * w.abs().max(1.0),
                "{what}[{i}]: {g} vs {w}"
            );
        }
    }

    /// Every element-wise kernel of `kernels/lk_model.cu` in the simulator against a host
    /// computation (the CPU engine's GELU), on random data with partial blocks.
    #[test]
    fn model_kernels_in_the_simulator() {
        if !crate::sim::available() {
            return;
        }
        let mut ex = SimExec { bufs: Vec::new() };
        let mut rng = Rng::new(9);
        let (n, c, h, w) = (2, 5, 7, 9);
        let hw = h * w;
        let len = n * c * hw;
        let x = random(len, 6.0, &mut rng);
        let res = random(len, 1.0, &mut rng);
        let bias = random(c, 1.0, &mut rng);
        let scale = random(c, 2.0, &mut rng);
        let (bx, bres, bb, bs) = (
            buf(&mut ex, &x),
            buf(&mut ex, &res),
            buf(&mut ex, &bias),
            buf(&mut ex, &scale),
        );
        let ch = |i: usize| (i / hw) % c;
        for act in [ModelAct::None, ModelAct::Relu, ModelAct::Gelu] {
            for with_res in [false, true] {
                let y = buf(&mut ex, &x);
                let l = kernels::model_bias_act_launch(DType::F32, [n, c, h, w], act).unwrap();
                let r = if with_res { bres.addr } else { 0 };
                ex.run(&[bind(l, y.addr, r, bb.addr, y.addr)]).unwrap();
                let want: Vec<f32> = (0..len)
                    .map(|i| {
                        let v = x[i] + bias[ch(i)];
                        let v = match act {
                            ModelAct::None => v,
                            ModelAct::Relu => v.max(0.0),
                            ModelAct::Gelu => gelu(v),
                        };
                        v + if with_res { res[i] } else { 0.0 }
                    })
                    .collect();
                let got = get(&mut ex, y, len);
                close(
                    &format!("bias_act {act:?} res {with_res}"),
                    &got,
                    &want,
                    1e-6,
                );
            }
        }
        // affine, with and without scale/shift
        for (sc, sh) in [(true, true), (false, true), (true, false), (false, false)] {
            let y = ex.alloc(4 * len).unwrap();
            let l = kernels::model_affine_launch(DType::F32, [n, c, h, w]).unwrap();
            let (ps, pt) = (if sc { bs.addr } else { 0 }, if sh { bb.addr } else { 0 });
            ex.run(&[bind(l, bx.addr, ps, pt, y.addr)]).unwrap();
            let want: Vec<f32> = (0..len)
                .map(|i| {
                    let s = if sc { scale[ch(i)] } else { 1.0 };
                    let t = if sh { bias[ch(i)] } else { 0.0 };
                    x[i] * s + t
                })
                .collect();
            close("affine", &get(&mut ex, y, len), &want, 1e-6);
        }
        // average pool, both layouts
        for transposed in [false, true] {
            let y = ex.alloc(4 * n * c).unwrap();
            let l = kernels::model_avgpool_launch(DType::F32, [n, c, h, w], transposed).unwrap();
            ex.run(&[bind(l, bx.addr, bs.addr, bb.addr, y.addr)])
                .unwrap();
            let mut want = vec![0f32; n * c];
            for i in 0..n {
                for j in 0..c {
                    let p = &x[(i * c + j) * hw..(i * c + j + 1) * hw];
                    let mean = p.iter().map(|&v| v as f64).sum::<f64>() / hw as f64;
                    let o = if transposed { j * n + i } else { i * c + j };
                    want[o] = (mean * scale[j] as f64 + bias[j] as f64) as f32;
                }
            }
            close("avgpool", &get(&mut ex, y, n * c), &want, 1e-5);
        }
        // dense conv 3x3 stride 2 pad 1 + ReLU against the CPU engine's stem conv
        let cout = 4;
        let k = 3;
        let wt = random(cout * c * k * k, 0.5, &mut rng);
        let bw = buf(&mut ex, &wt);
        let dc = super::super::cpu::DenseConv {
            cin: c,
            cout,
            k,
            stride: 2,
            pad: 1,
            w: wt.clone(),
            b: bias[..cout].to_vec(),
        };
        let (oh, ow) = dc.out_hw(h, w).unwrap();
        let y = ex.alloc(4 * n * cout * oh * ow).unwrap();
        let l = kernels::model_dense_conv_launch(
            DType::F32,
            [n, c, h, w],
            cout,
            k,
            2,
            1,
            ModelAct::Relu,
        )
        .unwrap();
        ex.run(&[bind(l, bx.addr, bw.addr, bb.addr, y.addr)])
            .unwrap();
        let mut want = vec![0f32; n * cout * oh * ow];
        for i in 0..n {
            for co in 0..cout {
                for oy in 0..oh {
                    for ox in 0..ow {
                        let mut acc = bias[co] as f64;
                        for ci in 0..c {
                            for ky in 0..k {
                                for kx in 0..k {
                                    let iy = (oy * 2 + ky) as isize - 1;
                                    let ix = (ox * 2 + kx) as isize - 1;
                                    if iy < 0 || ix < 0 || iy >= h as isize || ix >= w as isize {
                                        continue;
                                    }
                                    acc += x[(i * c + ci) * hw + iy as usize * w + ix as usize]
                                        as f64
                                        * wt[((co * c + ci) * k + ky) * k + kx] as f64;
                                }
                            }
                        }
                        want[((i * cout + co) * oh + oy) * ow + ox] = acc.max(0.0) as f32;
                    }
                }
            }
        }
        close("dense conv", &get(&mut ex, y, want.len()), &want, 1e-5);
        // the host GEMM: batched, A shared
        let (m, kk, nn, batch) = (3, 4, 5, 2);
        let a = random(m * kk, 1.0, &mut rng);
        let b = random(batch * kk * nn, 1.0, &mut rng);
        let (ba, bbm) = (buf(&mut ex, &a), buf(&mut ex, &b));
        let cbuf = ex.alloc(4 * batch * m * nn).unwrap();
        ex.run(&[Step::Gemm(Gemm {
            dtype: DType::F32,
            m,
            k: kk,
            n: nn,
            a: ba.addr,
            b: bbm.addr,
            stride_b: kk * nn,
            c: cbuf.addr,
            stride_c: m * nn,
            batch,
        })])
        .unwrap();
        let mut want = vec![0f32; batch * m * nn];
        for bt in 0..batch {
            for i in 0..m {
                for j in 0..nn {
                    want[bt * m * nn + i * nn + j] = (0..kk)
                        .map(|p| a[i * kk + p] * b[bt * kk * nn + p * nn + j])
                        .sum();
                }
            }
        }
        close("gemm", &get(&mut ex, cbuf, want.len()), &want, 1e-5);
    }

    /// bf16 and f16 storage end to end in the simulator against the CPU engine (f32): the
    /// wiring of every half-precision kernel and GEMM (rounding errors only).
    #[test]
    fn half_precision_programs_in_the_simulator() {
        if !crate::sim::available() {
            return;
        }
        let cfg = crate::model::ReplknetConfig {
            large_kernel_sizes: vec![9, 7],
            layers: vec![1, 1],
            channels: vec![8, 16],
            small_kernel: Some(3),
            dw_ratio: 1.0,
            ffn_ratio: 2.0,
            num_classes: 5,
            in_channels: 3,
        };
        let model = crate::model::Replknet::random(&cfg, 7).unwrap();
        let mut rng = Rng::new(3);
        let x = Tensor::<f32>::random(&[2, 3, 27, 22], &mut rng).unwrap();
        let want = model
            .run(&x, Some(&[0]), true, &mut crate::model::Workspace::new())
            .unwrap();
        for dt in [DType::Bf16, DType::F16] {
            let mut g = GpuModel::new(&model.deploy, GpuTarget::Sim, dt).unwrap();
            assert_eq!(g.dtype(), dt);
            let got = g.run(&model.deploy, &x, &[0], true).unwrap();
            for (a, b) in [
                (got.logits.as_ref().unwrap(), want.logits.as_ref().unwrap()),
                (&got.stages[0].1, &want.stages[0].1),
            ] {
                let mag = b.data().iter().fold(0f32, |m, v| m.max(v.abs()));
                let err = a
                    .data()
                    .iter()
                    .zip(b.data())
                    .fold(0f32, |m, (p, q)| m.max((p - q).abs()));
                // bf16 keeps 8 significant bits, f16 11
                let tol = if dt == DType::Bf16 { 0.05 } else { 0.01 };
                assert!(
                    err <= tol * mag.max(1e-3),
                    "{dt}: error {err}, magnitude {mag}"
                );
            }
        }
    }
}
