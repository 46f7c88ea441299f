//! include/lkconv.h is what cbindgen generates from capi/src/lib.rs: this test fails when the
//! checked-in header drifts from the code. `LKCONV_BLESS=1` rewrites it instead.

use std::path::Path;

#[test]
fn checked_in_header_matches_the_code() {
    let capi = Path::new(env!("CARGO_MANIFEST_DIR"));
    let config = cbindgen::Config::from_file(capi.join("cbindgen.toml")).expect("cbindgen.toml");
    let bindings = cbindgen::Builder::new()
        .with_config(config)
        .with_src(capi.join("src/lib.rs"))
        .generate()
        .expect("cbindgen failed on capi/src/lib.rs");
    let mut generated = Vec::new();
    bindings.write(&mut generated);
    let generated = String::from_utf8(generated).expect("header is UTF-8");
    let path = capi.join("../include/lkconv.h");
    if std::env::var_os("LKCONV_BLESS").is_some() {
        std::fs::write(&path, &generated).expect("writing include/lkconv.h");
        return;
    }
    let checked_in = std::fs::read_to_string(&path).unwrap_or_default();
    assert!(
        checked_in == generated,
        "include/lkconv.h differs from what cbindgen generates from capi/src/lib.rs; \
         regenerate it with: LKCONV_BLESS=1 cargo test -p lkconv-capi --test header"
    );
}
