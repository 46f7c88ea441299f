//! CUDA-event timing for the benchmarks, and device descriptions.

use std::sync::Arc;

use cudarc::driver::sys::CUevent_flags;
use cudarc::driver::{CudaEvent, CudaSlice, CudaStream, DevicePtr};

use super::device::{device_count, CudaDevice};
use super::ops::{bind_raw, workspace_bytes, BoundPlan};
use super::tensor::Workspace;
use super::{driver_err, kernels_compiled, NO_KERNELS};
use crate::conv::{ConvShape, DwConv2d};
use crate::device::{Impl, Op};
use crate::dtype::DType;
use crate::error::{Error, Result};
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
                format!(
                    "kernels: {} ({})",
                    super::nvcc_version(),
                    super::compiled_archs()
                )
            } else if kernels_compiled() {
                "kernels: fatbin failed to load".to_string()
            } else {
                format!("kernels: {NO_KERNELS}")
            };
            Ok(format!("{}; {kernels}", d.info().summary()))
        })
        .collect()
}

/// Random values in [-1, 1) stored as `dtype`, little-endian bytes.
fn random_bytes(len: usize, dtype: DType, rng: &mut Rng) -> Vec<u8> {
    let mut out = Vec::with_capacity(len * dtype.size_bytes());
    for _ in 0..len {
        let v = rng.uniform_pm1();
        match dtype {
            DType::F32 => out.extend_from_slice(&v.to_le_bytes()),
            DType::F16 => out.extend_from_slice(&half::f16::from_f32(v).to_le_bytes()),
            DType::Bf16 => out.extend_from_slice(&half::bf16::from_f32(v).to_le_bytes()),
        }
    }
    out
}

/// The device buffers of one problem (shape and dtype): random inputs, an output per op.
/// Shared by the [`PreparedOp`]s of every op and implementation of that problem.
pub struct ProblemBuffers {
    dtype: DType,
    conv: DwConv2d,
    shape: ConvShape,
    x: CudaSlice<u8>,
    w: CudaSlice<u8>,
    bias: CudaSlice<u8>,
    dy: CudaSlice<u8>,
    y: CudaSlice<u8>,
    dx: CudaSlice<u8>,
    dw: CudaSlice<u8>,
}

