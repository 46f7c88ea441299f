//! RepLKNet: golden outputs (training and merged form), re-parameterisation equivalence per
//! block type, parameter counts, name schemes and checkpoint errors. Run in release mode.

mod common;

use std::collections::BTreeMap;

use common::{assert_matches, erfc_hp, have_gpu, Expected};
use lkconv::model::reference::{self, Act64};
use lkconv::model::{reparam, Backend, Checkpoint, Form, Replknet, ReplknetConfig};
use lkconv::safetensors_io::TensorFile;
use lkconv::{Error, Tensor};

const GOLDEN: &str = concat!(
    env!("CARGO_MANIFEST_DIR"),
    "/tests/data/replknet_small31.safetensors"
);

fn golden() -> TensorFile {
    TensorFile::read(GOLDEN).expect("golden file")
}

fn check_golden(
    file: &TensorFile,
    tensors: BTreeMap<String, Tensor<f32>>,
    logits_name: &str,
    want_form: Form,
    backend: Backend,
) {
    let ck = Checkpoint::from_tensors(tensors).expect("checkpoint");
    assert!(ck.forms.iter().flatten().all(|&f| f == want_form));
    let cfg = &ck.config;
    assert_eq!(cfg.large_kernel_sizes, vec![31, 29, 27, 13]);
    assert_eq!(cfg.layers, vec![2, 2, 6, 2]);
    assert_eq!(cfg.channels, vec![8, 16, 32, 64]);
    assert_eq!(cfg.num_classes, 10);
    assert_eq!(cfg.dw_ratio, 1.0);
    assert_eq!(cfg.ffn_ratio, 4.0);
    if want_form == Form::Training {
        assert_eq!(cfg.small_kernel, Some(5));
    }
    let model = Replknet::from_checkpoint(&ck).expect("fold");
    let x = file.get("input").unwrap();
    let mut ws = lkconv::model::Workspace::with_backend(backend);
    let out = model
        .run(x, Some(&[0, 1, 2, 3]), true, &mut ws)
        .expect("forward");
    let what = format!("{backend:?} {logits_name}");
    assert_close(
        &what,
        out.logits.as_ref().unwrap(),
        file.get(logits_name).unwrap(),
        1e-4,
    );
    let indices: Vec<usize> = out.stages.iter().map(|(i, _)| *i).collect();
    assert_eq!(indices, [0, 1, 2, 3], "{backend:?}: the requested stages");
    for (i, t) in out.stages.iter() {
        let want = file.get(&format!("stage{i}")).unwrap();
        assert_close(&format!("{backend:?} stage{i}"), t, want, 1e-4);
    }
    // Same answers a second time through the same workspace, and through forward().
    let again = model.run(x, None, true, &mut ws).unwrap().logits.unwrap();
    assert_eq!(again.data(), out.logits.as_ref().unwrap().data());
    if backend == Backend::Cpu {
        assert_eq!(model.forward(x).unwrap().data(), again.data());
    }
}

#[test]
fn golden_training_form() {
    let file = golden();
    // Extra tensors (input, logits, stage*, lkb_reparam) are present: the training form wins
    // where both lkb_origin and lkb_reparam are in the file.
    check_golden(
        &file,
        file.tensors.clone(),
        "logits",
        Form::Training,
        Backend::Cpu,
    );
}

/// The whole forward pass as the device program (`model::gpu`) run by the kernel simulator:
/// every kernel launch of the CUDA path, GEMMs on the host.
#[test]
fn golden_simulator_both_forms() {
    assert!(
        lkconv::sim::available(),
        "the kernel simulator was not built"
    );
    let file = golden();
    check_golden(
        &file,
        file.tensors.clone(),
        "logits",
        Form::Training,
        Backend::Sim,
    );
    check_golden(
        &file,
        merged_tensors(&file),
        "logits_merged",
        Form::Merged,
        Backend::Sim,
    );
}

/// The GPU-resident forward pass (cuBLAS 1x1 convs, our depthwise and element-wise kernels).
#[test]
fn golden_cuda_both_forms() {
    if !have_gpu() {
        return;
    }
    let file = golden();
    let be = Backend::Cuda(0);
    check_golden(&file, file.tensors.clone(), "logits", Form::Training, be);
    check_golden(
        &file,
        merged_tensors(&file),
        "logits_merged",
        Form::Merged,
        be,
    );
}

