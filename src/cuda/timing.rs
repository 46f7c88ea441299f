//! Benchmark support: device descriptions, random problem buffers, and an op prepared once and
//! timed with the executor's one timer ([`CudaExec`]'s CUDA events around back-to-back runs).

use std::sync::Arc;

use cudarc::driver::{CudaSlice, CudaStream, DevicePtr};

use super::device::{device_count, CudaDevice};
use super::driver::{
    compiled_archs, driver_err, kernels_compiled, nvcc_version, require_kernels, NO_KERNELS,
};
use super::exec::CudaExec;
use super::ops::RawOperands;
use crate::conv::{ConvShape, DwConv2d};
use crate::dtype::DType;
use crate::error::{Error, Result};
use crate::exec::Executor;
use crate::op::{Impl, Op};
use crate::plan::{plan, Step};
use crate::problem::Problem;
use crate::rng::Rng;

/// One line per CUDA device (name, compute capability, SMs, clock, memory, driver, FP32 peak,
/// whether the embedded kernels loaded), or an error saying "no CUDA driver" or
/// "no CUDA device".
pub fn describe() -> Result<Vec<String>> {
    let n = device_count()?;
    if n == 0 {
        return Err(Error::CudaUnavailable("no CUDA device".into()));
    }
    (0..n)
        .map(|i| {
            let d = CudaDevice::shared(i)?;
            let kernels = if d.kernels_loaded() {
                format!("kernels: {} ({})", nvcc_version(), compiled_archs())
            } else if kernels_compiled() {
                "kernels: fatbin failed to load".to_string()
            } else {
                format!("kernels: {NO_KERNELS}")
            };
            Ok(format!("{}; {kernels}", d.info().summary()))
        })
        .collect()
}

/// The device buffers of one problem (shape and dtype): random inputs, an output per op.
/// Shared by the [`PreparedOp`]s of every op and implementation of that problem.
pub struct ProblemBuffers {
    problem: Problem,
    x: CudaSlice<u8>,
    w: CudaSlice<u8>,
    bias: CudaSlice<u8>,
    dy: CudaSlice<u8>,
    y: CudaSlice<u8>,
    dx: CudaSlice<u8>,
    dw: CudaSlice<u8>,
}

impl ProblemBuffers {
    /// Allocates and fills the buffers on `stream` (random x, w, bias, dy in [-1, 1) from
    /// `seed`).
    pub fn new(
        stream: &Arc<CudaStream>,
        dtype: DType,
        conv: &DwConv2d,
        shape: &ConvShape,
        seed: u64,
    ) -> Result<Self> {
        let problem = Problem::new(Op::Forward, Impl::Fast, dtype, conv, shape)?;
        let mut rng = Rng::new(seed);
        let es = dtype.size_bytes();
        let wlen = shape.c * conv.kernel.0 * conv.kernel.1;
        let upload = |len: usize, rng: &mut Rng| -> Result<CudaSlice<u8>> {
            let v: Vec<f32> = (0..len).map(|_| rng.uniform_pm1()).collect();
            stream
                .clone_htod(&dtype.encode(&v))
                .map_err(driver_err("copying benchmark data to the device"))
        };
        let zeros = |bytes: usize| -> Result<CudaSlice<u8>> {
            stream
                .alloc_zeros::<u8>(bytes)
                .map_err(driver_err("allocating a benchmark buffer"))
        };
        Ok(ProblemBuffers {
            problem,
            x: upload(shape.input_len(), &mut rng)?,
            w: upload(wlen, &mut rng)?,
            bias: upload(shape.c, &mut rng)?,
            dy: upload(shape.output_len(), &mut rng)?,
            y: zeros(shape.output_len() * es)?,
            dx: zeros(shape.input_len() * es)?,
            dw: zeros(wlen * es)?,
        })
    }
}

/// One op and implementation on one problem, ready to be queued repeatedly on its stream:
/// the plan is made, checked and bound once, so that a run costs only its launches.
pub struct PreparedOp {
    ex: CudaExec,
    bufs: Arc<ProblemBuffers>,
    steps: Vec<Step>,
}

