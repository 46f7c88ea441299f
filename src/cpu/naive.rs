//! Baseline: one loop iteration per output element, no blocking, f32 accumulation (what a
//! generic kernel does). Also the fast path's fallback for strides and dilations other than 1.

use rayon::prelude::*;

use crate::conv::{ConvShape, DwConv2d};
use crate::dtype::Element;
use crate::error::Result;
use crate::tensor::Tensor;
// ---------------------------------------------------------------------------------------------

pub(crate) fn forward_plain(
    conv: &DwConv2d,
    s: &ConvShape,
    x: &[f32],
    w: &[f32],
    bias: Option<&[f32]>,
    y: &mut [f32],
) {
    let (kh, kw) = conv.kernel;
    let (sh, sw) = conv.stride;
    let (dh, dw) = conv.dilation;
    let (top, left) = (conv.padding.top as isize, conv.padding.left as isize);
    y.par_chunks_mut(s.oh * s.ow)
        .enumerate()
        .for_each(|(plane, out)| {
            let c = plane % s.c;
            let xp = &x[plane * s.h * s.w..(plane + 1) * s.h * s.w];
            let wc = &w[c * kh * kw..(c + 1) * kh * kw];
            let b = bias.map_or(0.0, |b| b[c]);
            for oy in 0..s.oh {
                for ox in 0..s.ow {
                    let mut acc = b;
                    for ky in 0..kh {
                        let iy = (oy * sh + ky * dh) as isize - top;
                        if iy < 0 || iy >= s.h as isize {
                            continue;
                        }
                        let xrow = &xp[iy as usize * s.w..(iy as usize + 1) * s.w];
                        for kx in 0..kw {
                            let ix = (ox * sw + kx * dw) as isize - left;
                            if ix >= 0 && ix < s.w as isize {
                                acc += xrow[ix as usize] * wc[ky * kw + kx];
                            }
                        }
                    }
                    out[oy * s.ow + ox] = acc;
                }
            }
        });
}

pub(crate) fn data_grad_plain(
    conv: &DwConv2d,
    s: &ConvShape,
    dy: &[f32],
    w: &[f32],
    dx: &mut [f32],
) {
    let (kh, kw) = conv.kernel;
    let (sh, sw) = conv.stride;
    let (dh, dw) = conv.dilation;
    let (top, left) = (conv.padding.top, conv.padding.left);
    dx.par_chunks_mut(s.h * s.w)
        .enumerate()
        .for_each(|(plane, out)| {
            let c = plane % s.c;
            let g = &dy[plane * s.oh * s.ow..(plane + 1) * s.oh * s.ow];
            let wc = &w[c * kh * kw..(c + 1) * kh * kw];
            for iy in 0..s.h {
                for ix in 0..s.w {
                    // Gather: every (oy, ky) with oy*sh + ky*dh = iy + top.
                    let mut acc = 0.0f32;
                    for ky in 0..kh {
                        let ty = iy + top;
                        if ty < ky * dh || (ty - ky * dh) % sh != 0 {
                            continue;
                        }
                        let oy = (ty - ky * dh) / sh;
                        if oy >= s.oh {
                            continue;
                        }
                        for kx in 0..kw {
                            let tx = ix + left;
                            if tx < kx * dw || (tx - kx * dw) % sw != 0 {
                                continue;
                            }
                            let ox = (tx - kx * dw) / sw;
                            if ox < s.ow {
                                acc += g[oy * s.ow + ox] * wc[ky * kw + kx];
                            }
                        }
                    }
                    out[iy * s.w + ix] = acc;
                }
            }
        });
}

/// Weight gradient of one plane for every tap, by a plain loop (any stride and dilation).
fn weight_grad_plane_strided(
    conv: &DwConv2d,
    s: &ConvShape,
    x: &[f32],
    dy: &[f32],
    acc: &mut [f32],
) {
    let (kh, kw) = conv.kernel;
    let (sh, sw) = conv.stride;
    let (dh, dw) = conv.dilation;
    let (top, left) = (conv.padding.top as isize, conv.padding.left as isize);
    for ky in 0..kh {
        for kx in 0..kw {
            let mut sum = 0.0f32;
            for oy in 0..s.oh {
                let iy = (oy * sh + ky * dh) as isize - top;
                if iy < 0 || iy >= s.h as isize {
                    continue;
                }
                for ox in 0..s.ow {
                    let ix = (ox * sw + kx * dw) as isize - left;
                    if ix >= 0 && ix < s.w as isize {
                        sum += dy[oy * s.ow + ox] * x[iy as usize * s.w + ix as usize];
                    }
                }
            }
            acc[ky * kw + kx] = sum;
        }
    }
}

/// Weight gradient by plain loops, reduced over the batch in a fixed order (deterministic).
pub(crate) fn weight_grad_plain(
    conv: &DwConv2d,
    s: &ConvShape,
    x: &[f32],
    dy: &[f32],
    dw: &mut [f32],
) {
    let (kh, kw) = conv.kernel;
    dw.par_chunks_mut(kh * kw).enumerate().for_each(|(c, out)| {
        let mut total = vec![0.0f64; kh * kw];
        let mut acc = vec![0.0f32; kh * kw];
        for n in 0..s.n {
            let plane = n * s.c + c;
            weight_grad_plane_strided(
                conv,
                s,
                &x[plane * s.h * s.w..(plane + 1) * s.h * s.w],
                &dy[plane * s.oh * s.ow..(plane + 1) * s.oh * s.ow],
                &mut acc,
            );
            for (t, a) in total.iter_mut().zip(&acc) {
                *t += *a as f64;
            }
        }
        for (o, t) in out.iter_mut().zip(total) {
            *o = t as f32;
        }
    });
}

/// Forward by the plain loop.
pub fn forward<T: Element>(
    conv: &DwConv2d,
    x: &Tensor<T>,
    w: &Tensor<T>,
    bias: Option<&Tensor<T>>,
) -> Result<Tensor<T>> {
    super::tensor_forward(conv, x, w, bias, forward_plain)
}

/// Data gradient by the plain gather loop.
pub fn data_grad<T: Element>(
    conv: &DwConv2d,
    dy: &Tensor<T>,
    w: &Tensor<T>,
    input_hw: (usize, usize),
) -> Result<Tensor<T>> {
    super::tensor_data_grad(conv, dy, w, input_hw, data_grad_plain)
}

/// Weight gradient by plain loops.
pub fn weight_grad<T: Element>(
    conv: &DwConv2d,
    x: &Tensor<T>,
    dy: &Tensor<T>,
) -> Result<Tensor<T>> {
    super::tensor_weight_grad(conv, x, dy, weight_grad_plain)
}