/// The depthwise layers alone on the GPU through host round trips (the rest on the CPU).
#[test]
fn golden_cuda_depthwise_both_forms() {
    if !have_gpu() {
        return;
    }
    let file = golden();
    let be = Backend::CudaDepthwise(0);
    check_golden(&file, file.tensors.clone(), "logits", Form::Training, be);
}

fn merged_tensors(file: &TensorFile) -> BTreeMap<String, Tensor<f32>> {
    file.tensors
        .iter()
        .filter(|(n, _)| !n.contains(".lkb_origin.") && !n.contains(".small_conv."))
        .map(|(n, t)| (n.clone(), t.clone()))
        .collect()
}

#[test]
fn golden_merged_form() {
    let file = golden();
    check_golden(
        &file,
        merged_tensors(&file),
        "logits_merged",
        Form::Merged,
        Backend::Cpu,
    );
}

#[test]
fn golden_with_public_prefixes() {
    let file = golden();
    let model_prefixed: BTreeMap<_, _> = file
        .tensors
        .iter()
        .map(|(n, t)| (format!("model.{n}"), t.clone()))
        .collect();
    check_golden(
        &file,
        model_prefixed,
        "logits",
        Form::Training,
        Backend::Cpu,
    );
    let sd: BTreeMap<_, _> = merged_tensors(&file)
        .into_iter()
        .map(|(n, t)| (format!("state_dict.{n}"), t))
        .collect();
    check_golden(&file, sd, "logits_merged", Form::Merged, Backend::Cpu);
    // mmpretrain: backbone. prefix, head.fc., final norm as backbone.stages.3.norm.
    let mm: BTreeMap<_, _> = file
        .tensors
        .iter()
        .map(|(n, t)| {
            let name = if let Some(r) = n.strip_prefix("head.") {
                format!("head.fc.{r}")
            } else if let Some(r) = n.strip_prefix("norm.") {
                format!("backbone.stages.3.norm.{r}")
            } else if matches!(n.as_str(), "input" | "logits" | "logits_merged")
                || n.starts_with("stage") && !n.starts_with("stages.")
            {
                n.clone()
            } else {
                format!("backbone.{n}")
            };
            (name, t.clone())
        })
        .collect();
    let ck = Checkpoint::from_tensors(mm).unwrap();
    assert_eq!(ck.stage_norms, vec![false, false, false, true]);
    let model = Replknet::from_checkpoint(&ck).unwrap();
    let logits = model.forward(file.get("input").unwrap()).unwrap();
    assert_close(
        "mmpretrain names",
        &logits,
        file.get("logits").unwrap(),
        1e-4,
    );
    // Num_batches_tracked (an int tensor) is ignored.
    let mut with_nbt = file.tensors.clone();
    with_nbt.insert(
        "stem.0.bn.num_batches_tracked".into(),
        Tensor::from_vec(&[], vec![0.0]).unwrap(),
    );
    assert!(Checkpoint::from_tensors(with_nbt).is_ok());
}

fn tiny_config(small: Option<usize>, dw_ratio: f64) -> ReplknetConfig {
    ReplknetConfig {
        large_kernel_sizes: vec![9, 7],
        layers: vec![1, 1],
        channels: vec![4, 8],
        small_kernel: small,
        dw_ratio,
        ffn_ratio: 2.0,
        num_classes: 5,
        in_channels: 3,
    }
}

/// Whole-network results: every element within `tol * max(max |want|, 1)`, NaN-aware.
fn assert_close(what: &str, got: &Tensor<f32>, want: &Tensor<f32>, tol: f64) {
    assert_matches(what, got, &Expected::scaled(want, tol));
}

