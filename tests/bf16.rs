//! The bf16 CPU paths against the f64 reference on the same bf16-rounded operands: the
//! 1x1-convolution GEMM on every instruction set this machine has (AMX, AVX-512 BF16, the f32
//! fallback; each called explicitly in this process), the depthwise forward, data gradient and
//! weight gradient, and the whole RepLKNet.

mod common;

use common::{assert_matches, case, random, rng, Case, Expected, Inputs};
use half::bf16;
use lkconv::cpu::bf16::{self as b16, Bf16Input, Bf16Isa, Bf16Weights};
use lkconv::cpu::bf16_dw;
use lkconv::{DType, DwConv2d, Op, Padding, Rng, Tensor};

/// A random matrix of bf16-exact values (as f32).
fn bf16_values(shape: &[usize], rng: &mut Rng) -> Tensor<f32> {
    random::<bf16>(shape, rng).cast::<f32>()
}

/// C = A * B (+ C0 when given) in f64, and the same over absolute values (the error scale).
fn gemm_expected(a: &Tensor<f32>, b: &Tensor<f32>, c0: Option<&Tensor<f32>>) -> Expected {
    let (m, k, n) = (a.shape()[0], a.shape()[1], b.shape()[1]);
    let mut value = vec![0.0f32; m * n];
    let mut mag = vec![0.0f32; m * n];
    for i in 0..m {
        for j in 0..n {
            let (mut s, mut t) = (0.0f64, 0.0f64);
            for p in 0..k {
                let prod = a.data()[i * k + p] as f64 * b.data()[p * n + j] as f64;
                s += prod;
                t += prod.abs();
            }
            if let Some(c) = c0 {
                s += c.data()[i * n + j] as f64;
                t += (c.data()[i * n + j] as f64).abs();
            }
            value[i * n + j] = s as f32;
            mag[i * n + j] = t as f32;
        }
    }
    let v = Tensor::from_vec(&[m, n], value).unwrap();
    let g = Tensor::from_vec(&[m, n], mag).unwrap();
    Expected::of_sum(DType::F32, k + 1, &v, &g)
}

/// GEMM sizes: tile multiples, odd sizes, k of zero, k and n of one, k not a multiple of 32, wide
/// and tall.
const GEMM_SIZES: [(usize, usize, usize); 13] = [
    (1, 1, 1),
    (3, 0, 5),
    (16, 32, 16),
    (32, 32, 32),
    (33, 31, 17),
    (7, 65, 3),
    (128, 128, 196),
    (5, 1, 50),
    (40, 3, 1),
    (64, 257, 49),
    (17, 96, 100),
    (130, 64, 33),
    (3, 600, 70),
];

fn check_gemm(isa: Bf16Isa, rng: &mut Rng) {
    for &(m, k, n) in &GEMM_SIZES {
        let a = bf16_values(&[m, k], rng);
        let b = bf16_values(&[k, n], rng);
        let w = Bf16Weights::new(isa, m, k, a.data()).unwrap();
        let mut x = Bf16Input::new();
        x.pack(isa, k, n, b.data(), n).unwrap();
        // beta = 0: C is poisoned first and must be fully overwritten.
        let mut c = vec![f32::NAN; m * n];
        b16::gemm(&w, &x, 0.0, &mut c, n).unwrap();
        let got = Tensor::from_vec(&[m, n], c.clone()).unwrap();
        assert_matches(
            &format!("{isa:?} gemm {m}x{k}x{n}"),
            &got,
            &gemm_expected(&a, &b, None),
        );
        // beta = 1 into a block of a wider matrix (ldc > n); the columns beyond n are untouched.
        let ldc = n + 3;
        let c0 = bf16_values(&[m, n], rng);
        let mut wide = vec![-7.0f32; m * ldc];
        for i in 0..m {
            wide[i * ldc..i * ldc + n].copy_from_slice(&c0.data()[i * n..(i + 1) * n]);
        }
        b16::gemm(&w, &x, 1.0, &mut wide, ldc).unwrap();
        let block: Vec<f32> = (0..m)
            .flat_map(|i| wide[i * ldc..i * ldc + n].to_vec())
            .collect();
        assert!((0..m).all(|i| wide[i * ldc + n..(i + 1) * ldc] == [-7.0; 3]));
        let got = Tensor::from_vec(&[m, n], block).unwrap();
        assert_matches(
            &format!("{isa:?} gemm beta=1 {m}x{k}x{n}"),
            &got,
            &gemm_expected(&a, &b, Some(&c0)),
        );
    }
}

