//! The one place where a kernel family is chosen for a problem. To add a family (a new
//! `Impl`, or a faster kernel tried before the existing ones), write its planner in its own
//! file (`fn(&Problem, DwArgs) -> Result<Option<Plan>>`, `None` when it does not apply) and
//! add it to [`candidates`].

use super::launch::{base_args, DwArgs, Plan};
use super::{im2col, naive, tensor_core, tiled, wgrad};
use crate::error::{Error, Result};
use crate::op::{Impl, Op};
use crate::problem::Problem;

/// A family's planner: the plan, or `None` when the family does not handle the problem.
pub type FamilyPlanner = fn(&Problem, DwArgs) -> Result<Option<Plan>>;

fn naive_family(p: &Problem, args: DwArgs) -> Result<Option<Plan>> {
    naive::plan(p, args).map(Some)
}

fn im2col_family(p: &Problem, args: DwArgs) -> Result<Option<Plan>> {
    im2col::plan(p, args).map(Some)
}

fn tiled_fwd_dgrad(p: &Problem, args: DwArgs) -> Result<Option<Plan>> {
    if p.conv().is_unit() {
        tiled::plan(p, args)
    } else {
        Ok(None)
    }
}

fn tiled_wgrad(p: &Problem, args: DwArgs) -> Result<Option<Plan>> {
    if p.conv().is_unit() {
        wgrad::tiled_plan(p, args)
    } else {
        Ok(None)
    }
}

/// The families that can run `(imp, op)`, best first; the first that returns a plan wins.
fn candidates(imp: Impl, op: Op) -> Result<&'static [FamilyPlanner]> {
    Ok(match (imp, op) {
        (Impl::Fast, Op::Forward | Op::DataGrad) => &[tiled_fwd_dgrad, naive_family],
        (Impl::Fast, Op::WeightGrad) => &[tiled_wgrad, wgrad::strided_plan, naive_family],
        (Impl::Naive, _) => &[naive_family],
        (Impl::Im2col, _) => &[im2col_family],
        // the tensor-core kernels, else (documented fallback) the SIMT ones
        (Impl::TensorCore, Op::Forward | Op::DataGrad) => {
            &[tensor_core::plan, tiled_fwd_dgrad, naive_family]
        }
        (Impl::TensorCore, Op::WeightGrad) => &[
            tensor_core::plan,
            tiled_wgrad,
            wgrad::strided_plan,
            naive_family,
        ],
        (Impl::Reference, _) => {
            return Err(Error::Unsupported(
                "the f64 reference runs on the CPU only (use fast, naive or im2col on a GPU or \
                 the simulator)"
                    .into(),
            ))
        }
    })
}

/// Plans a validated problem: which kernels, with which grid, block, shared memory and
/// workspace. `Impl::Fast` uses the tiled kernels for stride 1 / dilation 1; otherwise the
/// deterministic two-kernel strided weight gradient and the naive (one thread per output, any
/// stride/dilation) fwd/dgrad kernels; `Impl::Naive` and `Impl::Im2col` are the baselines;
/// `Impl::Reference` is CPU-only (an `Unsupported` error: the one place that says so).
pub fn plan(p: &Problem) -> Result<Plan> {
    let families = candidates(p.imp(), p.op())?;
    let args = base_args(p.conv(), p.shape())?;
    for family in families {
        if let Some(plan) = family(p, args)? {
            return Ok(plan);
        }
    }
    Err(Error::Unsupported(format!(
        "no kernel family handles {} {} for {:?}",
        p.op().name(),
        p.imp().name(),
        p.shape()
    )))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::conv::DwConv2d;
    use crate::dtype::DType;
    use crate::plan::geometry::{SHARED_LIMIT_BYTES, SHARED_TARGET_BYTES};
    use crate::plan::launch::{kernel_names, TEMPLATE_SIZES};

    #[test]
    fn plans_stay_within_launch_limits() {
        let mut sizes: Vec<(usize, usize)> = TEMPLATE_SIZES.iter().map(|&k| (k, k)).collect();
        sizes.extend([(1, 1), (2, 2), (51, 5), (5, 51), (101, 101), (301, 3)]);
        for (kh, kw) in sizes {
            let conv = DwConv2d::new(kh, kw);
            for (h, w) in [
                (1, 1),
                (7, 7),
                (14, 14),
                (56, 56),
                (300, 5),
                (5, 300),
                (256, 200),
            ] {
                let s = conv.resolve(2, 3, h, w).unwrap();
                for op in Op::ALL {
                    let pr = Problem::new(op, Impl::Fast, DType::F32, &conv, &s).unwrap();
                    let p = plan(&pr).unwrap();
                    for l in &p.launches {
                        let threads = l.block.0 * l.block.1 * l.block.2;
                        assert!((1..=256).contains(&threads), "{l:?}");
                        assert!(l.grid.1 <= 65535 && l.grid.2 <= 65535, "{l:?}");
                        // template sizes stay below the 48 KB that needs no opt-in
                        let limit = if TEMPLATE_SIZES.contains(&kh) && kh == kw {
                            SHARED_TARGET_BYTES
                        } else {
                            SHARED_LIMIT_BYTES
                        };
                        assert!(l.shared_bytes as usize <= limit, "{l:?}");
                    }
                }
            }
        }
    }

    #[test]
    fn catalogue_has_every_planned_kernel() {
        let names = kernel_names();
        let conv = DwConv2d::new(31, 31);
        let s = conv.resolve(1, 4, 20, 20).unwrap();
        for op in Op::ALL {
            for imp in [Impl::Fast, Impl::Naive, Impl::Im2col] {
                let p = plan(&Problem::new(op, imp, DType::F16, &conv, &s).unwrap()).unwrap();
                for l in &p.launches {
                    assert!(names.contains(&l.kernel.name()));
                }
            }
        }
        let r = Problem::new(Op::Forward, Impl::Reference, DType::F32, &conv, &s).unwrap();
        assert!(matches!(plan(&r), Err(Error::Unsupported(_))));
    }
}
