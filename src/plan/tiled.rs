//! The block-tiled forward / data-gradient kernels (`kernels/lk_conv.cu`), stride 1 /
//! dilation 1: templated per square filter size, generic (filter in chunks) otherwise.
//!
//! Register tile RY x 8 per thread (RY = 2 templated, 1 generic); block (TX, TY, P): OW split
//! evenly into ceil(OW / 64) tiles of 8*TX columns (TX <= 8), OH split evenly into tiles of
//! TH = RY*TY <= RY*256/TX rows (48 KB of shared memory at most), or into more tiles of >= 16
//! rows when N*C is small so that the grid has >= 264 blocks; P planes per block (one z-slice
//! each) when TX*TY < 128 and the grid stays >= 264 blocks (small images: up to 256 threads
//! within 48 KB); grid (ceil(N*C / P), tiles_y, tiles_x).

use super::geometry::{tiled_smem, RX, SHARED_LIMIT_BYTES, SHARED_TARGET_BYTES};
use super::launch::{DwArgs, Family, KernelId, Launch, Plan};
use crate::error::Result;
use crate::op::Op;
use crate::problem::Problem;

/// Blocks the tiled forward/data-gradient grid aims for at least (2 per SM of a 132-SM H100).
const TARGET_BLOCKS: usize = 264;

/// The tiled plan; None when no configuration fits the grid limits.
pub(crate) fn plan(p: &Problem, mut args: DwArgs) -> Result<Option<Plan>> {
    let (s, conv) = (p.shape(), p.conv());
    let (kh, kw) = conv.kernel;
    let dgrad = p.op() == Op::DataGrad;
    let family = if dgrad {
        Family::TiledDgrad
    } else {
        Family::TiledFwd
    };
    let kernel = KernelId::tiled(family, p.dtype(), kh, kw);
    let (oh, ow) = if dgrad { (s.h, s.w) } else { (s.oh, s.ow) };
    // at most 8 threads (64 columns) per tile row, tiles balanced so few columns are wasted
    let tiles_x = ow.div_ceil(8 * RX);
    let tx = ow.div_ceil(tiles_x).div_ceil(RX).clamp(1, 8);
    let tw = tx * RX;
    let templated = kernel.is_templated();
    // output rows per thread: 2 in the templated kernel (RY), 1 in the generic one
    let ry = if templated { 2 } else { 1 };
    let mut max_th = 256 / tx * ry;
    let (mut kch, mut kcw) = (kh, kw);
    if templated {
        while tiled_smem(max_th.min(oh).div_ceil(ry) * ry, tw, kch, kcw) > SHARED_TARGET_BYTES
            && max_th > ry
        {
            max_th = max_th.div_ceil(2);
        }
    } else {
        kch = kch.min(64);
        kcw = kcw.min(64);
        while tiled_smem(max_th.min(oh), tw, kch, kcw) > SHARED_TARGET_BYTES {
            if kch > 8 {
                kch = kch.div_ceil(2);
            } else if kcw > 8 {
                kcw = kcw.div_ceil(2);
            } else if max_th > 1 {
                max_th = max_th.div_ceil(2);
            } else {
                break;
            }
        }
    }
    let planes = s.n * s.c;
    let mut tiles_y = oh.div_ceil(max_th);
    // few planes (batch 1): more, shorter tiles (>= 16 rows) so that the grid fills the GPU
    if planes * tiles_x * tiles_y < TARGET_BLOCKS {
        let want = TARGET_BLOCKS
            .div_ceil(planes * tiles_x)
            .min(oh.div_ceil(16));
        tiles_y = tiles_y.max(want);
    }
    let threads_y = oh.div_ceil(tiles_y).div_ceil(ry);
    let th = threads_y * ry;
    let smem1 = tiled_smem(th, tw, kch, kcw);
    if tiles_y > 65535 || tiles_x > 65535 || smem1 > SHARED_LIMIT_BYTES {
        return Ok(None);
    }
    // small images, many planes: pack P planes into one block (one z-slice each)
    let threads1 = tx * threads_y;
    let blocks1 = planes * tiles_x * tiles_y;
    let packed = if threads1 < 128 {
        (256 / threads1)
            .min(SHARED_TARGET_BYTES / smem1)
            .min(64)
            .min(blocks1 / TARGET_BLOCKS)
            .max(1)
    } else {
        1
    };
    args.aux0 = tiles_x as i32;
    args.aux1 = tiles_y as i32;
    args.aux2 = kch as i32;
    args.aux3 = kcw as i32;
    Ok(Some(Plan {
        launches: vec![Launch {
            kernel,
            grid: (
                planes.div_ceil(packed) as u32,
                tiles_y as u32,
                tiles_x as u32,
            ),
            block: (tx as u32, threads_y as u32, packed as u32),
            shared_bytes: (smem1 * packed) as u32,
            args,
        }],
        workspace_bytes: 0,
        gemm: None,
    }))
}