impl ProblemBuffers {
    /// Allocates and fills the buffers on `stream` (random x, w, bias, dy from `seed`).
    pub fn new(
        stream: &Arc<CudaStream>,
        dtype: DType,
        conv: &DwConv2d,
        shape: &ConvShape,
        seed: u64,
    ) -> Result<Self> {
        let s = conv.resolve(shape.n, shape.c, shape.h, shape.w)?;
        if s != *shape {
            return Err(Error::InvalidArgument(format!(
                "shape {shape:?} is inconsistent with the convolution"
            )));
        }
        let mut rng = Rng::new(seed);
        let es = dtype.size_bytes();
        let wlen = shape.c * conv.kernel.0 * conv.kernel.1;
        let upload = |len: usize, rng: &mut Rng| -> Result<CudaSlice<u8>> {
            stream
                .clone_htod(&random_bytes(len, dtype, rng))
                .map_err(driver_err("copying benchmark data to the device"))
        };
        let zeros = |bytes: usize| -> Result<CudaSlice<u8>> {
            stream
                .alloc_zeros::<u8>(bytes)
                .map_err(driver_err("allocating a benchmark buffer"))
        };
        Ok(ProblemBuffers {
            dtype,
            conv: *conv,
            shape: *shape,
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
    dev: Arc<CudaDevice>,
    stream: Arc<CudaStream>,
    bufs: Arc<ProblemBuffers>,
    _ws: Workspace,
    bound: BoundPlan,
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
        if !dev.kernels_loaded() {
            return Err(Error::CudaUnavailable(if kernels_compiled() {
                "the embedded fatbin did not load".into()
            } else {
                NO_KERNELS.into()
            }));
        }
        dev.check_stream(&stream)?;
        if *bufs.x.stream() != stream {
            return Err(Error::InvalidArgument(
                "the problem buffers belong to another stream".into(),
            ));
        }
        let (dtype, conv, shape) = (bufs.dtype, bufs.conv, bufs.shape);
        let ws_len = workspace_bytes(op, imp, dtype, &conv, &shape)?;
        let mut ws = Workspace::with_capacity(&stream, ws_len)?;
        let bound = {
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
            let wsg = ws.ptr(s);
            let ws_ptr = wsg.as_ref().map_or(0, |(p, _)| *p);
            let ptrs = match op {
                Op::Forward => [x, w, bias, y],
                Op::DataGrad => [dy, w, 0, dx],
                Op::WeightGrad => [x, dy, 0, dw],
            };
            bind_raw(&dev, op, imp, dtype, &conv, &shape, ptrs, ws_ptr, ws_len)?
        };
        Ok(PreparedOp {
            dev,
            stream,
            bufs,
            _ws: ws,
            bound,
        })
    }

    /// Queues one run on the stream (no synchronisation).
    pub fn enqueue(&mut self) -> Result<()> {
        // SAFETY: the bound addresses are the buffers of `self.bufs` and `self._ws`, which
        // `self` keeps alive (and cudarc frees only after the queued work completes); they
        // belong to this device, were sized in `ProblemBuffers::new` for the problem's shape
        // and dtype and by `workspace_bytes` for the workspace; the outputs y, dx, dw and the
        // workspace are separate allocations. The device memory is never accessed by the host
        // through these buffers, so writing outputs behind shared references is sound.
        unsafe { self.bound.enqueue(&self.dev, &self.stream) }
    }

    fn timing_event(&self) -> Result<CudaEvent> {
        self.dev
            .context()
            .new_event(Some(CUevent_flags::CU_EVENT_DEFAULT))
            .map_err(driver_err("creating a timing event"))
    }

    /// Queues `iters` runs back to back and returns their total time in milliseconds, measured
    /// with CUDA events around the whole batch (waits for the batch to finish).
    pub fn time_batch_ms(&mut self, iters: usize) -> Result<f64> {
        let start = self.timing_event()?;
        let end = self.timing_event()?;
        start
            .record(&self.stream)
            .map_err(driver_err("recording an event"))?;
        for _ in 0..iters {
            self.enqueue()?;
        }
        end.record(&self.stream)
            .map_err(driver_err("recording an event"))?;
        let ms = start
            .elapsed_ms(&end)
            .map_err(driver_err("reading an event timer"))?;
        Ok(ms as f64)
    }

    /// Runs `warmup` untimed runs, then `iters` runs each between its own pair of events, and
    /// returns the median time of one run in milliseconds.
    pub fn median_ms(&mut self, warmup: usize, iters: usize) -> Result<f64> {
        for _ in 0..warmup {
            self.enqueue()?;
        }
        let iters = iters.max(1);
        let mut events = Vec::with_capacity(iters);
        for _ in 0..iters {
            let (a, b) = (self.timing_event()?, self.timing_event()?);
            a.record(&self.stream)
                .map_err(driver_err("recording an event"))?;
            self.enqueue()?;
            b.record(&self.stream)
                .map_err(driver_err("recording an event"))?;
            events.push((a, b));
        }
        let mut ms = events
            .iter()
            .map(|(a, b)| {
                a.elapsed_ms(b)
                    .map(|v| v as f64)
                    .map_err(driver_err("reading an event timer"))
            })
            .collect::<Result<Vec<f64>>>()?;
        ms.sort_by(f64::total_cmp);
        Ok(ms[ms.len() / 2])
    }

    /// Nominal FLOPs of one run (2 N C OH OW KH KW).
    pub fn flops(&self) -> f64 {
        self.bufs.conv.flops(&self.bufs.shape)
    }

    /// FLOPs of the taps inside the image.
    pub fn useful_flops(&self) -> f64 {
        self.bufs.conv.useful_flops(&self.bufs.shape)
    }

    /// The device.
    pub fn device(&self) -> &Arc<CudaDevice> {
        &self.dev
    }

    /// The stream the runs are queued on.
    pub fn stream(&self) -> &Arc<CudaStream> {
        &self.stream
    }
}

/// Median time in milliseconds of one `op` with `imp` on random device data of `dtype` for
/// `shape` (resolved with `conv`), measured with CUDA events after `warmup` runs over `iters`
/// timed runs, on a new stream of device `ordinal`.
#[allow(clippy::too_many_arguments)]
pub fn time_op(
    ordinal: usize,
    op: Op,
    imp: Impl,
    dtype: DType,
    conv: &DwConv2d,
    shape: &ConvShape,
    warmup: usize,
    iters: usize,
) -> Result<f64> {
    if !kernels_compiled() {
        return Err(Error::CudaUnavailable(NO_KERNELS.into()));
    }
    let dev = CudaDevice::shared(ordinal)?;
    let stream = dev.new_stream()?;
    let bufs = Arc::new(ProblemBuffers::new(&stream, dtype, conv, shape, 0x1c0)?);
    let mut p = PreparedOp::new(dev, stream, bufs, op, imp)?;
    p.median_ms(warmup, iters)
}
