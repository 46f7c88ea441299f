//! One error type for the whole crate: every bad input is named, never a panic.

use thiserror::Error;

/// Errors returned by lkconv.
#[derive(Debug, Error)]
pub enum Error {
    /// A tensor has the wrong number of dimensions or the wrong extents.
    #[error("shape mismatch for {what}: expected {expected}, got {got:?}")]
    Shape {
        what: String,
        expected: String,
        got: Vec<usize>,
    },
    /// A size is zero where a positive value is needed.
    #[error("{what} must be at least 1, got {got}")]
    ZeroSize { what: String, got: usize },
    /// A size computation overflows (element counts, byte counts, 32-bit kernel indices).
    #[error("size overflow: {0}")]
    Overflow(String),
    /// The padding, kernel, stride and dilation leave no output element.
    #[error("empty output: {0}")]
    EmptyOutput(String),
    /// Two tensors that must share an element type do not.
    #[error("dtype mismatch: {0}")]
    DType(String),
    /// A caller-provided buffer has the wrong length.
    #[error("buffer {what} has {got} elements, expected {expected}")]
    BufferLength {
        what: String,
        expected: usize,
        got: usize,
    },
    /// An argument that is not a shape (a flag, a name, a parameter) is invalid.
    #[error("invalid argument: {0}")]
    InvalidArgument(String),
    /// A weight or tensor file is unreadable, corrupt, or lacks tensors.
    #[error("weights: {0}")]
    Weights(String),
    /// Reading or writing a file failed.
    #[error("i/o error on {path}: {source}")]
    Io {
        path: String,
        #[source]
        source: std::io::Error,
    },
    /// A safetensors file could not be parsed or written.
    #[error("safetensors: {0}")]
    SafeTensors(String),
    /// CUDA is unavailable: no driver, no device, or built without kernels.
    #[error("CUDA unavailable: {0}")]
    CudaUnavailable(String),
    /// A CUDA driver or cuBLAS call failed: what was being done, and the driver's or cuBLAS's
    /// own error as the source (see [`Error::is_out_of_memory`]).
    #[error("CUDA error: {what}: {source}")]
    Cuda {
        what: String,
        #[source]
        source: CudaFailure,
    },
    /// The kernel simulator reported a failure.
    #[error("kernel simulator: {0}")]
    Simulator(String),
    /// The operation is not supported for this combination of arguments.
    #[error("unsupported: {0}")]
    Unsupported(String),
    /// A host allocation failed (the request exceeds what the system grants).
    #[error("out of host memory: {bytes} bytes for {what}")]
    OutOfMemory { what: String, bytes: usize },
}

/// The CUDA driver's or cuBLAS's error behind an [`Error::Cuda`]. Displayed by its status
/// name (e.g. `CUDA_ERROR_OUT_OF_MEMORY`), which needs no call into the driver library.
#[derive(Clone, Copy, Error, PartialEq, Eq)]
pub enum CudaFailure {
    #[error("{:?}", .0 .0)]
    Driver(cudarc::driver::DriverError),
    #[error("{:?}", .0 .0)]
    Cublas(cudarc::cublas::result::CublasError),
}

// By hand: cudarc's own Debug of these errors asks the driver library for a description, which
// panics on a machine without it.
impl std::fmt::Debug for CudaFailure {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            CudaFailure::Driver(e) => write!(f, "Driver({:?})", e.0),
            CudaFailure::Cublas(e) => write!(f, "Cublas({:?})", e.0),
        }
    }
}

/// Result alias used throughout lkconv.
pub type Result<T> = std::result::Result<T, Error>;

impl Error {
    /// A failed driver call while doing `what`.
    pub fn driver(what: impl Into<String>, e: cudarc::driver::DriverError) -> Self {
        Error::Cuda {
            what: what.into(),
            source: CudaFailure::Driver(e),
        }
    }

    /// A failed cuBLAS call while doing `what`.
    pub fn cublas(what: impl Into<String>, e: cudarc::cublas::result::CublasError) -> Self {
        Error::Cuda {
            what: what.into(),
            source: CudaFailure::Cublas(e),
        }
    }

    /// True when the host ([`Error::OutOfMemory`]) or the device ran out of memory (the
    /// driver's `CUDA_ERROR_OUT_OF_MEMORY` or cuBLAS's `CUBLAS_STATUS_ALLOC_FAILED`), as opposed
    /// to any other failure.
    pub fn is_out_of_memory(&self) -> bool {
        use cudarc::cublas::sys::cublasStatus_t;
        use cudarc::driver::sys::CUresult;
        match self {
            Error::OutOfMemory { .. } => true,
            Error::Cuda {
                source: CudaFailure::Driver(e),
                ..
            } => e.0 == CUresult::CUDA_ERROR_OUT_OF_MEMORY,
            Error::Cuda {
                source: CudaFailure::Cublas(e),
                ..
            } => e.0 == cublasStatus_t::CUBLAS_STATUS_ALLOC_FAILED,
            _ => false,
        }
    }

    pub(crate) fn shape(
        what: impl Into<String>,
        expected: impl Into<String>,
        got: &[usize],
    ) -> Self {
        Error::Shape {
            what: what.into(),
            expected: expected.into(),
            got: got.to_vec(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use cudarc::driver::sys::CUresult;
    use std::error::Error as _;

    #[test]
    fn cuda_errors_keep_their_source() {
        let oom = Error::driver(
            "allocating",
            cudarc::driver::DriverError(CUresult::CUDA_ERROR_OUT_OF_MEMORY),
        );
        assert!(oom.is_out_of_memory());
        let src = oom.source().expect("a source");
        assert!(src.to_string().contains("OUT_OF_MEMORY"), "{src}");
        // printing needs no driver library (this machine may have none)
        assert!(format!("{oom} {oom:?}").contains("CUDA_ERROR_OUT_OF_MEMORY"));
        let launch = Error::driver(
            "launching",
            cudarc::driver::DriverError(CUresult::CUDA_ERROR_LAUNCH_FAILED),
        );
        assert!(!launch.is_out_of_memory());
        assert!(matches!(
            launch,
            Error::Cuda {
                source: CudaFailure::Driver(cudarc::driver::DriverError(
                    CUresult::CUDA_ERROR_LAUNCH_FAILED
                )),
                ..
            }
        ));
        let blas = Error::cublas(
            "GEMM",
            cudarc::cublas::result::CublasError(
                cudarc::cublas::sys::cublasStatus_t::CUBLAS_STATUS_ALLOC_FAILED,
            ),
        );
        assert!(blas.is_out_of_memory());
        assert!(!Error::InvalidArgument("x".into()).is_out_of_memory());
    }
}