impl PreparedOp {
    /// Prepares `op` with `imp` on `bufs` (allocates its workspace on `stream`). Fails early,
    /// before any launch, when the op cannot run (unsupported, too large, no kernels).
    /// `stream` must be the stream `bufs` was made on (all runs are ordered on it).
    pub fn new(
        dev: Arc<CudaDevice>,
        stream: Arc<CudaStream>,
        bufs: Arc<ProblemBuffers>,
        op: Op,
        imp: Impl,
    ) -> Result<Self> {
        require_kernels()?;
        if *bufs.x.stream() != stream {
            return Err(Error::InvalidArgument(
                "the problem buffers belong to another stream".into(),
            ));
        }
        let mut ex = CudaExec::on_stream(dev, stream.clone())?;
        let p = bufs.problem.with_op(op).with_impl(imp);
        let mut plan = plan(&p)?;
        let (workspace, workspace_bytes) = ex.plan_workspace(plan.workspace_bytes)?;
        let o = {
            let s = &*stream;
            let b = &*bufs;
            // The guards record each buffer's use on this stream as they drop; every run is
            // queued on this same stream, so stream order alone keeps later runs correct.
            let (x, _g1) = b.x.device_ptr(s);
            let (w, _g2) = b.w.device_ptr(s);
            let (bias, _g3) = b.bias.device_ptr(s);
            let (dy, _g4) = b.dy.device_ptr(s);
            let (y, _g5) = b.y.device_ptr(s);
            let (dx, _g6) = b.dx.device_ptr(s);
            let (dw, _g7) = b.dw.device_ptr(s);
            let [in0, in1, bias, out] = match op {
                Op::Forward => [x, w, bias, y],
                Op::DataGrad => [dy, w, 0, dx],
                Op::WeightGrad => [x, dy, 0, dw],
            };
            RawOperands {
                in0,
                in1,
                bias,
                out,
                workspace,
                workspace_bytes,
            }
        };
        plan.bind(o.in0, o.in1, o.bias, o.out, o.workspace);
        let steps = plan.steps();
        ex.prepare(&steps)?;
        Ok(PreparedOp { ex, bufs, steps })
    }

    /// Queues one run on the stream (no synchronisation).
    pub fn enqueue(&mut self) -> Result<()> {
        // SAFETY: the bound addresses are the buffers of `self.bufs` and the executor's plan
        // workspace, which `self` keeps alive (and cudarc frees only after the queued work
        // completes); they belong to this device, were sized in `ProblemBuffers::new` for the
        // problem's shape and dtype and by the plan for the workspace; the outputs y, dx, dw and
        // the workspace are separate allocations. The device memory is never accessed by the
        // host through these buffers, so writing outputs behind shared references is sound.
        unsafe { self.ex.run(&self.steps) }
    }

    /// Queues `iters` runs back to back and returns their total time in milliseconds, measured
    /// with CUDA events around the whole batch (waits for the batch to finish).
    pub fn time_batch_ms(&mut self, iters: usize) -> Result<f64> {
        // SAFETY: as in `enqueue`.
        let t = unsafe { self.ex.time(&self.steps, 1, iters.max(1)) }?;
        Ok(t[0] * iters.max(1) as f64)
    }

    /// Median time of one run in milliseconds: after `warmup` runs, `iters` samples, each the
    /// mean of B back-to-back runs between two CUDA events, B chosen so that a sample spans
    /// at least 1 ms (1 <= B <= 1000). Batch-1 kernels of a few microseconds are thus timed
    /// without the launch gap an event pair per run would add.
    pub fn median_ms(&mut self, warmup: usize, iters: usize) -> Result<f64> {
        for _ in 0..warmup {
            self.enqueue()?;
        }
        let one = self.time_batch_ms(1)?.max(1e-4);
        let batch = ((1.0 / one).ceil() as usize).clamp(1, 1000);
        // SAFETY: as in `enqueue`.
        let mut ms = unsafe { self.ex.time(&self.steps, iters.max(1), batch) }?;
        ms.sort_by(f64::total_cmp);
        Ok(ms[ms.len() / 2])
    }

    /// Nominal FLOPs of one run (2 N C OH OW KH KW).
    pub fn flops(&self) -> f64 {
        self.bufs.problem.flops()
    }

    /// FLOPs of the taps inside the image.
    pub fn useful_flops(&self) -> f64 {
        self.bufs.problem.useful_flops()
    }

    /// The device.
    pub fn device(&self) -> &Arc<CudaDevice> {
        self.ex.device()
    }

    /// The stream the runs are queued on.
    pub fn stream(&self) -> &Arc<CudaStream> {
        self.ex.stream()
    }
}

/// Median time in milliseconds of one run of problem `p` on random device data, measured as
/// [`PreparedOp::median_ms`] after `warmup` runs over `iters` samples, on a new stream of
/// device `ordinal`.
pub fn time_op(ordinal: usize, p: &Problem, warmup: usize, iters: usize) -> Result<f64> {
    require_kernels()?;
    let dev = CudaDevice::shared(ordinal)?;
    let stream = dev.new_stream()?;
    let bufs = Arc::new(ProblemBuffers::new(
        &stream,
        p.dtype(),
        p.conv(),
        p.shape(),
        0x1c0,
    )?);
    let mut prepared = PreparedOp::new(dev, stream, bufs, p.op(), p.imp())?;
    prepared.median_ms(warmup, iters)
}
