//! Checkpoints by their public names: name normalisation (plain, `model.`/`state_dict.`/`module.`
//! prefixes, mmpretrain's `backbone.` / `head.fc.` / `backbone.stages.3.norm`), form detection
//! (training or merged, per block) and validation against the inferred config.

use std::collections::BTreeMap;
use std::path::Path;

use super::config::{Form, ReplknetConfig};
use crate::error::{Error, Result};
use crate::safetensors_io::TensorFile;
use crate::tensor::Tensor;

/// A validated RepLKNet checkpoint: normalised names, config, forms.
#[derive(Clone, Debug)]
pub struct Checkpoint {
    pub config: ReplknetConfig,
    /// Normalised name -> tensor (only the ones the model uses).
    pub tensors: BTreeMap<String, Tensor<f32>>,
    /// `forms[s][i]`: the form of RepLKBlock `2i` of stage `s`.
    pub forms: Vec<Vec<Form>>,
    /// Whether stage `s` has its own output BN (`stages.{s}.norm`).
    pub stage_norms: Vec<bool>,
    /// Whether `norm.*` + `head.*` are present (num_classes > 0).
    pub has_head: bool,
}

const WRAPPERS: [&str; 4] = ["state_dict.", "model.", "module.", "backbone."];

/// Maps a public checkpoint name to the plain `RepLKNet` state_dict name, or `None` for a
/// tensor the model never uses (`num_batches_tracked`, extra tensors are kept by name and
/// simply ignored later).
pub fn normalize_name(name: &str) -> Option<String> {
    if name.ends_with("num_batches_tracked") {
        return None;
    }
    let mut n = name;
    loop {
        let before = n;
        for w in WRAPPERS {
            if let Some(rest) = n.strip_prefix(w) {
                n = rest;
            }
        }
        if n == before {
            break;
        }
    }
    if let Some(rest) = n.strip_prefix("head.fc.") {
        return Some(format!("head.{rest}"));
    }
    Some(n.to_string())
}

impl Checkpoint {
    /// Reads and validates a safetensors checkpoint.
    pub fn read(path: impl AsRef<Path>) -> Result<Self> {
        let file = TensorFile::read(path)?;
        // A parameter stored as integers is a corrupt checkpoint, not a tensor to skip.
        let bad: Vec<String> = file
            .non_float
            .iter()
            .filter(|(name, _)| {
                [".weight", ".bias", ".running_mean", ".running_var"]
                    .iter()
                    .any(|s| name.ends_with(s))
            })
            .map(|(name, dtype)| format!("{name} ({dtype})"))
            .collect();
        if !bad.is_empty() {
            return Err(Error::DType(format!(
                "parameters with a non-float dtype: {}",
                bad.join(", ")
            )));
        }
        Self::from_tensors(file.tensors)
    }

