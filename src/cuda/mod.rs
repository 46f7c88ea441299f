//! The CUDA device: a safe API over cudarc for the depthwise-convolution kernels in `kernels/`.
//!
//! Layers, in the style of cudarc's own `sys` / `result` / `safe` split:
//! - [`CudaDevice`] (in `device.rs`): one context per GPU ordinal, the embedded fatbin loaded
//!   once, kernel functions fetched lazily by name and cached, device facts (SMs, clock, compute
//!   capability, memory) and the FP32 peak used to report a share of peak.
//! - [`DeviceTensor`] and [`Workspace`] (in `tensor.rs`): device buffers that carry their shape
//!   (and, through `T`, their dtype).
//! - [`forward`], [`data_grad`], [`weight_grad`] (in `ops.rs`): the safe ops. They run on a
//!   caller-provided stream and never synchronise the host; every shape is checked with the
//!   checks in `crate::conv` before anything is launched, and every launch configuration is
//!   checked against the device's limits. The raw-pointer entry points ([`forward_raw`],
//!   [`data_grad_raw`], [`weight_grad_raw`]) are for the C ABI.
//! - [`host`]: copy in, run on a new stream, copy out, synchronise (the CLI's `--device cuda`).
//! - [`time_op`], [`PreparedOp`], [`describe`] (in `timing.rs`): CUDA-event timing for the
//!   benchmarks and a one-line description of each device.
//!
//! Which kernels run, with which grid, block and shared memory, is decided in one place:
//! `crate::kernels::plan`. This module only executes plans.
//!
//! Without a CUDA driver (no `libcuda`), without a device, or when the crate was built without
//! nvcc (no embedded fatbin), every entry point returns [`Error::CudaUnavailable`]; nothing
//! panics.

mod device;
mod gemm;
pub mod host;
mod ops;
mod tensor;
mod timing;

// The kernel planner: which kernels, grids and workspace each op needs.
use crate::kernels;

pub use device::{fp32_lanes_per_sm, CudaDevice, DeviceInfo};
pub use ops::{
    data_grad, data_grad_raw, forward, forward_raw, weight_grad, weight_grad_raw, workspace_bytes,
};
pub use tensor::{CudaElement, DeviceTensor, Workspace};
pub use timing::{describe, time_op, PreparedOp, ProblemBuffers};

/// cudarc's stream handle, re-exported so that callers need no direct cudarc dependency.
pub use cudarc::driver::CudaStream;

use crate::error::Error;
use kernels::DwArgs;

// For the GPU-resident model (`crate::model::gpu`).
pub(crate) use gemm::{run as gemm_run, BatchedGemm};
pub(crate) use ops::prepare_launches;

// SAFETY: `DwArgs` is `#[repr(C)]` plain old data (five u64 then eighteen i32, no pointers the
// driver follows on the host, no padding-sensitive invariants, `Copy`); every kernel takes it by
// value as its single parameter `const DwArgs args`, declared with the identical layout in
// `kernels/*.cu`, so copying its bytes into the launch parameter buffer is exactly what the
// kernel expects.
unsafe impl cudarc::driver::DeviceRepr for DwArgs {}
// The layout `kernels/lk_args.cuh` static_asserts on the device side.
const _: () = assert!(std::mem::size_of::<DwArgs>() == 112 && std::mem::align_of::<DwArgs>() == 8);

/// The embedded fatbin (sm_75..sm_90 SASS + compute_75 PTX), when build.rs found nvcc.
#[cfg(lkconv_cuda_kernels)]
pub(crate) const FATBIN: Option<&[u8]> = Some(include_bytes!(concat!(
    env!("OUT_DIR"),
    "/lkconv_kernels.fatbin"
)));
/// The embedded fatbin: none, build.rs did not find nvcc.
#[cfg(not(lkconv_cuda_kernels))]
pub(crate) const FATBIN: Option<&[u8]> = None;

/// The reason every op fails when the crate was built without nvcc.
pub(crate) const NO_KERNELS: &str = "built without CUDA kernels";

/// True when build.rs compiled `kernels/*.cu` with nvcc and embedded the fatbin.
pub fn kernels_compiled() -> bool {
    FATBIN.is_some()
}

/// The nvcc release line the kernels were compiled with ("none" without nvcc).
pub fn nvcc_version() -> &'static str {
    env!("LKCONV_NVCC_VERSION")
}

/// The architectures in the embedded fatbin, comma separated ("" without nvcc).
pub fn compiled_archs() -> &'static str {
    env!("LKCONV_CUDA_ARCHS")
}

/// Peak FP32 GFLOP/s of GPU `ordinal` and how it was computed (SMs x FP32 lanes per SM for the
/// compute capability x 2 x peak SM clock; see [`DeviceInfo::peak_fp32_gflops`]).
pub fn peak_fp32_gflops(ordinal: usize) -> crate::error::Result<(f64, String)> {
    let d = CudaDevice::shared(ordinal)?;
    Ok((d.info().peak_fp32_gflops(), d.info().peak_fp32_note()))
}

/// Maps a cudarc driver error to [`Error::Cuda`], naming what was being done.
pub(crate) fn driver_err(what: &'static str) -> impl Fn(cudarc::driver::DriverError) -> Error {
    move |e| Error::Cuda(format!("{what}: {e}"))
}

/// The error for a machine without libcuda, or `None` when the driver library is present.
pub(crate) fn driver_missing() -> Option<Error> {
    // SAFETY: `is_culib_present` only tries to dlopen libcuda (through cudarc's lazily
    // initialised loader) and reports whether that worked; it calls no CUDA function and
    // dereferences nothing we own. It must run before any other cudarc driver call, which
    // would panic without the library.
    let present = unsafe { cudarc::driver::sys::is_culib_present() };
    (!present).then(|| Error::CudaUnavailable("no CUDA driver (libcuda not found)".into()))
}
