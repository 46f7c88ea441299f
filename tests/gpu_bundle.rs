//! The GPU run script (`scripts/gpu-run.sh`, the bundle's run.sh) rehearsed without a GPU:
//! - on a machine where lkconv sees no CUDA device (forced with CUDA_VISIBLE_DEVICES="", so the
//!   test means the same on every machine) it must stop within seconds with exit status 3, a
//!   summary that says so, and every GPU step marked skipped;
//! - with stand-ins for the GPU binaries (shell scripts that print what the real ones print) and
//!   for the Python package (a wheel holding a stub module, a stub python/gpu_check.py) it must
//!   run every step in the planned order, report failed tests by name, put the library path
//!   only on lkconv's commands, print the bench table last, and exit 1 for the failures;
//!   without the Python package it must skip that step and say why;
//! - its step limits must fit its run cap (TOTAL_S).
//!
//! Either way at most 8 files land in $OUT (what the device tool brings back).

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

fn bundle_in(dir: &Path) -> PathBuf {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let bundle = dir.join("target/gpu-bundle");
    std::fs::create_dir_all(bundle.join("bin")).unwrap();
    std::fs::copy(root.join("scripts/gpu-run.sh"), bundle.join("run.sh")).unwrap();
    std::fs::copy(
        root.join("scripts/torch_compare.py"),
        bundle.join("torch_compare.py"),
    )
    .unwrap();
    bundle
}

fn script(path: &Path, body: &str) {
    use std::os::unix::fs::PermissionsExt;
    std::fs::write(path, format!("#!/usr/bin/env bash\n{body}\n")).unwrap();
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o755)).unwrap();
}

#[test]
fn run_script_without_a_gpu_fails_fast_and_clearly() {
    let dir = tempfile::tempdir().unwrap();
    let bundle = bundle_in(dir.path());
    std::os::unix::fs::symlink(env!("CARGO_BIN_EXE_lkconv"), bundle.join("bin/lkconv")).unwrap();
    let out = dir.path().join("out");
    let t0 = Instant::now();
    let o = Command::new("timeout")
        .args(["120", "bash"])
        .arg(bundle.join("run.sh"))
        .env("OUT", &out)
        .env("CUDA_VISIBLE_DEVICES", "")
        .output()
        .unwrap();
    let took = t0.elapsed();
    let stdout = String::from_utf8_lossy(&o.stdout);
    let stderr = String::from_utf8_lossy(&o.stderr);
    assert_eq!(o.status.code(), Some(3), "{stdout}\n{stderr}");
    assert!(took < Duration::from_secs(60), "took {took:?}");
    let summary = std::fs::read_to_string(out.join("summary.txt")).unwrap();
    assert!(summary.contains("NO GPU"), "{summary}");
    assert!(
        stdout.contains("NO GPU"),
        "the summary is printed last: {stdout}"
    );
    for step in [
        "tests",
        "bench",
        "torch",
        "python",
        "model",
        "criterion",
        "sanitizer",
    ] {
        assert!(
            summary
                .lines()
                .any(|l| l.starts_with(step) && l.contains("SKIP") && l.contains("no GPU")),
            "{step} not marked skipped: {summary}"
        );
    }
    let files = std::fs::read_dir(&out).unwrap().count();
    assert!(files <= 8, "{files} files in $OUT");
}

/// A bundle in `dir` with stand-ins for the GPU binaries, nvidia-smi and compute-sanitizer
/// (and for the Python package when `python`); runs its run.sh and returns $OUT and the
/// output. The library path given is /stand-in/cublas.
fn run_with_stand_ins(dir: &Path, python: bool) -> (PathBuf, std::process::Output) {
    let bundle = bundle_in(dir);
    let bin = bundle.join("bin");
    let tools = dir.join("tools");
    std::fs::create_dir_all(&tools).unwrap();
    script(
        &bin.join("lkconv"),
        r#"case "$1" in
  info) echo "lkconv 0.1.0"; echo "CUDA devices:"; echo "  stand-in GPU"; echo "LD=$LD_LIBRARY_PATH" ;;
  bench)
    if [[ " $* " == *" --model "* ]]; then
      echo "RepLKNet-31B 64x3x224x224 cuda f32: median 100.00 ms, 640.00 images/s"
    else
      dt=$(sed 's/.*--dtype \([a-z0-9]*\).*/\1/' <<<"$*"); imp=$(sed 's/.*--impl \([a-z0-9]*\).*/\1/' <<<"$*")
      printf '[{"op":"fwd","device":"cuda","dtype":"%s","impl":"%s","n":1,"c":128,"h":56,"w":56,"kh":31,"kw":31,"median_ms":0.5,"gflops":1000.0}]\n' "$dt" "$imp"
    fi ;;
  *) exit 2 ;;
