//! [`Problem`]: one pass of a depthwise convolution (op, implementation, storage type,
//! convolution and resolved shape), validated once when it is built. Everything downstream
//! (the planner, the simulator, the CUDA device) takes a `Problem` and checks nothing again.

use crate::conv::{dims4, ConvShape, DwConv2d};
use crate::dtype::DType;
use crate::error::{Error, Result};
use crate::op::{Impl, Op};

/// A validated problem. The fields are private so that every `Problem` went through a
/// constructor: the convolution's parameters are valid, the shape is the one the convolution
/// gives for its input, and every size fits the limits of `ConvShape`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Problem {
    op: Op,
    imp: Impl,
    dtype: DType,
    conv: DwConv2d,
    shape: ConvShape,
}

impl Problem {
    /// A problem from a shape (the raw-pointer entry points, benchmarks, the planner's own
    /// tests): `shape` must be what `conv.resolve(n, c, h, w)` gives.
    pub fn new(
        op: Op,
        imp: Impl,
        dtype: DType,
        conv: &DwConv2d,
        shape: &ConvShape,
    ) -> Result<Self> {
        let s = conv.resolve(shape.n, shape.c, shape.h, shape.w)?;
        if s != *shape {
            return Err(Error::InvalidArgument(format!(
                "shape {shape:?} is inconsistent with the convolution: its output is {}x{}",
                s.oh, s.ow
            )));
        }
        Ok(Self::checked(op, imp, dtype, conv, s))
    }

    /// A problem for input sizes `[n, c, h, w]` (output sizes resolved).
    pub fn for_input(
        op: Op,
        imp: Impl,
        dtype: DType,
        conv: &DwConv2d,
        [n, c, h, w]: [usize; 4],
    ) -> Result<Self> {
        let s = conv.resolve(n, c, h, w)?;
        Ok(Self::checked(op, imp, dtype, conv, s))
    }

    /// A forward problem from tensor shapes: x `[N, C, H, W]`, w `[C, 1, KH, KW]`, bias `[C]`.
    pub fn forward(
        imp: Impl,
        dtype: DType,
        conv: &DwConv2d,
        x: &[usize],
        w: &[usize],
        bias: Option<&[usize]>,
    ) -> Result<Self> {
        let s = conv.check_forward(x, w, bias)?;
        Ok(Self::checked(Op::Forward, imp, dtype, conv, s))
    }

    /// A data-gradient problem: dy `[N, C, OH, OW]` the output of an input of `input_hw`,
    /// w `[C, 1, KH, KW]`.
    pub fn data_grad(
        imp: Impl,
        dtype: DType,
        conv: &DwConv2d,
        dy: &[usize],
        w: &[usize],
        input_hw: (usize, usize),
    ) -> Result<Self> {
        let s = conv.check_data_grad(dy, w, input_hw)?;
        Ok(Self::checked(Op::DataGrad, imp, dtype, conv, s))
    }

    /// A data-gradient problem whose input size is read from the shape of `dx`.
    pub fn data_grad_into(
        imp: Impl,
        dtype: DType,
        conv: &DwConv2d,
        dy: &[usize],
        w: &[usize],
        dx: &[usize],
    ) -> Result<Self> {
        let [_, _, h, wd] = dims4("input gradient dx", dx)?;
        let p = Self::data_grad(imp, dtype, conv, dy, w, (h, wd))?;
        p.check_output("input gradient dx", dx)?;
        Ok(p)
    }

    /// A weight-gradient problem: x `[N, C, H, W]`, dy `[N, C, OH, OW]`.
    pub fn weight_grad(
        imp: Impl,
        dtype: DType,
        conv: &DwConv2d,
        x: &[usize],
        dy: &[usize],
    ) -> Result<Self> {
        let s = conv.check_weight_grad(x, dy)?;
        Ok(Self::checked(Op::WeightGrad, imp, dtype, conv, s))
    }

