//! Baseline: im2col + GEMM, per (n, c) plane. The patch matrix P [OH*OW x KH*KW] holds the input
//! value each output reads for each tap (zero outside the image); then
//! forward y = P w, weight gradient dw = P^T dy, data gradient dP = dy w^T folded back (col2im).
//! GEMMs by `cpu::gemm` (single-threaded per plane; planes run in parallel).

use rayon::prelude::*;

use super::gemm::sgemm;
use crate::conv::{ConvShape, DwConv2d};
use crate::dtype::Element;
use crate::error::{Error, Result};
use crate::tensor::{checked_numel, try_grow, try_with_capacity, Tensor};

/// For each output position and tap, the flat input index it reads (None = padding; a plane
/// holds at most 2^31 elements, so u32 holds it). The table grows with OH*OW*KH*KW: fallible.
fn patch_indices(conv: &DwConv2d, s: &ConvShape) -> Result<Vec<Option<u32>>> {
    const WHAT: &str = "the im2col patch index table";
    let (kh, kw) = conv.kernel;
    let entry = std::mem::size_of::<Option<u32>>();
    // (the byte count checked too: an entry count that fits but whose bytes do not is an overflow)
    let bytes =
        checked_numel(&[s.oh, s.ow, kh, kw, entry]).map_err(|_| Error::Overflow(WHAT.into()))?;
    let mut idx = try_with_capacity(bytes / entry, WHAT)?;
    for oy in 0..s.oh {
        for ox in 0..s.ow {
            for ky in 0..kh {
                let iy = (oy * conv.stride.0 + ky * conv.dilation.0) as isize
                    - conv.padding.top as isize;
                for kx in 0..kw {
                    let ix = (ox * conv.stride.1 + kx * conv.dilation.1) as isize
                        - conv.padding.left as isize;
                    let inside = iy >= 0 && iy < s.h as isize && ix >= 0 && ix < s.w as isize;
                    idx.push(inside.then(|| (iy as usize * s.w + ix as usize) as u32));
                }
            }
        }
    }
    Ok(idx)
}

const PATCH_MATRIX: &str = "an im2col patch matrix";

fn im2col(idx: &[Option<u32>], plane: &[f32], cols: &mut [f32]) {
    for (c, i) in cols.iter_mut().zip(idx) {
        *c = i.map_or(0.0, |i| plane[i as usize]);
    }
}

/// Forward via im2col + GEMM.
pub fn forward<T: Element>(
    conv: &DwConv2d,
    x: &Tensor<T>,
    w: &Tensor<T>,
    bias: Option<&Tensor<T>>,
) -> Result<Tensor<T>> {
    super::wrap::tensor_forward(conv, x, w, bias, forward_kernel)
}

fn forward_kernel(
    conv: &DwConv2d,
    s: &ConvShape,
    xf: &[f32],
    wf: &[f32],
    b: Option<&[f32]>,
    y: &mut [f32],
) -> Result<()> {
    let kk = conv.kernel.0 * conv.kernel.1;
    let idx = patch_indices(conv, s)?;
    y.par_chunks_mut(s.oh * s.ow)
        .enumerate()
        .try_for_each_init(Vec::new, |cols, (plane, out)| -> Result<()> {
            let c = plane % s.c;
            try_grow(cols, idx.len(), 0.0, PATCH_MATRIX)?;
            im2col(&idx, &xf[plane * s.h * s.w..(plane + 1) * s.h * s.w], cols);
            sgemm(
                s.oh * s.ow,
                kk,
                1,
                cols,
                false,
                &wf[c * kk..(c + 1) * kk],
                0.0,
                out,
            );
            if let Some(b) = b {
                out.iter_mut().for_each(|v| *v += b[c]);
            }
            Ok(())
        })?;
    // The patch matrix holds zeros for padding: 0 * a NaN/Inf weight gives a spurious NaN.
    super::naive::repair_forward(conv, s, xf, wf, b, y);
    Ok(())
}

/// Weight gradient via im2col + GEMM (dw_c = sum over n of P^T dy), batch reduced in order.
pub fn weight_grad<T: Element>(
    conv: &DwConv2d,
    x: &Tensor<T>,
    dy: &Tensor<T>,
) -> Result<Tensor<T>> {
    super::wrap::tensor_weight_grad(conv, x, dy, weight_grad_kernel)
}

fn weight_grad_kernel(
    conv: &DwConv2d,
    s: &ConvShape,
    xf: &[f32],
    dyf: &[f32],
    dw: &mut [f32],
) -> Result<()> {
    let kk = conv.kernel.0 * conv.kernel.1;
    let idx = patch_indices(conv, s)?;
    // Per thread: the patch matrix, one plane's dw and the f64 sum over the batch.
    let scratch = || (Vec::new(), Vec::new(), Vec::new());
    dw.par_chunks_mut(kk).enumerate().try_for_each_init(
        scratch,
        |(cols, part, total), (c, out)| -> Result<()> {
            try_grow(cols, idx.len(), 0.0f32, PATCH_MATRIX)?;
            try_grow(part, kk, 0.0f32, "an im2col weight-gradient plane")?;
            try_grow(total, kk, 0.0f64, "an im2col weight-gradient plane")?;
            total.fill(0.0);
            for n in 0..s.n {
                let plane = n * s.c + c;
                im2col(&idx, &xf[plane * s.h * s.w..(plane + 1) * s.h * s.w], cols);
                sgemm(
                    kk,
                    s.oh * s.ow,
                    1,
                    cols,
                    true,
                    &dyf[plane * s.oh * s.ow..(plane + 1) * s.oh * s.ow],
                    0.0,
                    part,
                );
                total
                    .iter_mut()
                    .zip(part.iter())
                    .for_each(|(t, p)| *t += *p as f64);
            }
            out.iter_mut()
                .zip(total.iter())
                .for_each(|(o, t)| *o = *t as f32);
            Ok(())
        },
    )?;
    // Padding zeros of the patch matrix times a NaN/Inf in dy give spurious NaNs.
    super::naive::repair_weight_grad(conv, s, xf, dyf, dw);
    Ok(())
}

/// Data gradient via GEMM (dP = dy w^T) and col2im.
pub fn data_grad<T: Element>(
    conv: &DwConv2d,
    dy: &Tensor<T>,
    w: &Tensor<T>,
    input_hw: (usize, usize),
) -> Result<Tensor<T>> {
    super::wrap::tensor_data_grad(conv, dy, w, input_hw, data_grad_kernel)
}

fn data_grad_kernel(
    conv: &DwConv2d,
    s: &ConvShape,
    dyf: &[f32],
    wf: &[f32],
    dx: &mut [f32],
) -> Result<()> {
    let kk = conv.kernel.0 * conv.kernel.1;
    let idx = patch_indices(conv, s)?;
    dx.par_chunks_mut(s.h * s.w).enumerate().try_for_each_init(
        Vec::new,
        |cols, (plane, out)| -> Result<()> {
            let c = plane % s.c;
            try_grow(cols, idx.len(), 0.0, PATCH_MATRIX)?;
            sgemm(
                s.oh * s.ow,
                1,
                kk,
                &dyf[plane * s.oh * s.ow..(plane + 1) * s.oh * s.ow],
                false,
                &wf[c * kk..(c + 1) * kk],
                0.0,
                cols,
            );
            out.fill(0.0);
            for (v, i) in cols.iter().zip(&idx) {
                if let Some(i) = i {
                    out[*i as usize] += v;
                }
            }
            Ok(())
        },
    )
}