    /// Validates a name -> tensor map (any of the accepted naming schemes).
    pub fn from_tensors(raw: BTreeMap<String, Tensor<f32>>) -> Result<Self> {
        let mut tensors = BTreeMap::new();
        for (name, t) in raw {
            if let Some(n) = normalize_name(&name) {
                tensors.insert(n, t);
            }
        }
        let mut config = ReplknetConfig::infer(&tensors)?;
        let last = config.num_stages() - 1;
        // mmpretrain keeps the final norm as the last stage's norm.
        if !tensors.contains_key("norm.weight") && tensors.contains_key("head.weight") {
            let p = format!("stages.{last}.norm");
            for f in ["weight", "bias", "running_mean", "running_var"] {
                if let Some(t) = tensors.get(&format!("{p}.{f}")) {
                    tensors.insert(format!("norm.{f}"), t.clone());
                }
            }
        }
        let has_head = tensors.contains_key("head.weight")
            || tensors.contains_key("head.bias")
            || tensors.contains_key("norm.weight");
        if !has_head {
            config.num_classes = 0;
        }
        let forms: Vec<Vec<Form>> = (0..config.num_stages())
            .map(|s| {
                (0..config.layers[s])
                    .map(|i| {
                        let p = format!("stages.{s}.blocks.{}.large_kernel", 2 * i);
                        if tensors.contains_key(&format!("{p}.lkb_reparam.weight"))
                            && !tensors.contains_key(&format!("{p}.lkb_origin.conv.weight"))
                        {
                            Form::Merged
                        } else {
                            Form::Training
                        }
                    })
                    .collect()
            })
            .collect();
        let stage_norms: Vec<bool> = (0..config.num_stages())
            .map(|s| tensors.contains_key(&format!("stages.{s}.norm.weight")))
            .collect();
        // A training-form block whose small conv is missing while others have one is reported
        // as missing by the check below (the config's small kernel applies to every block).
        let expected = config.expected_tensors_with(&forms, &stage_norms, has_head);
        let mut missing = Vec::new();
        let mut misshaped = Vec::new();
        for (name, shape) in &expected {
            match tensors.get(name) {
                None => missing.push(format!("{name} {shape:?}")),
                Some(t) if t.shape() != shape.as_slice() => {
                    misshaped.push(format!("{name}: expected {shape:?}, got {:?}", t.shape()))
                }
                Some(_) => {}
            }
        }
        if !missing.is_empty() || !misshaped.is_empty() {
            let mut msg = String::from("checkpoint does not match the inferred RepLKNet config");
            msg.push_str(&format!(
                " (channels {:?}, layers {:?}, kernels {:?}, small kernel {:?})",
                config.channels, config.layers, config.large_kernel_sizes, config.small_kernel
            ));
            let list = |msg: &mut String, what: &str, items: &[String]| {
                if items.is_empty() {
                    return;
                }
                msg.push_str(&format!("; {} {what}: ", items.len()));
                let shown: Vec<&str> = items.iter().take(20).map(String::as_str).collect();
                msg.push_str(&shown.join(", "));
                if items.len() > 20 {
                    msg.push_str(&format!(", ... and {} more", items.len() - 20));
                }
            };
            list(&mut msg, "missing", &missing);
            list(&mut msg, "mis-shaped", &misshaped);
            return Err(Error::Weights(msg));
        }
        // Keep only what the model uses.
        let mut used = BTreeMap::new();
        for (name, _) in expected {
            if let Some((k, v)) = tensors.remove_entry(&name) {
                used.insert(k, v);
            }
        }
        // Optional conv biases (conv_bn has none in the public code; accepted when present).
        for (name, t) in tensors {
            if name.ends_with(".conv.bias") {
                used.insert(name, t);
            }
        }
        Ok(Checkpoint {
            config,
            tensors: used,
            forms,
            stage_norms,
            has_head,
        })
    }

    /// The tensor `name` (validated to exist by construction, still an error, not a panic).
    pub fn get(&self, name: &str) -> Result<&Tensor<f32>> {
        self.tensors
            .get(name)
            .ok_or_else(|| Error::Weights(format!("tensor '{name}' missing")))
    }
}

/// Random training-form (or merged-form) weights for `cfg`: conv weights scaled by
/// 1/sqrt(fan_in), BN with random affine parameters and running statistics.
pub fn random_weights(
    cfg: &ReplknetConfig,
    form: Form,
    seed: u64,
) -> Result<BTreeMap<String, Tensor<f32>>> {
    let mut rng = crate::rng::Rng::new(seed);
    let mut out = BTreeMap::new();
    for (name, shape) in cfg.expected_tensors(form) {
        let numel: usize = shape.iter().product();
        let data: Vec<f32> = if name.ends_with("running_var") {
            (0..numel).map(|_| 0.5 + rng.uniform()).collect()
        } else if name.ends_with("running_mean") || name.ends_with(".bias") {
            (0..numel).map(|_| 0.2 * rng.uniform_pm1()).collect()
        } else if shape.len() == 1 {
            // BN weight.
            (0..numel).map(|_| 0.5 + 0.5 * rng.uniform()).collect()
        } else {
            let fan_in: usize = shape[1..].iter().product();
            let scale = (3.0 / fan_in as f32).sqrt();
            (0..numel).map(|_| scale * rng.uniform_pm1()).collect()
        };
        out.insert(name, Tensor::from_vec(&shape, data)?);
    }
    Ok(out)
}

#[cfg(test)]
mod non_float_tests {
    use super::*;

    #[test]
    fn integer_parameters_are_a_dtype_error() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("int.safetensors");
        let bytes: Vec<u8> = (0..8i64).flat_map(|v| v.to_le_bytes()).collect();
        let nbt = 7i64.to_le_bytes();
        let views = vec![
            (
                "stem.0.conv.weight".to_string(),
                safetensors::tensor::TensorView::new(safetensors::Dtype::I64, vec![8], &bytes)
                    .unwrap(),
            ),
            (
                "stem.0.bn.num_batches_tracked".to_string(),
                safetensors::tensor::TensorView::new(safetensors::Dtype::I64, vec![], &nbt)
                    .unwrap(),
            ),
        ];
        std::fs::write(&path, safetensors::serialize(views, None).unwrap()).unwrap();
        match Checkpoint::read(&path) {
            Err(Error::DType(msg)) => {
                assert!(msg.contains("stem.0.conv.weight"), "{msg}");
                assert!(!msg.contains("num_batches_tracked"), "{msg}");
            }
            other => panic!("expected a dtype error, got {other:?}"),
        }
    }
}
