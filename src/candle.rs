//! lkconv as a candle custom op (feature `candle`; its CUDA path: feature `candle-cuda`).
//!
//! [`DepthwiseConv2d`] implements `CustomOp2` (x, w) and `CustomOp3` (x, w, bias) on candle
//! tensors of f32, f16 or bf16, any layout (strided inputs are gathered into contiguous
//! buffers). Its backward pass runs lkconv's data- and weight-gradient passes as two more
//! custom ops, and the bias gradient as a sum, so candle's autograd differentiates it.
//!
//! ```
//! use candle_core::{Device, Tensor, Var};
//! use lkconv::candle::DepthwiseConv2d;
//!
//! let dev = Device::Cpu;
//! let x = Var::from_tensor(&Tensor::randn(0f32, 1., (1, 8, 32, 32), &dev)?)?;
//! let w = Var::from_tensor(&Tensor::randn(0f32, 1., (8, 1, 13, 13), &dev)?)?;
//! let b = Tensor::zeros(8, candle_core::DType::F32, &dev)?;
//! let op = DepthwiseConv2d::new(lkconv::DwConv2d::new(13, 13)); // "same" padding 6
//! let y = op.forward(x.as_tensor(), w.as_tensor(), Some(&b))?;
//! assert_eq!(y.dims(), &[1, 8, 32, 32]);
//! let grads = y.sqr()?.sum_all()?.backward()?;
//! assert_eq!(grads.get(&w).expect("dL/dw").dims(), &[8, 1, 13, 13]);
//! # Ok::<(), candle_core::Error>(())
//! ```

use candle_core::backend::BackendStorage;
use candle_core::{CpuStorage, CustomOp2, CustomOp3, Layout, Shape, Tensor, WithDType};
use half::{bf16, f16};

use crate::conv::DwConv2d;
use crate::dtype::Element;
use crate::{Device, Impl, Op};

/// A depthwise 2-D convolution as a candle op: x [N, C, H, W], w [C, 1, KH, KW], bias [C].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct DepthwiseConv2d {
    pub conv: DwConv2d,
}

impl DepthwiseConv2d {
    pub fn new(conv: DwConv2d) -> Self {
        DepthwiseConv2d { conv }
    }

    /// y = conv(x, w) (+ bias), differentiable with respect to all three.
    pub fn forward(
        &self,
        x: &Tensor,
        w: &Tensor,
        bias: Option<&Tensor>,
    ) -> candle_core::Result<Tensor> {
        match bias {
            None => x.apply_op2(w, *self),
            Some(b) => x.apply_op3(w, b, *self),
        }
    }
}

/// The data gradient as an op on (dy, w), for an input of `input_hw`.
#[derive(Clone, Copy, Debug)]
struct DataGrad {
    conv: DwConv2d,
    input_hw: (usize, usize),
}

/// The weight gradient as an op on (x, dy).
#[derive(Clone, Copy, Debug)]
struct WeightGrad {
    conv: DwConv2d,
}

/// Which pass a custom op runs, with what it needs besides its tensors.
#[derive(Clone, Copy, Debug)]
enum Pass {
    Forward,
    DataGrad((usize, usize)),
    WeightGrad,
}

impl Pass {
    fn op(self) -> Op {
        match self {
            Pass::Forward => Op::Forward,
            Pass::DataGrad(_) => Op::DataGrad,
            Pass::WeightGrad => Op::WeightGrad,
        }
    }
}

fn wrap(e: crate::Error) -> candle_core::Error {
    candle_core::Error::wrap(e)
}

/// The elements of a strided view in row-major order (a copy of the contiguous range when the
/// layout is contiguous).
fn gather<T: Copy>(data: &[T], layout: &Layout) -> Vec<T> {
    if let Some((start, end)) = layout.contiguous_offsets() {
        return data[start..end].to_vec();
    }
    let (dims, strides) = (layout.dims(), layout.stride());
    let len: usize = dims.iter().product();
    let mut out = Vec::with_capacity(len);
    let mut index = vec![0usize; dims.len()];
    let mut offset = layout.start_offset();
    for _ in 0..len {
        out.push(data[offset]);
        // Odometer step: the last axis fastest.
        for axis in (0..dims.len()).rev() {
            index[axis] += 1;
            offset += strides[axis];
            if index[axis] < dims[axis] {
                break;
            }
            offset -= strides[axis] * dims[axis];
            index[axis] = 0;
        }
    }
    out
}

