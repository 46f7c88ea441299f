//! Fast CPU path (stub: being written).
use crate::conv::{ConvShape, DwConv2d};
use crate::dtype::Element;
use crate::error::Result;
use crate::tensor::Tensor;

pub fn forward<T: Element>(
    conv: &DwConv2d,
    x: &Tensor<T>,
    w: &Tensor<T>,
    bias: Option<&Tensor<T>>,
) -> Result<Tensor<T>> {
    super::reference::forward(conv, x, w, bias)
}
pub fn data_grad<T: Element>(
    conv: &DwConv2d,
    dy: &Tensor<T>,
    w: &Tensor<T>,
    input_hw: (usize, usize),
) -> Result<Tensor<T>> {
    super::reference::data_grad(conv, dy, w, input_hw)
}
pub fn weight_grad<T: Element>(
    conv: &DwConv2d,
    x: &Tensor<T>,
    dy: &Tensor<T>,
) -> Result<Tensor<T>> {
    super::reference::weight_grad(conv, x, dy)
}
/// y [N,C,OH,OW] = conv(x [N,C,H,W], w [C,KH,KW]) + bias [C]; `shape` from `conv.resolve`.
pub fn forward_f32_into(
    conv: &DwConv2d,
    shape: &ConvShape,
    x: &[f32],
    w: &[f32],
    bias: Option<&[f32]>,
    y: &mut [f32],
) -> Result<()> {
    let s = shape;
    let xt = Tensor::from_vec(&s.input_dims(), x.to_vec())?;
    let wt = Tensor::from_vec(&conv.weight_dims(s.c), w.to_vec())?;
    let bt = bias
        .map(|b| Tensor::from_vec(&[s.c], b.to_vec()))
        .transpose()?;
    let out = super::reference::forward(conv, &xt, &wt, bt.as_ref())?;
    y.copy_from_slice(out.data());
    Ok(())
}
pub fn data_grad_f32_into(
    conv: &DwConv2d,
    shape: &ConvShape,
    dy: &[f32],
    w: &[f32],
    dx: &mut [f32],
) -> Result<()> {
    let s = shape;
    let dyt = Tensor::from_vec(&s.output_dims(), dy.to_vec())?;
    let wt = Tensor::from_vec(&conv.weight_dims(s.c), w.to_vec())?;
    let out = super::reference::data_grad(conv, &dyt, &wt, (s.h, s.w))?;
    dx.copy_from_slice(out.data());
    Ok(())
}
pub fn weight_grad_f32_into(
    conv: &DwConv2d,
    shape: &ConvShape,
    x: &[f32],
    dy: &[f32],
    dw: &mut [f32],
) -> Result<()> {
    let s = shape;
    let xt = Tensor::from_vec(&s.input_dims(), x.to_vec())?;
    let dyt = Tensor::from_vec(&s.output_dims(), dy.to_vec())?;
    let out = super::reference::weight_grad(conv, &xt, &dyt)?;
    dw.copy_from_slice(out.data());
    Ok(())
}
