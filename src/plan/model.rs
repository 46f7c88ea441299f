//! RepLKNet's own kernels (`kernels/lk_model.cu`): element-wise epilogues, the head's pooling
//! and the stem's dense conv. Each planner returns one launch with its pointers left 0.

use super::launch::{flat_launch, strided_launch, to_i32, DwArgs, Family, KernelId, Launch};
use crate::dtype::DType;
use crate::error::{Error, Result};

/// The activation a model kernel applies (`aux0` of `lk_bias_act` and `lk_dense_conv`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ModelAct {
    None = 0,
    Relu = 1,
    /// Exact GELU: 0.5 x (1 + erf(x / sqrt 2)).
    Gelu = 2,
}

/// NCHW dims as the kernels' 32-bit fields, checking that the element count fits 64 bits.
fn model_dims(n: usize, c: usize, h: usize, w: usize) -> Result<(DwArgs, usize)> {
    let total = n
        .checked_mul(c)
        .and_then(|v| v.checked_mul(h))
        .and_then(|v| v.checked_mul(w))
        .filter(|&v| v <= i64::MAX as usize / 2)
        .ok_or_else(|| Error::Overflow(format!("tensor {n}x{c}x{h}x{w}")))?;
    let args = DwArgs {
        n: to_i32("batch N", n)?,
        c: to_i32("channels C", c)?,
        h: to_i32("height H", h)?,
        w: to_i32("width W", w)?,
        ..DwArgs::default()
    };
    Ok((args, total))
}

/// `lk_bias_act_<t>` over an `[n, c, h, w]` tensor: `y = act(x + bias[c]) + res` (bind in0 = x,
/// bias, in1 = res, out = y; bias and res may be 0). Pointers are left 0.
pub fn bias_act_launch(dtype: DType, [n, c, h, w]: [usize; 4], act: ModelAct) -> Result<Launch> {
    let (mut args, total) = model_dims(n, c, h, w)?;
    args.aux0 = act as i32;
    Ok(strided_launch(
        KernelId::new(Family::BiasAct, dtype),
        total,
        args,
    ))
}

/// `lk_affine_<t>`: `y = x * scale[c] + shift[c]` (bind in0 = x, in1 = scale, bias = shift,
/// out = y; scale and shift may be 0).
pub fn affine_launch(dtype: DType, [n, c, h, w]: [usize; 4]) -> Result<Launch> {
    let (args, total) = model_dims(n, c, h, w)?;
    Ok(strided_launch(
        KernelId::new(Family::Affine, dtype),
        total,
        args,
    ))
}

/// `lk_avgpool_<t>`: per plane `mean * scale[c] + shift[c]` into `[n, c]`, or `[c, n]` with
/// `transposed` (bind in0 = x, in1 = scale, bias = shift, out).
pub fn avgpool_launch(dtype: DType, [n, c, h, w]: [usize; 4], transposed: bool) -> Result<Launch> {
    let (mut args, _) = model_dims(n, c, h, w)?;
    args.aux1 = transposed as i32;
    flat_launch(KernelId::new(Family::Avgpool, dtype), n * c, args)
}

/// A dense `k x k` convolution (stride, padding, dilation 1) to `cout` channels.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct DenseConvShape {
    pub cout: usize,
    pub k: usize,
    pub stride: usize,
    pub pad: usize,
}

impl DenseConvShape {
    /// Output (OH, OW) for an input of (H, W).
    pub fn out_hw(&self, h: usize, w: usize) -> Result<(usize, usize)> {
        let o = |v: usize, what: &str| -> Result<usize> {
            let padded = v + 2 * self.pad;
            if self.k == 0 || self.stride == 0 || padded < self.k {
                return Err(Error::EmptyOutput(format!(
                    "dense conv: input {what} {v} (padding {}) is smaller than the {}x{} kernel",
                    self.pad, self.k, self.k
                )));
            }
            Ok((padded - self.k) / self.stride + 1)
        };
        Ok((o(h, "height")?, o(w, "width")?))
    }
}

/// `lk_dense_conv_<t>`: a dense conv with bias and activation, `[n, cin, h, w]` ->
/// `[n, cout, oh, ow]` (bind in0 = x, in1 = w `[cout, cin, k, k]`, bias, out = y).
pub fn dense_conv_launch(
    dtype: DType,
    [n, cin, h, w]: [usize; 4],
    conv: DenseConvShape,
    act: ModelAct,
) -> Result<Launch> {
    let (oh, ow) = conv.out_hw(h, w)?;
    let (mut args, _) = model_dims(n, cin, h, w)?;
    let (_, total) = model_dims(n, conv.cout, oh, ow)?;
    args.oh = to_i32("output height", oh)?;
    args.ow = to_i32("output width", ow)?;
    args.kh = to_i32("kernel", conv.k)?;
    args.kw = args.kh;
    args.sh = to_i32("stride", conv.stride)?;
    args.sw = args.sh;
    args.pad_top = to_i32("padding", conv.pad)?;
    args.pad_left = args.pad_top;
    args.dh = 1;
    args.dw = 1;
    args.aux0 = act as i32;
    args.aux1 = to_i32("output channels", conv.cout)?;
    flat_launch(KernelId::new(Family::DenseConv, dtype), total, args)
}
