//! The CUDA device: a safe API over cudarc for the kernels in `kernels/`.
//!
//! Files, bottom up:
//! - `driver.rs`: the embedded fatbin and the checks that precede any driver call;
//! - `device.rs`: [`CudaDevice`], one context per GPU ordinal, the fatbin loaded once, kernels
//!   fetched by [`KernelId`](crate::plan::KernelId) and cached, launch limits, the cuBLAS handle,
//!   device facts and the FP32 peak;
//! - `tensor.rs`: [`DeviceTensor`], device buffers that carry their shape (and, through `T`,
//!   their dtype);
//! - `gemm.rs`: the one GEMM step as a cuBLAS call;
//! - `exec.rs`: [`CudaExec`], the CUDA back-end of the plan executor (one stream; the one
//!   launch site and the one timer);
//! - `ops.rs`: the convolution API: [`forward`], [`data_grad`], [`weight_grad`] on device
//!   tensors and [`run_raw`] on raw pointers, queued on an executor's stream (a caller's, with
//!   [`CudaExec::on_stream`]); nothing synchronises the host;
//! - `timing.rs`: [`describe`], [`ProblemBuffers`], [`PreparedOp`], [`time_op`] for the
//!   benchmarks.
//!
//! Which kernels run, with which grid, block and shared memory, is decided in one place:
//! `crate::plan`. This module only executes plans.
//!
//! Without a CUDA driver (no `libcuda`), without a device, or when the crate was built without
//! nvcc (no embedded fatbin), every entry point returns
//! [`Error::CudaUnavailable`](crate::Error::CudaUnavailable); nothing panics.

mod device;
mod driver;
mod exec;
mod gemm;
mod ops;
mod tensor;
mod timing;

pub use device::{fp32_lanes_per_sm, CudaDevice, DeviceInfo};
pub use driver::{compiled_archs, kernels_compiled, nvcc_version};
pub use exec::CudaExec;
pub use ops::{data_grad, forward, run_raw, weight_grad, workspace_bytes, RawOperands};
pub use tensor::{CudaElement, DeviceTensor};
pub use timing::{describe, time_op, PreparedOp, ProblemBuffers};

/// cudarc's stream handle and driver error (the source of `Error::Cuda`), re-exported so that
/// callers need no direct cudarc dependency.
pub use cudarc::driver::{sys::CUresult, CudaStream, DriverError};

/// Peak FP32 GFLOP/s of GPU `ordinal` and how it was computed (SMs x FP32 lanes per SM for the
/// compute capability x 2 x peak SM clock; see [`DeviceInfo::peak_fp32_gflops`]).
pub fn peak_fp32_gflops(ordinal: usize) -> crate::error::Result<(f64, String)> {
    let d = CudaDevice::shared(ordinal)?;
    Ok((d.info().peak_fp32_gflops(), d.info().peak_fp32_note()))
}
