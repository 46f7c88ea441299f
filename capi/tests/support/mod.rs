//! Shared by the C and Python tests of the C ABI: where the library is, running commands.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::OnceLock;

/// The repository root (capi/..).
pub fn repo_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("capi/ has a parent")
        .to_path_buf()
}

/// The directory holding liblkconv.so and liblkconv.a (the profile directory above this test's
/// `deps/`), after `cargo build -p lkconv-capi` into it with this test's profile: `cargo test`
/// alone suffices, and a library older than the sources is never tested (the build is a no-op
/// when it is up to date; once per test binary).
pub fn lib_dir() -> PathBuf {
    static BUILT: OnceLock<PathBuf> = OnceLock::new();
    BUILT
        .get_or_init(|| {
            let exe = std::env::current_exe().expect("test executable path");
            let dir = exe
                .parent()
                .and_then(Path::parent)
                .expect("target/<profile>/deps/<test>")
                .to_path_buf();
            let target = dir.parent().expect("target/<profile>");
            let profile = match dir.file_name().and_then(|n| n.to_str()) {
                Some("debug") => "dev",
                Some(p) => p,
                None => panic!("no profile directory above {}", exe.display()),
            };
            let mut cargo = Command::new(env!("CARGO"));
            cargo
                .args([
                    "build",
                    "-p",
                    "lkconv-capi",
                    "--profile",
                    profile,
                    "--target-dir",
                ])
                .arg(target)
                .current_dir(repo_root());
            run_checked(
                &mut cargo,
                "building the C library (cargo build -p lkconv-capi)",
            );
            for lib in ["liblkconv.so", "liblkconv.a"] {
                assert!(
                    dir.join(lib).is_file(),
                    "{} is missing after cargo build -p lkconv-capi",
                    dir.join(lib).display()
                );
            }
            dir
        })
        .clone()
}

/// Runs `cmd`, panicking with its output when it cannot start or fails; returns its stdout.
pub fn run_checked(cmd: &mut Command, what: &str) -> String {
    let out = cmd
        .output()
        .unwrap_or_else(|e| panic!("{what}: cannot run {cmd:?}: {e}"));
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        out.status.success(),
        "{what} failed ({}):\n{stdout}\n{stderr}",
        out.status
    );
    eprint!("{stderr}");
    stdout
}

/// The first fenced block opened by `fence` after the heading `section` in a markdown text.
#[allow(dead_code)] // used by c_api.rs, not by python.rs
pub fn readme_block(markdown: &str, section: &str, fence: &str) -> String {
    let start = markdown
        .find(&format!("\n{section}\n"))
        .unwrap_or_else(|| panic!("README has no section '{section}'"));
    let rest = &markdown[start..];
    let open = rest
        .find(&format!("\n{fence}\n"))
        .unwrap_or_else(|| panic!("section '{section}' has no {fence} block"))
        + fence.len()
        + 2;
    let len = rest[open..].find("\n```").expect("unterminated block");
    rest[open..open + len + 1].to_string()
}
