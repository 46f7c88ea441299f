//! The C ABI from Python: `capi/tests/python/test_capi.py` (stdlib unittest, NumPy float64
//! reference) against liblkconv.so. Needs python3 with NumPy (`.ci/run` installs it pinned).

mod support;

use std::path::Path;
use std::process::Command;

use support::{lib_dir, run_checked};

#[test]
fn python_ctypes_tests_pass() {
    let python = std::env::var("PYTHON").unwrap_or_else(|_| "python3".into());
    let probe = Command::new(&python)
        .args(["-c", "import numpy"])
        .output()
        .unwrap_or_else(|e| panic!("cannot run {python} (set PYTHON): {e}"));
    assert!(
        probe.status.success(),
        "{python} has no NumPy: `{python} -m pip install numpy==2.2.6` (what .ci/run does)"
    );
    let tests = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/python");
    let out = run_checked(
        Command::new(&python)
            .args(["-m", "unittest", "-v", "test_capi"])
            .current_dir(&tests)
            .env("LKCONV_LIB", lib_dir().join("liblkconv.so")),
        "python -m unittest test_capi",
    );
    print!("{out}");
}
