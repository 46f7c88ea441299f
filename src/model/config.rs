//! The RepLKNet architecture as data: named configs, inference from a checkpoint, the list of
//! tensors a checkpoint must hold, and parameter counts.

use std::collections::BTreeMap;

use crate::error::{Error, Result};
use crate::tensor::Tensor;

/// BatchNorm epsilon of the public definition.
pub const BN_EPS: f64 = 1e-5;

/// Hyper-parameters of a RepLKNet (the public `RepLKNet(...)` constructor's arguments).
#[derive(Clone, Debug, PartialEq)]
pub struct ReplknetConfig {
    /// Large kernel size per stage.
    pub large_kernel_sizes: Vec<usize>,
    /// Number of (RepLKBlock, ConvFFN) pairs per stage.
    pub layers: Vec<usize>,
    /// Channels per stage.
    pub channels: Vec<usize>,
    /// The parallel small depthwise kernel (training form), `None` for XL.
    pub small_kernel: Option<usize>,
    /// RepLKBlock internal width = int(C * dw_ratio).
    pub dw_ratio: f64,
    /// ConvFFN internal width = int(C * ffn_ratio).
    pub ffn_ratio: f64,
    /// Classifier outputs; 0 when the model has no head (a downstream backbone).
    pub num_classes: usize,
    /// Input image channels (3).
    pub in_channels: usize,
}

/// Which form of the large-kernel layer a checkpoint stores.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Form {
    /// `lkb_origin` (+ `small_conv`), each a conv + BN: what training produces.
    Training,
    /// `lkb_reparam.{weight,bias}`: the public code's `structural_reparam()` output.
    Merged,
}

impl ReplknetConfig {
    /// RepLKNet-31B (ImageNet-1k head).
    pub fn replknet_31b() -> Self {
        ReplknetConfig {
            large_kernel_sizes: vec![31, 29, 27, 13],
            layers: vec![2, 2, 18, 2],
            channels: vec![128, 256, 512, 1024],
            small_kernel: Some(5),
            dw_ratio: 1.0,
            ffn_ratio: 4.0,
            num_classes: 1000,
            in_channels: 3,
        }
    }

    /// RepLKNet-31L.
    pub fn replknet_31l() -> Self {
        ReplknetConfig {
            channels: vec![192, 384, 768, 1536],
            ..Self::replknet_31b()
        }
    }

    /// RepLKNet-XL (no small kernel, dw_ratio 1.5).
    pub fn replknet_xl() -> Self {
        ReplknetConfig {
            large_kernel_sizes: vec![27, 27, 27, 13],
            layers: vec![2, 2, 18, 2],
            channels: vec![256, 512, 1024, 2048],
            small_kernel: None,
            dw_ratio: 1.5,
            ffn_ratio: 4.0,
            num_classes: 1000,
            in_channels: 3,
        }
    }

    /// `31b`, `31l` or `xl` (case-insensitive; `replknet-` prefix allowed).
    pub fn by_name(name: &str) -> Result<Self> {
        let lower = name.to_ascii_lowercase();
        let key = lower
            .trim_start_matches("replknet")
            .trim_start_matches(['-', '_']);
        match key {
            "31b" | "b" => Ok(Self::replknet_31b()),
            "31l" | "l" => Ok(Self::replknet_31l()),
            "xl" => Ok(Self::replknet_xl()),
            _ => Err(Error::InvalidArgument(format!(
                "unknown RepLKNet model '{name}' (expected 31b, 31l or xl)"
            ))),
        }
    }

    pub fn num_stages(&self) -> usize {
        self.channels.len()
    }

    /// RepLKBlock internal width of stage `s`: int(C * dw_ratio).
    pub fn dw_channels(&self, s: usize) -> usize {
        ratio_width(self.channels[s], self.dw_ratio)
    }

    /// ConvFFN internal width of stage `s`: int(C * ffn_ratio).
    pub fn ffn_channels(&self, s: usize) -> usize {
        ratio_width(self.channels[s], self.ffn_ratio)
    }

