//! The kernel simulator device: the unchanged `kernels/*.cu` compiled for the host with g++
//! against the SIMT runtime in `kernels/sim/` (fibers per block, blocks on worker threads), driven
//! through the same launch plans as the CUDA device ([`crate::kernels::plan`]).
//!
//! Every output buffer and the workspace are poisoned with NaN before the launches, so an element
//! a kernel fails to write shows up in the result; the simulator also poisons shared memory before
//! every block. It checks launch limits (block size, grid size, 227 KB of shared memory) and
//! reports barrier divergence as an error.

use crate::conv::{ConvShape, DwConv2d};
use crate::device::{Impl, Op};
use crate::dtype::Element;
use crate::error::{Error, Result};
use crate::kernels::{self, Plan};
use crate::tensor::Tensor;

pub mod warp;

#[cfg(lkconv_sim)]
mod ffi {
    use crate::kernels::DwArgs;
    use std::ffi::c_char;

    extern "C" {
        pub fn lksim_launch(
            name: *const c_char,
            gx: u32,
            gy: u32,
            gz: u32,
            bx: u32,
            by: u32,
            bz: u32,
            shared_bytes: u32,
            args: *const DwArgs,
            err: *mut c_char,
            err_len: usize,
        ) -> i32;
        pub fn lksim_selftest(err: *mut c_char, err_len: usize) -> i32;
        pub fn lksim_f32_to_f16_bits(v: f32) -> u16;
        pub fn lksim_f16_bits_to_f32(b: u16) -> f32;
        pub fn lksim_f32_to_bf16_bits(v: f32) -> u16;
        pub fn lksim_kernel_count() -> usize;
        pub fn lksim_kernel_name(i: usize) -> *const c_char;
    }
}

/// True when the crate was built with the simulator (g++ and `kernels/sim/` present).
pub fn available() -> bool {
    cfg!(lkconv_sim)
}

#[cfg(not(lkconv_sim))]
fn unavailable<T>() -> Result<T> {
    Err(Error::Simulator("built without the simulator".into()))
}

/// The kernels registered in the simulator library, sorted by name.
pub fn registered_kernels() -> Result<Vec<String>> {
    #[cfg(lkconv_sim)]
    {
        // SAFETY: lksim_kernel_count has no preconditions; it reads a static registry.
        let count = unsafe { ffi::lksim_kernel_count() };
        let mut v = Vec::with_capacity(count);
        for i in 0..count {
            // SAFETY: i < count, so the returned pointer is a NUL-terminated string owned by the
            // registry for the life of the process.
            let p = unsafe { ffi::lksim_kernel_name(i) };
            if p.is_null() {
                return Err(Error::Simulator(format!("kernel {i} has no name")));
            }
            // SAFETY: p is non-null and NUL-terminated (see above).
            let s = unsafe { std::ffi::CStr::from_ptr(p) };
            v.push(s.to_string_lossy().into_owned());
        }
        Ok(v)
    }
    #[cfg(not(lkconv_sim))]
    unavailable()
}

/// Runs the simulator runtime's self-tests: barrier semantics over several blocks and workers,
/// and that it reports a thread exiting before a barrier, threads at different barriers, a
/// misaligned 16-byte shared load, a write past the dynamic shared memory, an oversized block and
/// oversized shared memory.
pub fn selftest() -> Result<()> {
    #[cfg(lkconv_sim)]
    {
        let mut err = vec![0u8; 512];
        // SAFETY: `err` is writable for err.len() bytes; the self-test owns all other buffers.
        let rc = unsafe { ffi::lksim_selftest(err.as_mut_ptr().cast(), err.len()) };
        if rc == 0 {
            return Ok(());
        }
        let end = err.iter().position(|&b| b == 0).unwrap_or(err.len());
        Err(Error::Simulator(
            String::from_utf8_lossy(&err[..end]).into_owned(),
        ))
    }
    #[cfg(not(lkconv_sim))]
    unavailable()
}

/// The simulator runtime's own storage conversions (`__float2half_rn`, `__half2float`,
/// `__float2bfloat16_rn`), exposed to test them bit for bit against the `half` crate.
#[derive(Clone, Copy, Debug)]
pub struct Conversions {
    pub f32_to_f16_bits: fn(f32) -> u16,
    pub f16_bits_to_f32: fn(u16) -> f32,
    pub f32_to_bf16_bits: fn(f32) -> u16,
}

/// The simulator's conversions (see [`Conversions`]).
pub fn conversions() -> Result<Conversions> {
    #[cfg(lkconv_sim)]
    {
        fn to_f16(v: f32) -> u16 {
            // SAFETY: a pure function of its argument.
            unsafe { ffi::lksim_f32_to_f16_bits(v) }
        }
        fn from_f16(b: u16) -> f32 {
            // SAFETY: a pure function of its argument.
            unsafe { ffi::lksim_f16_bits_to_f32(b) }
        }
        fn to_bf16(v: f32) -> u16 {
            // SAFETY: a pure function of its argument.
            unsafe { ffi::lksim_f32_to_bf16_bits(v) }
        }
        Ok(Conversions {
            f32_to_f16_bits: to_f16,
            f16_bits_to_f32: from_f16,
            f32_to_bf16_bits: to_bf16,
        })
    }
    #[cfg(not(lkconv_sim))]
    unavailable()
}

