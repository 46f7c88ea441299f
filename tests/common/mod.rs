//! Shared helpers for the test files: random data, comparison against the reference.
#![allow(dead_code)]

use lkconv::{Element, Rng, Tensor};

/// A generator with a fresh seed (printed so that a failure can be replayed with LKCONV_SEED).
pub fn rng() -> Rng {
    if let Some(seed) = std::env::var("LKCONV_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
    {
        eprintln!("seed {seed} (from LKCONV_SEED)");
        return Rng::new(seed);
    }
    let (rng, seed) = Rng::from_time();
    eprintln!("seed {seed} (replay with LKCONV_SEED={seed})");
    rng
}

pub fn random<T: Element>(shape: &[usize], rng: &mut Rng) -> Tensor<T> {
    Tensor::random(shape, rng).expect("valid shape")
}

/// Largest |a - b| divided by the largest |b| (b the reference); 0 for equal tensors.
pub fn normalized_max_error<T: Element>(got: &Tensor<T>, want: &Tensor<T>) -> f64 {
    assert_eq!(got.shape(), want.shape(), "shapes differ");
    let mut max_err = 0.0f64;
    let mut max_ref = 0.0f64;
    for (a, b) in got.data().iter().zip(want.data()) {
        let (a, b) = (a.to_f64(), b.to_f64());
        assert!(a.is_finite(), "non-finite output {a}");
        max_err = max_err.max((a - b).abs());
        max_ref = max_ref.max(b.abs());
    }
    if max_ref == 0.0 {
        max_err
    } else {
        max_err / max_ref
    }
}

/// Asserts `got` matches `want` within `tol` relative to the reference's scale.
pub fn assert_close<T: Element>(what: &str, got: &Tensor<T>, want: &Tensor<T>, tol: f64) {
    let e = normalized_max_error(got, want);
    assert!(e <= tol, "{what}: normalized max error {e:.3e} > {tol:.1e}");
}
