//! The tensor-core path (`Impl::TensorCore`, CLI `--impl tc`): launch planning for
//! `kernels/lk_tc.cu` (forward and data gradient) and `kernels/lk_tc_wgrad.cu` (weight gradient),
//! f16/bf16 with f32 accumulation, stride 1 / dilation 1, `mma.sync.aligned.m16n8k16`, sm_80+;
//! and the share of the executed tensor-core work that is useful with the time it implies at the
//! tensor-core ceiling.
//!
//! Kernels (`<t>` = `f16` | `bf16`): `lk_tc_fwd_<t>_k<K>`, `lk_tc_dgrad_<t>_k<K>` for the square
//! sizes of [`super::TEMPLATE_SIZES`], and `lk_tc_fwd_<t>_generic` /
//! `lk_tc_dgrad_<t>_generic` for any KH x KW with KW <= [`MAX_GENERIC_KW`]; `lk_tc_wgrad_<t>`
//! (partials, then the SIMT path's deterministic `lk_wgrad_reduce_<t>`) for any KH, KW <=
//! [`MAX_WGRAD_K`].
//!
//! What is not planned here falls back to the SIMT kernels of `Impl::Fast` (documented, not an
//! error): stride or dilation other than 1, KW > [`MAX_GENERIC_KW`] (fwd/dgrad), KH or KW >
//! [`MAX_WGRAD_K`] (wgrad), and tiles that do not fit shared memory. f32 with
//! `Impl::TensorCore` is an `Error::Unsupported`; so is a device below sm_80 ([`check_device`]).
//!
//! Geometry (fwd/dgrad): block = `warps` warps (1..=8) stacked along y, each 16 output rows x `nt` n-tiles of
//! 8 columns (nt <= 8, TW = 8 nt); grid (N*C, tiles_y, tiles_x); OW split evenly into
//! ceil(OW / 64) tiles, OH into tiles of 16 * warps rows (more, shorter tiles when N*C is small,
//! so that the grid has >= 264 blocks); shared memory (16-bit): input tile
//! [16 warps + KH - 1][tc_ld(8 (nt - 1) + 16 S)] and filter [KH][2][16 S + 10] (two shifted
//! copies), S = ceil((KW + 7) / 16). The weight gradient's geometry: [`wgrad_shared_bytes`] and
//! the comment of `kernels/lk_tc_wgrad.cu`.

use super::geometry::{SHARED_LIMIT_BYTES, SHARED_TARGET_BYTES};
use super::launch::{base_args, DwArgs, Family, KernelId, Launch, Plan, TEMPLATE_SIZES};
use super::wgrad::tiled_partial_plan;
use crate::dtype::DType;
use crate::error::{Error, Result};
use crate::op::Op;
use crate::problem::Problem;

/// Widest filter the generic tensor-core kernel takes (S = 4 k-steps: KW + 7 <= 64).
pub const MAX_GENERIC_KW: usize = 57;
/// The lowest compute capability with `mma.sync.aligned.m16n8k16` for f16 and bf16.
pub const MIN_COMPUTE_CAPABILITY: (i32, i32) = (8, 0);
/// Dense f16/bf16 tensor-core peak with f32 accumulation of an H100/H200 SXM (TFLOP/s).
pub const TC_PEAK_TFLOPS: f64 = 990.0;
/// HBM bandwidth of an H200 (TB/s), for the memory bound beside the tensor-core bound.
pub const HBM_TBPS: f64 = 4.8;
/// Multiply-adds of one `mma.m16n8k16`.
pub const MMA_MACS: f64 = 16.0 * 8.0 * 16.0;
/// SMs and boost clock of an H100/H200 SXM: the ceilings per clock below are per SM.
pub const SMS: f64 = 132.0;
pub const CLOCK_HZ: f64 = 1.83e9;
/// Warp-wide shared-memory load instructions (conflict-free: one 128-byte wavefront each) an SM
/// issues per clock; the dense tensor-core peak is one `mma.m16n8k16` per SM per clock.
pub const SMEM_WAVEFRONTS_PER_CLOCK: f64 = 1.0;
/// Blocks the grid aims for at least (2 per SM of a 132-SM H100).
const TARGET_BLOCKS: usize = 264;
const NT_MAX: usize = 8;
const WARPS_MAX: usize = 8;

