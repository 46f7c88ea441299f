//! The kernel simulator device (stub: being written).
use crate::conv::DwConv2d;
use crate::device::Impl;
use crate::dtype::Element;
use crate::error::{Error, Result};
use crate::tensor::Tensor;

pub fn forward<T: Element>(
    _imp: Impl,
    _conv: &DwConv2d,
    _x: &Tensor<T>,
    _w: &Tensor<T>,
    _bias: Option<&Tensor<T>>,
) -> Result<Tensor<T>> {
    Err(Error::Simulator("not yet available".into()))
}
pub fn data_grad<T: Element>(
    _imp: Impl,
    _conv: &DwConv2d,
    _dy: &Tensor<T>,
    _w: &Tensor<T>,
    _input_hw: (usize, usize),
) -> Result<Tensor<T>> {
    Err(Error::Simulator("not yet available".into()))
}
pub fn weight_grad<T: Element>(
    _imp: Impl,
    _conv: &DwConv2d,
    _x: &Tensor<T>,
    _dy: &Tensor<T>,
) -> Result<Tensor<T>> {
    Err(Error::Simulator("not yet available".into()))
}