/// Blocks of the output computed separately (as RepLKNet's tasks do) equal the whole.
fn check_gemm_blocks(isa: Bf16Isa, rng: &mut Rng) {
    let (m, k, n) = (70, 45, 90);
    let a = bf16_values(&[m, k], rng);
    let b = bf16_values(&[k, n], rng);
    let w = Bf16Weights::new(isa, m, k, a.data()).unwrap();
    let mut x = Bf16Input::new();
    x.pack(isa, k, n, b.data(), n).unwrap();
    let mut c = vec![f32::NAN; m * n];
    for (r0, rows) in [(0, 16), (16, 33), (49, 21)] {
        for (c0, cols) in [(0, 7), (7, 48), (55, 35)] {
            // SAFETY: the blocks are disjoint and inside c (m x n, row stride n).
            unsafe {
                b16::gemm_raw(
                    &w,
                    r0,
                    rows,
                    &x,
                    c0,
                    cols,
                    0.0,
                    c.as_mut_ptr().add(r0 * n + c0),
                    n,
                )
            };
        }
    }
    let got = Tensor::from_vec(&[m, n], c).unwrap();
    assert_matches(
        &format!("{isa:?} gemm in blocks"),
        &got,
        &gemm_expected(&a, &b, None),
    );
}

/// NaN and infinities in the operands propagate as the f64 reference says (and padding adds
/// none).
fn check_gemm_nonfinite(isa: Bf16Isa, rng: &mut Rng) {
    let (m, k, n) = (20, 37, 21);
    let mut a = bf16_values(&[m, k], rng);
    let mut b = bf16_values(&[k, n], rng);
    a.data_mut()[3 * k + 36] = f32::INFINITY;
    b.data_mut()[5 * n + 20] = f32::NAN;
    b.data_mut()[36 * n] = f32::NEG_INFINITY;
    let w = Bf16Weights::new(isa, m, k, a.data()).unwrap();
    let mut x = Bf16Input::new();
    x.pack(isa, k, n, b.data(), n).unwrap();
    // poisoned: with beta 0 the output is only written, never read
    let mut c = vec![f32::NAN; m * n];
    b16::gemm(&w, &x, 0.0, &mut c, n).unwrap();
    let got = Tensor::from_vec(&[m, n], c).unwrap();
    assert_matches(
        &format!("{isa:?} gemm non-finite"),
        &got,
        &gemm_expected(&a, &b, None),
    );
}

#[test]
fn gemm_every_isa_matches_reference() {
    let mut rng = rng();
    for isa in Bf16Isa::all_available() {
        println!("checking {isa:?}");
        check_gemm(isa, &mut rng);
        check_gemm_blocks(isa, &mut rng);
        check_gemm_nonfinite(isa, &mut rng);
    }
}

#[test]
fn packing_rounds_to_nearest_even() {
    // 1 + 2^-8 is halfway between two bf16 values: ties go to the even one (1.0);
    // 1 + 3 * 2^-8 goes up to 1 + 2^-6.
    assert_eq!(b16::round_bf16(1.0 + 2f32.powi(-8)), 1.0);
    assert_eq!(
        b16::round_bf16(1.0 + 3.0 * 2f32.powi(-8)),
        1.0 + 2f32.powi(-6)
    );
    assert!(b16::round_bf16(f32::NAN).is_nan());
    assert_eq!(b16::round_bf16(f32::MAX), f32::INFINITY);
    for v in [0.1f32, -3.7, 1e-20, 6.5e4] {
        assert_eq!(b16::round_bf16(v), bf16::from_f32(v).to_f32());
    }
}

