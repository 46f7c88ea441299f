//! Baseline: one loop iteration per output element, no blocking, f32 accumulation (what a
//! generic kernel does). Also the fast path's fallback for strides and dilations other than 1.

use rayon::prelude::*;

use crate::conv::{ConvShape, DwConv2d};
use crate::dtype::Element;
use crate::error::Result;
use crate::tensor::Tensor;
// ---------------------------------------------------------------------------------------------

/// The geometry of one correlation, for any stride, dilation and signed padding:
/// `y[oy, ox] = sum of x[oy*sh + ky*dh - top, ox*sw + kx*dw - left] * w[ky, kx]` over the taps
/// whose input lies inside the image (padding contributes nothing, not 0 * w).
#[derive(Clone, Copy, Debug)]
pub(crate) struct Correlation {
    pub kh: usize,
    pub kw: usize,
    pub stride: (usize, usize),
    pub dilation: (usize, usize),
    pub top: isize,
    pub left: isize,
    /// Source plane size.
    pub h: usize,
    pub w: usize,
}

impl Correlation {
    /// The forward pass of `conv` on planes of `s`.
    pub fn forward(conv: &DwConv2d, s: &ConvShape) -> Self {
        Correlation {
            kh: conv.kernel.0,
            kw: conv.kernel.1,
            stride: conv.stride,
            dilation: conv.dilation,
            top: conv.padding.top as isize,
            left: conv.padding.left as isize,
            h: s.h,
            w: s.w,
        }
    }

    /// One output, exactly as defined (f32 accumulation in tap order).
    pub fn point(&self, x: &[f32], w: &[f32], oy: usize, ox: usize) -> f32 {
        let mut acc = 0.0f32;
        for ky in 0..self.kh {
            let iy = (oy * self.stride.0 + ky * self.dilation.0) as isize - self.top;
            if iy < 0 || iy >= self.h as isize {
                continue;
            }
            let xrow = &x[iy as usize * self.w..(iy as usize + 1) * self.w];
            for kx in 0..self.kw {
                let ix = (ox * self.stride.1 + kx * self.dilation.1) as isize - self.left;
                if ix >= 0 && ix < self.w as isize {
                    acc += xrow[ix as usize] * w[ky * self.kw + kx];
                }
            }
        }
        acc
    }
}

/// Replaces every non-finite value of `out` by `exact(index)`.
///
/// The fast kernels read zero padding (of the image, the filter or dy) so that their loops need
/// no bounds checks; a NaN or Inf operand times such a zero gives a NaN that the definition does
/// not have. Such a product only ever adds NaN, so every value the definition makes non-finite is
/// non-finite in the fast result as well: recomputing the non-finite values exactly (rare, and
/// cheap to detect) gives IEEE-correct results without slowing the finite case.
pub(crate) fn repair_nonfinite(out: &mut [f32], exact: impl Fn(usize) -> f32) {
    if out.iter().fold(true, |ok, v| ok & v.is_finite()) {
        return;
    }
    for (i, v) in out.iter_mut().enumerate() {
        if !v.is_finite() {
            *v = exact(i);
        }
    }
}

pub(crate) fn forward_plain(
    conv: &DwConv2d,
    s: &ConvShape,
    x: &[f32],
    w: &[f32],
    bias: Option<&[f32]>,
    y: &mut [f32],
) {
    forward_exact(conv, s, x, w, bias, y, false);
}

/// Repairs the non-finite values of a forward result computed by a kernel that reads padding.
pub(crate) fn repair_forward(
    conv: &DwConv2d,
    s: &ConvShape,
    x: &[f32],
    w: &[f32],
    bias: Option<&[f32]>,
    y: &mut [f32],
) {
    forward_exact(conv, s, x, w, bias, y, true);
}