/// Every block type, folded (deploy) vs. evaluated as the training-form graph.
#[test]
fn reparam_equivalence_per_block() {
    for (small, dw_ratio, form) in [
        (Some(3), 1.0, Form::Training),
        (Some(5), 1.5, Form::Training),
        (None, 1.5, Form::Training),
        (Some(3), 1.0, Form::Merged),
    ] {
        let cfg = tiny_config(small, dw_ratio);
        let ck = Checkpoint::from_tensors(lkconv::model::random_weights(&cfg, form, 3).unwrap())
            .unwrap();
        if form == Form::Training {
            assert_eq!(ck.config, cfg.clone());
        } else {
            // A merged checkpoint does not say which small kernel was merged.
            assert_eq!(ck.config.small_kernel, None);
        }
        let mut rng = common::rng();
        // Stem (odd size: checks padding/stride edges).
        let x = Tensor::<f32>::random(&[2, 3, 21, 18], &mut rng).unwrap();
        let stem = reparam::fold_stem(&ck).unwrap();
        let want = reference::stem(&ck, &Act64::from_tensor(&x).unwrap()).unwrap();
        assert_close(
            "stem",
            &stem.forward(&x).unwrap(),
            &want.to_tensor().unwrap(),
            2e-5,
        );
        // Blocks of both stages, image smaller than the kernel in stage 1.
        for (s, hw) in [(0usize, 11usize), (1, 5)] {
            let c = cfg.channels[s];
            let x = Tensor::<f32>::random(&[2, c, hw, hw + 1], &mut rng).unwrap();
            let x64 = Act64::from_tensor(&x).unwrap();
            let b = reparam::fold_replk_block(&ck, s, 0).unwrap();
            let want = reference::replk_block(&ck, s, 0, &x64).unwrap();
            assert_close(
                "RepLKBlock",
                &b.forward(&x).unwrap(),
                &want.to_tensor().unwrap(),
                2e-5,
            );
            let f = reparam::fold_ffn_block(&ck, s, 0).unwrap();
            let want = reference::ffn_block(&ck, s, 0, &x64).unwrap();
            assert_close(
                "ConvFFN",
                &f.forward(&x).unwrap(),
                &want.to_tensor().unwrap(),
                2e-5,
            );
        }
        let x = Tensor::<f32>::random(&[1, 4, 7, 6], &mut rng).unwrap();
        let t = reparam::fold_transition(&ck, 0).unwrap();
        let want = reference::transition(&ck, 0, &Act64::from_tensor(&x).unwrap()).unwrap();
        assert_close(
            "transition",
            &t.forward(&x).unwrap(),
            &want.to_tensor().unwrap(),
            2e-5,
        );
        // The whole model.
        let model = Replknet::from_checkpoint(&ck).unwrap();
        let x = Tensor::<f32>::random(&[2, 3, 32, 27], &mut rng).unwrap();
        let (logits, stages) = reference::forward(&ck, &x).unwrap();
        assert_close(
            "logits",
            &model.forward(&x).unwrap(),
            &logits.unwrap(),
            2e-5,
        );
        let feats = model.forward_features(&x, &[1, 0]).unwrap();
        assert_close("stage1", &feats[0], &stages[1], 2e-5);
        assert_close("stage0", &feats[1], &stages[0], 2e-5);
    }
}

#[test]
fn param_counts() {
    let b = ReplknetConfig::replknet_31b();
    assert_eq!(b.param_count(Form::Training), 79_864_168);
    assert_eq!(b.param_count(Form::Merged), 79_527_272);
    assert_eq!(
        ReplknetConfig::replknet_31l().param_count(Form::Training),
        172_671_016
    );
    assert_eq!(
        ReplknetConfig::replknet_xl().param_count(Form::Training),
        335_435_752
    );
    let gmacs = b.macs(224, 224) / 1e9;
    assert!((gmacs - 15.35).abs() < 0.05, "31B GMACs {gmacs}");
    assert_eq!(ReplknetConfig::by_name("31B").unwrap(), b);
    assert!(matches!(
        ReplknetConfig::by_name("31x"),
        Err(Error::InvalidArgument(_))
    ));
}

#[test]
fn missing_and_misshaped_tensors_are_named() {
    let file = golden();
    let mut t = file.tensors.clone();
    t.remove("stages.2.blocks.3.pw1.bn.running_var");
    t.insert(
        "stages.1.blocks.0.large_kernel.small_conv.conv.weight".into(),
        Tensor::zeros(&[16, 1, 3, 3]).unwrap(),
    );
    match Checkpoint::from_tensors(t) {
        Err(Error::Weights(msg)) => {
            assert!(
                msg.contains("stages.2.blocks.3.pw1.bn.running_var"),
                "{msg}"
            );
            assert!(
                msg.contains("stages.1.blocks.0.large_kernel.small_conv.conv.weight"),
                "{msg}"
            );
        }
        other => panic!("expected Error::Weights, got {other:?}"),
    }
    let mut t = file.tensors.clone();
    t.remove("stem.0.conv.weight");
    match Checkpoint::from_tensors(t) {
        Err(Error::Weights(msg)) => assert!(msg.contains("stem.0.conv.weight"), "{msg}"),
        other => panic!("expected Error::Weights, got {other:?}"),
    }
    let mut t = file.tensors.clone();
    t.insert("head.weight".into(), Tensor::zeros(&[10, 63]).unwrap());
    match Checkpoint::from_tensors(t) {
        Err(Error::Weights(msg)) => assert!(msg.contains("head.weight"), "{msg}"),
        other => panic!("expected Error::Weights, got {other:?}"),
    }
    // An empty or foreign file.
    assert!(matches!(
        Checkpoint::from_tensors(BTreeMap::new()),
        Err(Error::Weights(_))
    ));
}

