//! The launch planner: for a validated [`Problem`](crate::problem::Problem), which kernels of
//! `kernels/*.cu` run, with which grid, block, shared memory and workspace. It returns data (a
//! [`Plan`]); the two executors (`crate::sim`, `crate::cuda`) run it.
//!
//! Every kernel has the C signature `extern "C" __global__ void NAME(const DwArgs args)` and is
//! named by a [`KernelId`] (family, dtype, filter size for the templated tiled kernels).
//!
//! Files, one per kernel family: `tiled.rs` (fwd/dgrad, `kernels/lk_conv.cu`), `wgrad.rs`
//! (`kernels/lk_wgrad.cu`, `kernels/lk_wgrad_strided.cu`), `naive.rs` (`kernels/lk_naive.cu`),
//! `im2col.rs` (`kernels/lk_im2col.cu`), `model.rs` (RepLKNet's kernels,
//! `kernels/lk_model.cu`), `tensor_core.rs` (`kernels/lk_tc.cu`, `Impl::TensorCore`);
//! `select.rs` chooses among them (the place a new family plugs in),
//! `geometry.rs` holds the shared-memory layouts the kernels agree on, `launch.rs` the types,
//! `fma.rs` the executed-FMA accounting.

mod fma;
mod geometry;
mod im2col;
mod launch;
pub mod model;
mod naive;
mod select;
pub mod tensor_core;
mod tiled;
mod wgrad;

pub use fma::executed_fmas;
pub use geometry::{
    tile_ld, tiled_smem, wgrad_smem, wgrad_threads, RX, SHARED_LIMIT_BYTES, SHARED_TARGET_BYTES,
    WGRAD_STRIDED_TAPS, WGRAD_STRIDED_THREADS,
};
pub use launch::{
    kernel_names, DwArgs, Family, Gemm, KernelId, Launch, Plan, Step, TEMPLATE_SIZES,
};
pub use model::ModelAct;
pub use select::{plan, FamilyPlanner};