    fn checked(op: Op, imp: Impl, dtype: DType, conv: &DwConv2d, shape: ConvShape) -> Self {
        Problem {
            op,
            imp,
            dtype,
            conv: *conv,
            shape,
        }
    }

    /// The same problem with another op, implementation or dtype (no re-validation needed:
    /// the convolution and shape do not change).
    pub fn with_op(self, op: Op) -> Self {
        Problem { op, ..self }
    }
    pub fn with_impl(self, imp: Impl) -> Self {
        Problem { imp, ..self }
    }
    pub fn with_dtype(self, dtype: DType) -> Self {
        Problem { dtype, ..self }
    }

    pub fn op(&self) -> Op {
        self.op
    }
    pub fn imp(&self) -> Impl {
        self.imp
    }
    pub fn dtype(&self) -> DType {
        self.dtype
    }
    pub fn conv(&self) -> &DwConv2d {
        &self.conv
    }
    pub fn shape(&self) -> &ConvShape {
        &self.shape
    }

    /// Shapes of the two inputs and the output, in the order the kernels bind them
    /// (fwd: x, w -> y; dgrad: dy, w -> dx; wgrad: x, dy -> dw).
    pub fn operand_dims(&self) -> [[usize; 4]; 3] {
        let s = &self.shape;
        let w = self.conv.weight_dims(s.c);
        match self.op {
            Op::Forward => [s.input_dims(), w, s.output_dims()],
            Op::DataGrad => [s.output_dims(), w, s.input_dims()],
            Op::WeightGrad => [s.input_dims(), s.output_dims(), w],
        }
    }

    /// Shape of the result.
    pub fn output_dims(&self) -> [usize; 4] {
        self.operand_dims()[2]
    }

    /// Elements of the result.
    pub fn output_len(&self) -> usize {
        self.output_dims().iter().product()
    }

    /// Checks a caller-provided output tensor's shape.
    pub fn check_output(&self, what: &str, got: &[usize]) -> Result<()> {
        let expected = self.output_dims();
        if got != expected {
            return Err(Error::shape(what, format!("{expected:?}"), got));
        }
        Ok(())
    }

    /// Nominal FLOPs (2 N C OH OW KH KW).
    pub fn flops(&self) -> f64 {
        self.conv.flops(&self.shape)
    }

    /// FLOPs of the taps inside the image.
    pub fn useful_flops(&self) -> f64 {
        self.conv.useful_flops(&self.shape)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_problem_is_validated_once_when_built() {
        let conv = DwConv2d::new(5, 3);
        let s = conv.resolve(2, 3, 9, 7).unwrap();
        let p = Problem::new(Op::Forward, Impl::Fast, DType::F32, &conv, &s).unwrap();
        assert_eq!(p.output_dims(), [2, 3, 9, 7]);
        assert_eq!(p.with_op(Op::WeightGrad).output_dims(), [3, 1, 5, 3]);
        // a shape the convolution does not give
        let bad = ConvShape { oh: 8, ..s };
        let e = Problem::new(Op::Forward, Impl::Fast, DType::F32, &conv, &bad).unwrap_err();
        assert!(e.to_string().contains("inconsistent"), "{e}");
        // tensor shapes: wrong weight, wrong dx
        assert!(Problem::forward(
            Impl::Fast,
            DType::F32,
            &conv,
            &[2, 3, 9, 7],
            &[3, 1, 3, 5],
            None
        )
        .is_err());
        assert!(Problem::data_grad_into(
            Impl::Fast,
            DType::F32,
            &conv,
            &[2, 3, 9, 7],
            &[3, 1, 5, 3],
            &[2, 3, 9, 8]
        )
        .is_err());
        let p = Problem::data_grad_into(
            Impl::Fast,
            DType::F16,
            &conv,
            &[2, 3, 9, 7],
            &[3, 1, 5, 3],
            &[2, 3, 9, 7],
        )
        .unwrap();
        assert_eq!(p.operand_dims()[0], [2, 3, 9, 7]);
        assert!(p.check_output("dx", &[2, 3, 9, 6]).is_err());
    }
}