#[test]
fn corrupt_file_is_an_error() {
    let dir = tempfile::tempdir().unwrap();
    let bytes = std::fs::read(GOLDEN).unwrap();
    let p = dir.path().join("truncated.safetensors");
    std::fs::write(&p, &bytes[..bytes.len() / 2]).unwrap();
    assert!(matches!(Replknet::load(&p), Err(Error::SafeTensors(_))));
    let p = dir.path().join("garbage.safetensors");
    std::fs::write(&p, b"not a safetensors file at all").unwrap();
    assert!(matches!(Replknet::load(&p), Err(Error::SafeTensors(_))));
    assert!(matches!(
        Replknet::load(dir.path().join("absent.safetensors")),
        Err(Error::Io { .. })
    ));
}

#[test]
fn bad_inputs_are_errors() {
    let file = golden();
    let model = Replknet::from_tensors(file.tensors.clone()).unwrap();
    let x = Tensor::<f32>::zeros(&[1, 4, 32, 32]).unwrap();
    assert!(matches!(model.forward(&x), Err(Error::Shape { .. })));
    let x = Tensor::<f32>::zeros(&[3, 32, 32]).unwrap();
    assert!(matches!(model.forward(&x), Err(Error::Shape { .. })));
    let x = Tensor::<f32>::zeros(&[1, 3, 32, 32]).unwrap();
    assert!(matches!(
        model.forward_features(&x, &[4]),
        Err(Error::InvalidArgument(_))
    ));
    // Tiny and odd sizes, batch > 1.
    let mut rng = common::rng();
    for (n, h, w) in [(1, 1, 1), (3, 17, 9), (2, 64, 48)] {
        let x = Tensor::<f32>::random(&[n, 3, h, w], &mut rng).unwrap();
        let y = model.forward(&x).unwrap();
        assert_eq!(y.shape(), [n, 10]);
        assert!(y.data().iter().all(|v| v.is_finite()));
    }
}

#[test]
fn batch_images_are_independent() {
    let file = golden();
    let model = Replknet::from_tensors(file.tensors.clone()).unwrap();
    let mut rng = common::rng();
    let x = Tensor::<f32>::random(&[3, 3, 40, 36], &mut rng).unwrap();
    let y = model.forward(&x).unwrap();
    for i in 0..3 {
        let xi =
            Tensor::from_vec(&[1, 3, 40, 36], x.data()[i * 4320..(i + 1) * 4320].to_vec()).unwrap();
        let yi = model.forward(&xi).unwrap();
        let batched = Tensor::from_vec(&[1, 10], y.data()[i * 10..(i + 1) * 10].to_vec()).unwrap();
        assert_close(&format!("image {i} alone"), &yi, &batched, 1e-5);
    }
}

#[test]
fn erf_and_gelu_are_accurate() {
    use lkconv::model::cpu::{erf, gelu};
    // A high-precision erf from the tests' erfc (common::erfc_hp).
    fn erf_hp(x: f64) -> f64 {
        (1.0 - erfc_hp(x.abs())).copysign(x)
    }
    let mut worst = 0.0f64;
    for i in -6000..=6000 {
        let x = i as f64 * 1e-3;
        let e = (erf(x) - erf_hp(x)).abs();
        assert!(!e.is_nan(), "erf({x}) is NaN");
        worst = worst.max(e);
    }
    assert!(worst < 1e-7, "erf max abs error {worst}");
    // The vectorised GELU the engine runs against the f64 one.
    let mut worst = 0.0f32;
    for i in -20000..=20000 {
        let x = i as f32 * 1e-3;
        let want = gelu(x);
        let got = lkconv::model::cpu::gelu_fast(x);
        let e = (got - want).abs() / want.abs().max(1e-6);
        assert!(!e.is_nan(), "gelu_fast({x}) = {got}, gelu = {want}");
        worst = worst.max(e);
    }
    assert!(worst < 3e-6, "gelu_fast max relative error {worst}");
    assert_eq!(gelu(0.0), 0.0);
    assert!((gelu(1.0) - 0.841_344_7).abs() < 1e-6);
    assert!((gelu(-1.0) + 0.158_655_25).abs() < 1e-6);
    assert!(gelu(-20.0).abs() < 1e-30 && gelu(20.0) == 20.0);
}