esac"#,
    );
    script(
        &bin.join("test-cuda"),
        r#"echo "LD=$LD_LIBRARY_PATH REQUIRE=$LKCONV_REQUIRE_GPU"
echo "test big_shapes ... ok"
echo "test result: ok. 7 passed; 0 failed; 0 ignored; 0 measured; 0 filtered out""#,
    );
    script(
        &bin.join("test-model"),
        r#"echo "test golden_cuda_both_forms ... FAILED"
echo "test result: FAILED. 1 passed; 1 failed; 0 ignored; 0 measured; 5 filtered out"
exit 101"#,
    );
    script(&bin.join("bench-gpu"), "echo criterion-ran");
    script(
        &tools.join("nvidia-smi"),
        "echo \"smi LD=$LD_LIBRARY_PATH\"",
    );
    script(
        &tools.join("compute-sanitizer"),
        "echo \"========= ERROR SUMMARY: 0 errors\"",
    );
    if python {
        // what python/bundle.sh puts there: a wheel (here holding a stub `lkconv` module) and
        // gpu_check.py (here a stub that prints and writes what the real one does)
        let py = bundle.join("python");
        let pkg = dir.join("wheel/lkconv");
        std::fs::create_dir_all(&pkg).unwrap();
        std::fs::write(pkg.join("__init__.py"), "STUB = 'from the wheel'\n").unwrap();
        std::fs::create_dir_all(&py).unwrap();
        let zipped = Command::new("python3")
            .args(["-m", "zipfile", "-c"])
            .arg(py.join("lkconv-0.1.0-cp39-abi3-linux_x86_64.whl"))
            .arg(&pkg)
            .status()
            .expect("python3");
        assert!(zipped.success());
        std::fs::write(
            py.join("gpu_check.py"),
            r#"import os, sys
import lkconv
out = sys.argv[sys.argv.index("--out") + 1]
print("stub gpu_check:", lkconv.STUB, "args", " ".join(sys.argv[1:]))
print("LD=" + os.environ.get("LD_LIBRARY_PATH", ""))
with open(os.path.join(out, "python_gpu_check.log"), "w") as f:
    f.write("check Case(n=1) torch.float32 contiguous: ok\n")
with open(os.path.join(out, "python_gpu_timing.json"), "w") as f:
    f.write('{"rows": [{"speedup_fwd": 2.5}]}\n')
print("correctness: 3 cases + 5 tests, 0 failed")
print("gpu_check: passed (0 failures)")
"#,
        )
        .unwrap();
    }
    let out = dir.join("out");
    let path = format!(
        "{}:{}",
        tools.display(),
        std::env::var("PATH").unwrap_or_default()
    );
    let o = Command::new("timeout")
        .args(["300", "bash"])
        .arg(bundle.join("run.sh"))
        .env("OUT", &out)
        .env("PATH", path)
        .env("LK_LIBRARY_PATH", "/stand-in/cublas")
        .env_remove("LD_LIBRARY_PATH")
        .output()
        .unwrap();
    (out, o)
}

