//! The `lkconv` command line, end to end on temporary safetensors files.

mod common;

use std::path::Path;
use std::process::Command;

use common::{assert_matches, random, rng, Expected};
use half::bf16;
use lkconv::safetensors_io::{self, TensorFile};
use lkconv::{DwConv2d, Tensor};

fn lkconv(args: &[&str]) -> std::process::Output {
    Command::new(env!("CARGO_BIN_EXE_lkconv"))
        .args(args)
        .output()
        .expect("run lkconv")
}

/// Runs a `conv` command that must succeed and returns tensor `name` of its output file.
fn conv_output(args: &[&str], out: &Path, name: &str) -> Tensor<f32> {
    let o = lkconv(args);
    assert!(
        o.status.success(),
        "{args:?}: {}",
        String::from_utf8_lossy(&o.stderr)
    );
    TensorFile::read(out).unwrap().take(name).unwrap()
}

fn path(p: &Path) -> &str {
    p.to_str().expect("utf-8 temp path")
}

#[test]
fn conv_fwd_dgrad_wgrad_match_reference() {
    let dir = tempfile::tempdir().unwrap();
    let mut rng = rng();
    let conv = DwConv2d::new(7, 5).with_padding(2, 1).with_stride(1, 2);
    let s = conv.resolve(2, 3, 13, 17).unwrap();
    let x: Tensor<f32> = random(&s.input_dims(), &mut rng);
    let w: Tensor<f32> = random(&conv.weight_dims(3), &mut rng);
    let b: Tensor<f32> = random(&[3], &mut rng);
    let dy: Tensor<f32> = random(&s.output_dims(), &mut rng);
    let input = dir.path().join("in.safetensors");
    safetensors_io::write(
        &input,
        &[("x", &x), ("w", &w), ("bias", &b), ("dy", &dy)],
        None,
    )
    .unwrap();
    let common = [
        "--input",
        path(&input),
        "--padding",
        "2,1",
        "--stride",
        "1,2",
    ];

    let cases = [
        (
            "fwd",
            "y",
            vec!["--op", "fwd"],
            Expected::forward(&conv, &x, &w, Some(&b)),
        ),
        (
            "dgrad",
            "dx",
            vec!["--op", "dgrad", "--input-hw", "13,17"],
            Expected::data_grad(&conv, &dy, &w, (13, 17)),
        ),
        (
            "wgrad",
            "dw",
            vec!["--op", "wgrad", "--kernel", "7,5"],
            Expected::weight_grad(&conv, &x, &dy),
        ),
    ];
    for device in ["cpu", "cpu-ref"] {
        for (op, name, flags, want) in &cases {
            let out = dir.path().join(format!("{op}_{device}.safetensors"));
            let args = [
                &["conv", "--output", path(&out), "--device", device][..],
                flags,
                &common,
            ]
            .concat();
            let got = conv_output(&args, &out, name);
            assert_matches(&format!("cli {op} {device}"), &got, want);
        }
    }

    // Half-precision compute: files stay f32, the result is the bf16 computation's (inputs
    // rounded to bf16, f32 accumulation, one bf16 unit), written back as f32.
    let out = dir.path().join("y_bf16.safetensors");
    let args = [
        &[
            "conv",
            "--op",
            "fwd",
            "--dtype",
            "bf16",
            "--output",
            path(&out),
        ][..],
        &common,
    ]
    .concat();
    let y = conv_output(&args, &out, "y");
    let want = Expected::forward(
        &conv,
        &x.cast::<bf16>(),
        &w.cast::<bf16>(),
        Some(&b.cast::<bf16>()),
    );
    assert_matches("cli fwd bf16", &y.cast::<bf16>(), &want);
    assert_eq!(
        y,
        y.cast::<bf16>().cast::<f32>(),
        "bf16 values written as f32"
    );
}

