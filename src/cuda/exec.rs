//! [`CudaExec`]: the CUDA back-end of the plan executor. One device, one stream for life
//! (its own, or a caller's), device buffers allocated on that stream, kernels fetched once per
//! executor, GEMMs through cuBLAS with this stream's own cuBLAS workspace. The one CUDA launch
//! site and the one CUDA timer are here.

use std::collections::HashMap;
use std::sync::Arc;

use cudarc::driver::sys::CUevent_flags;
use cudarc::driver::{
    CudaEvent, CudaFunction, CudaSlice, CudaStream, DevicePtr, LaunchConfig, PushKernelArg,
};

use super::device::CudaDevice;
use super::driver::{driver_err, require_kernels};
use super::gemm;
use super::tensor::Workspace;
use crate::error::{Error, Result};
use crate::exec::{Buf, Executor};
use crate::plan::{DwArgs, KernelId, Step};

// SAFETY: `DwArgs` is `#[repr(C)]` plain old data (five u64 then eighteen i32, no padding-
// sensitive invariants, `Copy`; its size and alignment are asserted in `crate::plan`); every
// kernel takes it by value as its single parameter `const DwArgs args`, declared with the
// identical layout in `kernels/lk_args.cuh`, so copying its bytes into the launch parameter
// buffer is exactly what the kernel expects.
unsafe impl cudarc::driver::DeviceRepr for DwArgs {}

/// The CUDA back-end: see the module documentation.
pub struct CudaExec {
    dev: Arc<CudaDevice>,
    stream: Arc<CudaStream>,
    bufs: Vec<(u64, CudaSlice<u8>)>,
    funcs: HashMap<KernelId, CudaFunction>,
    /// This stream's cuBLAS workspace (allocated on the first GEMM).
    blas_ws: Option<CudaSlice<u8>>,
    /// The plans' workspace for the safe ops (grows to the largest request).
    plan_ws: Workspace,
}

impl std::fmt::Debug for CudaExec {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CudaExec")
            .field("device", &self.dev.ordinal())
            .field("buffers", &self.bufs.len())
            .finish()
    }
}

impl CudaExec {
    /// An executor on a new stream of GPU `ordinal`. Fails without embedded kernels (before
    /// the driver is touched), without a driver or device, or when the fatbin did not load.
    pub fn new(ordinal: usize) -> Result<Self> {
        require_kernels()?;
        let dev = CudaDevice::shared(ordinal)?;
        let stream = dev.new_stream()?;
        Self::on_stream(dev, stream)
    }

    /// An executor that queues its work on `stream` (a caller's stream of `dev`).
    pub fn on_stream(dev: Arc<CudaDevice>, stream: Arc<CudaStream>) -> Result<Self> {
        dev.require_module()?;
        dev.check_stream(&stream)?;
        Ok(CudaExec {
            dev,
            stream,
            bufs: Vec::new(),
            funcs: HashMap::new(),
            blas_ws: None,
            plan_ws: Workspace::new(),
        })
    }

    /// The device.
    pub fn device(&self) -> &Arc<CudaDevice> {
        &self.dev
    }

    /// The stream every step is queued on.
    pub fn stream(&self) -> &Arc<CudaStream> {
        &self.stream
    }

    /// (buffer index, byte offset) of the byte range `[start, start + len)`, which must lie in
    /// one buffer of this executor.
    fn find(&self, start: u64, len: usize) -> Result<(usize, usize)> {
        self.bufs
            .iter()
            .position(|(base, b)| start >= *base && start + len as u64 <= base + b.len() as u64)
            .map(|i| (i, (start - self.bufs[i].0) as usize))
            .ok_or_else(|| {
                Error::InvalidArgument(format!(
                    "{len} bytes at {start:#x} are not inside one buffer of this executor"
                ))
            })
    }

    /// The executor's plan workspace grown to at least `bytes` (address, capacity); (0, 0) when
    /// `bytes` is 0. Only this executor's stream uses it.
    pub(crate) fn plan_workspace(&mut self, bytes: usize) -> Result<(u64, usize)> {
        if bytes == 0 {
            return Ok((0, 0));
        }
        self.plan_ws.ensure(&self.stream, bytes)?;
        let cap = self.plan_ws.capacity();
        let addr = self.plan_ws.ptr(&self.stream).map_or(0, |(p, _guard)| p);
        Ok((addr, cap))
    }

    /// This stream's cuBLAS workspace (address, bytes), allocated on first use.
    fn blas_workspace(&mut self) -> Result<(u64, usize)> {
        if self.blas_ws.is_none() {
            let bytes = self.dev.blas_workspace_bytes();
            // SAFETY: cuBLAS uses the workspace as scratch; nothing reads it before writing.
            let buf = unsafe { self.stream.alloc::<u8>(bytes) }
                .map_err(driver_err("allocating the cuBLAS workspace"))?;
            self.blas_ws = Some(buf);
        }
        let Some(buf) = self.blas_ws.as_ref() else {
            unreachable!("allocated above")
        };
        // Only this stream ever uses the workspace, so no cross-stream tracking is needed.
        let (addr, _guard) = buf.device_ptr(&self.stream);
        Ok((addr, buf.len()))
    }

    fn event(&self) -> Result<CudaEvent> {
        self.dev
            .context()
            .new_event(Some(CUevent_flags::CU_EVENT_DEFAULT))
            .map_err(driver_err("creating a timing event"))
    }