fn tensor<T: Element>(data: &[T], layout: &Layout) -> crate::Result<crate::Tensor<T>> {
    crate::Tensor::from_vec(layout.dims(), gather(data, layout))
}

/// Runs `pass` on the CPU engine over up to three candle buffers of one element type.
fn run_cpu<T: Element + WithDType>(
    conv: &DwConv2d,
    pass: Pass,
    (a, la): (&[T], &Layout),
    (b, lb): (&[T], &Layout),
    bias: Option<(&[T], &Layout)>,
) -> candle_core::Result<(CpuStorage, Shape)> {
    let (a, b) = (tensor(a, la).map_err(wrap)?, tensor(b, lb).map_err(wrap)?);
    let bias = bias.map(|(d, l)| tensor(d, l)).transpose().map_err(wrap)?;
    let out = match pass {
        Pass::Forward => {
            crate::device::forward(Device::Cpu, Impl::Fast, conv, &a, &b, bias.as_ref())
        }
        Pass::DataGrad(hw) => crate::device::data_grad(Device::Cpu, Impl::Fast, conv, &a, &b, hw),
        Pass::WeightGrad => crate::device::weight_grad(Device::Cpu, Impl::Fast, conv, &a, &b),
    }
    .map_err(wrap)?;
    let shape = Shape::from(out.shape());
    Ok((T::to_cpu_storage_owned(out.into_vec()), shape))
}

/// Dispatches on the element type: f32, f16 and bf16, all arguments alike.
fn cpu_pass(
    conv: &DwConv2d,
    pass: Pass,
    a: (&CpuStorage, &Layout),
    b: (&CpuStorage, &Layout),
    bias: Option<(&CpuStorage, &Layout)>,
) -> candle_core::Result<(CpuStorage, Shape)> {
    use CpuStorage as S;
    let name = pass.op().name();
    let mismatch = || {
        candle_core::Error::Msg(format!(
            "lkconv {name}: all tensors must share one dtype (got {:?} and {:?}{})",
            a.0.dtype(),
            b.0.dtype(),
            bias.map_or(String::new(), |(s, _)| format!(" and {:?}", s.dtype()))
        ))
    };
    macro_rules! typed {
        ($variant:ident, $t:ty, $av:ident) => {{
            let S::$variant(bv) = b.0 else {
                return Err(mismatch());
            };
            let bias: Option<(&[$t], &Layout)> = match bias {
                None => None,
                Some((S::$variant(v), l)) => Some((v, l)),
                Some(_) => return Err(mismatch()),
            };
            run_cpu::<$t>(conv, pass, ($av, a.1), (bv, b.1), bias)
        }};
    }
    match a.0 {
        S::F32(av) => typed!(F32, f32, av),
        S::F16(av) => typed!(F16, f16, av),
        S::BF16(av) => typed!(BF16, bf16, av),
        other => Err(candle_core::Error::UnsupportedDTypeForOp(
            other.dtype(),
            "lkconv depthwise conv (f32, f16, bf16)",
        )),
    }
}

/// dL/dx, dL/dw (and dL/dbias) of y = conv(x, w) + bias, through the two gradient ops.
fn backward(
    conv: DwConv2d,
    x: &Tensor,
    w: &Tensor,
    with_bias: bool,
    grad_y: &Tensor,
) -> candle_core::Result<(Tensor, Tensor, Option<Tensor>)> {
    let (_, _, h, wd) = x.dims4()?;
    let dx = grad_y.apply_op2_no_bwd(
        w,
        &DataGrad {
            conv,
            input_hw: (h, wd),
        },
    )?;
    let dw = x.apply_op2_no_bwd(grad_y, &WeightGrad { conv })?;
    let db = with_bias.then(|| grad_y.sum((0, 2, 3))).transpose()?;
    Ok((dx, dw, db))
}

