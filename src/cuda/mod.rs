//! The CUDA device (stub: being written).
pub mod host;