/// Refuses a tensor-core kernel on a device below sm_80 (the fatbin's sm_75 build of these
/// kernels is empty).
pub fn check_device(kernel: KernelId, compute_capability: (i32, i32), device: &str) -> Result<()> {
    if kernel.family.is_tensor_core() && compute_capability < MIN_COMPUTE_CAPABILITY {
        let (ma, mi) = compute_capability;
        return Err(Error::Unsupported(format!(
            "{kernel} needs tensor cores with mma.sync m16n8k16 (sm_80 or newer); {device} is sm_{ma}{mi}: use --impl fast"
        )));
    }
    Ok(())
}

/// The error for `Impl::TensorCore` on a CPU device.
pub fn cpu_unsupported() -> Error {
    Error::Unsupported("the tensor-core path runs on cuda or sim (use fast on the CPU)".into())
}

fn ceil_div(a: usize, b: usize) -> usize {
    a.div_ceil(b)
}

/// Row stride (16-bit elements) of the staged input tile; must match `tc_ld` in lk_tc.cu.
fn tc_ld(twi: usize) -> usize {
    let ld = twi.div_ceil(8) * 8;
    if (ld / 2).is_multiple_of(8) {
        ld + 8
    } else {
        ld
    }
}

/// K-steps of 16 input columns per n-tile: the band of 8 outputs spans KW + 7 columns.
fn ksteps(kw: usize) -> usize {
    ceil_div(kw + 7, 16)
}

/// True when the band ends in the first 8 columns of its last k-step, which the templated
/// kernels then run as an `mma.m16n8k8` (must match `tail8` in lk_tc.cu).
fn tail8(kh: usize, kw: usize) -> bool {
    kh == kw && TEMPLATE_SIZES.contains(&kw) && kw + 7 <= 16 * ksteps(kw) - 8
}

/// Shared bytes of `lk_tc_*` for `warps` warps, `nt` n-tiles and a KH x KW filter.
pub fn shared_bytes(warps: usize, nt: usize, kh: usize, kw: usize) -> usize {
    let s = ksteps(kw);
    let rows = 16 * warps + kh - 1;
    let input = (rows * tc_ld(8 * (nt - 1) + 16 * s)).div_ceil(8) * 8;
    2 * (input + kh * 2 * (16 * s + 10))
}

/// The tensor-core plan, or None where the path falls back to the SIMT kernels (see the module
/// documentation). `args` are the shape's kernel arguments (pointers unbound).
pub(crate) fn plan(p: &Problem, mut args: DwArgs) -> Result<Option<Plan>> {
    let (op, dtype, conv, s) = (p.op(), p.dtype(), p.conv(), p.shape());
    if dtype == DType::F32 {
        return Err(Error::Unsupported(
            "the tensor-core path computes f16 or bf16 inputs (f32 accumulation); use --impl fast for f32".into(),
        ));
    }
    let (kh, kw) = conv.kernel;
    if !conv.is_unit() {
        return Ok(None);
    }
    if op == Op::WeightGrad {
        return wgrad_plan(p, args);
    }
    if kw > MAX_GENERIC_KW {
        return Ok(None);
    }
    let (oh, ow) = if op == Op::DataGrad {
        (s.h, s.w)
    } else {
        (s.oh, s.ow)
    };
    let tiles_x = ceil_div(ow, 8 * NT_MAX);
    let nt = ceil_div(ceil_div(ow, tiles_x), 8).clamp(1, NT_MAX);
    let planes = s.n * s.c;
    let mut tiles_y = ceil_div(oh, 16 * WARPS_MAX);
    if planes * tiles_x * tiles_y < TARGET_BLOCKS {
        let want = ceil_div(TARGET_BLOCKS, planes * tiles_x).min(ceil_div(oh, 16));
        tiles_y = tiles_y.max(want);
    }
    let mut warps = ceil_div(ceil_div(oh, tiles_y), 16);
    while warps > 1 && shared_bytes(warps, nt, kh, kw) > SHARED_TARGET_BYTES {
        tiles_y = ceil_div(oh, 16 * (warps - 1));
        warps = ceil_div(ceil_div(oh, tiles_y), 16);
    }
    let smem = shared_bytes(warps, nt, kh, kw);
    if smem > SHARED_LIMIT_BYTES || tiles_y > 65535 || tiles_x > 65535 {
        return Ok(None);
    }
    let family = if op == Op::DataGrad {
        Family::TcDgrad
    } else {
        Family::TcFwd
    };
    let kernel = KernelId::tiled(family, dtype, kh, kw);
    args.aux0 = nt as i32;
    Ok(Some(Plan {
        launches: vec![Launch {
            kernel,
            grid: (planes as u32, tiles_y as u32, tiles_x as u32),
            block: (32 * warps as u32, 1, 1),
            shared_bytes: smem as u32,
            args,
        }],
        workspace_bytes: 0,
        gemm: None,
    }))
}

