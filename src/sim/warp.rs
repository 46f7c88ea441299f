//! The simulator's warp-level primitives (`kernels/sim/sim_warp.h`): a rendezvous of the lanes
//! of a warp with the hardware's member-mask semantics for `__syncwarp`, the shuffles, the votes
//! and `mma.sync.aligned.m16n8k16` / `m16n8k8` (f16 and bf16 inputs, f32 accumulation), exposed here so that
//! tests can check the emulation itself.

use crate::dtype::DType;
use crate::error::{Error, Result};

#[cfg(lkconv_sim)]
mod ffi {
    use std::ffi::c_char;

    extern "C" {
        pub fn lksim_warp_selftest(err: *mut c_char, err_len: usize) -> i32;
        #[allow(clippy::too_many_arguments)]
        pub fn lksim_mma_m16n8_test(
            bf16: i32,
            kd: i32,
            count: u32,
            a: *const u16,
            b: *const u16,
            c: *const f32,
            d: *mut f32,
            err: *mut c_char,
            err_len: usize,
        ) -> i32;
    }
}

#[cfg(lkconv_sim)]
fn message(err: &[u8]) -> Error {
    let end = err.iter().position(|&b| b == 0).unwrap_or(err.len());
    Error::Simulator(String::from_utf8_lossy(&err[..end]).into_owned())
}

/// Runs the warp-primitive self-tests: shuffles (index, up, down, xor, with widths), votes and
/// `__syncwarp` in full and partial warps against CUDA's documented results, and that the
/// simulator reports, with the kernel's name, a lane that exits before a warp-synchronous point,
/// lanes at two call sites, different masks, a lane outside its own mask, `__syncwarp` against
/// `__syncthreads`, a shuffle reading outside the mask, a mask past the block, and an `mma.sync`
/// with a lane missing.
pub fn selftest() -> Result<()> {
    #[cfg(lkconv_sim)]
    {
        let mut err = vec![0u8; 2048];
        // SAFETY: `err` is writable for err.len() bytes; the self-test owns all other buffers.
        let rc = unsafe { ffi::lksim_warp_selftest(err.as_mut_ptr().cast(), err.len()) };
        if rc == 0 {
            Ok(())
        } else {
            Err(message(&err))
        }
    }
    #[cfg(not(lkconv_sim))]
    Err(Error::Simulator("built without the simulator".into()))
}

/// Runs `count = a.len() / (16 k)` products `D_w = A_w * B_w + C_w` through the simulator's
/// `mma.sync.aligned.m16n8k<k>.row.col.f32.<dtype>.<dtype>.f32` (k = 16 or 8), one warp each,
/// with every lane's fragments loaded as the PTX ISA documents them. `a`: 16 x k row-major,
/// `b`: k x 8 row-major (k rows, n columns), both f16 or bf16 bits; `c` and the result: 16x8
/// row-major f32.
pub fn mma_m16n8(dtype: DType, k: usize, a: &[u16], b: &[u16], c: &[f32]) -> Result<Vec<f32>> {
    let count = a.len() / (16 * k.max(1));
    if dtype == DType::F32
        || (k != 16 && k != 8)
        || count == 0
        || count > 32
        || a.len() != count * 16 * k
        || b.len() != count * k * 8
        || c.len() != count * 128
    {
        return Err(Error::InvalidArgument(format!(
            "mma test: 1..32 f16/bf16 products of 16x{k} by {k}x8, k 16 or 8 (got {dtype}, {} / {} / {} elements)",
            a.len(),
            b.len(),
            c.len()
        )));
    }
    #[cfg(lkconv_sim)]
    {
        let mut d = vec![f32::NAN; count * 128];
        let mut err = vec![0u8; 512];
        // SAFETY: a, b, c hold `count` matrices each (checked above) and d is writable for
        // count * 128 floats; all outlive the call; `err` is writable for err.len() bytes.
        let rc = unsafe {
            ffi::lksim_mma_m16n8_test(
                (dtype == DType::Bf16) as i32,
                k as i32,
                count as u32,
                a.as_ptr(),
                b.as_ptr(),
                c.as_ptr(),
                d.as_mut_ptr(),
                err.as_mut_ptr().cast(),
                err.len(),
            )
        };
        if rc == 0 {
            Ok(d)
        } else {
            Err(message(&err))
        }
    }
    #[cfg(not(lkconv_sim))]
    Err(Error::Simulator("built without the simulator".into()))
}
