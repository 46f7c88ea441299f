//! The dispatcher on top of the layers: where a convolution runs (a [`Device`]) and the one
//! device-generic entry point per pass, for the CLI, the benchmarks and the device-generic
//! tests. The CPU engine (`crate::cpu`) takes host tensors directly; the simulator and CUDA run
//! the same plans through the plan executor (`crate::exec::run_host`).

use std::fmt;
use std::str::FromStr;

use crate::conv::DwConv2d;
use crate::dtype::Element;
use crate::error::{Error, Result};
use crate::exec::run_host;
use crate::problem::Problem;
use crate::tensor::Tensor;

pub use crate::op::{Impl, Op};

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

/// The implementation the CPU runs: `Device::CpuRef` forces the reference.
fn cpu_impl(device: Device, imp: Impl) -> Impl {
    if device == Device::CpuRef {
        Impl::Reference
    } else {
        imp
    }
}

/// Runs a validated problem on the simulator or a GPU.
fn run_planned<T: Element>(
    device: Device,
    p: &Problem,
    inputs: [&Tensor<T>; 2],
    bias: Option<&Tensor<T>>,
) -> Result<Tensor<T>> {
    match device {
        Device::Sim => run_host(crate::sim::SimExec::new, p, inputs, bias),
        Device::Cuda(ordinal) => run_host(|| crate::cuda::CudaExec::new(ordinal), p, inputs, bias),
        Device::Cpu | Device::CpuRef => Err(Error::Unsupported(
            "the CPU engine runs host tensors directly".into(),
        )),
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
            Impl::TensorCore => Err(crate::plan::tensor_core::cpu_unsupported()),
        },
        Device::Sim | Device::Cuda(_) => {
            let p = Problem::forward(
                imp,
                T::DTYPE,
                conv,
                x.shape(),
                w.shape(),
                bias.map(|b| b.shape()),
            )?;
            run_planned(device, &p, [x, w], bias)
        }
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
            Impl::TensorCore => Err(crate::plan::tensor_core::cpu_unsupported()),
        },
        Device::Sim | Device::Cuda(_) => {
            let p = Problem::data_grad(imp, T::DTYPE, conv, dy.shape(), w.shape(), input_hw)?;
            run_planned(device, &p, [dy, w], None)
        }
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
            Impl::TensorCore => Err(crate::plan::tensor_core::cpu_unsupported()),
        },
        Device::Sim | Device::Cuda(_) => {
            let p = Problem::weight_grad(imp, T::DTYPE, conv, x.shape(), dy.shape())?;
            run_planned(device, &p, [x, dy], None)
        }
    }
}