fn lkconv_cli(args: &[&str]) -> std::process::Output {
    std::process::Command::new(env!("CARGO_BIN_EXE_lkconv"))
        .args(args)
        .output()
        .expect("run lkconv")
}

#[test]
fn cli_replknet_writes_logits_and_stages() {
    let dir = tempfile::tempdir().unwrap();
    let file = golden();
    // Merged-form weights file (with the public `model.` prefix) for the CLI.
    let w = dir.path().join("merged.safetensors");
    let merged: Vec<(String, Tensor<f32>)> = merged_tensors(&file)
        .into_iter()
        .filter(|(n, _)| {
            !n.starts_with("logits") && !n.starts_with("stage") || n.starts_with("stages.")
        })
        .map(|(n, t)| (format!("model.{n}"), t))
        .collect();
    let refs: Vec<(&str, &Tensor<f32>)> = merged.iter().map(|(n, t)| (n.as_str(), t)).collect();
    lkconv::safetensors_io::write(&w, &refs, None).unwrap();
    let out = dir.path().join("y.safetensors");
    let o = lkconv_cli(&[
        "replknet",
        "--weights",
        w.to_str().unwrap(),
        "--input",
        GOLDEN,
        "--output",
        out.to_str().unwrap(),
    ]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let y = TensorFile::read(&out).unwrap();
    let want = file.get("logits_merged").unwrap();
    assert_close("cli merged logits", y.get("logits").unwrap(), want, 1e-4);
    let o = lkconv_cli(&[
        "replknet",
        "--weights",
        GOLDEN,
        "--input",
        GOLDEN,
        "--output",
        out.to_str().unwrap(),
        "--out-indices",
        "2,0",
    ]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let y = TensorFile::read(&out).unwrap();
    for i in [0, 2] {
        let name = format!("stage{i}");
        let want = file.get(&name).unwrap();
        assert_close(&format!("cli {name}"), y.get(&name).unwrap(), want, 1e-4);
    }
    assert!(matches!(y.get("logits"), Err(Error::Weights(_))));
    // Errors exit with 2: unknown device, bad index, missing weights, no `input` tensor.
    assert!(
        lkconv::sim::available(),
        "the kernel simulator was not built"
    );
    {
        let o = lkconv_cli(&[
            "replknet",
            "--weights",
            GOLDEN,
            "--input",
            GOLDEN,
            "--output",
            out.to_str().unwrap(),
            "--device",
            "sim",
        ]);
        assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
        let y = TensorFile::read(&out).unwrap();
        let want = file.get("logits").unwrap();
        assert_close("cli sim logits", y.get("logits").unwrap(), want, 1e-4);
    }
    for args in [
        vec!["--device", "tpu"],
        vec!["--out-indices", "7"],
        vec!["--out-indices", "x"],
    ] {
        let mut a = vec![
            "replknet",
            "--weights",
            GOLDEN,
            "--input",
            GOLDEN,
            "--output",
            out.to_str().unwrap(),
        ];
        a.extend(args);
        assert_eq!(lkconv_cli(&a).status.code(), Some(2), "{a:?}");
    }
    let o = lkconv_cli(&[
        "replknet",
        "--weights",
        GOLDEN,
        "--input",
        w.to_str().unwrap(),
        "--output",
        out.to_str().unwrap(),
    ]);
    assert_eq!(o.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&o.stderr).contains("input"));
}

#[test]
fn cli_classify_prints_top5() {
    let dir = tempfile::tempdir().unwrap();
    let img = image::RgbImage::from_fn(97, 61, |x, y| {
        image::Rgb([(x * 2) as u8, (y * 4) as u8, ((x + y) % 256) as u8])
    });
    let p = dir.path().join("img.png");
    img.save(&p).unwrap();
    let o = lkconv_cli(&[
        "classify",
        p.to_str().unwrap(),
        "--weights",
        GOLDEN,
        "--size",
        "64",
    ]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let stdout = String::from_utf8_lossy(&o.stdout);
    assert_eq!(
        stdout.lines().filter(|l| l.contains('%')).count(),
        5,
        "{stdout}"
    );
    let bad = dir.path().join("bad.jpg");
    std::fs::write(&bad, b"not an image").unwrap();
    let o = lkconv_cli(&["classify", bad.to_str().unwrap(), "--weights", GOLDEN]);
    assert_eq!(o.status.code(), Some(2));
    // Sizes whose resize would take tens of gigabytes: a typed error, not an abort.
    let thin = dir.path().join("thin.png");
    image::RgbImage::from_pixel(1, 3000, image::Rgb([9, 9, 9]))
        .save(&thin)
        .unwrap();
    for (img, size) in [(&p, "100000"), (&p, "4294967520"), (&thin, "2048")] {
        let o = lkconv_cli(&[
            "classify",
            img.to_str().unwrap(),
            "--weights",
            GOLDEN,
            "--size",
            size,
        ]);
        let err = String::from_utf8_lossy(&o.stderr);
        assert_eq!(o.status.code(), Some(2), "--size {size}: {err}");
        assert!(err.contains("invalid argument"), "--size {size}: {err}");
    }
}

#[test]
fn imagenet_names() {
    use lkconv::model::imagenet::IMAGENET_CLASSES;
    assert_eq!(IMAGENET_CLASSES.len(), 1000);
    assert_eq!(IMAGENET_CLASSES[0], "tench");
    assert_eq!(IMAGENET_CLASSES[207], "golden retriever");
    assert_eq!(IMAGENET_CLASSES[999], "toilet tissue");
}

/// A backbone-only checkpoint (no norm/head, per-stage norms as downstream checkpoints have).
/// The device program in the simulator against the CPU engine on random weights: batch 2,
/// odd image sizes (partial tiles everywhere), dw_ratio 1.5, stage outputs in a custom order,
/// a second input size and a second model through the same workspace (program rebuilt,
/// weights re-uploaded), and a backbone with per-stage norms (the affine kernel).
#[test]
fn simulator_matches_cpu_engine_on_random_models() {
    assert!(
        lkconv::sim::available(),
        "the kernel simulator was not built"
    );
    let mut rng = common::rng();
    let mut ws = lkconv::model::Workspace::with_backend(Backend::Sim);
    for (seed, small, dw_ratio, (h, w)) in [
        (3, Some(3), 1.5, (37, 29)),
        (3, Some(3), 1.5, (16, 23)),
        (4, None, 1.0, (21, 18)),
    ] {
        let model = Replknet::random(&tiny_config(small, dw_ratio), seed).unwrap();
        let x = Tensor::<f32>::random(&[2, 3, h, w], &mut rng).unwrap();
        let want = model
            .run(
                &x,
                Some(&[1, 0]),
                true,
                &mut lkconv::model::Workspace::new(),
            )
            .unwrap();
        let got = model.run(&x, Some(&[1, 0]), true, &mut ws).unwrap();
        assert_close(
            "logits",
            got.logits.as_ref().unwrap(),
            want.logits.as_ref().unwrap(),
            2e-5,
        );
        assert_eq!(got.stages.len(), 2);
        for ((gi, g), (wi, w)) in got.stages.iter().zip(&want.stages) {
            assert_eq!(gi, wi);
            assert_close(&format!("stage{gi}"), g, w, 2e-5);
        }
    }
    // Per-stage norms, no head.
    let cfg = tiny_config(Some(3), 1.0);
    let mut t = lkconv::model::random_weights(&cfg, Form::Training, 12).unwrap();
    t.retain(|n, _| !n.starts_with("norm.") && !n.starts_with("head."));
    for s in 0..2 {
        let c = cfg.channels[s];
        for (f, lo) in [
            ("weight", 0.5),
            ("bias", -0.2),
            ("running_mean", -0.2),
            ("running_var", 0.5),
        ] {
            let v: Vec<f32> = (0..c).map(|_| lo + 0.5 * rng.uniform()).collect();
            t.insert(
                format!("stages.{s}.norm.{f}"),
                Tensor::from_vec(&[c], v).unwrap(),
            );
        }
    }
    let model = Replknet::from_tensors(t).unwrap();
    let x = Tensor::<f32>::random(&[1, 3, 24, 20], &mut rng).unwrap();
    let want = model.forward_features(&x, &[0, 1]).unwrap();
    let got = model.run(&x, Some(&[0, 1]), false, &mut ws).unwrap();
    assert_close("stage0 (normed)", &got.stages[0].1, &want[0], 2e-5);
    assert_close("stage1 (normed)", &got.stages[1].1, &want[1], 2e-5);
    assert!(matches!(
        model.run(&x, None, true, &mut ws),
        Err(Error::Unsupported(_))
    ));
}

#[test]
fn downstream_backbone_with_stage_norms() {
    let cfg = tiny_config(Some(3), 1.0);
    let mut t = lkconv::model::random_weights(&cfg, Form::Training, 11).unwrap();
    t.retain(|n, _| !n.starts_with("norm.") && !n.starts_with("head."));
    let mut rng = common::rng();
    for s in 0..2 {
        let c = cfg.channels[s];
        for (f, lo) in [
            ("weight", 0.5),
            ("bias", -0.2),
            ("running_mean", -0.2),
            ("running_var", 0.5),
        ] {
            let v: Vec<f32> = (0..c).map(|_| lo + 0.5 * rng.uniform()).collect();
            t.insert(
                format!("backbone.stages.{s}.norm.{f}"),
                Tensor::from_vec(&[c], v).unwrap(),
            );
        }
    }
    let t: BTreeMap<_, _> = t
        .into_iter()
        .map(|(n, v)| {
            if n.starts_with("backbone.") {
                (n, v)
            } else {
                (format!("backbone.{n}"), v)
            }
        })
        .collect();
    let ck = Checkpoint::from_tensors(t).unwrap();
    assert!(!ck.has_head);
    assert_eq!(ck.stage_norms, vec![true, true]);
    let model = Replknet::from_checkpoint(&ck).unwrap();
    let x = Tensor::<f32>::random(&[1, 3, 24, 20], &mut rng).unwrap();
    assert!(matches!(model.forward(&x), Err(Error::Unsupported(_))));
    let (_, stages) = reference::forward(&ck, &x).unwrap();
    let feats = model.forward_features(&x, &[0, 1]).unwrap();
    assert_close("stage0 (normed)", &feats[0], &stages[0], 2e-5);
    assert_close("stage1 (normed)", &feats[1], &stages[1], 2e-5);
}

#[test]
fn cli_bench_model_runs() {
    let o = lkconv_cli(&["bench", "--model", "31b", "--size", "32", "--reps", "1"]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    assert!(String::from_utf8_lossy(&o.stdout).contains("images/s"));
    let o = lkconv_cli(&["bench", "--model", "31x", "--reps", "1"]);
    assert_eq!(o.status.code(), Some(2));
    // the device program in the simulator (the CUDA path's launches)
    assert!(
        lkconv::sim::available(),
        "the kernel simulator was not built"
    );
    {
        let o = lkconv_cli(&[
            "bench", "--model", "31b", "--device", "sim", "--size", "32", "--reps", "1",
        ]);
        assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
        assert!(String::from_utf8_lossy(&o.stdout).contains("images/s"));
    }
    let o = lkconv_cli(&[
        "bench", "--model", "31b", "--device", "cpu", "--dtype", "bf16", "--size", "32", "--reps",
        "1",
    ]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    assert!(String::from_utf8_lossy(&o.stdout).contains(") bf16: median"));
    let o = lkconv_cli(&[
        "bench", "--model", "31b", "--device", "cpu", "--dtype", "f16", "--reps", "1",
    ]);
    assert_eq!(o.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&o.stderr).contains("f32 or bf16"));
    assert!(
        lkconv::sim::available(),
        "the kernel simulator was not built"
    );
    {
        let o = lkconv_cli(&[
            "bench", "--model", "31b", "--device", "sim", "--dtype", "bf16", "--size", "32",
            "--reps", "1",
        ]);
        assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
        assert!(String::from_utf8_lossy(&o.stdout).contains("sim bf16"));
    }
}

/// Wide layers at a size where the 1x1 convs run in several column blocks.
#[test]
fn wide_layers_match_reference() {
    let cfg = ReplknetConfig {
        large_kernel_sizes: vec![9, 5],
        layers: vec![1, 1],
        channels: vec![64, 96],
        small_kernel: Some(3),
        dw_ratio: 1.0,
        ffn_ratio: 4.0,
        num_classes: 7,
        in_channels: 3,
    };
    let ck =
        Checkpoint::from_tensors(lkconv::model::random_weights(&cfg, Form::Training, 21).unwrap())
            .unwrap();
    let model = Replknet::from_checkpoint(&ck).unwrap();
    let mut rng = common::rng();
    let x = Tensor::<f32>::random(&[2, 3, 164, 150], &mut rng).unwrap();
    let (logits, stages) = reference::forward(&ck, &x).unwrap();
    let mut ws = lkconv::model::Workspace::new();
    let out = model.run(&x, Some(&[0, 1]), true, &mut ws).unwrap();
    assert_close(
        "logits",
        out.logits.as_ref().unwrap(),
        logits.as_ref().unwrap(),
        2e-5,
    );
    assert_close("stage0", &out.stages[0].1, &stages[0], 2e-5);
    assert_close("stage1", &out.stages[1].1, &stages[1], 2e-5);
}

/// Found by the fuzzer: a lone huge block index sized the expected-tensor list (50 GB), and a
/// stage index of usize::MAX overflowed; both are now `Error::Weights`.
#[test]
fn lying_block_and_stage_indices_are_errors() {
    let file = golden();
    let v = file
        .get("stages.0.blocks.0.pw1.bn.running_mean")
        .unwrap()
        .clone();
    let mut t = file.tensors.clone();
    t.insert(
        "stages.1.blocks.99999999999.pw1.bn.running_mean".into(),
        v.clone(),
    );
    assert!(matches!(
        Checkpoint::from_tensors(t),
        Err(Error::Weights(_))
    ));
    let mut t = file.tensors.clone();
    t.insert(
        format!("stages.{}.blocks.0.pw1.bn.running_mean", usize::MAX),
        v,
    );
    assert!(matches!(
        Checkpoint::from_tensors(t),
        Err(Error::Weights(_))
    ));
}

/// bf16 and f16 storage end to end in the simulator against the CPU engine (f32): the
/// wiring of every half-precision kernel and GEMM (rounding errors only).
#[test]
fn half_precision_programs_in_the_simulator() {
    assert!(
        lkconv::sim::available(),
        "the kernel simulator was not built"
    );
    let cfg = ReplknetConfig {
        large_kernel_sizes: vec![9, 7],
        layers: vec![1, 1],
        channels: vec![8, 16],
        small_kernel: Some(3),
        dw_ratio: 1.0,
        ffn_ratio: 2.0,
        num_classes: 5,
        in_channels: 3,
    };
    let model = Replknet::random(&cfg, 7).unwrap();
    let mut rng = common::rng();
    let x = Tensor::<f32>::random(&[2, 3, 27, 22], &mut rng).unwrap();
    let want = model
        .run(&x, Some(&[0]), true, &mut lkconv::model::Workspace::new())
        .unwrap();
    for dt in [lkconv::DType::Bf16, lkconv::DType::F16] {
        let mut g =
            lkconv::model::GpuModel::new(&model.deploy, lkconv::model::GpuTarget::Sim, dt).unwrap();
        assert_eq!(g.dtype(), dt);
        let got = g.run(&model.deploy, &x, &[0], true).unwrap();
        for (a, b) in [
            (got.logits.as_ref().unwrap(), want.logits.as_ref().unwrap()),
            (&got.stages[0].1, &want.stages[0].1),
        ] {
            let mag = b.data().iter().fold(0f64, |m, v| m.max(f64::from(v.abs())));
            // bf16 keeps 8 significant bits, f16 11
            let tol = if dt == lkconv::DType::Bf16 {
                0.05
            } else {
                0.01
            };
            assert_matches(
                &format!("{dt}"),
                a,
                &Expected::within(b, tol * mag.max(1e-3)),
            );
        }
    }
}

/// Folding a checkpoint it owns (dropping each part once folded) gives the same deploy model,
/// bit for bit, as folding a borrowed one; `Replknet::load` takes that path, and the file read
/// tensor by tensor holds the same values as the bytes parsed in memory.
#[test]
fn consuming_fold_and_streaming_read_match_the_borrowed_paths() {
    let ck = Checkpoint::read(GOLDEN).unwrap();
    let borrowed = Replknet::from_checkpoint(&ck).unwrap();
    let owned = Replknet::from_checkpoint_owned(ck.clone()).unwrap();
    let loaded = Replknet::load(GOLDEN).unwrap();
    let want = format!("{:?}", borrowed.deploy);
    assert_eq!(format!("{:?}", owned.deploy), want);
    assert_eq!(format!("{:?}", loaded.deploy), want);
    // Against the safetensors crate's own parse of the whole file.
    let bytes = std::fs::read(GOLDEN).unwrap();
    let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
    let streamed = golden();
    assert_eq!(streamed.tensors.len(), st.len());
    for (name, view) in st.tensors() {
        assert_eq!(view.dtype(), safetensors::Dtype::F32, "{name}");
        let want: Vec<f32> = view
            .data()
            .chunks_exact(4)
            .map(|b| f32::from_le_bytes(b.try_into().unwrap()))
            .collect();
        let got = &streamed.tensors[&name];
        assert_eq!(got.shape(), view.shape(), "{name}");
        assert_eq!(got.data(), &want[..], "{name}");
    }
}
