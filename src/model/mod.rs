//! RepLKNet (CVPR 2022) on lkconv: config inferred from a checkpoint (`config`, `weights`),
//! structural re-parameterisation (`reparam`) into the deploy form (`deploy`), two engines that
//! run it — the CPU engine (`cpu`) and the device program (`gpu`: resident on a CUDA GPU or run
//! by the kernel simulator) — and, here, the one switch between them ([`DeployModel::run`] with
//! a [`Workspace`]'s [`Backend`]).
//!
//! ```no_run
//! use lkconv::model::Replknet;
//! let model = Replknet::load("replknet_31b.safetensors")?; // training or merged form
//! let x = lkconv::Tensor::<f32>::zeros(&[1, 3, 224, 224])?;
//! let logits = model.forward(&x)?; // [1, 1000]
//! # Ok::<(), lkconv::Error>(())
//! ```

mod bf16;
pub mod config;
pub mod cpu;
pub mod deploy;
pub mod gpu;
pub mod imagenet;
pub mod reference;
pub mod reparam;
pub mod weights;

use std::collections::BTreeMap;
use std::path::Path;

pub use config::{Form, ReplknetConfig};
pub use deploy::{Backend, DeployModel, Output};
pub use gpu::{GpuModel, GpuTarget};
pub use weights::{normalize_name, random_weights, Checkpoint};

use crate::dtype::DType;
use crate::error::{Error, Result};
use crate::tensor::Tensor;
use cpu::CpuBuffers;

/// What a forward pass keeps between calls: where it runs, the CPU engine's buffers, and the
/// device-resident model for `Backend::Sim` and `Backend::Cuda` (weights uploaded on first use,
/// reused while the workspace runs the same model).
#[derive(Default, Debug)]
pub struct Workspace {
    cpu: CpuBuffers,
    gpu: Option<GpuModel>,
}

impl Workspace {
    pub fn new() -> Self {
        Self::default()
    }

    pub fn with_backend(backend: Backend) -> Self {
        Workspace {
            cpu: CpuBuffers::with_backend(backend),
            gpu: None,
        }
    }

    /// Where the model runs.
    pub fn backend(&self) -> Backend {
        self.cpu.backend
    }
}

impl DeployModel {
    /// Logits `[N, classes]` for an input `[N, C_in, H, W]` (CPU engine).
    pub fn forward(&self, x: &Tensor<f32>) -> Result<Tensor<f32>> {
        let out = self.run(x, None, true, &mut Workspace::new())?;
        out.logits
            .ok_or_else(|| Error::Unsupported("the model has no head".into()))
    }

    /// The outputs of the stages in `out_indices` (each through `stages.{i}.norm` when the
    /// checkpoint has one), taken before the transition that follows (CPU engine).
    pub fn forward_features(
        &self,
        x: &Tensor<f32>,
        out_indices: &[usize],
    ) -> Result<Vec<Tensor<f32>>> {
        let out = self.run(x, Some(out_indices), false, &mut Workspace::new())?;
        Ok(out.stages.into_iter().map(|(_, t)| t).collect())
    }

    /// The general entry point: logits and/or stage outputs, with a caller-kept workspace whose
    /// backend picks the engine. The request is checked once, here.
    pub fn run(
        &self,
        x: &Tensor<f32>,
        out_indices: Option<&[usize]>,
        want_logits: bool,
        ws: &mut Workspace,
    ) -> Result<Output> {
        let indices = out_indices.unwrap_or(&[]);
        let d = self.check_request(x.shape(), indices, want_logits)?;
        if self.cpu_dtype() != DType::F32 && !matches!(ws.backend(), Backend::Cpu) {
            return Err(Error::Unsupported(
                "a bf16 model (into_cpu_bf16) runs on the CPU engine only".into(),
            ));
        }
        let target = match ws.backend() {
            Backend::Sim => GpuTarget::Sim,
            Backend::Cuda(i) => GpuTarget::Cuda(i),
            Backend::Cpu | Backend::CudaDepthwise(_) => {
                return self.run_cpu(x, d, indices, want_logits, &mut ws.cpu)
            }
        };
        let reuse = ws
            .gpu
            .as_ref()
            .is_some_and(|g| g.target() == target && g.holds(self));
        if !reuse {
            ws.gpu = None; // frees the old device buffers first
            ws.gpu = Some(GpuModel::new(self, target, DType::F32)?);
        }
        match ws.gpu.as_mut() {
            Some(gpu) => gpu.run(self, x, indices, want_logits),
            None => unreachable!("set above"),
        }
    }
}

/// A loaded RepLKNet, in deploy form, ready to run on the CPU.
#[derive(Clone, Debug)]
pub struct Replknet {
    pub deploy: DeployModel,
}

impl Replknet {
    /// Loads a training-form or merged-form checkpoint (any accepted naming scheme).
    pub fn load(path: impl AsRef<Path>) -> Result<Self> {
        Self::from_checkpoint_owned(Checkpoint::read(path)?)
    }

    /// From a name -> tensor map.
    pub fn from_tensors(tensors: BTreeMap<String, Tensor<f32>>) -> Result<Self> {
        Self::from_checkpoint_owned(Checkpoint::from_tensors(tensors)?)
    }

    /// From a checkpoint it consumes, dropping each part's tensors once folded (the peak memory
    /// of a load is about one copy of the weights, not two).
    pub fn from_checkpoint_owned(ck: Checkpoint) -> Result<Self> {
        Ok(Replknet {
            deploy: reparam::fold_owned(ck)?,
        })
    }

    pub fn from_checkpoint(ck: &Checkpoint) -> Result<Self> {
        Ok(Replknet {
            deploy: reparam::fold(ck)?,
        })
    }

    /// Random weights for a config (benchmarks): training form, folded.
    pub fn random(cfg: &ReplknetConfig, seed: u64) -> Result<Self> {
        cfg.validate()?;
        Self::from_tensors(random_weights(cfg, Form::Training, seed)?)
    }

    pub fn config(&self) -> &ReplknetConfig {
        &self.deploy.config
    }

    /// Logits `[N, classes]` for `[N, 3, H, W]`.
    pub fn forward(&self, x: &Tensor<f32>) -> Result<Tensor<f32>> {
        self.deploy.forward(x)
    }

    /// Stage outputs (downstream mode).
    pub fn forward_features(
        &self,
        x: &Tensor<f32>,
        out_indices: &[usize],
    ) -> Result<Vec<Tensor<f32>>> {
        self.deploy.forward_features(x, out_indices)
    }

    /// Logits and/or stage outputs with a caller-kept workspace (no allocation after the first
    /// call at a given size).
    pub fn run(
        &self,
        x: &Tensor<f32>,
        out_indices: Option<&[usize]>,
        want_logits: bool,
        ws: &mut Workspace,
    ) -> Result<Output> {
        self.deploy.run(x, out_indices, want_logits, ws)
    }
}
