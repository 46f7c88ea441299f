//! The bottom of the CUDA layer: the embedded fatbin, what the build found, and the checks
//! that must precede any driver call (cudarc panics without libcuda).

use crate::error::{Error, Result};

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

/// Maps a cudarc driver error to [`Error::Cuda`] (the driver's error kept as its source),
/// naming what was being done.
pub(crate) fn driver_err(what: &'static str) -> impl Fn(cudarc::driver::DriverError) -> Error {
    move |e| Error::driver(what, e)
}

/// Fills a fresh device allocation with all-ones bytes (NaN in f32, f16 and bf16), queued on the
/// stream it was made on, as the simulator poisons its buffers: an element a kernel fails to
/// write, or scratch read before it is written, then fails the comparisons instead of reading 0.
pub(crate) fn poison(
    stream: &cudarc::driver::CudaStream,
    buf: &cudarc::driver::CudaSlice<u8>,
) -> std::result::Result<(), cudarc::driver::DriverError> {
    use cudarc::driver::DevicePtr;
    let (addr, _guard) = buf.device_ptr(stream);
    // SAFETY: `addr` is the start of `buf`, a live allocation of `buf.len()` bytes; the memset is
    // ordered on `stream` before every later use of the buffer on it.
    unsafe { cudarc::driver::result::memset_d8_async(addr, 0xFF, buf.len(), stream.cu_stream()) }
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

/// Fails without embedded kernels (before the driver is touched).
pub(crate) fn require_kernels() -> Result<()> {
    if kernels_compiled() {
        Ok(())
    } else {
        Err(Error::CudaUnavailable(NO_KERNELS.into()))
    }
}