    /// Checks that the lists agree and every size is usable.
    pub fn validate(&self) -> Result<()> {
        let s = self.channels.len();
        if s == 0 || self.layers.len() != s || self.large_kernel_sizes.len() != s {
            return Err(Error::InvalidArgument(format!(
                "RepLKNet config: channels ({}), layers ({}) and large_kernel_sizes ({}) must have the same non-zero length",
                self.channels.len(),
                self.layers.len(),
                self.large_kernel_sizes.len()
            )));
        }
        if self.in_channels == 0 || self.channels.contains(&0) {
            return Err(Error::InvalidArgument(
                "RepLKNet config: channel counts must be >= 1".into(),
            ));
        }
        for st in 0..s {
            if self.dw_channels(st) == 0 || self.ffn_channels(st) == 0 {
                return Err(Error::InvalidArgument(format!(
                    "RepLKNet config: stage {st} has an empty internal width"
                )));
            }
            let k = self.large_kernel_sizes[st];
            if k == 0 || k.is_multiple_of(2) {
                return Err(Error::InvalidArgument(format!(
                    "RepLKNet config: large kernel {k} of stage {st} must be odd"
                )));
            }
            if let Some(sk) = self.small_kernel {
                if sk == 0 || sk % 2 == 0 || sk > k {
                    return Err(Error::InvalidArgument(format!(
                        "RepLKNet config: small kernel {sk} must be odd and at most the large kernel {k}"
                    )));
                }
            }
        }
        Ok(())
    }

    /// Every tensor a checkpoint of this config holds, with its shape, in `form`
    /// (BN running statistics included, `num_batches_tracked` not).
    pub fn expected_tensors(&self, form: Form) -> Vec<(String, Vec<usize>)> {
        let blocks: Vec<Vec<Form>> = self.layers.iter().map(|&l| vec![form; l]).collect();
        self.expected_tensors_with(&blocks, &vec![false; self.num_stages()], true)
    }

    /// Like [`expected_tensors`](Self::expected_tensors) with a form per RepLKBlock
    /// (`forms[s][i]` for block `2i` of stage `s`), per-stage norms and an optional head.
    pub fn expected_tensors_with(
        &self,
        forms: &[Vec<Form>],
        stage_norms: &[bool],
        head: bool,
    ) -> Vec<(String, Vec<usize>)> {
        let mut out = Vec::new();
        let bn = |out: &mut Vec<(String, Vec<usize>)>, p: &str, c: usize| {
            for f in ["weight", "bias", "running_mean", "running_var"] {
                out.push((format!("{p}.{f}"), vec![c]));
            }
        };
        let conv_bn = |out: &mut Vec<(String, Vec<usize>)>, p: &str, shape: Vec<usize>| {
            let c = shape[0];
            out.push((format!("{p}.conv.weight"), shape));
            bn(out, &format!("{p}.bn"), c);
        };
        let c1 = self.channels[0];
        conv_bn(&mut out, "stem.0", vec![c1, self.in_channels, 3, 3]);
        conv_bn(&mut out, "stem.1", vec![c1, 1, 3, 3]);
        conv_bn(&mut out, "stem.2", vec![c1, c1, 1, 1]);
        conv_bn(&mut out, "stem.3", vec![c1, 1, 3, 3]);
        for s in 0..self.num_stages() {
            let c = self.channels[s];
            let dw = self.dw_channels(s);
            let ffn = self.ffn_channels(s);
            let k = self.large_kernel_sizes[s];
            for i in 0..self.layers[s] {
                let p = format!("stages.{s}.blocks.{}", 2 * i);
                bn(&mut out, &format!("{p}.prelkb_bn"), c);
                conv_bn(&mut out, &format!("{p}.pw1"), vec![dw, c, 1, 1]);
                let form = forms
                    .get(s)
                    .and_then(|f| f.get(i))
                    .copied()
                    .unwrap_or(Form::Training);
                match form {
                    Form::Training => {
                        conv_bn(
                            &mut out,
                            &format!("{p}.large_kernel.lkb_origin"),
                            vec![dw, 1, k, k],
                        );
                        if let Some(sk) = self.small_kernel {
                            conv_bn(
                                &mut out,
                                &format!("{p}.large_kernel.small_conv"),
                                vec![dw, 1, sk, sk],
                            );
                        }
                    }
                    Form::Merged => {
                        out.push((
                            format!("{p}.large_kernel.lkb_reparam.weight"),
                            vec![dw, 1, k, k],
                        ));
                        out.push((format!("{p}.large_kernel.lkb_reparam.bias"), vec![dw]));
                    }
                }
                conv_bn(&mut out, &format!("{p}.pw2"), vec![c, dw, 1, 1]);
                let p = format!("stages.{s}.blocks.{}", 2 * i + 1);
                bn(&mut out, &format!("{p}.preffn_bn"), c);
                conv_bn(&mut out, &format!("{p}.pw1"), vec![ffn, c, 1, 1]);
                conv_bn(&mut out, &format!("{p}.pw2"), vec![c, ffn, 1, 1]);
            }
            if stage_norms.get(s).copied().unwrap_or(false) {
                bn(&mut out, &format!("stages.{s}.norm"), c);
            }
            if s + 1 < self.num_stages() {
                let n = self.channels[s + 1];
                conv_bn(&mut out, &format!("transitions.{s}.0"), vec![n, c, 1, 1]);
                conv_bn(&mut out, &format!("transitions.{s}.1"), vec![n, 1, 3, 3]);
            }
        }
        if head && self.num_classes > 0 {
            let c = *self.channels.last().expect("validated: non-empty");
            bn(&mut out, "norm", c);
            out.push(("head.weight".into(), vec![self.num_classes, c]));
            out.push(("head.bias".into(), vec![self.num_classes]));
        }
        out
    }