/// Largest KH and KW of the tensor-core weight gradient (a warp's unit is 32 x 32 of dW; at most
/// 2 x 2 units).
pub const MAX_WGRAD_K: usize = 64;
/// Row groups of the weight-gradient block: at most 8 warps in all.
const WGRAD_WARPS_MAX: usize = 8;

/// Filter-column m-tiles (16), filter-row n-tiles (8) and warp units (2 x 4 tiles) of the
/// tensor-core weight gradient; must match `wgrad_tc` in lk_tc_wgrad.cu.
fn wgrad_tiles(kh: usize, kw: usize) -> (usize, usize, usize) {
    let (mt, nt) = (kw.div_ceil(16), kh.div_ceil(8));
    (mt, nt, mt.div_ceil(2) * nt.div_ceil(4))
}

/// Shared bytes of `lk_tc_wgrad_*`: the staged tiles (two X copies and dY, 16-bit), or the
/// reduction of the `warps` accumulators ([warp][32][33] f32) if larger.
pub fn wgrad_shared_bytes(th: usize, tw: usize, kh: usize, kw: usize, warps: usize) -> usize {
    let (mt, _, _) = wgrad_tiles(kh, kw);
    let nc = tw.div_ceil(16);
    let x_elems = (th + kh - 1) * 16 * (nc + mt);
    // the shifted copy starts 16 words mod 32 banks after the first (wgrad_x1_offset)
    let x1 = (x_elems + 31) / 64 * 64 + 32;
    let tiles = 2 * (x1 + x_elems + th * tc_ld(16 * nc));
    tiles.max(4 * warps * 32 * 33).div_ceil(16) * 16
}

/// The tensor-core weight gradient (`lk_tc_wgrad_<t>`, then `lk_wgrad_reduce_<t>`), or None
/// (KH or KW above [`MAX_WGRAD_K`], or tiles that do not fit): the SIMT kernels.
fn wgrad_plan(p: &Problem, args: DwArgs) -> Result<Option<Plan>> {
    let s = p.shape();
    let (kh, kw) = p.conv().kernel;
    if kh > MAX_WGRAD_K || kw > MAX_WGRAD_K {
        return Ok(None);
    }
    let (_, _, units) = wgrad_tiles(kh, kw);
    let tiles_x = s.ow.div_ceil(8 * NT_MAX);
    let tw = s.ow.div_ceil(tiles_x);
    // row groups: about 4 X rows (inside the image) per warp and item
    let groups = |th: usize| {
        (s.h.min(th + kh - 1))
            .div_ceil(4)
            .clamp(1, WGRAD_WARPS_MAX / units)
    };
    let smem_of = |th: usize| wgrad_shared_bytes(th, tw, kh, kw, units * groups(th));
    let mut th = s.oh.min(64);
    while th > 1 && smem_of(th) > SHARED_TARGET_BYTES {
        th = th.div_ceil(2);
    }
    let smem = smem_of(th);
    if smem > SHARED_LIMIT_BYTES {
        return Ok(None);
    }
    let g = groups(th);
    let kernel = KernelId::new(Family::TcWgrad, p.dtype());
    tiled_partial_plan(p, args, kernel, (th, tw), g, 32 * units * g, smem).map(Some)
}

/// A tensor-core plan's work and its bounds at the H100/H200 ceilings.
#[derive(Clone, Debug, PartialEq)]
pub struct WorkReport {
    pub launch: Launch,
    /// Warps per block and n-tiles (8 output columns) per warp.
    pub warps: usize,
    pub nt: usize,
    /// `mma.m16n8k16` the kernel executes, an `m16n8k8` counting one half (filter rows and
    /// k-steps that cannot touch the image skipped, as the kernel does).
    pub mma: f64,
    /// Multiply-adds that involve an input inside the image (`useful_flops / 2`).
    pub useful_macs: f64,
    /// useful_macs / (mma * 2048).
    pub useful_share: f64,
    /// mma * 2048 * 2 flops at [`TC_PEAK_TFLOPS`].
    pub tc_bound_s: f64,
    /// Warp-wide shared-memory loads of the fragments (A: 2 x 32-bit per 8-column block, B:
    /// 2 x 32-bit per k-step, those inside the image; per warp and filter row), at one per SM
    /// per clock.
    pub smem_bound_s: f64,
    /// Compulsory traffic (input, output, filter once) at [`HBM_TBPS`].
    pub memory_bound_s: f64,
}

