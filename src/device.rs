//! Where a convolution runs, and which implementation: one dispatch point for the CLI, the
//! benchmarks and the device-generic tests.

use std::fmt;
use std::str::FromStr;

use crate::conv::DwConv2d;
use crate::dtype::Element;
use crate::error::{Error, Result};
use crate::tensor::Tensor;

/// An execution device.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Device {
    /// The fast CPU engine.
    Cpu,
    /// The f64 reference (the oracle).
    CpuRef,
    /// The CUDA kernels compiled for the host and run by the SIMT simulator.
    Sim,
    /// A CUDA GPU (ordinal).
    Cuda(usize),
}

impl Device {
    /// The first CUDA device when one is usable, else the fast CPU engine.
    pub fn auto() -> Device {
        match crate::cuda::describe() {
            Ok(devices) if !devices.is_empty() && crate::cuda::kernels_compiled() => {
                Device::Cuda(0)
            }
            _ => Device::Cpu,
        }
    }
}

impl FromStr for Device {
    type Err = Error;
    fn from_str(s: &str) -> Result<Self> {
        match s {
            "cpu" => Ok(Device::Cpu),
            "cpu-ref" | "reference" => Ok(Device::CpuRef),
            "sim" => Ok(Device::Sim),
            "cuda" | "gpu" => Ok(Device::Cuda(0)),
            other => match other.strip_prefix("cuda:").map(str::parse::<usize>) {
                Some(Ok(i)) => Ok(Device::Cuda(i)),
                _ => Err(Error::InvalidArgument(format!(
                    "unknown device '{other}' (expected cpu, cpu-ref, sim, cuda or cuda:N)"
                ))),
            },
        }
    }
}

impl fmt::Display for Device {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Device::Cpu => f.write_str("cpu"),
            Device::CpuRef => f.write_str("cpu-ref"),
            Device::Sim => f.write_str("sim"),
            Device::Cuda(0) => f.write_str("cuda"),
            Device::Cuda(i) => write!(f, "cuda:{i}"),
        }
    }
}

/// Which implementation of an op to run on a device.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Impl {
    /// lkconv's own fast implementation (the block-wise kernels, or the CPU direct path).
    Fast,
    /// One thread (or loop iteration) per output, no blocking: the baseline.
    Naive,
    /// im2col + GEMM baseline.
    Im2col,
    /// The f64 reference (CPU only).
    Reference,
    /// Tensor cores (f16/bf16, sm_80+; `crate::tensor_core`), SIMT where it has no kernel.
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

fn cpu_impl(device: Device, imp: Impl) -> Impl {
    if device == Device::CpuRef {
        Impl::Reference
    } else {
        imp
    }
}

/// Forward on any device: y = conv(x, w) + bias.
pub fn forward<T: Element>(
    device: Device,
    imp: Impl,
    conv: &DwConv2d,
    x: &Tensor<T>,
    w: &Tensor<T>,
    bias: Option<&Tensor<T>>,
) -> Result<Tensor<T>> {
    match device {
        Device::Cpu | Device::CpuRef => match cpu_impl(device, imp) {
            Impl::Fast => crate::cpu::direct::forward(conv, x, w, bias),
            Impl::Naive => crate::cpu::naive::forward(conv, x, w, bias),
            Impl::Im2col => crate::cpu::im2col::forward(conv, x, w, bias),
            Impl::Reference => crate::cpu::reference::forward(conv, x, w, bias),
            Impl::TensorCore => Err(crate::tensor_core::cpu_unsupported()),
        },
        Device::Sim => crate::sim::forward(imp, conv, x, w, bias),
        Device::Cuda(ordinal) => crate::cuda::host::forward(ordinal, imp, conv, x, w, bias),
    }
}

/// Data gradient on any device.
pub fn data_grad<T: Element>(
    device: Device,
    imp: Impl,
    conv: &DwConv2d,
    dy: &Tensor<T>,
    w: &Tensor<T>,
    input_hw: (usize, usize),
) -> Result<Tensor<T>> {
    match device {
        Device::Cpu | Device::CpuRef => match cpu_impl(device, imp) {
            Impl::Fast => crate::cpu::direct::data_grad(conv, dy, w, input_hw),
            Impl::Naive => crate::cpu::naive::data_grad(conv, dy, w, input_hw),
            Impl::Im2col => crate::cpu::im2col::data_grad(conv, dy, w, input_hw),
            Impl::Reference => crate::cpu::reference::data_grad(conv, dy, w, input_hw),
            Impl::TensorCore => Err(crate::tensor_core::cpu_unsupported()),
        },
        Device::Sim => crate::sim::data_grad(imp, conv, dy, w, input_hw),
        Device::Cuda(ordinal) => crate::cuda::host::data_grad(ordinal, imp, conv, dy, w, input_hw),
    }
}

/// Weight gradient on any device.
pub fn weight_grad<T: Element>(
    device: Device,
    imp: Impl,
    conv: &DwConv2d,
    x: &Tensor<T>,
    dy: &Tensor<T>,
) -> Result<Tensor<T>> {
    match device {
        Device::Cpu | Device::CpuRef => match cpu_impl(device, imp) {
            Impl::Fast => crate::cpu::direct::weight_grad(conv, x, dy),
            Impl::Naive => crate::cpu::naive::weight_grad(conv, x, dy),
            Impl::Im2col => crate::cpu::im2col::weight_grad(conv, x, dy),
            Impl::Reference => crate::cpu::reference::weight_grad(conv, x, dy),
            Impl::TensorCore => Err(crate::tensor_core::cpu_unsupported()),
        },
        Device::Sim => crate::sim::weight_grad(imp, conv, x, dy),
        Device::Cuda(ordinal) => crate::cuda::host::weight_grad(ordinal, imp, conv, x, dy),
    }
}
