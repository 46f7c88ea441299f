//! The op vocabulary: the three passes of a depthwise convolution ([`Op`]) and the
//! implementations that can run them ([`Impl`]). A leaf: everything else builds on it.

use std::str::FromStr;

use crate::error::{Error, Result};

/// Which implementation of an op to run on a device.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Impl {
    /// lkconv's own fast implementation (the block-wise kernels, or the CPU direct path).
    Fast,
    /// One thread (or loop iteration) per output, no blocking: the baseline.
    Naive,
    /// im2col + GEMM baseline.
    Im2col,
    /// The f64 reference (CPU only).
    Reference,
    /// Tensor cores (f16/bf16, sm_80+; `crate::plan::tensor_core`), SIMT where it has no kernel.
    TensorCore,
}

impl Impl {
    pub fn name(self) -> &'static str {
        match self {
            Impl::Fast => "fast",
            Impl::Naive => "naive",
            Impl::Im2col => "im2col",
            Impl::Reference => "reference",
            Impl::TensorCore => "tc",
        }
    }
}

impl FromStr for Impl {
    type Err = Error;
    fn from_str(s: &str) -> Result<Self> {
        match s {
            "fast" | "ours" | "direct" | "tiled" => Ok(Impl::Fast),
            "naive" => Ok(Impl::Naive),
            "im2col" => Ok(Impl::Im2col),
            "reference" | "ref" => Ok(Impl::Reference),
            "tc" | "tensor-core" => Ok(Impl::TensorCore),
            other => Err(Error::InvalidArgument(format!(
                "unknown implementation '{other}' (expected fast, naive, im2col, tc or reference)"
            ))),
        }
    }
}

/// The three passes of a depthwise convolution.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Op {
    Forward,
    DataGrad,
    WeightGrad,
}

impl Op {
    pub fn name(self) -> &'static str {
        match self {
            Op::Forward => "fwd",
            Op::DataGrad => "dgrad",
            Op::WeightGrad => "wgrad",
        }
    }
    pub const ALL: [Op; 3] = [Op::Forward, Op::DataGrad, Op::WeightGrad];
}

impl FromStr for Op {
    type Err = Error;
    fn from_str(s: &str) -> Result<Self> {
        match s {
            "fwd" | "forward" => Ok(Op::Forward),
            "dgrad" | "data-grad" => Ok(Op::DataGrad),
            "wgrad" | "weight-grad" => Ok(Op::WeightGrad),
            other => Err(Error::InvalidArgument(format!(
                "unknown op '{other}' (expected fwd, dgrad or wgrad)"
            ))),
        }
    }
}
