//! The oracle: the plain formulas with f64 accumulation, parallel over (n, c) planes.
//! Kept deliberately simple; every other implementation is tested against it.

use rayon::prelude::*;

use crate::conv::{ConvShape, DwConv2d};
use crate::dtype::Element;
use crate::error::Result;
use crate::tensor::Tensor;

/// Input coordinate of output `o` and tap `t` along one axis, if it lies inside the image.
#[inline]
fn input_coord(
    o: usize,
    t: usize,
    stride: usize,
    dil: usize,
    pad: usize,
    len: usize,
) -> Option<usize> {
    let i = (o * stride + t * dil) as isize - pad as isize;
    (i >= 0 && (i as usize) < len).then_some(i as usize)
}

/// Forward: y = conv(x, w) + bias.
pub fn forward<T: Element>(
    conv: &DwConv2d,
    x: &Tensor<T>,
    w: &Tensor<T>,
    bias: Option<&Tensor<T>>,
) -> Result<Tensor<T>> {
    let s = conv.check_forward(x.shape(), w.shape(), bias.map(|b| b.shape()))?;
    let (kh, kw) = conv.kernel;
    let mut y = Tensor::<T>::zeros(&s.output_dims())?;
    y.data_mut()
        .par_chunks_mut(s.oh * s.ow)
        .enumerate()
        .for_each(|(plane, out)| {
            let c = plane % s.c;
            let xp = &x.data()[plane * s.h * s.w..(plane + 1) * s.h * s.w];
            let wp = &w.data()[c * kh * kw..(c + 1) * kh * kw];
            let b = bias.map_or(0.0, |b| b.data()[c].to_f64());
            for oy in 0..s.oh {
                for ox in 0..s.ow {
                    let mut acc = 0.0f64;
                    for ky in 0..kh {
                        let Some(iy) = input_coord(
                            oy,
                            ky,
                            conv.stride.0,
                            conv.dilation.0,
                            conv.padding.top,
                            s.h,
                        ) else {
                            continue;
                        };
                        for kx in 0..kw {
                            let Some(ix) = input_coord(
                                ox,
                                kx,
                                conv.stride.1,
                                conv.dilation.1,
                                conv.padding.left,
                                s.w,
                            ) else {
                                continue;
                            };
                            acc += xp[iy * s.w + ix].to_f64() * wp[ky * kw + kx].to_f64();
                        }
                    }
                    out[oy * s.ow + ox] = T::from_f64(acc + b);
                }
            }
        });
    Ok(y)
}

/// Data gradient: dx[iy, ix] = sum of dy[oy, ox] * w[ky, kx] over every (output, tap) that read x[iy, ix].
pub fn data_grad<T: Element>(
    conv: &DwConv2d,
    dy: &Tensor<T>,
    w: &Tensor<T>,
    input_hw: (usize, usize),
) -> Result<Tensor<T>> {
    let s = conv.check_data_grad(dy.shape(), w.shape(), input_hw)?;
    let mut dx = Tensor::<T>::zeros(&s.input_dims())?;
    dx.data_mut()
        .par_chunks_mut(s.h * s.w)
        .enumerate()
        .for_each(|(plane, out)| {
            let acc = scatter_plane(conv, &s, plane, dy.data(), w.data());
            for (o, a) in out.iter_mut().zip(acc) {
                *o = T::from_f64(a);
            }
        });
    Ok(dx)
}

fn scatter_plane<T: Element>(
    conv: &DwConv2d,
    s: &ConvShape,
    plane: usize,
    dy: &[T],
    w: &[T],
) -> Vec<f64> {
    let (kh, kw) = conv.kernel;
    let c = plane % s.c;
    let dyp = &dy[plane * s.oh * s.ow..(plane + 1) * s.oh * s.ow];
    let wp = &w[c * kh * kw..(c + 1) * kh * kw];
    let mut acc = vec![0.0f64; s.h * s.w];
    for oy in 0..s.oh {
        for ox in 0..s.ow {
            let g = dyp[oy * s.ow + ox].to_f64();
            for ky in 0..kh {
                let Some(iy) = input_coord(
                    oy,
                    ky,
                    conv.stride.0,
                    conv.dilation.0,
                    conv.padding.top,
                    s.h,
                ) else {
                    continue;
                };
                for kx in 0..kw {
                    if let Some(ix) = input_coord(
                        ox,
                        kx,
                        conv.stride.1,
                        conv.dilation.1,
                        conv.padding.left,
                        s.w,
                    ) {
                        acc[iy * s.w + ix] += g * wp[ky * kw + kx].to_f64();
                    }
                }
            }
        }
    }
    acc
}

/// Weight gradient: dw[c, ky, kx] = sum over n, oy, ox of dy[n,c,oy,ox] * x[n,c,iy,ix]. Shape [C,1,KH,KW].
pub fn weight_grad<T: Element>(
    conv: &DwConv2d,
    x: &Tensor<T>,
    dy: &Tensor<T>,
) -> Result<Tensor<T>> {
    let s = conv.check_weight_grad(x.shape(), dy.shape())?;
    let (kh, kw) = conv.kernel;
    let mut dw = Tensor::<T>::zeros(&conv.weight_dims(s.c))?;
    dw.data_mut()
        .par_chunks_mut(kh * kw)
        .enumerate()
        .for_each(|(c, out)| {
            let mut acc = vec![0.0f64; kh * kw];
            for n in 0..s.n {
                let plane = n * s.c + c;
                let xp = &x.data()[plane * s.h * s.w..(plane + 1) * s.h * s.w];
                let dyp = &dy.data()[plane * s.oh * s.ow..(plane + 1) * s.oh * s.ow];
                for oy in 0..s.oh {
                    for ox in 0..s.ow {
                        let g = dyp[oy * s.ow + ox].to_f64();
                        for ky in 0..kh {
                            let Some(iy) = input_coord(
                                oy,
                                ky,
                                conv.stride.0,
                                conv.dilation.0,
                                conv.padding.top,
                                s.h,
                            ) else {
                                continue;
                            };
                            for kx in 0..kw {
                                if let Some(ix) = input_coord(
                                    ox,
                                    kx,
                                    conv.stride.1,
                                    conv.dilation.1,
                                    conv.padding.left,
                                    s.w,
                                ) {
                                    acc[ky * kw + kx] += g * xp[iy * s.w + ix].to_f64();
                                }
                            }
                        }
                    }
                }
            }
            for (o, a) in out.iter_mut().zip(acc) {
                *o = T::from_f64(a);
            }
        });
    Ok(dw)
}
