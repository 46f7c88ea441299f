//! RepLKNet in deploy form: the re-parameterised layers and their weights (what runs), the
//! activation shape, where a forward pass runs, and what it returns. Both engines run this
//! form: `super::cpu` on the host, `super::gpu` as a device program.

use super::config::ReplknetConfig;
use crate::conv::DwConv2d;
use crate::error::{Error, Result};
use crate::plan::model::DenseConvShape;
use crate::tensor::Tensor;

/// A 1x1 conv with bias: weight `[cout, cin]`.
#[derive(Clone, Debug)]
pub struct Pointwise {
    pub cin: usize,
    pub cout: usize,
    pub w: Vec<f32>,
    pub b: Vec<f32>,
    /// `w` rounded to bf16 and packed: the CPU engine then runs this layer in bf16
    /// ([`DeployModel::into_cpu_bf16`]).
    pub bf16: Option<std::sync::Arc<crate::cpu::bf16::Bf16Weights>>,
}

/// A depthwise KxK conv with bias, padding K/2: weight `[c, k, k]`.
#[derive(Clone, Debug)]
pub struct Depthwise {
    pub c: usize,
    pub k: usize,
    pub stride: usize,
    pub w: Vec<f32>,
    pub b: Vec<f32>,
    /// The CPU engine rounds input and filter to bf16 (f32 sums) ([`DeployModel::into_cpu_bf16`]).
    pub bf16: bool,
}

/// A dense conv with bias: weight `[cout, cin * k * k]`.
#[derive(Clone, Debug)]
pub struct DenseConv {
    pub cin: usize,
    pub cout: usize,
    pub k: usize,
    pub stride: usize,
    pub pad: usize,
    pub w: Vec<f32>,
    pub b: Vec<f32>,
}

/// Per-channel y = scale * x + shift (a folded BN that has no conv to fold into).
#[derive(Clone, Debug)]
pub struct Affine {
    pub scale: Vec<f32>,
    pub shift: Vec<f32>,
}

/// Stem: dense 3x3/2 + ReLU, dw 3x3 + ReLU, 1x1 + ReLU, dw 3x3/2 + ReLU.
#[derive(Clone, Debug)]
pub struct Stem {
    pub conv0: DenseConv,
    pub conv1: Depthwise,
    pub conv2: Pointwise,
    pub conv3: Depthwise,
}

/// `x + pw2(relu(lk(relu(pw1(x)))))` (pre-BN folded into pw1, small kernel into lk).
#[derive(Clone, Debug)]
pub struct RepLkBlock {
    pub pw1: Pointwise,
    pub lk: Depthwise,
    pub pw2: Pointwise,
}

/// `x + pw2(gelu(pw1(x)))` (pre-BN folded into pw1).
#[derive(Clone, Debug)]
pub struct FfnBlock {
    pub pw1: Pointwise,
    pub pw2: Pointwise,
}

#[derive(Clone, Debug)]
pub enum Block {
    RepLk(RepLkBlock),
    Ffn(FfnBlock),
}

#[derive(Clone, Debug)]
pub struct Stage {
    pub blocks: Vec<Block>,
    /// `stages.{s}.norm`, applied to the stage's output in downstream mode.
    pub norm: Option<Affine>,
}

/// 1x1 + ReLU, dw 3x3/2 + ReLU.
#[derive(Clone, Debug)]
pub struct Transition {
    pub pw: Pointwise,
    pub dw: Depthwise,
}

/// BN -> global average pool -> Linear.
#[derive(Clone, Debug)]
pub struct Head {
    pub norm: Affine,
    pub classes: usize,
    /// `[classes, C]`.
    pub w: Vec<f32>,
    pub b: Vec<f32>,
}

/// RepLKNet in deploy form: what runs.
#[derive(Clone, Debug)]
pub struct DeployModel {
    pub config: ReplknetConfig,
    pub stem: Stem,
    pub stages: Vec<Stage>,
    pub transitions: Vec<Transition>,
    pub head: Option<Head>,
}

