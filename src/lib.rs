//! lkconv: very large depthwise convolutions on CUDA and on the CPU, and RepLKNet built on them.
//!
//! ```no_run
//! use lkconv::{cpu, DwConv2d, Tensor};
//! let conv = DwConv2d::new(31, 31); // stride 1, "same" padding 15
//! let mut rng = lkconv::Rng::new(7);
//! let x = Tensor::<f32>::random(&[1, 128, 56, 56], &mut rng)?;
//! let w = Tensor::<f32>::random(&[128, 1, 31, 31], &mut rng)?;
//! let y = cpu::forward(&conv, &x, &w, None)?; // fast path
//! let y_ref = cpu::reference::forward(&conv, &x, &w, None)?; // f64 oracle
//! # Ok::<(), lkconv::Error>(())
//! ```

//!
//! Layers (see ARCHITECTURE.md): the vocabulary ([`op`], [`conv`], [`dtype`], [`tensor`],
//! [`error`]) and the validated [`Problem`]; the planner ([`plan`]); the plan executor
//! ([`exec`]) with its two back-ends, the simulator ([`sim`]) and the CUDA device ([`cuda`]);
//! the CPU engine ([`cpu`]); the dispatcher on top ([`device`]); RepLKNet ([`model`]).

#[cfg(feature = "candle")]
pub mod candle;
pub mod conv;
pub mod cpu;
pub mod cuda;
pub mod device;
pub mod dtype;
pub mod error;
pub mod exec;
pub mod model;
pub mod occupancy;
pub mod op;
pub mod plan;
pub mod problem;
pub mod rng;
pub mod safetensors_io;
pub mod sim;
pub mod tensor;

/// The planner under its former name (`lkconv::kernels::{Plan, DwArgs, Launch, ..}`).
pub use plan as kernels;

pub use conv::{ConvShape, DwConv2d, Padding};
pub use device::Device;
pub use dtype::{DType, Element};
pub use error::{CudaFailure, Error, Result};
pub use op::{Impl, Op};
pub use problem::Problem;
pub use rng::Rng;
pub use tensor::Tensor;