/// The work of the tensor-core plan of `p` (an `Impl::TensorCore` problem; None where the path
/// falls back to SIMT).
pub fn work_report(p: &Problem) -> Result<Option<WorkReport>> {
    let Some(plan) = plan(p, base_args(p.conv(), p.shape())?)? else {
        return Ok(None);
    };
    let l = plan.launches[0].clone();
    let (op, dtype, conv, s) = (p.op(), p.dtype(), p.conv(), p.shape());
    let (kh, kw) = conv.kernel;
    let bytes =
        dtype.size_bytes() as f64 * (s.n * s.c * (s.h * s.w + s.oh * s.ow) + s.c * kh * kw) as f64;
    let report = |warps: usize, nt: usize, halves: i64, loads: i64| {
        let mma = halves as f64 * (s.n * s.c) as f64 / 2.0;
        let useful_macs = p.useful_flops() / 2.0;
        WorkReport {
            launch: l.clone(),
            warps,
            nt,
            mma,
            useful_macs,
            useful_share: useful_macs / (mma * MMA_MACS),
            tc_bound_s: mma * MMA_MACS * 2.0 / (TC_PEAK_TFLOPS * 1e12),
            smem_bound_s: loads as f64 * (s.n * s.c) as f64
                / (SMEM_WAVEFRONTS_PER_CLOCK * SMS * CLOCK_HZ),
            memory_bound_s: bytes / (HBM_TBPS * 1e12),
        }
    };
    if op == Op::WeightGrad {
        let (halves, loads) = wgrad_work(p, &l);
        let (_, nt, _) = wgrad_tiles(kh, kw);
        return Ok(Some(report(
            (l.block.0 / 32) as usize,
            nt.min(4),
            halves,
            loads,
        )));
    }
    let pad = conv.padding;
    let dgrad = op == Op::DataGrad;
    let (sh, sw, oh, ow) = if dgrad {
        (s.oh as i64, s.ow as i64, s.h as i64, s.w as i64)
    } else {
        (s.h as i64, s.w as i64, s.oh as i64, s.ow as i64)
    };
    let (pt, pl) = if dgrad {
        (
            kh as i64 - 1 - pad.top as i64,
            kw as i64 - 1 - pad.left as i64,
        )
    } else {
        (pad.top as i64, pad.left as i64)
    };
    let warps = (l.block.0 / 32) as i64;
    let nt = l.args.aux0 as i64;
    let steps = ksteps(kw) as i64;
    let tail = tail8(kh, kw);
    let (th, tw) = (16 * warps, 8 * nt);
    let mut per_plane = 0i64;
    let mut loads_plane = 0i64;
    for by in 0..l.grid.1 as i64 {
        for bz in 0..l.grid.2 as i64 {
            let (oy0, ox0) = (by * th, bz * tw);
            let nt_used = (tw.min(ow - ox0) + 7) / 8;
            // k-steps per filter row that touch the image, summed over the n-tiles, and the
            // fragment loads per filter row (A blocks and B k-steps inside the image)
            let a_blocks = (0..nt_used - 1 + 2 * steps - i64::from(tail))
                .filter(|b| ox0 - pl + 8 * b + 8 > 0 && ox0 - pl + 8 * b < sw)
                .count() as i64;
            let b_steps = (0..steps)
                .filter(|st| {
                    let gx = ox0 - pl + 16 * st;
                    gx + 8 * nt_used + 8 > 0 && gx < sw
                })
                .count() as i64;
            let b_tail = i64::from(
                tail && {
                    let gx = ox0 - pl + 16 * (steps - 1);
                    gx + 8 * nt_used + 8 > 0 && gx < sw
                },
            );
            let loads_row = 2 * a_blocks + 2 * b_steps - b_tail;
            // in halves of an m16n8k16
            let mut steps_row = 0i64;
            for q in 0..nt_used {
                for st in 0..steps {
                    let k8 = tail && st == steps - 1;
                    let gx = ox0 - pl + 8 * q + 16 * st;
                    if gx + if k8 { 8 } else { 16 } > 0 && gx < sw {
                        steps_row += if k8 { 1 } else { 2 };
                    }
                }
            }
            for w in 0..warps {
                let wy0 = oy0 + 16 * w;
                let rows_out = 16.min(oh - wy0);
                if rows_out <= 0 {
                    continue;
                }
                let ky_lo = (pt - wy0 - rows_out + 1).max(0);
                let ky_hi = (kh as i64).min(sh + pt - wy0);
                per_plane += (ky_hi - ky_lo).max(0) * steps_row;
                loads_plane += (ky_hi - ky_lo).max(0) * loads_row;
            }
        }
    }
    Ok(Some(report(
        warps as usize,
        nt as usize,
        per_plane,
        loads_plane,
    )))
}