/// Activation shape (NCHW).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Dims {
    pub n: usize,
    pub c: usize,
    pub h: usize,
    pub w: usize,
}

impl Dims {
    pub fn len(&self) -> usize {
        self.n * self.c * self.h * self.w
    }
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
    pub fn hw(&self) -> usize {
        self.h * self.w
    }
    pub(crate) fn to_vec(self) -> Vec<usize> {
        self.to_array().to_vec()
    }
    pub fn to_array(self) -> [usize; 4] {
        [self.n, self.c, self.h, self.w]
    }
}

/// Where the model runs.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum Backend {
    /// lkconv's fast CPU path.
    #[default]
    Cpu,
    /// The whole forward pass as the device program of `super::gpu` run by the kernel
    /// simulator (slow: small inputs; checks every kernel in the model's shapes, kernels larger
    /// than the feature map and the stride-2 layers included; GEMMs on the host).
    Sim,
    /// The depthwise layers on CUDA GPU `ordinal` through host round trips (a correctness
    /// check of the CUDA kernels inside the model, not a fast GPU model: the 1x1 convs and
    /// everything else stay on the CPU).
    CudaDepthwise(usize),
    /// The whole forward pass resident on CUDA GPU `ordinal` (`super::gpu`).
    Cuda(usize),
}

/// What a forward pass returns.
#[derive(Clone, Debug, Default)]
pub struct Output {
    /// `[N, classes]` when requested.
    pub logits: Option<Tensor<f32>>,
    /// `(stage index, [N, C, H, W])` for each requested stage, in order.
    pub stages: Vec<(usize, Tensor<f32>)>,
}

pub fn dims_of(what: &str, shape: &[usize]) -> Result<Dims> {
    let [n, c, h, w] = crate::conv::dims4(what, shape)?;
    if n == 0 || c == 0 || h == 0 || w == 0 {
        return Err(Error::shape(
            what,
            "[N, C, H, W] with every extent >= 1",
            shape,
        ));
    }
    Ok(Dims { n, c, h, w })
}

impl Depthwise {
    /// The convolution: K x K, stride `stride`, padding K/2.
    pub fn conv(&self) -> DwConv2d {
        DwConv2d::new(self.k, self.k).with_stride(self.stride, self.stride)
    }

    /// Output dims for input `d`.
    pub fn out_dims(&self, d: Dims) -> Result<Dims> {
        let s = self.conv().resolve(d.n, d.c, d.h, d.w)?;
        Ok(Dims {
            h: s.oh,
            w: s.ow,
            ..d
        })
    }
}

impl DenseConv {
    /// The geometry the planner's `lk_dense_conv` launch takes.
    pub fn shape(&self) -> DenseConvShape {
        DenseConvShape {
            cout: self.cout,
            k: self.k,
            stride: self.stride,
            pad: self.pad,
        }
    }

    /// Output (OH, OW) for an input of (H, W).
    pub fn out_hw(&self, h: usize, w: usize) -> Result<(usize, usize)> {
        self.shape().out_hw(h, w)
    }
}

impl DeployModel {
    /// Checks a forward request (input `[N, C_in, H, W]`, stage indices, logits wanted) once,
    /// for both engines, and returns the input's dims.
    pub fn check_request(&self, x: &[usize], indices: &[usize], want_logits: bool) -> Result<Dims> {
        let d = dims_of("input", x)?;
        let cin = self.stem.conv0.cin;
        if d.c != cin {
            return Err(Error::shape("input", format!("[N, {cin}, H, W]"), x));
        }
        let ns = self.stages.len();
        if let Some(&bad) = indices.iter().find(|&&i| i >= ns) {
            return Err(Error::InvalidArgument(format!(
                "out index {bad} is out of range: the model has {ns} stages"
            )));
        }
        if want_logits && self.head.is_none() {
            return Err(Error::Unsupported(
                "the checkpoint has no classification head (norm.* / head.*): request stage outputs with out_indices".into(),
            ));
        }
        Ok(d)
    }
}
