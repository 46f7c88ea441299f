//! RepLKNet (CVPR 2022) on lkconv: config inferred from a checkpoint, structural
//! re-parameterisation into a deploy form, a CPU inference engine (`cpu`), and the forward pass
//! resident on a CUDA GPU or run by the kernel simulator (`gpu`; `Backend::Cuda` / `Backend::Sim`
//! in a [`Workspace`], or [`GpuModel`] directly).
//!
//! ```no_run
//! use lkconv::model::Replknet;
//! let model = Replknet::load("replknet_31b.safetensors")?; // training or merged form
//! let x = lkconv::Tensor::<f32>::zeros(&[1, 3, 224, 224])?;
//! let logits = model.forward(&x)?; // [1, 1000]
//! # Ok::<(), lkconv::Error>(())
//! ```

pub mod config;
pub mod cpu;
pub mod gpu;
pub mod imagenet;
pub mod reference;
pub mod reparam;
pub mod weights;

use std::collections::BTreeMap;
use std::path::Path;

pub use config::{Form, ReplknetConfig};
pub use cpu::{Backend, DeployModel, Output, Workspace};
pub use gpu::{GpuModel, GpuTarget};
pub use weights::{normalize_name, random_weights, Checkpoint};

use crate::error::Result;
use crate::tensor::Tensor;

/// A loaded RepLKNet, in deploy form, ready to run on the CPU.
#[derive(Clone, Debug)]
pub struct Replknet {
    pub deploy: DeployModel,
}

impl Replknet {
    /// Loads a training-form or merged-form checkpoint (any accepted naming scheme).
    pub fn load(path: impl AsRef<Path>) -> Result<Self> {
        Self::from_checkpoint(&Checkpoint::read(path)?)
    }

    /// From a name -> tensor map.
    pub fn from_tensors(tensors: BTreeMap<String, Tensor<f32>>) -> Result<Self> {
        Self::from_checkpoint(&Checkpoint::from_tensors(tensors)?)
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