/// Computes every output exactly, or with `only_nonfinite` only those that are not finite.
fn forward_exact(
    conv: &DwConv2d,
    s: &ConvShape,
    x: &[f32],
    w: &[f32],
    bias: Option<&[f32]>,
    y: &mut [f32],
    only_nonfinite: bool,
) {
    let (kh, kw) = conv.kernel;
    let corr = Correlation::forward(conv, s);
    y.par_chunks_mut(s.oh * s.ow)
        .enumerate()
        .for_each(|(plane, out)| {
            let c = plane % s.c;
            let xp = &x[plane * s.h * s.w..(plane + 1) * s.h * s.w];
            let wc = &w[c * kh * kw..(c + 1) * kh * kw];
            let b = bias.map_or(0.0, |b| b[c]);
            let exact = |i: usize| corr.point(xp, wc, i / s.ow, i % s.ow) + b;
            if only_nonfinite {
                repair_nonfinite(out, exact);
            } else {
                out.iter_mut().enumerate().for_each(|(i, o)| *o = exact(i));
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

/// Weight gradient of one plane for one tap, by a plain loop (any stride and dilation).
fn weight_grad_tap(
    conv: &DwConv2d,
    s: &ConvShape,
    x: &[f32],
    dy: &[f32],
    ky: usize,
    kx: usize,
) -> f32 {
    let (sh, sw) = conv.stride;
    let (dh, dw) = conv.dilation;
    let (top, left) = (conv.padding.top as isize, conv.padding.left as isize);
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
    sum
}

/// Weight gradient of channel `c` for one tap over the whole batch, reduced in batch order.
pub(crate) fn weight_grad_exact(
    conv: &DwConv2d,
    s: &ConvShape,
    x: &[f32],
    dy: &[f32],
    c: usize,
    tap: usize,
) -> f32 {
    let kw = conv.kernel.1;
    let mut total = 0.0f64;
    for n in 0..s.n {
        let plane = n * s.c + c;
        total += weight_grad_tap(
            conv,
            s,
            &x[plane * s.h * s.w..(plane + 1) * s.h * s.w],
            &dy[plane * s.oh * s.ow..(plane + 1) * s.oh * s.ow],
            tap / kw,
            tap % kw,
        ) as f64;
    }
    total as f32
}

/// Repairs the non-finite taps of a weight gradient computed by a kernel that reads padding.
pub(crate) fn repair_weight_grad(
    conv: &DwConv2d,
    s: &ConvShape,
    x: &[f32],
    dy: &[f32],
    dw: &mut [f32],
) {
    let kk = conv.kernel.0 * conv.kernel.1;
    dw.par_chunks_mut(kk).enumerate().for_each(|(c, out)| {
        repair_nonfinite(out, |tap| weight_grad_exact(conv, s, x, dy, c, tap));
    });
}

/// Weight gradient by plain loops, reduced over the batch in a fixed order (deterministic).
pub(crate) fn weight_grad_plain(
    conv: &DwConv2d,
    s: &ConvShape,
    x: &[f32],
    dy: &[f32],
    dw: &mut [f32],
) {
    let kk = conv.kernel.0 * conv.kernel.1;
    dw.par_chunks_mut(kk).enumerate().for_each(|(c, out)| {
        for (tap, o) in out.iter_mut().enumerate() {
            *o = weight_grad_exact(conv, s, x, dy, c, tap);
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
    super::wrap::tensor_forward(conv, x, w, bias, |c, s, x, w, b, y| {
        forward_plain(c, s, x, w, b, y);
        Ok(())
    })
}

/// Data gradient by the plain gather loop.
pub fn data_grad<T: Element>(
    conv: &DwConv2d,
    dy: &Tensor<T>,
    w: &Tensor<T>,
    input_hw: (usize, usize),
) -> Result<Tensor<T>> {
    super::wrap::tensor_data_grad(conv, dy, w, input_hw, |c, s, a, b, out| {
        data_grad_plain(c, s, a, b, out);
        Ok(())
    })
}

/// Weight gradient by plain loops.
pub fn weight_grad<T: Element>(
    conv: &DwConv2d,
    x: &Tensor<T>,
    dy: &Tensor<T>,
) -> Result<Tensor<T>> {
    super::wrap::tensor_weight_grad(conv, x, dy, |c, s, a, b, out| {
        weight_grad_plain(c, s, a, b, out);
        Ok(())
    })
}
