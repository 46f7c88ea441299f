//! The cuBLAS side of the one GEMM step ([`crate::plan::Gemm`]): the row-major GEMM as the
//! column-major `cublasGemmStridedBatchedEx` call that computes it.
//!
//! All three storage types use `CUBLAS_COMPUTE_32F`: f32 x f32 -> f32 is plain SGEMM
//! arithmetic (no TF32), f16/bf16 operands are multiplied and accumulated in f32 (tensor cores
//! where cuBLAS picks them).

use std::ffi::c_void;
use std::sync::Arc;

use cudarc::cublas::sys::{cublasComputeType_t, cublasGemmAlgo_t, cublasOperation_t, cudaDataType};
use cudarc::driver::CudaStream;

use super::device::CudaDevice;
use crate::dtype::DType;
use crate::error::{Error, Result};
use crate::plan::Gemm;

fn cuda_type(d: DType) -> cudaDataType {
    match d {
        DType::F32 => cudaDataType::CUDA_R_32F,
        DType::F16 => cudaDataType::CUDA_R_16F,
        DType::Bf16 => cudaDataType::CUDA_R_16BF,
    }
}

fn to_i32(what: &str, v: usize) -> Result<i32> {
    i32::try_from(v).map_err(|_| Error::Overflow(format!("cuBLAS {what} {v} exceeds i32")))
}

fn to_i64(what: &str, v: usize) -> Result<i64> {
    i64::try_from(v).map_err(|_| Error::Overflow(format!("cuBLAS {what} {v} exceeds i64")))
}

/// The arguments of the column-major cuBLAS call that computes a row-major [`Gemm`]:
/// `C^T = op(B)^T op(A)^T`, i.e. the operands and the m/n extents swap and each operand keeps
/// its own transpose flag.
#[derive(Clone, Copy, Debug, PartialEq)]
struct CublasArgs {
    trans_a: bool,
    trans_b: bool,
    m: i32,
    n: i32,
    k: i32,
    a: u64,
    lda: i32,
    stride_a: i64,
    b: u64,
    ldb: i32,
    stride_b: i64,
    c: u64,
    ldc: i32,
    stride_c: i64,
    batch: i32,
}

fn cublas_args(g: &Gemm) -> Result<CublasArgs> {
    g.extents()?;
    if g.a == 0 || g.b == 0 || g.c == 0 {
        return Err(Error::InvalidArgument(
            "GEMM operand pointer is null".into(),
        ));
    }
    Ok(CublasArgs {
        trans_a: g.b_trans,
        trans_b: g.a_trans,
        m: to_i32("n", g.n)?,
        n: to_i32("m", g.m)?,
        k: to_i32("k", g.k)?,
        a: g.b,
        lda: to_i32("ldb", g.ldb)?,
        stride_a: to_i64("stride_b", g.stride_b)?,
        b: g.a,
        ldb: to_i32("lda", g.lda)?,
        stride_b: to_i64("stride_a", g.stride_a)?,
        c: g.c,
        ldc: to_i32("ldc", g.ldc)?,
        stride_c: to_i64("stride_c", g.stride_c)?,
        batch: to_i32("batch", g.batch)?,
    })
}

