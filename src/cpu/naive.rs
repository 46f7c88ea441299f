//! Baseline: one loop iteration per output element, no blocking (what a generic kernel does).
use crate::conv::DwConv2d;
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
