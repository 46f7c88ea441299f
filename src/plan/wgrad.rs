//! The deterministic weight-gradient kernels: partial sums per (channel, slice) written to the
//! workspace, then `lk_wgrad_reduce` sums the slices in a fixed order.
//!
//! - `lk_wgrad_partial` (`kernels/lk_wgrad.cu`), stride 1 / dilation 1: output tile
//!   TH x TW = min(OH, 16) x min(OW, 32) (shrunk to fit 48 KB of shared memory), one thread per
//!   (filter row, 8 filter columns) unit, G row groups filling up to 256 threads;
//!   B = clamp(ceil(528 / C), 1, N * tiles) blocks per channel;
//! - `lk_wgrad_strided` (`kernels/lk_wgrad_strided.cu`), any stride/dilation (and stride-1
//!   shapes whose tiles do not fit shared memory): 256 threads = TG tap groups (8 taps each,
//!   TG = the power of two <= 8 that covers ceil(KH*KW / 8)) x 256/TG position lanes, 8 KB of
//!   shared memory; B = clamp(min(ceil(528 / C), N*OH*OW / 1024), 1, 65535) blocks per channel.

use super::geometry::{
    wgrad_smem, wgrad_threads, SHARED_LIMIT_BYTES, SHARED_TARGET_BYTES, WGRAD_STRIDED_TAPS,
    WGRAD_STRIDED_THREADS,
};
use super::launch::{flat_launch, DwArgs, Family, KernelId, Launch, Plan};
use crate::error::{Error, Result};
use crate::problem::Problem;

/// Blocks both weight-gradient grids aim for (4 per SM of a 132-SM H100).
const WGRAD_TARGET_BLOCKS: usize = 528;
/// Output positions a strided weight-gradient block gets at least (when there are enough).
const WGRAD_MIN_POSITIONS: usize = 1024;

/// The partial kernel (its own args) followed by the reduction over `blocks` slices.
fn two_kernel_plan(p: &Problem, partial: Launch, mut args: DwArgs, blocks: usize) -> Result<Plan> {
    let (kh, kw) = p.conv().kernel;
    let kk = kh * kw;
    let c = p.shape().c;
    let overflow = || Error::Overflow("weight-gradient workspace".into());
    let workspace_bytes = c
        .checked_mul(blocks)
        .and_then(|v| v.checked_mul(kk))
        .and_then(|v| v.checked_mul(4))
        .ok_or_else(overflow)?;
    args.aux0 = blocks as i32;
    let reduce = flat_launch(KernelId::new(Family::WgradReduce, p.dtype()), c * kk, args)?;
    Ok(Plan {
        launches: vec![partial, reduce],
        workspace_bytes,
        gemm: None,
    })
}

/// The tiled weight gradient (stride 1 / dilation 1); None when the tiles do not fit shared
/// memory.
pub(crate) fn tiled_plan(p: &Problem, args: DwArgs) -> Result<Option<Plan>> {
    let s = p.shape();
    let (kh, kw) = p.conv().kernel;
    let mut th = s.oh.min(16);
    let mut tw = s.ow.min(32);
    let smem_of = |th: usize, tw: usize| {
        let (tpg, g) = wgrad_threads(th, kh, kw);
        wgrad_smem(th, tw, kh, kw, tpg * g)
    };
    while smem_of(th, tw) > SHARED_TARGET_BYTES && (th > 1 || tw > 8) {
        if th > 1 {
            th = th.div_ceil(2);
        } else {
            tw = tw.div_ceil(2).max(8).min(tw);
            if tw == 8 {
                break;
            }
        }
    }
    let smem = smem_of(th, tw);
    if smem > SHARED_LIMIT_BYTES {
        return Ok(None);
    }
    let (tpg, g) = wgrad_threads(th, kh, kw);
    let kernel = KernelId::new(Family::WgradPartial, p.dtype());
    tiled_partial_plan(p, args, kernel, (th, tw), g, tpg * g, smem).map(Some)
}

/// A tiled partial kernel (the SIMT `lk_wgrad_partial_<t>` or the tensor-core
/// `lk_tc_wgrad_<t>`): grid (C, B), B = clamp(ceil(528 / C), 1, N * tiles) blocks per channel,
/// `threads` per block, aux0 = TH, aux1 = TW, aux2 = `groups`; then the reduction.
pub(crate) fn tiled_partial_plan(
    p: &Problem,
    args: DwArgs,
    kernel: KernelId,
    (th, tw): (usize, usize),
    groups: usize,
    threads: usize,
    smem: usize,
) -> Result<Plan> {
    let s = p.shape();
    let tiles = s.oh.div_ceil(th) * s.ow.div_ceil(tw);
    let blocks = WGRAD_TARGET_BLOCKS
        .div_ceil(s.c)
        .clamp(1, (s.n * tiles).min(65535));
    let mut a1 = args;
    a1.aux0 = th as i32;
    a1.aux1 = tw as i32;
    a1.aux2 = groups as i32;
    let partial = Launch {
        kernel,
        grid: (s.c as u32, blocks as u32, 1),
        block: (threads as u32, 1, 1),
        shared_bytes: smem as u32,
        args: a1,
    };
    two_kernel_plan(p, partial, args, blocks)
}

/// The weight gradient for any stride/dilation; None when an index would not fit the kernel's
/// 32-bit ints.
pub(crate) fn strided_plan(p: &Problem, args: DwArgs) -> Result<Option<Plan>> {
    let s = p.shape();
    let (kh, kw) = p.conv().kernel;
    let ohw = s.oh * s.ow;
    if ohw > i32::MAX as usize / 2 {
        return Ok(None);
    }
    // tap groups: a power of two <= 8 covering the 8-tap chunks (fewer passes over the slice)
    let chunks = (kh * kw).div_ceil(WGRAD_STRIDED_TAPS);
    let tg = chunks.next_power_of_two().min(8);
    let positions = s.n * ohw;
    let blocks = WGRAD_TARGET_BLOCKS
        .div_ceil(s.c)
        .min(positions / WGRAD_MIN_POSITIONS)
        .clamp(1, 65535);
    let mut a1 = args;
    a1.aux0 = tg as i32;
    let partial = Launch {
        kernel: KernelId::new(Family::WgradStrided, p.dtype()),
        grid: (s.c as u32, blocks as u32, 1),
        block: (WGRAD_STRIDED_THREADS as u32, 1, 1),
        shared_bytes: (4 * WGRAD_STRIDED_THREADS * WGRAD_STRIDED_TAPS) as u32,
        args: a1,
    };
    two_kernel_plan(p, partial, args, blocks).map(Some)
}
