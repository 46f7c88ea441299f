//! The CPU engine: the f64 reference (the oracle), the fast direct path, and the two baselines
//! the benchmarks compare against (naive loop, im2col + GEMM).

pub mod activation;
pub mod bf16;
mod bf16_amx;
pub mod bf16_dw;
pub mod ceiling;
pub mod direct;
pub mod gemm;
pub mod im2col;
pub mod naive;
pub mod reference;
mod simd;
#[cfg(target_arch = "x86_64")]
mod small;
pub mod small_conv;
mod wrap;

pub use direct::{
    data_grad, data_grad_f32_into, forward, forward_f32_into, weight_grad, weight_grad_f32_into,
};
