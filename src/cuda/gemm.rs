//! The cuBLAS step of the im2col baseline: one strided-batched GEMM (a batch entry per channel).
//!
//! All three storage types go through `cublasGemmStridedBatchedEx` with `CUBLAS_COMPUTE_32F`:
//! f32 x f32 -> f32 is plain SGEMM arithmetic (no TF32), f16/bf16 operands are multiplied and
//! accumulated in f32 (tensor cores where cuBLAS picks them), and C may be f32, f16 or bf16.

use std::ffi::c_void;
use std::sync::Arc;

use cudarc::cublas::sys::{cublasComputeType_t, cublasGemmAlgo_t, cublasOperation_t, cudaDataType};
use cudarc::driver::CudaStream;

use super::device::CudaDevice;
use crate::dtype::DType;
use crate::error::{Error, Result};

/// A row-major strided-batched GEMM: for every `i < batch`,
/// `C_i[m x n] = alpha * op(A_i)[m x k] * op(B_i)[k x n] + beta * C_i`, where
/// `A_i = a + i * stride_a` elements (row-major, leading dimension `lda`; stored `k x m` when
/// `trans_a`), likewise B (`n x k` when `trans_b`) and C (`m x n`, `ldc`).
#[derive(Clone, Copy, Debug, PartialEq)]
pub(crate) struct BatchedGemm {
    pub trans_a: bool,
    pub trans_b: bool,
    pub m: usize,
    pub n: usize,
    pub k: usize,
    pub a: u64,
    pub lda: usize,
    pub stride_a: usize,
    pub a_type: DType,
    pub b: u64,
    pub ldb: usize,
    pub stride_b: usize,
    pub b_type: DType,
    pub c: u64,
    pub ldc: usize,
    pub stride_c: usize,
    pub c_type: DType,
    pub batch: usize,
    pub alpha: f32,
    pub beta: f32,
}

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

impl BatchedGemm {
    /// Checks sizes and leading dimensions (cuBLAS would report them only as a status code).
    fn validate(&self) -> Result<()> {
        if self.m == 0 || self.n == 0 || self.k == 0 || self.batch == 0 {
            return Err(Error::InvalidArgument(format!(
                "empty GEMM m={} n={} k={} batch={}",
                self.m, self.n, self.k, self.batch
            )));
        }
        // Row-major: a row of A holds k (or m when transposed) elements.
        let a_cols = if self.trans_a { self.m } else { self.k };
        let b_cols = if self.trans_b { self.k } else { self.n };
        if self.lda < a_cols || self.ldb < b_cols || self.ldc < self.n {
            return Err(Error::InvalidArgument(format!(
                "GEMM leading dimensions lda={} ldb={} ldc={} below the row lengths {a_cols}/{b_cols}/{}",
                self.lda, self.ldb, self.ldc, self.n
            )));
        }
        if self.a == 0 || self.b == 0 || self.c == 0 {
            return Err(Error::InvalidArgument(
                "GEMM operand pointer is null".into(),
            ));
        }
        Ok(())
    }
}

/// The arguments of the column-major cuBLAS call that computes a row-major [`BatchedGemm`]:
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
    a_type: DType,
    b: u64,
    ldb: i32,
    stride_b: i64,
    b_type: DType,
    c: u64,
    ldc: i32,
    stride_c: i64,
    c_type: DType,
    batch: i32,
}

fn cublas_args(g: &BatchedGemm) -> Result<CublasArgs> {
    g.validate()?;
    Ok(CublasArgs {
        trans_a: g.trans_b,
        trans_b: g.trans_a,
        m: to_i32("n", g.n)?,
        n: to_i32("m", g.m)?,
        k: to_i32("k", g.k)?,
        a: g.b,
        lda: to_i32("ldb", g.ldb)?,
        stride_a: to_i64("stride_b", g.stride_b)?,
        a_type: g.b_type,
        b: g.a,
        ldb: to_i32("lda", g.lda)?,
        stride_b: to_i64("stride_a", g.stride_a)?,
        b_type: g.a_type,
        c: g.c,
        ldc: to_i32("ldc", g.ldc)?,
        stride_c: to_i64("stride_c", g.stride_c)?,
        c_type: g.c_type,
        batch: to_i32("batch", g.batch)?,
    })
}

/// Queues the GEMM on `stream` with the device's cuBLAS handle.
///
/// # Safety
/// `a`, `b` and `c` must be device pointers of `dev`'s context, valid for every element the
/// GEMM touches (`batch` entries at the given strides and leading dimensions) until the work
/// queued on `stream` completes, `c` must not overlap `a` or `b`, and their element types must
/// be `a_type`, `b_type`, `c_type`.
pub(crate) unsafe fn run(
    dev: &CudaDevice,
    stream: &Arc<CudaStream>,
    g: &BatchedGemm,
) -> Result<()> {
    let x = cublas_args(g)?;
    let op = |t: bool| {
        if t {
            cublasOperation_t::CUBLAS_OP_T
        } else {
            cublasOperation_t::CUBLAS_OP_N
        }
    };
    let alpha = g.alpha;
    let beta = g.beta;
    dev.with_blas(stream, |blas| {
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
                cuda_type(x.a_type),
                x.lda,
                x.stride_a,
                x.b as *const c_void,
                cuda_type(x.b_type),
                x.ldb,
                x.stride_b,
                (&beta) as *const f32 as *const c_void,
                x.c as *mut c_void,
                cuda_type(x.c_type),
                x.ldc,
                x.stride_c,
                x.batch,
                cublasComputeType_t::CUBLAS_COMPUTE_32F,
                cublasGemmAlgo_t::CUBLAS_GEMM_DEFAULT,
            )
        }
        .map_err(|e| Error::Cuda(format!("cuBLAS strided-batched GEMM: {e}")))
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::conv::DwConv2d;
    use crate::device::{Impl, Op};

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
                let plan = crate::kernels::plan(op, Impl::Im2col, DType::F32, &conv, &s).unwrap();
                let step = plan.gemm.unwrap();
                let len = plan.workspace_bytes / 4;
                let mut rng = crate::rng::Rng::new(5);
                let init: Vec<f32> = (0..len).map(|_| rng.uniform_pm1()).collect();
                let mut want = init.clone();
                step.run_host(&mut want).unwrap();
                let g = crate::cuda::ops::gemm_of_step(&step, base, plan.workspace_bytes).unwrap();
                let mut got = init.clone();
                emulate(&cublas_args(&g).unwrap(), &mut got, base);
                for (i, (a, b)) in got.iter().zip(&want).enumerate() {
                    assert!(
                        (a - b).abs() <= 1e-5 * (1.0 + b.abs()),
                        "{op:?} [{i}] {a} vs {b}"
                    );
                }
            }
        }
    }
}
