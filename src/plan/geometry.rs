//! Tile geometry shared with the kernels: the shared-memory layout of the tiled fwd/dgrad
//! kernel and of the weight-gradient kernels. The CUDA side computes the same quantities in
//! `kernels/lk_common.cuh`; `tests/sim.rs` checks that both agree over a sweep of shapes
//! (through the simulator library, which compiles that header for the host).

/// Outputs per thread along x in the tiled kernels (`lk::RX`).
pub const RX: usize = 8;
/// Shared memory per block the planner aims for (no opt-in needed below it).
pub const SHARED_TARGET_BYTES: usize = 48 * 1024;
/// The hardware limit on dynamic shared memory per block (sm_80+: 227 KB).
pub const SHARED_LIMIT_BYTES: usize = 227 * 1024;
/// Threads per block of `lk_wgrad_strided` (`WG_THREADS`).
pub const WGRAD_STRIDED_THREADS: usize = 256;
/// Filter taps per thread of `lk_wgrad_strided` (`WG_TC`).
pub const WGRAD_STRIDED_TAPS: usize = 8;

pub(crate) fn round4(v: usize) -> usize {
    v.div_ceil(4) * 4
}

/// Row stride (floats) of the tiled kernel's input tile: a multiple of 4 (16-byte loads) that is
/// 4 more than a multiple of 8, so that the rows of a warp start on different shared-memory
/// banks (`lk::tile_ld`).
pub fn tile_ld(tw: usize, kcw: usize) -> usize {
    let ld = tw + round4(kcw);
    if ld.is_multiple_of(8) {
        ld + 4
    } else {
        ld
    }
}

/// Shared bytes of one plane of the tiled fwd/dgrad kernel: the filter chunk (`kch` rows of
/// `round4(kcw)`) and the input tile (`th + kch - 1` rows of `tile_ld`) (`lk::tiled_smem_floats`).
pub fn tiled_smem(th: usize, tw: usize, kch: usize, kcw: usize) -> usize {
    4 * (kch * round4(kcw) + (th + kch - 1) * tile_ld(tw, kcw))
}

/// Shared bytes of the weight-gradient partial kernel (`lk::wgrad_smem_floats`).
pub fn wgrad_smem(th: usize, tw: usize, kh: usize, kw: usize, threads: usize) -> usize {
    let kwb = kw.div_ceil(RX);
    let twp = tw.div_ceil(RX) * RX;
    4 * ((th + kh - 1) * (kwb * RX + twp + RX) + th * twp + threads * RX)
}

/// Threads per row group and row groups of the weight-gradient partial kernel: one thread per
/// (filter row, 8 filter columns) unit, groups filling up to 256 threads.
pub fn wgrad_threads(th: usize, kh: usize, kw: usize) -> (usize, usize) {
    let units = kh * kw.div_ceil(RX);
    if units <= 256 {
        let g = (256 / units).min(th).max(1);
        (units, g)
    } else {
        (256, 1)
    }
}
