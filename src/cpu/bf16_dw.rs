//! Depthwise forward, data gradient and weight gradient in bf16: both operands of a pass rounded
//! to bf16 (nearest even), products summed in f32 by the f32 fast path (`direct.rs`).
//!
//! The f32 kernels are bound by FMA throughput, not memory, so reading bf16 and converting on
//! load saves nothing there. A `vdpbf16ps` kernel (AVX-512 BF16: two taps per f32 lane, input
//! rows stored as pairs of adjacent columns, blocked like `direct.rs`) measured 0.3-0.65x the
//! f32 kernel's speed on this project's Xeon, where `vdpbf16ps` issues at half the FMA rate
//! (BENCHMARKS.md, "CPU bf16"; the kernel is in commit 6ee35d5), so it was not kept.

use rayon::prelude::*;

use super::bf16::round_slice;
use crate::conv::{ConvShape, DwConv2d};
use crate::error::Result;

/// y = conv(x, w) + bias with x and w rounded to bf16 and f32 sums, on f32 buffers; `shape`
/// from `conv.resolve`. Bias is added in f32 (not rounded).
pub fn forward_f32_into(
    conv: &DwConv2d,
    shape: &ConvShape,
    x: &[f32],
    w: &[f32],
    bias: Option<&[f32]>,
    y: &mut [f32],
) -> Result<()> {
    with_rounded(x, w, |xr, wr| {
        super::direct::forward_f32_into(conv, shape, xr, wr, bias, y)
    })
}

/// dx from dy and w, both rounded to bf16, f32 sums, on f32 buffers.
pub fn data_grad_f32_into(
    conv: &DwConv2d,
    shape: &ConvShape,
    dy: &[f32],
    w: &[f32],
    dx: &mut [f32],
) -> Result<()> {
    with_rounded(dy, w, |dyr, wr| {
        super::direct::data_grad_f32_into(conv, shape, dyr, wr, dx)
    })
}

/// dw from x and dy, both rounded to bf16, f32 sums (the batch reduced in f64 as by the f32 path,
/// so deterministic), on f32 buffers.
pub fn weight_grad_f32_into(
    conv: &DwConv2d,
    shape: &ConvShape,
    x: &[f32],
    dy: &[f32],
    dw: &mut [f32],
) -> Result<()> {
    with_rounded(x, dy, |xr, dyr| {
        super::direct::weight_grad_f32_into(conv, shape, xr, dyr, dw)
    })
}

thread_local! {
    /// The rounded copies of the last call on this thread, kept so that the next call (the next
    /// layer) reuses their memory instead of faulting in fresh pages.
    static ROUNDED: std::cell::RefCell<(Vec<f32>, Vec<f32>)> = Default::default();
}

/// Runs `f` on bf16-rounded copies of `a` and `b` (same lengths; buffers reused per thread).
fn with_rounded<R>(a: &[f32], b: &[f32], f: impl FnOnce(&[f32], &[f32]) -> R) -> R {
    // Taken out of the cell for the call, so that a nested call finds it empty, not borrowed.
    let (mut ra, mut rb) = ROUNDED.with(|c| std::mem::take(&mut *c.borrow_mut()));
    ra.resize(a.len(), 0.0);
    rb.resize(b.len(), 0.0);
    // Both in parallel chunks: a filter is one chunk, but the weight gradient's dy is a tensor.
    for (src, dst) in [(a, &mut ra), (b, &mut rb)] {
        dst.par_chunks_mut(1 << 16)
            .zip(src.par_chunks(1 << 16))
            .for_each(|(d, s)| round_slice(s, d));
    }
    let r = f(&ra[..a.len()], &rb[..b.len()]);
    ROUNDED.with(|c| *c.borrow_mut() = (ra, rb));
    r
}
