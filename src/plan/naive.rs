//! The naive kernels (`kernels/lk_naive.cu`): one thread per output element, any
//! stride/dilation; the baseline, and the fwd/dgrad fallback for stride/dilation != 1.

use super::launch::{flat_launch, DwArgs, Family, KernelId, Plan};
use crate::error::Result;
use crate::op::Op;
use crate::problem::Problem;

pub(crate) fn plan(p: &Problem, args: DwArgs) -> Result<Plan> {
    let s = p.shape();
    let (kh, kw) = p.conv().kernel;
    let (family, total) = match p.op() {
        Op::Forward => (Family::NaiveFwd, s.output_len()),
        Op::DataGrad => (Family::NaiveDgrad, s.input_len()),
        Op::WeightGrad => (Family::NaiveWgrad, s.c * kh * kw),
    };
    Ok(Plan {
        launches: vec![flat_launch(KernelId::new(family, p.dtype()), total, args)?],
        workspace_bytes: 0,
        gemm: None,
    })
}
