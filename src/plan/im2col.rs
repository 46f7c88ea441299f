//! The im2col + GEMM baseline (`kernels/lk_im2col.cu`): the patch matrix and the per-channel
//! operands in an f32 workspace, one strided-batched GEMM (a batch entry per channel), and an
//! epilogue (fwd, wgrad: convert and add the bias) or `lk_col2im` (dgrad: gather into dx).

use super::launch::{strided_launch, DwArgs, Family, Gemm, KernelId, Plan};
use crate::dtype::DType;
use crate::error::{Error, Result};
use crate::op::Op;
use crate::problem::Problem;

pub(crate) fn plan(p: &Problem, args: DwArgs) -> Result<Plan> {
    let s = p.shape();
    let (kh, kw) = p.conv().kernel;
    let kk = kh * kw;
    let id = |f: Family| KernelId::new(f, p.dtype());
    let overflow = || Error::Overflow("im2col workspace".into());
    let m = s.n.checked_mul(s.oh * s.ow).ok_or_else(overflow)?;
    let cm = s.c.checked_mul(m).ok_or_else(overflow)?;
    let ckk = s.c.checked_mul(kk).ok_or_else(overflow)?;
    let cmkk = cm.checked_mul(kk).ok_or_else(overflow)?;
    let with_mode = |mode: i32| DwArgs { aux0: mode, ..args };
    // byte offset of an f32 element of the workspace
    let at = |elem: usize| (elem * 4) as u64;
    let base = Gemm {
        dtype: DType::F32,
        batch: s.c,
        m: 0,
        n: 0,
        k: 0,
        a: 0,
        lda: 0,
        stride_a: 0,
        a_trans: false,
        b: 0,
        ldb: 0,
        stride_b: 0,
        b_trans: false,
        c: 0,
        ldc: 0,
        stride_c: 0,
    };
    let (launches, gemm, len) = match p.op() {
        Op::Forward => {
            let len = cmkk.checked_add(ckk + cm).ok_or_else(overflow)?;
            let g = Gemm {
                m,
                n: 1,
                k: kk,
                lda: kk,
                stride_a: m * kk,
                b: at(cmkk),
                ldb: 1,
                stride_b: kk,
                c: at(cmkk + ckk),
                ldc: 1,
                stride_c: m,
                ..base
            };
            let l = vec![
                strided_launch(id(Family::Im2col), cmkk + ckk, with_mode(0)),
                strided_launch(id(Family::Im2colEpilogue), s.output_len(), with_mode(0)),
            ];
            (l, g, len)
        }
        Op::WeightGrad => {
            let len = cmkk.checked_add(cm + ckk).ok_or_else(overflow)?;
            let g = Gemm {
                m: kk,
                n: 1,
                k: m,
                lda: kk,
                stride_a: m * kk,
                a_trans: true,
                b: at(cmkk),
                ldb: 1,
                stride_b: m,
                c: at(cmkk + cm),
                ldc: 1,
                stride_c: kk,
                ..base
            };
            let l = vec![
                strided_launch(id(Family::Im2col), cmkk + cm, with_mode(1)),
                strided_launch(id(Family::Im2colEpilogue), ckk, with_mode(1)),
            ];
            (l, g, len)
        }
        Op::DataGrad => {
            let len = cmkk.checked_add(cm + ckk).ok_or_else(overflow)?;
            let g = Gemm {
                m,
                n: kk,
                k: 1,
                lda: 1,
                stride_a: m,
                b: at(cm),
                ldb: kk,
                stride_b: kk,
                c: at(cm + ckk),
                ldc: kk,
                stride_c: m * kk,
                ..base
            };
            let l = vec![
                strided_launch(id(Family::Im2col), cm + ckk, with_mode(2)),
                strided_launch(id(Family::Col2im), s.input_len(), with_mode(2)),
            ];
            (l, g, len)
        }
    };
    Ok(Plan {
        launches,
        workspace_bytes: len.checked_mul(4).ok_or_else(overflow)?,
        gemm: Some((0, gemm)),
    })
}
