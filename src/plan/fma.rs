//! FMA accounting: the FMAs the planned kernels execute for one call (padding taps and idle
//! lanes of a register tile included), to report which share of the executed work is useful
//! (`Problem::useful_flops / 2` over this).

use super::geometry::RX;
use super::launch::Family;
use super::select::plan;
use crate::dtype::DType;
use crate::error::Result;
use crate::op::Op;
use crate::problem::Problem;

/// Number of filter taps `t in 0..k` with `o - pad + t` inside `0..len` (stride/dilation 1).
fn taps_inside(o: usize, k: usize, pad: i64, len: usize) -> usize {
    let lo = (pad - o as i64).max(0);
    let hi = (len as i64 + pad - o as i64).min(k as i64);
    (hi - lo).max(0) as usize
}

/// Executed FMAs of `p`'s plan. Tiled fwd/dgrad: every thread runs its full 1 x RX register
/// tile over the filter rows that touch the image (templated: the quads of 4 filter columns
/// its stored outputs can reach, and no register row past the plane; generic: the columns its
/// outputs can reach); wgrad: each unit's clamped rows times 8-column steps of 64 FMAs; naive
/// and strided wgrad: only taps inside the image; im2col: the nominal GEMM.
pub fn executed_fmas(p: &Problem) -> Result<f64> {
    let plan = plan(&p.with_dtype(DType::F32))?;
    let (s, conv) = (p.shape(), p.conv());
    let (kh, kw) = conv.kernel;
    let planes = (s.n * s.c) as f64;
    let l = &plan.launches[0];
    if plan.gemm.is_some() {
        return Ok((s.c * s.n * s.oh * s.ow * kh * kw) as f64);
    }
    let family = l.kernel.family;
    if matches!(
        family,
        Family::NaiveFwd | Family::NaiveDgrad | Family::NaiveWgrad | Family::WgradStrided
    ) {
        return Ok(p.useful_flops() / 2.0);
    }
    let pad = conv.padding;
    if family == Family::WgradPartial {
        let (th, tw) = (l.args.aux0 as usize, l.args.aux1 as usize);
        let kwb = kw.div_ceil(RX);
        let mut per_plane = 0usize;
        for oy0 in (0..s.oh).step_by(th) {
            for ox0 in (0..s.ow).step_by(tw) {
                for ky in 0..kh {
                    let lo = (pad.top as i64 - ky as i64 - oy0 as i64).max(0);
                    let hi = (th.min(s.oh - oy0) as i64)
                        .min(s.h as i64 + pad.top as i64 - ky as i64 - oy0 as i64);
                    let rows = (hi - lo).max(0) as usize;
                    for q in 0..kwb {
                        let gx0 = ox0 as i64 - pad.left as i64 + (q * RX) as i64;
                        let ox_lo = (-(gx0 + RX as i64 - 1)).max(0);
                        let ox_hi = (tw.min(s.ow - ox0) as i64).min(s.w as i64 - gx0);
                        if ox_hi > ox_lo {
                            let start = ox_lo / RX as i64 * RX as i64;
                            let steps = (ox_hi - start + RX as i64 - 1) / RX as i64;
                            per_plane += rows * steps as usize * RX * RX;
                        }
                    }
                }
            }
        }
        return Ok(planes * per_plane as f64);
    }
    // tiled fwd / dgrad
    let dgrad = p.op() == Op::DataGrad;
    let (src_h, src_w, oh, ow) = if dgrad {
        (s.oh, s.ow, s.h, s.w)
    } else {
        (s.h, s.w, s.oh, s.ow)
    };
    let (pt, pl) = if dgrad {
        (
            kh as i64 - 1 - pad.top as i64,
            kw as i64 - 1 - pad.left as i64,
        )
    } else {
        (pad.top as i64, pad.left as i64)
    };
    let generic = !l.kernel.is_templated();
    let ry = if generic { 1 } else { 2 };
    let th = l.block.1 as usize * ry;
    // rows: per output row inside the plane (the templated kernel skips its second register row
    // past the plane), the filter rows whose source row is in the image
    let mut rows = 0usize;
    for oy0 in (0..oh).step_by(th) {
        for oyb in (oy0..oy0 + th).step_by(ry).filter(|&o| o < oh) {
            rows += (oyb..(oyb + ry).min(oh))
                .map(|oy| taps_inside(oy, kh, pt, src_h))
                .sum::<usize>();
        }
    }
    // cols: per thread (global x index t, outputs t*RX ..), the filter columns it visits
    let threads_x = (l.grid.2 * l.block.0) as usize;
    let cols: usize = (0..threads_x)
        .map(|t| {
            let gx0 = (t * RX) as i64 - pl;
            if generic {
                let lo = (-(gx0 + RX as i64 - 1)).max(0);
                let hi = (kw as i64).min(src_w as i64 - gx0);
                (hi - lo).max(0) as usize
            } else {
                // quads of 4 taps that reach the image for one of the stored outputs j < jn
                let jn = (RX as i64).min(ow as i64 - (t * RX) as i64);
                let lo = (-(gx0 + jn - 1)).max(0);
                let hi = (kw as i64).min(src_w as i64 - gx0);
                if jn <= 0 || lo >= hi {
                    0
                } else {
                    let (q_lo, q_hi) = (lo / 4, (hi + 3) / 4);
                    ((4 * q_hi).min(kw as i64) - 4 * q_lo) as usize
                }
            }
        })
        .sum();
    Ok(planes * (rows * cols * RX) as f64)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::conv::DwConv2d;
    use crate::op::Impl;

    #[test]
    fn executed_fma_counts() {
        // 56x56 K31: all output rows/cols compute; the useful share is below 1
        let conv = DwConv2d::new(31, 31);
        let s = conv.resolve(1, 2, 56, 56).unwrap();
        for op in Op::ALL {
            let p = Problem::new(op, Impl::Fast, DType::F32, &conv, &s).unwrap();
            let e = executed_fmas(&p).unwrap();
            let u = p.useful_flops() / 2.0;
            assert!(e >= u && e < 2.5 * u, "{op:?} {e} {u}");
        }
        let p = Problem::new(Op::Forward, Impl::Naive, DType::F32, &conv, &s).unwrap();
        assert_eq!(executed_fmas(&p).unwrap(), p.useful_flops() / 2.0);
    }
}