    /// Learnable parameters (what PyTorch's `sum(p.numel() for p in model.parameters())`
    /// counts: conv weights, BN weight and bias, the head; not BN running statistics).
    /// 31B: 79,864,168 in training form, 79,527,272 merged.
    pub fn param_count(&self, form: Form) -> usize {
        self.expected_tensors(form)
            .iter()
            .filter(|(name, _)| !name.ends_with("running_mean") && !name.ends_with("running_var"))
            .map(|(_, shape)| shape.iter().product::<usize>())
            .sum()
    }

    /// Multiply-accumulates of one forward pass of the deploy form at `h` x `w`, batch 1
    /// (every tap of the depthwise kernels counted, padded ones included).
    pub fn macs(&self, h: usize, w: usize) -> f64 {
        let out = |v: usize| (v + 2 - 3) / 2 + 1;
        let (mut h, mut w) = (out(h), out(w));
        let c1 = self.channels[0] as f64;
        let mut m = (h * w) as f64 * (c1 * self.in_channels as f64 * 9.0 + c1 * 9.0 + c1 * c1);
        h = out(h);
        w = out(w);
        m += (h * w) as f64 * c1 * 9.0;
        for s in 0..self.num_stages() {
            let hw = (h * w) as f64;
            let c = self.channels[s] as f64;
            let dw = self.dw_channels(s) as f64;
            let f = self.ffn_channels(s) as f64;
            let k = self.large_kernel_sizes[s] as f64;
            m += self.layers[s] as f64 * hw * (2.0 * c * dw + dw * k * k + 2.0 * c * f);
            if s + 1 < self.num_stages() {
                let n = self.channels[s + 1] as f64;
                m += hw * c * n;
                h = out(h);
                w = out(w);
                m += (h * w) as f64 * n * 9.0;
            }
        }
        m + (self.num_classes * self.channels.last().copied().unwrap_or(0)) as f64
    }

