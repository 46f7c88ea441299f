//! The one tensor-level wrapper of the CPU kernels (validate, convert to f32, allocate, convert
//! back), shared by the fast, naive and im2col paths.

use crate::conv::{ConvShape, DwConv2d};
use crate::dtype::Element;
use crate::error::Result;
use crate::tensor::{try_filled, Tensor};

/// An implementation's f32 forward on validated sizes: (conv, shape, x, w, bias, y); it fails
/// only where its own scratch cannot be allocated.
pub(crate) type ForwardKernel =
    fn(&DwConv2d, &ConvShape, &[f32], &[f32], Option<&[f32]>, &mut [f32]) -> Result<()>;
/// An implementation's f32 data gradient (conv, shape, dy, w, dx) or weight gradient
/// (conv, shape, x, dy, dw) on validated sizes.
pub(crate) type GradKernel = fn(&DwConv2d, &ConvShape, &[f32], &[f32], &mut [f32]) -> Result<()>;

/// Converts to f32 unless the data already is f32 (no copy then).
pub(crate) fn as_f32<T: Element>(t: &Tensor<T>) -> std::borrow::Cow<'_, [f32]> {
    match (t as &dyn std::any::Any).downcast_ref::<Tensor<f32>>() {
        Some(v) => std::borrow::Cow::Borrowed(v.data()),
        None => std::borrow::Cow::Owned(t.to_f32_vec()),
    }
}

/// Wraps f32 results as a tensor of T: the buffer itself for f32, a rounded copy otherwise.
pub(crate) fn from_f32<T: Element>(shape: &[usize], v: Vec<f32>) -> Result<Tensor<T>> {
    let boxed: Box<dyn std::any::Any> = Box::new(v);
    match boxed.downcast::<Vec<T>>() {
        Ok(same) => Tensor::from_vec(shape, *same),
        Err(boxed) => {
            let v = boxed
                .downcast::<Vec<f32>>()
                .expect("the box holds the Vec<f32> built above");
            Tensor::from_vec(shape, crate::dtype::from_f32_vec(&v))
        }
    }
}

/// Validates a forward call on tensors of any element type and runs an f32 kernel on it.
pub(crate) fn tensor_forward<T: Element>(
    conv: &DwConv2d,
    x: &Tensor<T>,
    w: &Tensor<T>,
    bias: Option<&Tensor<T>>,
    kernel: ForwardKernel,
) -> Result<Tensor<T>> {
    let s = conv.check_forward(x.shape(), w.shape(), bias.map(|b| b.shape()))?;
    let mut y = try_filled(s.output_len(), 0.0f32, "the output y")?;
    let b = bias.map(as_f32);
    kernel(conv, &s, &as_f32(x), &as_f32(w), b.as_deref(), &mut y)?;
    from_f32(&s.output_dims(), y)
}

/// Validates a data-gradient call and runs an f32 kernel on it.
pub(crate) fn tensor_data_grad<T: Element>(
    conv: &DwConv2d,
    dy: &Tensor<T>,
    w: &Tensor<T>,
    input_hw: (usize, usize),
    kernel: GradKernel,
) -> Result<Tensor<T>> {
    let s = conv.check_data_grad(dy.shape(), w.shape(), input_hw)?;
    let mut dx = try_filled(s.input_len(), 0.0f32, "the data gradient dx")?;
    kernel(conv, &s, &as_f32(dy), &as_f32(w), &mut dx)?;
    from_f32(&s.input_dims(), dx)
}

/// Validates a weight-gradient call and runs an f32 kernel on it.
pub(crate) fn tensor_weight_grad<T: Element>(
    conv: &DwConv2d,
    x: &Tensor<T>,
    dy: &Tensor<T>,
    kernel: GradKernel,
) -> Result<Tensor<T>> {
    let s = conv.check_weight_grad(x.shape(), dy.shape())?;
    let mut dw = try_filled(
        s.c * conv.kernel.0 * conv.kernel.1,
        0.0f32,
        "the weight gradient dw",
    )?;
    kernel(conv, &s, &as_f32(x), &as_f32(dy), &mut dw)?;
    from_f32(&conv.weight_dims(s.c), dw)
}