impl CustomOp2 for DepthwiseConv2d {
    fn name(&self) -> &'static str {
        "lkconv-dwconv2d"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        cpu_pass(&self.conv, Pass::Forward, (s1, l1), (s2, l2), None)
    }

    #[cfg(feature = "candle-cuda")]
    fn cuda_fwd(
        &self,
        s1: &candle_core::CudaStorage,
        l1: &Layout,
        s2: &candle_core::CudaStorage,
        l2: &Layout,
    ) -> candle_core::Result<(candle_core::CudaStorage, Shape)> {
        cuda::pass(&self.conv, Pass::Forward, (s1, l1), (s2, l2), None)
    }

    fn bwd(
        &self,
        x: &Tensor,
        w: &Tensor,
        _y: &Tensor,
        grad_y: &Tensor,
    ) -> candle_core::Result<(Option<Tensor>, Option<Tensor>)> {
        let (dx, dw, _) = backward(self.conv, x, w, false, grad_y)?;
        Ok((Some(dx), Some(dw)))
    }
}

impl CustomOp3 for DepthwiseConv2d {
    fn name(&self) -> &'static str {
        "lkconv-dwconv2d-bias"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
        s3: &CpuStorage,
        l3: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        cpu_pass(
            &self.conv,
            Pass::Forward,
            (s1, l1),
            (s2, l2),
            Some((s3, l3)),
        )
    }

    #[cfg(feature = "candle-cuda")]
    fn cuda_fwd(
        &self,
        s1: &candle_core::CudaStorage,
        l1: &Layout,
        s2: &candle_core::CudaStorage,
        l2: &Layout,
        s3: &candle_core::CudaStorage,
        l3: &Layout,
    ) -> candle_core::Result<(candle_core::CudaStorage, Shape)> {
        cuda::pass(
            &self.conv,
            Pass::Forward,
            (s1, l1),
            (s2, l2),
            Some((s3, l3)),
        )
    }

    fn bwd(
        &self,
        x: &Tensor,
        w: &Tensor,
        _bias: &Tensor,
        _y: &Tensor,
        grad_y: &Tensor,
    ) -> candle_core::Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let (dx, dw, db) = backward(self.conv, x, w, true, grad_y)?;
        Ok((Some(dx), Some(dw), db))
    }
}

/// The two gradient ops share one implementation; only the pass differs.
macro_rules! grad_op {
    ($op:ty, $name:literal, $pass:expr) => {
        impl CustomOp2 for $op {
            fn name(&self) -> &'static str {
                $name
            }

            fn cpu_fwd(
                &self,
                s1: &CpuStorage,
                l1: &Layout,
                s2: &CpuStorage,
                l2: &Layout,
            ) -> candle_core::Result<(CpuStorage, Shape)> {
                #[allow(clippy::redundant_closure_call)]
                let pass = ($pass)(self);
                cpu_pass(&self.conv, pass, (s1, l1), (s2, l2), None)
            }

            #[cfg(feature = "candle-cuda")]
            fn cuda_fwd(
                &self,
                s1: &candle_core::CudaStorage,
                l1: &Layout,
                s2: &candle_core::CudaStorage,
                l2: &Layout,
            ) -> candle_core::Result<(candle_core::CudaStorage, Shape)> {
                #[allow(clippy::redundant_closure_call)]
                let pass = ($pass)(self);
                cuda::pass(&self.conv, pass, (s1, l1), (s2, l2), None)
            }
        }
    };
}

grad_op!(DataGrad, "lkconv-dwconv2d-data-grad", |o: &DataGrad| {
    Pass::DataGrad(o.input_hw)
});
grad_op!(
    WeightGrad,
    "lkconv-dwconv2d-weight-grad",
    |_: &WeightGrad| Pass::WeightGrad
);

/// The CUDA path: lkconv's raw-pointer entry points on candle's device buffers and stream.
#[cfg(feature = "candle-cuda")]
mod cuda {
    use candle_core::cuda_backend::cudarc::driver::{CudaSlice, DevicePtr};
    use candle_core::{CudaStorage, Layout, Shape};

    use super::{wrap, Pass};
    use crate::conv::DwConv2d;
    use crate::cuda::{run_raw, workspace_bytes, CudaDevice, CudaElement, CudaExec, RawOperands};
    use crate::problem::Problem;
    use crate::Impl;