#[test]
fn bad_inputs_exit_2_and_write_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("out.safetensors");
    let corrupt = dir.path().join("corrupt.safetensors");
    std::fs::write(
        &corrupt,
        b"\x10\x00\x00\x00\x00\x00\x00\x00{not json at all",
    )
    .unwrap();
    let missing = dir.path().join("does-not-exist.safetensors");
    let wrong = dir.path().join("wrong.safetensors");
    let x = Tensor::<f32>::full(&[1, 4, 8, 8], 1.0).unwrap();
    let w = Tensor::<f32>::full(&[3, 1, 5, 5], 1.0).unwrap(); // C mismatch
    safetensors_io::write(&wrong, &[("x", &x), ("w", &w)], None).unwrap();
    // An integer weight tensor must be refused, not read as zeros.
    let int_w = dir.path().join("int_w.safetensors");
    let w_bytes: Vec<u8> = (0..4 * 25i64).flat_map(|v| v.to_le_bytes()).collect();
    let x_bytes: Vec<u8> = x.data().iter().flat_map(|v| v.to_le_bytes()).collect();
    let views = vec![
        (
            "w".to_string(),
            safetensors::tensor::TensorView::new(
                safetensors::Dtype::I64,
                vec![4, 1, 5, 5],
                &w_bytes,
            )
            .unwrap(),
        ),
        (
            "x".to_string(),
            safetensors::tensor::TensorView::new(
                safetensors::Dtype::F32,
                vec![1, 4, 8, 8],
                &x_bytes,
            )
            .unwrap(),
        ),
    ];
    std::fs::write(&int_w, safetensors::serialize(views, None).unwrap()).unwrap();
    let o = lkconv(&["conv", "--input", path(&int_w), "--output", path(&out)]);
    assert_eq!(o.status.code(), Some(2));
    assert!(
        String::from_utf8_lossy(&o.stderr).contains("dtype"),
        "{}",
        String::from_utf8_lossy(&o.stderr)
    );
    assert!(!out.exists());
    let cases: Vec<Vec<&str>> = vec![
        vec!["conv", "--input", path(&corrupt), "--output", path(&out)],
        vec!["conv", "--input", path(&missing), "--output", path(&out)],
        vec!["conv", "--input", path(dir.path()), "--output", path(&out)],
        vec!["conv", "--input", path(&wrong), "--output", path(&out)],
        vec![
            "conv",
            "--op",
            "wgrad",
            "--input",
            path(&wrong),
            "--output",
            path(&out),
        ],
        vec![
            "conv",
            "--op",
            "nope",
            "--input",
            path(&wrong),
            "--output",
            path(&out),
        ],
        vec![
            "conv",
            "--device",
            "tpu",
            "--input",
            path(&wrong),
            "--output",
            path(&out),
        ],
        vec![
            "conv",
            "--dtype",
            "f8",
            "--input",
            path(&wrong),
            "--output",
            path(&out),
        ],
        vec![
            "conv",
            "--stride",
            "0",
            "--input",
            path(&wrong),
            "--output",
            path(&out),
        ],
        vec![
            "conv",
            "--padding",
            "1,2,3",
            "--input",
            path(&wrong),
            "--output",
            path(&out),
        ],
    ];
    for args in cases {
        let o = lkconv(&args);
        assert_eq!(
            o.status.code(),
            Some(2),
            "{args:?}: {}",
            String::from_utf8_lossy(&o.stderr)
        );
        let err = String::from_utf8_lossy(&o.stderr);
        assert!(err.contains("error"), "{args:?}: no error message: {err}");
        assert!(!out.exists(), "{args:?} wrote an output");
    }
}