/// Per (image, channel) of the tensor-core weight gradient: the mma it executes in halves of an
/// `m16n8k16` (an `m16n8k8` is one) and its warp-wide fragment loads, skipping what the kernel
/// skips (X rows outside the image or meeting no dY row, n-tiles without a dY row, m-tiles whose
/// X columns are all outside the image).
fn wgrad_work(p: &Problem, l: &Launch) -> (i64, i64) {
    let s = p.shape();
    let (kh, kw) = p.conv().kernel;
    let pad = p.conv().padding;
    let (h, w, oh, ow) = (s.h as i64, s.w as i64, s.oh as i64, s.ow as i64);
    let (th, tw) = (l.args.aux0 as i64, l.args.aux1 as i64);
    let (mt, nt, _) = wgrad_tiles(kh, kw);
    let (mt, nt) = (mt as i64, nt as i64);
    let (mut halves, mut loads) = (0i64, 0i64);
    for oy0 in (0..oh).step_by(th as usize) {
        for ox0 in (0..ow).step_by(tw as usize) {
            let (sy0, sx0) = (oy0 - pad.top as i64, ox0 - pad.left as i64);
            let rows_valid = th.min(oh - oy0);
            let cols_valid = tw.min(ow - ox0);
            let xrows = th + kh as i64 - 1;
            for mt0 in (0..mt).step_by(2) {
                for nt0 in (0..nt).step_by(4) {
                    let (mtn, ntn) = (2.min(mt - mt0), 4.min(nt - nt0));
                    let (kyl, kyh) = (8 * nt0, (kh as i64).min(8 * nt0 + 32));
                    let i_lo = kyl.max(-sy0);
                    let i_hi = (rows_valid + kyh - 2).min(h - 1 - sy0).min(xrows - 1);
                    // row sets: rows base + 8 j (j < 4) sharing 7 B fragments, as the kernel
                    for s in 0.. {
                        let base = i_lo + 32 * (s / 8) + s % 8;
                        if base > i_hi {
                            break;
                        }
                        let row_ok: Vec<bool> = (0..4).map(|j| base + 8 * j <= i_hi).collect();
                        let mut carried = 0;
                        for ch in 0..(cols_valid + 15) / 16 {
                            let k8 = cols_valid - 16 * ch <= 8;
                            let nb = 2 * mtn + i64::from(!k8);
                            let rows = row_ok.iter().filter(|&&ok| ok).count() as i64;
                            loads += rows * (nb - carried);
                            carried = nb - 2;
                            let b_ok: Vec<bool> = (0..7)
                                .map(|d| {
                                    let r_top = base - 8 * nt0 + 8 * (d - 3);
                                    let used = (0..4).any(|j| {
                                        row_ok[j as usize] && (0..ntn).contains(&(j - d + 3))
                                    });
                                    used && r_top >= 0 && r_top - 7 < rows_valid
                                })
                                .collect();
                            loads += b_ok.iter().filter(|&&ok| ok).count() as i64
                                * if k8 { 1 } else { 2 };
                            for j in 0..4i64 {
                                for nl in 0..ntn {
                                    let d = j - nl + 3;
                                    if !row_ok[j as usize] || !b_ok[d as usize] {
                                        continue;
                                    }
                                    for ml in 0..mtn {
                                        let gx = sx0 + 16 * (ch + mt0 + ml);
                                        if gx + 31 > 0 && gx < w {
                                            halves += if k8 { 1 } else { 2 };
                                        }
                                    }
                                }
                            }
                        }
                    }
                }
            }
        }
    }
    (halves, loads)
}