#[test]
fn mismatched_operands_are_errors() {
    let isa = Bf16Isa::Fallback;
    let w = Bf16Weights::new(isa, 4, 3, &[1.0; 12]).unwrap();
    assert!(Bf16Weights::new(isa, 4, 3, &[1.0; 11]).is_err());
    let mut x = Bf16Input::new();
    assert!(x.pack(isa, 5, 2, &[1.0; 10], 2).is_ok());
    let mut c = vec![0.0; 8];
    assert!(b16::gemm(&w, &x, 0.0, &mut c, 2).is_err()); // k 3 vs 5
    assert!(x.pack(isa, 3, 2, &[1.0; 5], 2).is_err()); // input too short
    x.pack(isa, 3, 2, &[1.0; 6], 2).unwrap();
    assert!(b16::gemm(&w, &x, 0.0, &mut c[..7], 2).is_err()); // output too short
    for other in Bf16Isa::all_available().into_iter().filter(|&i| i != isa) {
        let mut y = Bf16Input::new();
        y.pack(other, 3, 2, &[1.0; 6], 2).unwrap();
        assert!(b16::gemm(&w, &y, 0.0, &mut c, 2).is_err()); // packed for another ISA
    }
}

/// Where the CPU reports the instructions, the fast paths must be used: fails if AMX or AVX-512
/// BF16 were silently skipped on a machine that has them.
#[test]
fn best_isa_is_used_where_present() {
    let amx = b16::cpu_has_amx();
    let dp =
        std::is_x86_feature_detected!("avx512f") && std::is_x86_feature_detected!("avx512bf16");
    println!(
        "CPU: AMX-BF16 {amx}, AVX-512 BF16 {dp}; available {:?}; picked {:?}",
        Bf16Isa::all_available(),
        b16::detect()
    );
    assert_eq!(Bf16Isa::Avx512Bf16.available(), dp);
    if amx && cfg!(target_os = "linux") {
        // Linux grants the tile state on request unless it is too old or forbids it.
        assert!(Bf16Isa::Amx.available(), "AMX present but not enabled");
    }
    if std::env::var_os("LKCONV_CPU_ISA").is_none() {
        let best = Bf16Isa::all_available().into_iter().max().unwrap();
        assert_eq!(b16::detect(), best);
    }
}

/// Depthwise cases: odd and even kernels, K > image, batch 1, one channel, non-square images and
/// kernels, asymmetric and zero padding, stride 2, and RepLKNet-like sizes.
fn dw_cases() -> Vec<Case> {
    let mut v = vec![
        case(1, 3, 56, 56, DwConv2d::new(31, 31)),
        case(2, 2, 28, 28, DwConv2d::new(29, 29)),
        case(1, 4, 14, 14, DwConv2d::new(27, 27)), // K > image
        case(1, 20, 7, 7, DwConv2d::new(13, 13)),  // small planes
        case(1, 1, 5, 5, DwConv2d::new(13, 13)),   // one channel, K >> image
        case(2, 2, 20, 40, DwConv2d::new(31, 5)),
        case(1, 2, 40, 20, DwConv2d::new(5, 31)),
        case(1, 2, 12, 12, DwConv2d::new(5, 5).with_padding(0, 0)),
        case(1, 2, 10, 11, DwConv2d::new(3, 3).with_padding(4, 5)),
        case(1, 3, 17, 19, DwConv2d::new(7, 7).with_stride(2, 2)),
        case(
            1,
            2,
            15,
            22,
            DwConv2d::new(9, 8).with_padding_sides(Padding {
                top: 1,
                bottom: 6,
                left: 7,
                right: 0,
            }),
        ),
    ];
    for k in 1..=12 {
        let (h, w) = [(9, 13), (16, 16), (23, 7), (40, 33)][k % 4];
        v.push(case(1 + k % 2, 1 + k % 3, h, w, DwConv2d::new(k, k)));
    }
    v
}

/// bf16-exact random inputs of a case, as f32 (the values the kernels see after rounding).
fn bf16_inputs(cs: &Case, rng: &mut Rng) -> Inputs<f32> {
    let t = cs.inputs::<bf16>(rng);
    Inputs {
        x: t.x.cast(),
        w: t.w.cast(),
        bias: t.bias.map(|b| b.cast()),
        dy: t.dy.cast(),
    }
}

