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
    /// A CUDA driver, cuBLAS or launch call failed.
    #[error("CUDA error: {0}")]
    Cuda(String),
    /// The kernel simulator reported a failure.
    #[error("kernel simulator: {0}")]
    Simulator(String),
    /// The operation is not supported for this combination of arguments.
    #[error("unsupported: {0}")]
    Unsupported(String),
}

/// Result alias used throughout lkconv.
pub type Result<T> = std::result::Result<T, Error>;

impl Error {
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