    fn contiguous(l: &Layout, what: &str) -> candle_core::Result<usize> {
        match l.contiguous_offsets() {
            Some((start, _)) => Ok(start),
            None => Err(candle_core::Error::Msg(format!(
                "lkconv on CUDA: {what} must be contiguous (call .contiguous() first)"
            ))),
        }
    }

    fn run<T: CudaElement + candle_core::cuda_backend::CudaDType>(
        conv: &DwConv2d,
        pass: Pass,
        a: (&CudaStorage, &Layout),
        b: (&CudaStorage, &Layout),
        bias: Option<(&CudaStorage, &Layout)>,
    ) -> candle_core::Result<(CudaStorage, Shape)> {
        let (dtype, imp) = (T::DTYPE, Impl::Fast);
        let (d0, d1) = (a.1.dims(), b.1.dims());
        let problem = match pass {
            Pass::Forward => Problem::forward(imp, dtype, conv, d0, d1, bias.map(|t| t.1.dims())),
            Pass::DataGrad(hw) => Problem::data_grad(imp, dtype, conv, d0, d1, hw),
            Pass::WeightGrad => Problem::weight_grad(imp, dtype, conv, d0, d1),
        }
        .map_err(wrap)?;
        let cdev = a.0.device().clone();
        let stream = cdev.cuda_stream();
        let dev = CudaDevice::shared(stream.context().ordinal()).map_err(wrap)?;
        let elem = std::mem::size_of::<T>() as u64;
        let ptr = |(s, l): (&CudaStorage, &Layout), what: &str| -> candle_core::Result<u64> {
            let start = contiguous(l, what)? as u64;
            let slice: &CudaSlice<T> = s.as_cuda_slice::<T>()?;
            let (p, _record) = slice.device_ptr(&stream);
            Ok(p + start * elem)
        };
        let ws_len = workspace_bytes(pass.op(), imp, dtype, conv, problem.shape()).map_err(wrap)?;
        let cuda_err = |e| candle_core::Error::Msg(format!("lkconv: allocating: {e}"));
        // SAFETY: device memory the op overwrites completely before anything reads it.
        let out = unsafe { stream.alloc::<T>(problem.output_len()) }.map_err(cuda_err)?;
        // SAFETY: scratch memory the op writes before it reads.
        let ws = unsafe { stream.alloc::<u8>(ws_len.max(16)) }.map_err(cuda_err)?;
        let operands = RawOperands {
            in0: ptr(a, "first input")?,
            in1: ptr(b, "second input")?,
            bias: bias.map(|t| ptr(t, "bias")).transpose()?.unwrap_or(0),
            out: out.device_ptr(&stream).0,
            workspace: if ws_len == 0 {
                0
            } else {
                ws.device_ptr(&stream).0
            },
            workspace_bytes: ws_len,
        };
        let mut ex = CudaExec::on_stream(dev, stream.clone()).map_err(wrap)?;
        // SAFETY: device buffers of candle's context (the executor checked the stream's)
        // holding the tensors the problem describes, alive until the queued work completes
        // (candle frees its storages on this stream); the output and the workspace are fresh
        // allocations that overlap nothing.
        unsafe { run_raw(&mut ex, &problem, operands) }.map_err(wrap)?;
        let dims = problem.output_dims().to_vec();
        Ok((CudaStorage::wrap_cuda_slice(out, cdev), Shape::from(dims)))
    }

    pub(super) fn pass(
        conv: &DwConv2d,
        pass: Pass,
        a: (&CudaStorage, &Layout),
        b: (&CudaStorage, &Layout),
        bias: Option<(&CudaStorage, &Layout)>,
    ) -> candle_core::Result<(CudaStorage, Shape)> {
        use candle_core::DType as D;
        match a.0.dtype() {
            D::F32 => run::<f32>(conv, pass, a, b, bias),
            D::F16 => run::<half::f16>(conv, pass, a, b, bias),
            D::BF16 => run::<half::bf16>(conv, pass, a, b, bias),
            other => Err(candle_core::Error::UnsupportedDTypeForOp(
                other,
                "lkconv depthwise conv (f32, f16, bf16)",
            )),
        }
    }
}