fn check_depthwise(rng: &mut Rng, nonfinite: bool) {
    for cs in dw_cases() {
        let (conv, s) = (cs.conv, cs.shape());
        let mut t = bf16_inputs(&cs, rng);
        if nonfinite {
            let (xl, dl) = (t.x.len(), t.dy.len());
            t.x.data_mut()[xl / 2] = f32::INFINITY;
            t.x.data_mut()[xl / 3] = f32::NAN;
            t.dy.data_mut()[dl / 2] = f32::NEG_INFINITY;
        }
        let what = format!("{cs:?}");
        let mut y = vec![f32::NAN; s.output_len()];
        let bias = t.bias.as_ref().map(|b| b.data());
        bf16_dw::forward_f32_into(&conv, &s, t.x.data(), t.w.data(), bias, &mut y).unwrap();
        let got = Tensor::from_vec(&s.output_dims(), y).unwrap();
        assert_matches(
            &format!("{what} forward"),
            &got,
            &t.expected(Op::Forward, &conv),
        );
        let mut dx = vec![f32::NAN; s.input_len()];
        bf16_dw::data_grad_f32_into(&conv, &s, t.dy.data(), t.w.data(), &mut dx).unwrap();
        let got = Tensor::from_vec(&s.input_dims(), dx).unwrap();
        assert_matches(
            &format!("{what} data grad"),
            &got,
            &t.expected(Op::DataGrad, &conv),
        );
        let mut dw = vec![f32::NAN; t.w.len()];
        bf16_dw::weight_grad_f32_into(&conv, &s, t.x.data(), t.dy.data(), &mut dw).unwrap();
        let got = Tensor::from_vec(t.w.shape(), dw).unwrap();
        assert_matches(
            &format!("{what} weight grad"),
            &got,
            &t.expected(Op::WeightGrad, &conv),
        );
    }
}

#[test]
fn depthwise_matches_reference() {
    let mut rng = rng();
    check_depthwise(&mut rng, false);
    check_depthwise(&mut rng, true);
}

/// The kernel rounds f32 operands itself: unrounded inputs give the result on rounded ones.
#[test]
fn depthwise_rounds_f32_operands() {
    let mut rng = rng();
    let conv = DwConv2d::new(7, 7);
    let s = conv.resolve(1, 2, 19, 21).unwrap();
    let x = random::<f32>(&s.input_dims(), &mut rng);
    let w = random::<f32>(&conv.weight_dims(2), &mut rng);
    let (xr, wr) = (
        x.cast::<bf16>().cast::<f32>(),
        w.cast::<bf16>().cast::<f32>(),
    );
    let want = Expected::forward(&conv, &xr, &wr, None);
    let mut y = vec![f32::NAN; s.output_len()];
    bf16_dw::forward_f32_into(&conv, &s, x.data(), w.data(), None, &mut y).unwrap();
    let got = Tensor::from_vec(&s.output_dims(), y).unwrap();
    assert_matches("rounding", &got, &want);
    let mut dx = vec![f32::NAN; s.input_len()];
    bf16_dw::data_grad_f32_into(&conv, &s, x.data(), w.data(), &mut dx).unwrap();
    let got = Tensor::from_vec(&s.input_dims(), dx).unwrap();
    assert_matches(
        "rounding",
        &got,
        &Expected::data_grad(&conv, &xr, &wr, (19, 21)),
    );
    let dy = random::<f32>(&s.output_dims(), &mut rng);
    let mut dw = vec![f32::NAN; w.len()];
    bf16_dw::weight_grad_f32_into(&conv, &s, x.data(), dy.data(), &mut dw).unwrap();
    let got = Tensor::from_vec(w.shape(), dw).unwrap();
    let dyr = dy.cast::<bf16>().cast::<f32>();
    assert_matches("rounding", &got, &Expected::weight_grad(&conv, &xr, &dyr));
    // and bad sizes are errors, not panics
    let mut y = vec![0.0; s.output_len() - 1];
    assert!(bf16_dw::forward_f32_into(&conv, &s, x.data(), w.data(), None, &mut y).is_err());
    let mut dw = vec![0.0; w.len() + 1];
    assert!(bf16_dw::weight_grad_f32_into(&conv, &s, x.data(), dy.data(), &mut dw).is_err());
    assert!(
        bf16_dw::weight_grad_f32_into(&conv, &s, x.data(), &dy.data()[1..], &mut dw[1..]).is_err()
    );
}