#[test]
fn info_and_bench_json() {
    let o = lkconv(&["info"]);
    assert!(o.status.success());
    let text = String::from_utf8_lossy(&o.stdout);
    assert!(
        text.contains("CUDA kernels:") && text.contains("CUDA devices:") && text.contains("CPU:"),
        "{text}"
    );

    let o = lkconv(&[
        "bench",
        "--shape",
        "1,4,12,12",
        "--kernel",
        "5",
        "--reps",
        "1",
        "--json",
    ]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let v: serde_json::Value = serde_json::from_slice(&o.stdout).expect("one JSON array");
    let records = v.as_array().expect("array");
    assert_eq!(records.len(), 3 * 4, "3 ops x 4 implementations");
    for r in records {
        for key in [
            "op",
            "device",
            "dtype",
            "impl",
            "n",
            "c",
            "h",
            "w",
            "kh",
            "kw",
            "median_ms",
            "gflops",
        ] {
            assert!(r.get(key).is_some(), "record lacks {key}: {r}");
        }
        assert!(r["gflops"].as_f64().unwrap() > 0.0);
    }
}

#[test]
fn conv_on_the_simulator_agrees_with_the_reference_device() {
    if !lkconv::sim::available() {
        panic!("the kernel simulator was not built (kernels/sim missing?)");
    }
    let dir = tempfile::tempdir().unwrap();
    let mut rng = rng();
    let conv = DwConv2d::new(13, 13);
    let s = conv.resolve(1, 3, 11, 17).unwrap();
    let x: Tensor<f32> = random(&s.input_dims(), &mut rng);
    let w: Tensor<f32> = random(&conv.weight_dims(3), &mut rng);
    let dy: Tensor<f32> = random(&s.output_dims(), &mut rng);
    let input = dir.path().join("in.safetensors");
    safetensors_io::write(&input, &[("x", &x), ("w", &w), ("dy", &dy)], None).unwrap();
    for (op, name, extra, want) in [
        ("fwd", "y", vec![], Expected::forward(&conv, &x, &w, None)),
        (
            "dgrad",
            "dx",
            vec![],
            Expected::data_grad(&conv, &dy, &w, (11, 17)),
        ),
        (
            "wgrad",
            "dw",
            vec!["--kernel", "13"],
            Expected::weight_grad(&conv, &x, &dy),
        ),
    ] {
        let mut results = Vec::new();
        for device in ["sim", "cpu-ref"] {
            let out = dir.path().join(format!("{op}_{device}.safetensors"));
            let args = [
                &[
                    "conv",
                    "--op",
                    op,
                    "--input",
                    path(&input),
                    "--output",
                    path(&out),
                    "--device",
                    device,
                ][..],
                &extra,
            ]
            .concat();
            results.push(conv_output(&args, &out, name));
        }
        assert_matches(&format!("{op} sim"), &results[0], &want);
        assert_matches(&format!("{op} cpu-ref"), &results[1], &want);
    }
}

/// Distinct colours of an RGB image, and the share of its pixels that are not white.
fn colours_and_ink(img: &image::RgbImage) -> (usize, f64) {
    let mut seen = std::collections::HashSet::new();
    let mut ink = 0usize;
    for p in img.pixels() {
        seen.insert(p.0);
        ink += usize::from(p.0 != [255, 255, 255]);
    }
    (seen.len(), ink as f64 / (img.width() * img.height()) as f64)
}

#[test]
fn bench_plot_draws_png_and_svg_charts() {
    let dir = tempfile::tempdir().unwrap();
    // a kernel-size sweep: one panel (fwd), a line per implementation
    let png = dir.path().join("sweep.png");
    let o = lkconv(&[
        "bench",
        "--device",
        "cpu",
        "--op",
        "fwd",
        "--shape",
        "1,3,10,9",
        "--kernels",
        "3,5,7",
        "--reps",
        "1",
        "--plot",
        path(&png),
    ]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let img = image::open(&png).expect("a PNG that decodes").to_rgb8();
    assert_eq!(img.dimensions(), (960, 56 + 340), "one panel");
    let (colours, ink) = colours_and_ink(&img);
    assert!(colours >= 8, "{colours} colours: blank or monochrome");
    assert!(ink > 0.01 && ink < 0.6, "share of non-white pixels {ink}");
    // every implementation's colour is there (fast, naive, im2col, reference)
    for c in [[31, 119, 180], [214, 39, 40], [255, 127, 14], [44, 160, 44]] {
        assert!(img.pixels().any(|p| p.0 == c), "no {c:?} line");
    }

    // bars per layer, three passes, as SVG; --json still prints only JSON on stdout
    let svg = dir.path().join("bars.svg");
    let o = lkconv(&[
        "bench",
        "--device",
        "cpu",
        "--shape",
        "1,4,12,12",
        "--kernel",
        "5",
        "--reps",
        "1",
        "--json",
        "--plot",
        path(&svg),
    ]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let v: serde_json::Value = serde_json::from_slice(&o.stdout).expect("JSON on stdout");
    assert_eq!(v.as_array().map(Vec::len), Some(12));
    let text = std::fs::read_to_string(&svg).unwrap();
    for want in [
        "<svg",
        "C4 12x12 K5",
        "forward (fwd)",
        "weight gradient (wgrad)",
        "im2col",
    ] {
        assert!(text.contains(want), "SVG lacks {want}");
    }
    let mut names: Vec<String> = std::fs::read_dir(dir.path())
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    names.sort();
    assert_eq!(names, ["bars.svg", "sweep.png"], "no temporaries left");
}

/// A float64 value beyond f32's range is refused, not read as infinity.
#[test]
fn f64_values_beyond_f32_are_refused() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("out.safetensors");
    let input = dir.path().join("f64.safetensors");
    let f64_view = |v: &[f64]| v.iter().flat_map(|x| x.to_le_bytes()).collect::<Vec<u8>>();
    let (mut rng, seed) = lkconv::Rng::from_time();
    let mut x: Vec<f64> = (0..2 * 8 * 8).map(|_| rng.uniform_pm1() as f64).collect();
    let w: Vec<f64> = (0..2 * 9).map(|_| rng.uniform_pm1() as f64).collect();
    let write = |x: &[f64]| {
        let (xb, wb) = (f64_view(x), f64_view(&w));
        let views = vec![
            (
                "w",
                safetensors::tensor::TensorView::new(
                    safetensors::Dtype::F64,
                    vec![2, 1, 3, 3],
                    &wb,
                )
                .unwrap(),
            ),
            (
                "x",
                safetensors::tensor::TensorView::new(
                    safetensors::Dtype::F64,
                    vec![1, 2, 8, 8],
                    &xb,
                )
                .unwrap(),
            ),
        ];
        std::fs::write(&input, safetensors::serialize(views, None).unwrap()).unwrap();
    };
    // In range: read and convolved (the control that shows F64 files work at all).
    write(&x);
    let o = lkconv(&["conv", "--input", path(&input), "--output", path(&out)]);
    assert!(
        o.status.success(),
        "seed {seed}: {}",
        String::from_utf8_lossy(&o.stderr)
    );
    std::fs::remove_file(&out).unwrap();
    x[37] = 1e300;
    write(&x);
    let o = lkconv(&["conv", "--input", path(&input), "--output", path(&out)]);
    let err = String::from_utf8_lossy(&o.stderr);
    assert_eq!(o.status.code(), Some(2), "{err}");
    assert!(err.contains("beyond the range of f32"), "{err}");
    assert!(!out.exists());
}

#[test]
fn bench_plot_bad_targets_exit_2_and_leave_nothing() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::create_dir(dir.path().join("taken.png")).unwrap();
    let missing = dir.path().join("no-such-dir/chart.png");
    let jpg = dir.path().join("chart.jpg");
    let taken = dir.path().join("taken.png");
    let good = dir.path().join("chart.png");
    let small = [
        "bench", "--device", "cpu", "--shape", "1,2,8,8", "--reps", "1",
    ];
    let cases: Vec<(Vec<&str>, &str)> = vec![
        (
            vec!["--kernel", "3", "--plot", path(&missing)],
            "does not exist",
        ),
        (vec!["--kernel", "3", "--plot", path(&jpg)], ".png or .svg"),
        (vec!["--kernel", "3", "--plot", path(&taken)], "directory"),
        // A directory that exists but takes no files: refused before anything is measured.
        (
            vec!["--kernel", "3", "--plot", "/proc/lkconv-chart.png"],
            "i/o error",
        ),
        (vec!["--kernels", "3,x", "--plot", path(&good)], "--kernels"),
        (vec!["--kernels", "3,0", "--plot", path(&good)], "--kernels"),
        (
            vec!["--kernels", "3", "--kernel", "5", "--plot", path(&good)],
            "cannot be used with",
        ),
    ];
    for (extra, message) in cases {
        let args: Vec<&str> = small.iter().copied().chain(extra).collect();
        let o = lkconv(&args);
        let err = String::from_utf8_lossy(&o.stderr);
        assert_eq!(o.status.code(), Some(2), "{args:?}: {err}");
        assert!(err.contains(message), "{args:?}: {err}");
        assert!(o.stdout.is_empty(), "{args:?} measured before failing");
    }
    // --kernels needs --shape; --model checks the target before building the model
    for args in [
        vec!["bench", "--kernels", "3,5", "--plot", path(&good)],
        vec!["bench", "--model", "31b", "--plot", path(&missing)],
    ] {
        let o = lkconv(&args);
        assert_eq!(o.status.code(), Some(2), "{args:?}");
    }
    let names: Vec<_> = std::fs::read_dir(dir.path())
        .unwrap()
        .map(|e| e.unwrap().file_name())
        .collect();
    assert_eq!(names, ["taken.png"], "something was written");
}

#[test]
fn bench_model_plot_draws_the_profile_or_says_why_not() {
    let dir = tempfile::tempdir().unwrap();
    let png = dir.path().join("model.png");
    let args = [
        "bench",
        "--model",
        "31b",
        "--device",
        "cpu",
        "--size",
        "64",
        "--reps",
        "1",
        "--plot",
        path(&png),
    ];
    let o = Command::new(env!("CARGO_BIN_EXE_lkconv"))
        .args(args)
        .env_remove("LKCONV_PROFILE")
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(
        err.contains("no chart written") && err.contains("LKCONV_PROFILE=1"),
        "{err}"
    );
    assert!(!png.exists());

    let o = Command::new(env!("CARGO_BIN_EXE_lkconv"))
        .args(args)
        .env("LKCONV_PROFILE", "1")
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let img = image::open(&png).expect("a PNG that decodes").to_rgb8();
    let (colours, ink) = colours_and_ink(&img);
    assert!(colours >= 4 && ink > 0.01, "{colours} colours, ink {ink}");
    // the bars are the first series' colour
    assert!(img.pixels().filter(|p| p.0 == [31, 119, 180]).count() > 1000);
}
