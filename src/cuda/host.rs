//! Host-tensor convenience entry points (the CLI's `--device cuda` and the device-generic
//! tests): check the shapes, copy the inputs to GPU `ordinal`, run on a new stream, copy the
//! result back and synchronise.
//!
//! The host tensors are converted to the matching device element type (f32, f16 or bf16 by
//! `T::DTYPE`), which is exact for the crate's element types.

use half::{bf16, f16};

use super::device::CudaDevice;
use super::tensor::{CudaElement, DeviceTensor};
use super::{kernels_compiled, ops, NO_KERNELS};
use crate::conv::DwConv2d;
use crate::device::Impl;
use crate::dtype::{DType, Element};
use crate::error::{Error, Result};
use crate::tensor::Tensor;

/// Fails without kernels or with the CPU-only implementation (before the driver is touched).
fn preflight(imp: Impl) -> Result<()> {
    if imp == Impl::Reference {
        return Err(Error::Unsupported(
            "the f64 reference runs on the CPU only (use fast, naive or im2col on cuda)".into(),
        ));
    }
    if !kernels_compiled() {
        return Err(Error::CudaUnavailable(NO_KERNELS.into()));
    }
    Ok(())
}

/// Runs `f` with the tensors converted to the device element type of `T::DTYPE`.
macro_rules! dispatch {
    ($T:ty, $f:ident, ($($arg:expr),*), [$($t:expr),*], $opt:expr) => {
        match <$T as Element>::DTYPE {
            DType::F32 => $f::<f32>($($arg,)* $(&$t.cast::<f32>(),)* $opt.map(|b| b.cast::<f32>()).as_ref())
                .map(|t| t.cast::<$T>()),
            DType::F16 => $f::<f16>($($arg,)* $(&$t.cast::<f16>(),)* $opt.map(|b| b.cast::<f16>()).as_ref())
                .map(|t| t.cast::<$T>()),
            DType::Bf16 => $f::<bf16>($($arg,)* $(&$t.cast::<bf16>(),)* $opt.map(|b| b.cast::<bf16>()).as_ref())
                .map(|t| t.cast::<$T>()),
        }
    };
}

/// Forward on GPU `ordinal`: `y = conv(x, w) + bias`.
pub fn forward<T: Element>(
    ordinal: usize,
    imp: Impl,
    conv: &DwConv2d,
    x: &Tensor<T>,
    w: &Tensor<T>,
    bias: Option<&Tensor<T>>,
) -> Result<Tensor<T>> {
    conv.check_forward(x.shape(), w.shape(), bias.map(|b| b.shape()))?;
    preflight(imp)?;
    dispatch!(T, forward_typed, (ordinal, imp, conv), [x, w], bias)
}

/// Data gradient on GPU `ordinal`: `dx` for an input of `input_hw`.
pub fn data_grad<T: Element>(
    ordinal: usize,
    imp: Impl,
    conv: &DwConv2d,
    dy: &Tensor<T>,
    w: &Tensor<T>,
    input_hw: (usize, usize),
) -> Result<Tensor<T>> {
    conv.check_data_grad(dy.shape(), w.shape(), input_hw)?;
    preflight(imp)?;
    dispatch!(
        T,
        data_grad_typed,
        (ordinal, imp, conv, input_hw),
        [dy, w],
        None::<&Tensor<T>>
    )
}

/// Weight gradient on GPU `ordinal`: `dw` `[C, 1, KH, KW]`.
pub fn weight_grad<T: Element>(
    ordinal: usize,
    imp: Impl,
    conv: &DwConv2d,
    x: &Tensor<T>,
    dy: &Tensor<T>,
) -> Result<Tensor<T>> {
    conv.check_weight_grad(x.shape(), dy.shape())?;
    preflight(imp)?;
    dispatch!(
        T,
        weight_grad_typed,
        (ordinal, imp, conv),
        [x, dy],
        None::<&Tensor<T>>
    )
}

fn forward_typed<U: CudaElement>(
    ordinal: usize,
    imp: Impl,
    conv: &DwConv2d,
    x: &Tensor<U>,
    w: &Tensor<U>,
    bias: Option<&Tensor<U>>,
) -> Result<Tensor<U>> {
    let shape = conv.check_forward(x.shape(), w.shape(), bias.map(|b| b.shape()))?;
    let dev = CudaDevice::shared(ordinal)?;
    let stream = dev.new_stream()?;
    let dx = DeviceTensor::from_host(&stream, x)?;
    let dw = DeviceTensor::from_host(&stream, w)?;
    let db = bias
        .map(|b| DeviceTensor::from_host(&stream, b))
        .transpose()?;
    let mut y = DeviceTensor::zeros(&stream, &shape.output_dims())?;
    ops::forward(
        &dev,
        &stream,
        imp,
        conv,
        &dx,
        &dw,
        db.as_ref(),
        &mut y,
        None,
    )?;
    finish(&y)
}

fn data_grad_typed<U: CudaElement>(
    ordinal: usize,
    imp: Impl,
    conv: &DwConv2d,
    input_hw: (usize, usize),
    dy: &Tensor<U>,
    w: &Tensor<U>,
    _none: Option<&Tensor<U>>,
) -> Result<Tensor<U>> {
    let shape = conv.check_data_grad(dy.shape(), w.shape(), input_hw)?;
    let dev = CudaDevice::shared(ordinal)?;
    let stream = dev.new_stream()?;
    let ddy = DeviceTensor::from_host(&stream, dy)?;
    let dw = DeviceTensor::from_host(&stream, w)?;
    let mut dx = DeviceTensor::zeros(&stream, &shape.input_dims())?;
    ops::data_grad(&dev, &stream, imp, conv, &ddy, &dw, &mut dx, None)?;
    finish(&dx)
}

fn weight_grad_typed<U: CudaElement>(
    ordinal: usize,
    imp: Impl,
    conv: &DwConv2d,
    x: &Tensor<U>,
    dy: &Tensor<U>,
    _none: Option<&Tensor<U>>,
) -> Result<Tensor<U>> {
    let shape = conv.check_weight_grad(x.shape(), dy.shape())?;
    let dev = CudaDevice::shared(ordinal)?;
    let stream = dev.new_stream()?;
    let dx = DeviceTensor::from_host(&stream, x)?;
    let ddy = DeviceTensor::from_host(&stream, dy)?;
    let mut dw = DeviceTensor::zeros(&stream, &conv.weight_dims(shape.c))?;
    ops::weight_grad(&dev, &stream, imp, conv, &dx, &ddy, &mut dw, None)?;
    finish(&dw)
}

/// Copies the result back (synchronising its stream) and surfaces any error that the
/// driver recorded asynchronously (e.g. a fault in a kernel).
fn finish<U: CudaElement>(t: &DeviceTensor<U>) -> Result<Tensor<U>> {
    let out = t.to_host()?;
    t.stream()
        .context()
        .check_err()
        .map_err(super::driver_err("a queued CUDA operation failed"))?;
    Ok(out)
}