    /// Infers the config from tensor names and shapes (names already normalised).
    pub fn infer(tensors: &BTreeMap<String, Tensor<f32>>) -> Result<Self> {
        let shape_of = |name: &str| -> Result<&[usize]> {
            tensors.get(name).map(|t| t.shape()).ok_or_else(|| {
                Error::Weights(format!(
                    "cannot infer the RepLKNet config: tensor '{name}' is missing"
                ))
            })
        };
        let dim = |name: &str, nd: usize, i: usize| -> Result<usize> {
            let s = shape_of(name)?;
            if s.len() != nd {
                return Err(Error::Weights(format!(
                    "cannot infer the RepLKNet config: tensor '{name}' has shape {s:?}, expected {nd} dimensions"
                )));
            }
            Ok(s[i])
        };
        let in_channels = dim("stem.0.conv.weight", 4, 1)?;
        // Stages and blocks present, from the names.
        let mut max_block: BTreeMap<usize, usize> = BTreeMap::new();
        let mut blocks_named = std::collections::BTreeSet::new();
        for name in tensors.keys() {
            let Some(rest) = name.strip_prefix("stages.") else {
                continue;
            };
            let mut parts = rest.split('.');
            let (Some(s), Some("blocks"), Some(j)) = (parts.next(), parts.next(), parts.next())
            else {
                continue;
            };
            if let (Ok(s), Ok(j)) = (s.parse::<usize>(), j.parse::<usize>()) {
                let e = max_block.entry(s).or_insert(0);
                *e = (*e).max(j);
                blocks_named.insert((s, j));
            }
        }
        let num_stages = match max_block.keys().next_back() {
            // a stage index must be smaller than the number of tensors (each stage has some)
            Some(&s) if s < tensors.len() => s + 1,
            Some(&s) => {
                return Err(Error::Weights(format!(
                    "cannot infer the RepLKNet config: stage index {s} but only {} tensors",
                    tensors.len()
                )))
            }
            None => {
                return Err(Error::Weights(
                    "cannot infer the RepLKNet config: no 'stages.{s}.blocks.{j}.*' tensors (is this a RepLKNet checkpoint?)".into(),
                ))
            }
        };
        let mut cfg = ReplknetConfig {
            large_kernel_sizes: Vec::new(),
            layers: Vec::new(),
            channels: Vec::new(),
            small_kernel: None,
            dw_ratio: 1.0,
            ffn_ratio: 4.0,
            num_classes: 0,
            in_channels,
        };
        for s in 0..num_stages {
            let jmax = *max_block.get(&s).ok_or_else(|| {
                Error::Weights(format!(
                    "cannot infer the RepLKNet config: stage {s} has no blocks"
                ))
            })?;
            // Every block up to the highest index must have tensors: a lone huge index must not
            // size the model (and the list of tensors it expects) beyond what the file holds.
            let named = blocks_named.range((s, 0)..=(s, jmax)).count();
            if named != jmax + 1 {
                return Err(Error::Weights(format!(
                    "cannot infer the RepLKNet config: stage {s} names block {jmax} but has tensors for only {named} blocks"
                )));
            }
            cfg.layers.push(jmax / 2 + 1);
            let p = format!("stages.{s}.blocks.0");
            cfg.channels
                .push(dim(&format!("{p}.pw1.conv.weight"), 4, 1)?);
            let lk = format!("{p}.large_kernel");
            let origin = format!("{lk}.lkb_origin.conv.weight");
            let k = if tensors.contains_key(&origin) {
                dim(&origin, 4, 2)?
            } else {
                dim(&format!("{lk}.lkb_reparam.weight"), 4, 2)?
            };
            cfg.large_kernel_sizes.push(k);
        }
        // Small kernel: from any training-form block that has one.
        cfg.small_kernel = tensors
            .iter()
            .find(|(n, t)| {
                n.ends_with(".large_kernel.small_conv.conv.weight") && t.shape().len() == 4
            })
            .map(|(_, t)| t.shape()[2]);
        let c0 = cfg.channels[0];
        let dw0 = dim("stages.0.blocks.0.pw1.conv.weight", 4, 0)?;
        cfg.dw_ratio = dw0 as f64 / c0 as f64;
        let f0 = dim("stages.0.blocks.1.pw1.conv.weight", 4, 0)?;
        cfg.ffn_ratio = f0 as f64 / c0 as f64;
        if let Some(t) = tensors.get("head.weight") {
            if t.shape().len() != 2 {
                return Err(Error::Weights(format!(
                    "tensor 'head.weight' has shape {:?}, expected [num_classes, C]",
                    t.shape()
                )));
            }
            cfg.num_classes = t.shape()[0];
        }
        cfg.validate()
            .map_err(|e| Error::Weights(format!("inferred config is unusable: {e}")))?;
        Ok(cfg)
    }
}

/// int(c * ratio) as Python computes it (with a little slack for ratios like 1/3).
fn ratio_width(c: usize, ratio: f64) -> usize {
    (c as f64 * ratio + 1e-9).floor() as usize
}