    /// Queues the steps; see [`Executor::run`].
    ///
    /// # Safety
    /// As for [`Executor::run`].
    unsafe fn queue(&mut self, steps: &[Step]) -> Result<()> {
        for step in steps {
            match step {
                Step::Kernel(l) => {
                    let func = self.funcs.get(&l.kernel).ok_or_else(|| {
                        Error::InvalidArgument(format!("kernel '{}' was not prepared", l.kernel))
                    })?;
                    let cfg = LaunchConfig {
                        grid_dim: l.grid,
                        block_dim: l.block,
                        shared_mem_bytes: l.shared_bytes,
                    };
                    // SAFETY: every kernel is `extern "C" __global__ void NAME(const DwArgs
                    // args)`: one by-value parameter of the repr(C) `DwArgs` (see its
                    // DeviceRepr impl above). `prepare` checked the configuration
                    // against the device and the kernel's shared memory; the planner sized the
                    // grid for the launch's problem; the addresses inside `args` satisfy this
                    // function's contract, so the kernel stays inside live device memory.
                    unsafe { self.stream.launch_builder(func).arg(&l.args).launch(cfg) }.map_err(
                        |e| {
                            Error::driver(
                                format!(
                                    "launching '{}' (grid {:?}, block {:?}, {} B shared)",
                                    l.kernel, l.grid, l.block, l.shared_bytes
                                ),
                                e,
                            )
                        },
                    )?;
                }
                Step::Gemm(g) => {
                    let (ws, ws_bytes) = self.blas_workspace()?;
                    // SAFETY: the operands satisfy this function's contract; the workspace is
                    // this executor's own, used only on its stream and freed stream-ordered
                    // after the queued work.
                    unsafe { gemm::run(&self.dev, &self.stream, g, ws, ws_bytes) }?;
                }
            }
        }
        Ok(())
    }
}

impl Executor for CudaExec {
    fn name(&self) -> String {
        format!("cuda:{}", self.dev.ordinal())
    }
    fn alloc(&mut self, bytes: usize) -> Result<Buf> {
        // SAFETY: a byte buffer, poisoned below before any use.
        let buf = unsafe { self.stream.alloc::<u8>(bytes.max(1)) }
            .map_err(driver_err("allocating a device buffer"))?;
        // Every use of the buffer is on `self.stream`, so no cross-stream tracking is needed
        // after this point.
        let addr = {
            let (p, _guard) = buf.device_ptr(&self.stream);
            p
        };
        super::driver::poison(&self.stream, &buf)
            .map_err(driver_err("poisoning a device buffer"))?;
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
        let (i, off) = self.find(dst.addr, data.len())?;
        let stream = self.stream.clone();
        let mut view = self.bufs[i].1.slice_mut(off..off + data.len());
        stream
            .memcpy_htod(data, &mut view)
            .map_err(driver_err("copying to the device"))
    }
    fn download(&mut self, src: Buf, bytes: usize) -> Result<Vec<u8>> {
        let (i, off) = self.find(src.addr, bytes)?;
        let v = self
            .stream
            .clone_dtoh(&self.bufs[i].1.slice(off..off + bytes))
            .map_err(driver_err("copying to the host"))?;
        self.stream
            .synchronize()
            .map_err(driver_err("synchronising after a copy to the host"))?;
        // surface any error the driver recorded asynchronously (e.g. a fault in a kernel)
        self.stream
            .context()
            .check_err()
            .map_err(driver_err("a queued CUDA operation failed"))?;
        Ok(v)
    }
    fn prepare(&mut self, steps: &[Step]) -> Result<()> {
        for step in steps {
            if let Step::Kernel(l) = step {
                // checks every launch (a cached kernel may meet a larger configuration)
                let f = self.dev.kernel(l)?;
                self.funcs.entry(l.kernel).or_insert(f);
            }
        }
        Ok(())
    }
    unsafe fn run(&mut self, steps: &[Step]) -> Result<()> {
        // SAFETY: forwarded from this function's contract.
        unsafe { self.queue(steps) }
    }
    /// The one CUDA timer: per sample, an event before and after `batch` back-to-back runs on
    /// the stream (so that launch overhead between runs overlaps the previous run's work, as
    /// in a real training step, and batch-1 kernels of a few microseconds are not dominated by
    /// the event pair), divided by `batch`.
    unsafe fn time(&mut self, steps: &[Step], reps: usize, batch: usize) -> Result<Vec<f64>> {
        let batch = batch.max(1);
        // SAFETY: forwarded from this function's contract.
        unsafe { self.queue(steps) }?;
        let mut events = Vec::with_capacity(reps.max(1));
        for _ in 0..reps.max(1) {
            let (a, b) = (self.event()?, self.event()?);
            a.record(&self.stream)
                .map_err(driver_err("recording an event"))?;
            for _ in 0..batch {
                // SAFETY: as above.
                unsafe { self.queue(steps) }?;
            }
            b.record(&self.stream)
                .map_err(driver_err("recording an event"))?;
            events.push((a, b));
        }
        self.stream
            .synchronize()
            .map_err(driver_err("synchronising after timing"))?;
        events
            .iter()
            .map(|(a, b)| {
                a.elapsed_ms(b)
                    .map(|ms| ms as f64 / batch as f64)
                    .map_err(driver_err("reading an event timer"))
            })
            .collect()
    }
}
