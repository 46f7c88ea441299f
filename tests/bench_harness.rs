//! The standalone tuning harness `kernels/bench/` (lkbench): built for the host against the kernel
//! simulator (`kernels/bench/build.sh sim`, the same code as the nvcc build but for the backend)
//! and run on the checked-in plan fixture, so that its JSON reader, buffer binding, GEMM step,
//! checks and timing loop are tested without a GPU. A broken plan must be reported as a failure,
//! and bad input must be refused.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::sync::OnceLock;

fn root() -> &'static Path {
    Path::new(env!("CARGO_MANIFEST_DIR"))
}

fn fixture() -> PathBuf {
    root().join("kernels/bench/fixtures/small.json")
}

/// Builds lkbench-sim once per test run.
fn lkbench() -> &'static Path {
    static BIN: OnceLock<PathBuf> = OnceLock::new();
    BIN.get_or_init(|| {
        let out = PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join("lkbench");
        let o = Command::new("bash")
            .arg(root().join("kernels/bench/build.sh"))
            .arg("sim")
            .arg(&out)
            .output()
            .expect("run kernels/bench/build.sh");
        assert!(
            o.status.success(),
            "build.sh sim failed:\n{}{}",
            String::from_utf8_lossy(&o.stdout),
            String::from_utf8_lossy(&o.stderr)
        );
        out.join("lkbench-sim")
    })
}

fn run(args: &[&Path]) -> (Output, String) {
    let o = Command::new(lkbench())
        .args(["--groups", "1", "--group-ms", "0"])
        .args(args)
        .output()
        .expect("run lkbench-sim");
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    );
    (o, text)
}

fn plans() -> Vec<serde_json::Value> {
    std::fs::read_to_string(fixture())
        .unwrap()
        .lines()
        .filter(|l| !l.trim().is_empty())
        .map(|l| serde_json::from_str(l).unwrap())
        .collect()
}

#[test]
fn every_fixture_plan_matches_the_naive_kernel_in_the_simulator() {
    let plans = plans();
    let checked = plans.iter().filter(|p| p["impl"] != "naive").count();
    assert!(
        checked >= 10,
        "the fixture should hold fast and im2col plans"
    );
    let (o, text) = run(&[&fixture()]);
    println!("{text}");
    assert!(o.status.success(), "lkbench-sim failed:\n{text}");
    assert!(
        text.contains(&format!("{} plans, 0 failed", plans.len())),
        "{text}"
    );
    // every non-naive plan was checked (and timed), none unchecked
    let ok = text.lines().filter(|l| l.contains(" ok ")).count();
    assert_eq!(ok, checked, "{text}");
    assert!(text.contains("+ GEMM"), "the im2col GEMM step ran: {text}");
    assert!(
        text.lines()
            .filter(|l| l.contains(" ok "))
            .all(|l| l.contains(" ms ")),
        "{text}"
    );
}

#[test]
fn a_plan_that_leaves_outputs_unwritten_fails_the_check() {
    // the first problem's fast plan with one block along x instead of all of them
    let plans = plans();
    let fast = plans
        .iter()
        .find(|p| p["impl"] == "fast" && p["launches"][0]["grid"][0].as_u64().unwrap() > 1)
        .unwrap()
        .clone();
    let key = |p: &serde_json::Value| {
        (
            p["op"].clone(),
            p["dtype"].clone(),
            p["shape"].clone(),
            p["kernel"].clone(),
        )
    };
    let naive = plans
        .iter()
        .find(|p| p["impl"] == "naive" && key(p) == key(&fast))
        .unwrap()
        .clone();
    let mut broken = fast.clone();
    broken["launches"][0]["grid"][0] = 1.into();
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("broken.json");
    std::fs::write(&file, format!("[{naive}, {broken}]")).unwrap();
    let (o, text) = run(&[&file]);
    assert_eq!(o.status.code(), Some(1), "{text}");
    assert!(text.contains("FAIL"), "{text}");
    assert!(text.contains("differ from the naive kernel"), "{text}");
}

#[test]
fn bad_input_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let truncated = dir.path().join("truncated.json");
    std::fs::write(&truncated, "{\"op\": \"fwd\", ").unwrap();
    let (o, text) = run(&[&truncated]);
    assert_eq!(o.status.code(), Some(2), "{text}");
    assert!(text.contains("JSON"), "{text}");
    let mut bad = plans()[0].clone();
    bad["launches"][0]["block"][1] = 0.into();
    let zero_block = dir.path().join("zero_block.json");
    std::fs::write(&zero_block, bad.to_string()).unwrap();
    let (o, text) = run(&[&zero_block]);
    assert_eq!(o.status.code(), Some(2), "{text}");
    let (o, text) = run(&[&dir.path().join("missing.json")]);
    assert_eq!(o.status.code(), Some(2), "{text}");
}