#[test]
fn run_script_runs_every_step_in_order_with_stand_in_binaries() {
    let dir = tempfile::tempdir().unwrap();
    let (out, o) = run_with_stand_ins(dir.path(), true);
    let stdout = String::from_utf8_lossy(&o.stdout);
    let stderr = String::from_utf8_lossy(&o.stderr);
    assert_eq!(o.status.code(), Some(1), "{stdout}\n{stderr}");
    let summary = std::fs::read_to_string(out.join("summary.txt")).unwrap();
    println!("{summary}");
    // the steps, in the planned order
    let order = [
        "nvidia-smi",
        "lkconv info",
        "test-cuda (--skip simulator)",
        "test-model (cuda)",
        "bench (lkconv --json)",
        "torch_compare (conv)",
        "python gpu_check (lkconv.torch)",
        "model 31b b64 f32 (lkconv)",
        "model 31b b64 bf16 (lkconv)",
        "model 31b b64 (torch eager)",
        "criterion gpu (quick)",
        "sanitizer memcheck",
        "sanitizer racecheck",
        "harness (kernels/bench)",
    ];
    let at: Vec<usize> = order
        .iter()
        .map(|s| {
            summary
                .find(&format!("\n{s} "))
                .unwrap_or_else(|| panic!("{s} missing: {summary}"))
        })
        .collect();
    assert!(at.windows(2).all(|w| w[0] < w[1]), "order: {summary}");
    assert!(summary.contains("8 passed, 1 failed"), "{summary}");
    assert!(
        summary.contains("golden_cuda_both_forms ... FAILED"),
        "{summary}"
    );
    assert!(summary.contains("ERROR SUMMARY: 0 errors"), "{summary}");
    // the bench table (from bench.jsonl) is in the summary, and the summary is printed last
    assert!(summary.contains("lkconv bench --device cuda"), "{summary}");
    assert!(stdout.trim_end().ends_with(summary.trim_end()), "{stdout}");
    // the library path goes to lkconv's commands, not to the others
    let tests = std::fs::read_to_string(out.join("tests.log")).unwrap();
    // (a machine with a CUDA toolkit adds its own lib64 after the given path)
    assert!(tests.contains("LD=/stand-in/cublas"), "{tests}");
    assert!(tests.contains("REQUIRE=1"), "{tests}");
    let env = std::fs::read_to_string(out.join("env.log")).unwrap();
    assert!(env.contains("LD=/stand-in/cublas"), "{env}");
    assert!(env.contains("smi LD=\n"), "nvidia-smi saw the path: {env}");
    let bench = std::fs::read_to_string(out.join("bench.jsonl")).unwrap();
    assert!(bench.lines().count() >= 20, "{bench}");
    let first: Vec<&str> = bench.lines().take(5).collect();
    assert!(
        first
            .iter()
            .all(|l| l.contains("\"f32\"") && l.contains("\"fast\"")),
        "f32 fast first: {bench}"
    );
    // the Python step: the wheel unpacked onto PYTHONPATH, torch's library path (not lkconv's),
    // its deadline inside its limit; its files in extra.log, its verdict in the summary
    let perf = std::fs::read_to_string(out.join("perf.log")).unwrap();
    assert!(perf.contains("stub gpu_check: from the wheel"), "{perf}");
    assert!(
        perf.contains("--quick --deadline-s 30"),
        "deadline 15 s inside the 45 s limit: {perf}"
    );
    assert!(!perf.contains("LD=/stand-in/cublas"), "{perf}");
    assert!(
        summary.contains(
            "python (lkconv.torch): correctness: 3 cases + 5 tests, 0 failed; gpu_check: passed"
        ),
        "{summary}"
    );
    let extra = std::fs::read_to_string(out.join("extra.log")).unwrap();
    assert!(
        extra.contains("===== python_gpu_check.log\ncheck Case(n=1)")
            && extra.contains("===== python_gpu_timing.json\n{\"rows\""),
        "{extra}"
    );
    let files = std::fs::read_dir(&out).unwrap().count();
    assert!(files <= 8, "{files} files in $OUT");
}

#[test]
fn run_script_skips_the_python_step_when_the_package_is_not_bundled() {
    let dir = tempfile::tempdir().unwrap();
    let (out, o) = run_with_stand_ins(dir.path(), false);
    assert_eq!(o.status.code(), Some(1), "the failed model test");
    let summary = std::fs::read_to_string(out.join("summary.txt")).unwrap();
    let line = summary
        .lines()
        .find(|l| l.starts_with("python gpu_check"))
        .unwrap_or_else(|| panic!("no python step: {summary}"));
    assert!(
        line.contains("SKIP") && line.contains("not bundled"),
        "{line}"
    );
    // the steps after it still ran
    assert!(summary.contains("\nsanitizer racecheck "), "{summary}");
}

/// Step limits by variable, and how many steps each one bounds.
const STEP_LIMITS: [(&str, u32); 11] = [
    ("LIMIT_TESTS", 1),
    ("LIMIT_TESTS_MODEL", 1),
    ("LIMIT_TESTS_CONCURRENCY", 1),
    ("LIMIT_TESTS_TC", 1),
    ("LIMIT_BENCH", 1),
    ("LIMIT_TORCH", 1),
    ("LIMIT_PYTHON", 1),
    ("LIMIT_MODEL", 2),
    ("LIMIT_TORCH_MODEL", 1),
    ("LIMIT_CRITERION", 1),
    ("LIMIT_SANITIZER", 2),
];

#[test]
fn run_script_step_limits_fit_the_run_cap() {
    let text =
        std::fs::read_to_string(Path::new(env!("CARGO_MANIFEST_DIR")).join("scripts/gpu-run.sh"))
            .unwrap();
    // the default of `${NAME:-N}`
    let default_of = |name: &str| -> Option<u32> {
        let at = text.find(&format!("${{{name}:-"))? + name.len() + 4;
        text[at..].split('}').next()?.parse().ok()
    };
    let total = default_of("TOTAL_S").expect("TOTAL_S default");
    // every LIMIT_ variable of the script is counted here
    for (i, _) in text.match_indices("${LIMIT_") {
        let name = &text[i + 2..i + 2 + text[i + 2..].find(':').unwrap()];
        assert!(
            STEP_LIMITS.iter().any(|(n, _)| *n == name),
            "{name} is not counted in STEP_LIMITS"
        );
    }
    let sum: u32 = STEP_LIMITS
        .iter()
        .map(|&(name, steps)| steps * default_of(name).unwrap_or_else(|| panic!("{name}")))
        .sum();
    assert!(
        sum <= total,
        "step limits add up to {sum} s > TOTAL_S={total} s"
    );
}