/// Queues the GEMM on `stream` through the device's cuBLAS handle with `workspace` as its
/// cuBLAS workspace.
///
/// # Safety
/// `g.a`, `g.b` and `g.c` must be device pointers of `dev`'s context, valid for every element
/// the GEMM touches (see [`Gemm::extents`]) until the work queued on `stream` completes, `c`
/// must not overlap `a` or `b`; `workspace` as for [`CudaDevice::with_blas`].
pub(crate) unsafe fn run(
    dev: &CudaDevice,
    stream: &Arc<CudaStream>,
    g: &Gemm,
    workspace: u64,
    workspace_bytes: usize,
) -> Result<()> {
    let x = cublas_args(g)?;
    let op = |t: bool| {
        if t {
            cublasOperation_t::CUBLAS_OP_T
        } else {
            cublasOperation_t::CUBLAS_OP_N
        }
    };
    let (alpha, beta) = (1f32, 0f32);
    let ty = cuda_type(g.dtype);
    let queue = |blas: &cudarc::cublas::CudaBlas| -> Result<()> {
        // SAFETY: the handle is bound to `stream` (with_blas holds its lock); the operand
        // pointers satisfy this function's contract; alpha/beta are host f32 values, which is
        // what CUBLAS_COMPUTE_32F reads in the default host pointer mode, and they outlive the
        // call (cuBLAS reads host scalars before it returns).
        unsafe {
            cudarc::cublas::result::gemm_strided_batched_ex(
                *blas.handle(),
                op(x.trans_a),
                op(x.trans_b),
                x.m,
                x.n,
                x.k,
                (&alpha) as *const f32 as *const c_void,
                x.a as *const c_void,
                ty,
                x.lda,
                x.stride_a,
                x.b as *const c_void,
                ty,
                x.ldb,
                x.stride_b,
                (&beta) as *const f32 as *const c_void,
                x.c as *mut c_void,
                ty,
                x.ldc,
                x.stride_c,
                x.batch,
                cublasComputeType_t::CUBLAS_COMPUTE_32F,
                cublasGemmAlgo_t::CUBLAS_GEMM_DEFAULT,
            )
        }
        .map_err(|e| Error::cublas("cuBLAS strided-batched GEMM", e))
    };
    // SAFETY: the workspace satisfies `with_blas`'s contract (this function's).
    unsafe { dev.with_blas(stream, workspace, workspace_bytes, queue) }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::conv::DwConv2d;
    use crate::op::{Impl, Op};
    use crate::problem::Problem;

    /// cublasGemmStridedBatchedEx's column-major semantics (alpha 1, beta 0, f32) on a host
    /// buffer whose element 0 sits at address `base` (4 bytes per element).
    fn emulate(x: &CublasArgs, ws: &mut [f32], base: u64) {
        let idx = |addr: u64| ((addr - base) / 4) as usize;
        for bt in 0..x.batch as usize {
            let a0 = idx(x.a) + bt * x.stride_a as usize;
            let b0 = idx(x.b) + bt * x.stride_b as usize;
            let c0 = idx(x.c) + bt * x.stride_c as usize;
            for j in 0..x.n as usize {
                for i in 0..x.m as usize {
                    let mut acc = 0f32;
                    for p in 0..x.k as usize {
                        let a = if x.trans_a {
                            ws[a0 + p + i * x.lda as usize]
                        } else {
                            ws[a0 + i + p * x.lda as usize]
                        };
                        let b = if x.trans_b {
                            ws[b0 + j + p * x.ldb as usize]
                        } else {
                            ws[b0 + p + j * x.ldb as usize]
                        };
                        acc += a * b;
                    }
                    ws[c0 + i + j * x.ldc as usize] = acc;
                }
            }
        }
    }

    /// The same GEMM by its row-major definition (`Gemm`'s documentation).
    fn row_major(g: &Gemm, ws: &mut [f32], base: u64) {
        let idx = |addr: u64| ((addr - base) / 4) as usize;
        for bt in 0..g.batch {
            let (a0, b0, c0) = (
                idx(g.a) + bt * g.stride_a,
                idx(g.b) + bt * g.stride_b,
                idx(g.c) + bt * g.stride_c,
            );
            for i in 0..g.m {
                for j in 0..g.n {
                    let mut acc = 0f32;
                    for p in 0..g.k {
                        let a = if g.a_trans {
                            ws[a0 + p * g.lda + i]
                        } else {
                            ws[a0 + i * g.lda + p]
                        };
                        let b = if g.b_trans {
                            ws[b0 + j * g.ldb + p]
                        } else {
                            ws[b0 + p * g.ldb + j]
                        };
                        acc += a * b;
                    }
                    ws[c0 + i * g.ldc + j] = acc;
                }
            }
        }
    }

    /// The swapped column-major call computes exactly the planner's row-major GEMM, for the
    /// im2col plans of all three ops.
    #[test]
    fn cublas_mapping_matches_the_planners_gemm() {
        let base = 0x10_0000u64;
        for (conv, (n, c, h, w)) in [
            (DwConv2d::new(3, 5), (2, 3, 6, 7)),
            (DwConv2d::new(7, 7).with_stride(2, 2), (1, 2, 9, 8)),
        ] {
            let s = conv.resolve(n, c, h, w).unwrap();
            for op in Op::ALL {
                let p = Problem::new(op, Impl::Im2col, DType::F32, &conv, &s).unwrap();
                let mut plan = crate::plan::plan(&p).unwrap();
                plan.bind(1, 1, 0, 1, base);
                let (_, g) = plan.gemm.unwrap();
                let len = plan.workspace_bytes / 4;
                let mut rng = crate::rng::Rng::new(5);
                let init: Vec<f32> = (0..len).map(|_| rng.uniform_pm1()).collect();
                let mut want = init.clone();
                row_major(&g, &mut want, base);
                let mut got = init.clone();
                emulate(&cublas_args(&g).unwrap(), &mut got, base);
                for (i, (a, b)) in got.iter().zip(&want).enumerate() {
                    assert!(
                        (a - b).abs() <= 1e-5 * (1.0 + b.abs()),
                        "{op:?} [{i}] {a} vs {b}"
                    );
                }
                // the GEMM lies inside the workspace
                for (start, end) in g.extents().unwrap() {
                    assert!(start >= base && end <= base + plan.workspace_bytes as u64);
                }
            }
        }
    }
}