/// Runs one launch of a bound plan in the simulator.
#[cfg(lkconv_sim)]
fn launch(l: &kernels::Launch) -> Result<()> {
    let name = std::ffi::CString::new(l.kernel)
        .map_err(|_| Error::Simulator(format!("bad kernel name {}", l.kernel)))?;
    let mut err = vec![0u8; 512];
    // SAFETY: `name` is a NUL-terminated string and `l.args` a #[repr(C)] DwArgs that outlive the
    // call; `err` is writable for err.len() bytes. The buffer addresses inside the args were bound
    // by `run` to host allocations sized by the plan (outputs, inputs, workspace) that stay alive
    // and unaliased by Rust references while the call runs.
    let rc = unsafe {
        ffi::lksim_launch(
            name.as_ptr(),
            l.grid.0,
            l.grid.1,
            l.grid.2,
            l.block.0,
            l.block.1,
            l.block.2,
            l.shared_bytes,
            &l.args,
            err.as_mut_ptr().cast(),
            err.len(),
        )
    };
    if rc == 0 {
        return Ok(());
    }
    let end = err.iter().position(|&b| b == 0).unwrap_or(err.len());
    Err(Error::Simulator(format!(
        "{}: {}",
        l.kernel,
        String::from_utf8_lossy(&err[..end])
    )))
}

/// Runs one launch whose buffer addresses are already bound to host memory (the model's
/// simulator back-end, `crate::model::gpu`).
///
/// # Safety
/// Every address in `l.args` must be 0 or point to host memory that holds every element the
/// kernel touches for the launch's problem (as planned by `crate::kernels`), the output not
/// aliasing an input unless the kernel allows it, all alive and not accessed through Rust
/// references while the call runs.
pub(crate) unsafe fn launch_bound(l: &kernels::Launch) -> Result<()> {
    #[cfg(lkconv_sim)]
    {
        launch(l)
    }
    #[cfg(not(lkconv_sim))]
    {
        let _ = l;
        unavailable()
    }
}

/// Binds host buffers, poisons the output and workspace with NaN, runs every launch and the GEMM.
fn run<T: Element>(
    mut plan: Plan,
    in0: &[T],
    in1: &[T],
    bias: Option<&[T]>,
    out_len: usize,
) -> Result<Vec<T>> {
    #[cfg(lkconv_sim)]
    {
        let mut out = vec![T::from_f32(f32::NAN); out_len];
        let mut ws = vec![f32::NAN; plan.workspace_len()];
        let addr = |p: *const u8| p as usize as u64;
        let ws_addr = if ws.is_empty() {
            0
        } else {
            addr(ws.as_mut_ptr() as *const u8)
        };
        plan.bind(
            addr(in0.as_ptr().cast()),
            addr(in1.as_ptr().cast()),
            bias.map_or(0, |b| addr(b.as_ptr().cast())),
            addr(out.as_mut_ptr() as *const u8),
            ws_addr,
        );
        for (i, l) in plan.launches.iter().enumerate() {
            launch(l)?;
            if let Some(g) = plan.gemm.filter(|g| g.after_launch == i) {
                g.run_host(&mut ws)?;
            }
        }
        Ok(out)
    }
    #[cfg(not(lkconv_sim))]
    {
        let _ = (&mut plan, in0, in1, bias, out_len);
        unavailable()
    }
}

fn planned(op: Op, imp: Impl, conv: &DwConv2d, s: &ConvShape, dtype: crate::DType) -> Result<Plan> {
    if !available() {
        return Err(Error::Simulator("built without the simulator".into()));
    }
    kernels::plan(op, imp, dtype, conv, s)
}

/// Forward in the simulator: y = conv(x, w) + bias.
pub fn forward<T: Element>(
    imp: Impl,
    conv: &DwConv2d,
    x: &Tensor<T>,
    w: &Tensor<T>,
    bias: Option<&Tensor<T>>,
) -> Result<Tensor<T>> {
    let s = conv.check_forward(x.shape(), w.shape(), bias.map(|b| b.shape()))?;
    let plan = planned(Op::Forward, imp, conv, &s, T::DTYPE)?;
    let y = run(
        plan,
        x.data(),
        w.data(),
        bias.map(|b| b.data()),
        s.output_len(),
    )?;
    Tensor::from_vec(&s.output_dims(), y)
}

/// Data gradient in the simulator: dx for an input of `input_hw`.
pub fn data_grad<T: Element>(
    imp: Impl,
    conv: &DwConv2d,
    dy: &Tensor<T>,
    w: &Tensor<T>,
    input_hw: (usize, usize),
) -> Result<Tensor<T>> {
    let s = conv.check_data_grad(dy.shape(), w.shape(), input_hw)?;
    let plan = planned(Op::DataGrad, imp, conv, &s, T::DTYPE)?;
    let dx = run(plan, dy.data(), w.data(), None, s.input_len())?;
    Tensor::from_vec(&s.input_dims(), dx)
}

/// Weight gradient in the simulator: dw with shape [C, 1, KH, KW].
pub fn weight_grad<T: Element>(
    imp: Impl,
    conv: &DwConv2d,
    x: &Tensor<T>,
    dy: &Tensor<T>,
) -> Result<Tensor<T>> {
    let s = conv.check_weight_grad(x.shape(), dy.shape())?;
    let plan = planned(Op::WeightGrad, imp, conv, &s, T::DTYPE)?;
    let dims = conv.weight_dims(s.c);
    let dw = run(plan, x.data(), dy.data(), None, dims.iter().product())?;
    Tensor::from_vec(&dims, dw)
}