/// Logits of the bf16 model against the f64 reference: (max |error|, max |error| / max |logit|,
/// top-1 agreement over the batch).
fn logit_error(got: &Tensor<f32>, want: &Tensor<f32>) -> (f64, f64, usize) {
    let classes = want.shape()[1];
    let max_err = got
        .data()
        .iter()
        .zip(want.data())
        .map(|(a, b)| (*a as f64 - *b as f64).abs())
        .fold(0.0, f64::max);
    let scale = want.data().iter().fold(0f64, |m, v| m.max(v.abs() as f64));
    let argmax = |v: &[f32]| (0..v.len()).max_by(|&i, &j| v[i].total_cmp(&v[j])).unwrap();
    let agree = got
        .data()
        .chunks(classes)
        .zip(want.data().chunks(classes))
        .filter(|(a, b)| argmax(a) == argmax(b))
        .count();
    (max_err, max_err / scale, agree)
}

/// Logits and stage outputs within 1% of the largest reference value (bf16 keeps 8 significant
/// bits; measured ~1e-3 of the largest logit).
fn check_model_output(
    isa: Bf16Isa,
    requested: &[usize],
    out: &lkconv::model::Output,
    logits: &Tensor<f32>,
    stages: &[Tensor<f32>],
) {
    let got = out.logits.as_ref().unwrap();
    assert_matches(
        &format!("{isa:?} logits"),
        got,
        &Expected::scaled(logits, 0.01),
    );
    let indices: Vec<usize> = out.stages.iter().map(|(i, _)| *i).collect();
    assert_eq!(indices, requested, "{isa:?}: the requested stages");
    for (i, t) in &out.stages {
        assert_matches(
            &format!("{isa:?} stage{i}"),
            t,
            &Expected::scaled(&stages[*i], 0.01),
        );
    }
}

/// The golden RepLKNet (kernels 31/29/27/13) in bf16 on every ISA: logits and stage outputs
/// within bf16's error of the f64 reference, and the same top-1 class.
#[test]
fn model_in_bf16_matches_reference_on_every_isa() {
    use lkconv::model::{reference, Checkpoint, Replknet, Workspace};
    use lkconv::safetensors_io::TensorFile;
    let file = TensorFile::read(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/tests/data/replknet_small31.safetensors"
    ))
    .unwrap();
    let ck = Checkpoint::from_tensors(file.tensors.clone()).unwrap();
    let x = file.get("input").unwrap();
    let (logits64, stages64) = reference::forward(&ck, x).unwrap();
    let logits64 = logits64.unwrap();
    let f32_model = Replknet::from_checkpoint(&ck).unwrap();
    let f32_logits = f32_model.forward(x).unwrap();
    let (e32, r32, _) = logit_error(&f32_logits, &logits64);
    println!("f32 vs f64 reference: max |err| {e32:.2e} ({r32:.2e} of max |logit|)");
    for isa in Bf16Isa::all_available() {
        let model = f32_model.deploy.clone().into_cpu_bf16(isa).unwrap();
        assert_eq!(model.cpu_dtype(), DType::Bf16);
        let out = model
            .run(x, Some(&[0, 1, 2, 3]), true, &mut Workspace::new())
            .unwrap();
        let logits = out.logits.clone().unwrap();
        let (err, rel, agree) = logit_error(&logits, &logits64);
        let (err32, rel32, agree32) = logit_error(&logits, &f32_logits);
        println!(
            "{isa:?}: logits vs f64 max |err| {err:.2e} ({rel:.2e} of max |logit|), top-1 {agree}/{}; \
             vs f32 model {err32:.2e} ({rel32:.2e}), top-1 {agree32}/{}",
            x.shape()[0],
            x.shape()[0]
        );
        check_model_output(isa, &[0, 1, 2, 3], &out, &logits64, &stages64);
        assert_eq!(
            agree,
            x.shape()[0],
            "{isa:?}: top-1 differs from the reference"
        );
        // and not the f32 engine in disguise: bf16 rounding must show
        assert!(rel32 > 1e-5, "{isa:?}: bf16 logits equal the f32 ones");
    }
}

