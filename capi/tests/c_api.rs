//! The C ABI from C: `capi/tests/c/api_test.c` and README's C example, compiled with
//! `cc -std=c99 -Wall -Werror` against include/lkconv.h and linked with liblkconv.a and with
//! liblkconv.so, then run.

mod support;

use std::path::Path;
use std::process::Command;

use support::{lib_dir, repo_root, run_checked};

/// The system libraries a Rust staticlib with C++ (the simulator) needs on Linux.
const STATIC_SYSTEM_LIBS: &[&str] = &["-lstdc++", "-lpthread", "-ldl", "-lm", "-lgcc_s"];

#[derive(Clone, Copy, Debug)]
enum Link {
    Static,
    Shared,
}

/// Compiles `source` into `exe` against the header and the library, linked `link`.
fn compile(source: &Path, exe: &Path, link: Link) {
    let lib = lib_dir();
    let mut cc = Command::new(std::env::var("CC").unwrap_or_else(|_| "cc".into()));
    cc.args(["-std=c99", "-Wall", "-Wextra", "-Werror", "-O1", "-I"])
        .arg(repo_root().join("include"))
        .arg(source)
        .arg("-o")
        .arg(exe);
    match link {
        Link::Static => {
            cc.arg(lib.join("liblkconv.a")).args(STATIC_SYSTEM_LIBS);
        }
        Link::Shared => {
            cc.arg("-L")
                .arg(&lib)
                .arg("-llkconv")
                .arg(format!("-Wl,-rpath,{}", lib.display()));
        }
    }
    cc.arg("-lm");
    run_checked(
        &mut cc,
        &format!("compiling {} ({link:?})", source.display()),
    );
}

fn compile_and_run(source: &Path, name: &str) -> Vec<String> {
    let dir = tempfile::tempdir().expect("temp dir");
    let mut outputs = Vec::new();
    for link in [Link::Static, Link::Shared] {
        let exe = dir.path().join(format!("{name}-{link:?}"));
        compile(source, &exe, link);
        outputs.push(run_checked(
            &mut Command::new(&exe),
            &format!("running {name} ({link:?})"),
        ));
    }
    outputs
}

#[test]
fn c_program_checks_every_pass_and_error_static_and_shared() {
    let source = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/c/api_test.c");
    for out in compile_and_run(&source, "api_test") {
        assert_eq!(out.trim(), "ok", "{out}");
    }
}

#[test]
fn readme_c_example_compiles_and_runs() {
    let readme = std::fs::read_to_string(repo_root().join("README.md")).expect("README.md");
    let example = support::readme_block(&readme, "## C library", "```c");
    let dir = tempfile::tempdir().expect("temp dir");
    let source = dir.path().join("example.c");
    std::fs::write(&source, example).expect("writing the example");
    for out in compile_and_run(&source, "readme_example") {
        assert!(out.starts_with("y is 8x8"), "unexpected output: {out}");
    }
}