/// A wider random model at batch 2 (1x1 convs in several row and column blocks, odd channel
/// counts) in bf16 on every ISA against the f64 reference; a bf16 model refuses the GPU engines.
#[test]
fn wide_model_in_bf16_matches_reference() {
    use lkconv::model::{
        reference, Backend, Checkpoint, Form, Replknet, ReplknetConfig, Workspace,
    };
    let cfg = ReplknetConfig {
        large_kernel_sizes: vec![9, 5],
        layers: vec![1, 1],
        channels: vec![45, 131],
        small_kernel: Some(3),
        dw_ratio: 1.0,
        ffn_ratio: 3.0,
        num_classes: 7,
        in_channels: 3,
    };
    let ck =
        Checkpoint::from_tensors(lkconv::model::random_weights(&cfg, Form::Training, 21).unwrap())
            .unwrap();
    let model = Replknet::from_checkpoint(&ck).unwrap();
    let mut rng = rng();
    let x = Tensor::<f32>::random(&[2, 3, 70, 61], &mut rng).unwrap();
    let (logits, stages) = reference::forward(&ck, &x).unwrap();
    let logits = logits.unwrap();
    for isa in Bf16Isa::all_available() {
        let m = model.deploy.clone().into_cpu_bf16(isa).unwrap();
        let out = m
            .run(&x, Some(&[0, 1]), true, &mut Workspace::new())
            .unwrap();
        println!(
            "{isa:?}: {:?}",
            logit_error(out.logits.as_ref().unwrap(), &logits)
        );
        check_model_output(isa, &[0, 1], &out, &logits, &stages);
    }
    let m = model.deploy.into_cpu_bf16(Bf16Isa::Fallback).unwrap();
    let mut ws = Workspace::with_backend(Backend::Sim);
    assert!(m.run(&x, None, true, &mut ws).is_err());
}

/// `LKCONV_CPU_ISA` caps the bf16 ISA the model runs on (`bench --model --dtype bf16` names it).
#[test]
fn cpu_isa_override_reaches_the_model() {
    let run = |isa: &str| {
        let o = std::process::Command::new(env!("CARGO_BIN_EXE_lkconv"))
            .args([
                "bench", "--model", "31b", "--device", "cpu", "--dtype", "bf16",
            ])
            .args(["--size", "32", "--reps", "1"])
            .env("LKCONV_CPU_ISA", isa)
            .output()
            .unwrap();
        assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
        String::from_utf8_lossy(&o.stdout).into_owned()
    };
    assert!(run("portable").contains("bf16 on f32 fallback"));
    let want = if Bf16Isa::Avx512Bf16.available() {
        "bf16 on AVX-512 BF16"
    } else {
        "bf16 on f32 fallback"
    };
    assert!(run("avx512bf16").contains(want));
    let best = Bf16Isa::all_available().into_iter().max().unwrap();
    assert!(run("amx").contains(&format!("bf16 on {}", best.name())));
}

/// `lkconv replknet --dtype bf16` runs the CPU engine in bf16 (logits within bf16's error of the
/// golden ones, not equal to the f32 engine's); elsewhere the option is refused.
#[test]
fn cli_replknet_in_bf16() {
    use lkconv::safetensors_io::TensorFile;
    let golden = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/tests/data/replknet_small31.safetensors"
    );
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("y.safetensors");
    let run = |extra: &[&str]| {
        std::process::Command::new(env!("CARGO_BIN_EXE_lkconv"))
            .args(["replknet", "--weights", golden, "--input", golden])
            .args(["--output", out.to_str().unwrap()])
            .args(extra)
            .output()
            .unwrap()
    };
    let o = run(&["--dtype", "bf16"]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let got = TensorFile::read(&out).unwrap();
    let got = got.get("logits").unwrap();
    let file = TensorFile::read(golden).unwrap();
    let want = file.get("logits").unwrap();
    assert_matches("cli bf16 logits", got, &Expected::scaled(want, 0.01));
    assert!(got
        .data()
        .iter()
        .zip(want.data())
        .any(|(a, b)| (a - b).abs() > 1e-6 * b.abs().max(1.0)));
    for bad in [
        &["--dtype", "f16"][..],
        &["--dtype", "bf16", "--device", "cpu-ref"],
    ] {
        let o = run(bad);
        assert_eq!(o.status.code(), Some(2), "{bad:?} should be refused");
    }
}
