//! The suite's comparator (tests/common) can fail: NaN, infinities, one step past the bound,
//! wrong shapes, and real convolution mistakes are all caught; the worst element is reported.

mod common;

use common::{assert_matches, compare, random, sum_bound, Expected, Mismatch};
use half::{bf16, f16};
use lkconv::{cpu, DType, DwConv2d, Element, Rng, Tensor};

fn expected(value: &[f64], bound: &[f64]) -> Expected {
    Expected {
        shape: vec![value.len()],
        value: value.to_vec(),
        bound: bound.to_vec(),
    }
}

fn fails(got: &[f64], want: &Expected) -> Mismatch {
    compare(got, want).expect_err("the comparator must reject this")
}

const INF: f64 = f64::INFINITY;
const NAN: f64 = f64::NAN;

#[test]
fn nan_must_match_nan() {
    let want = expected(&[1.0, NAN, 3.0], &[0.5, 0.5, 0.5]);
    assert!(compare(&[1.0, NAN, 3.0], &want).is_ok());
    // NaN where a number is expected, even with an infinite bound
    let m = fails(&[1.0, NAN, NAN], &want);
    assert_eq!((m.index, m.count), (2, 1));
    assert!(m.got.is_nan() && m.expected == 3.0);
    assert!(compare(&[1.0, NAN, NAN], &expected(&[1.0, NAN, 3.0], &[INF; 3])).is_err());
    // a number where NaN is expected
    let m = fails(&[1.0, 2.0, 3.0], &want);
    assert_eq!(m.index, 1);
    assert!(m.expected.is_nan());
    // a NaN bound never passes
    assert!(compare(&[1.0], &expected(&[1.0], &[NAN])).is_err());
}

#[test]
fn infinities_must_match_in_sign() {
    let want = expected(&[INF, -INF, 0.0], &[1e300, 1e300, 1e300]);
    assert!(compare(&[INF, -INF, 0.0], &want).is_ok());
    assert_eq!(fails(&[-INF, -INF, 0.0], &want).index, 0);
    assert_eq!(fails(&[INF, INF, 0.0], &want).index, 1);
    assert_eq!(fails(&[f64::MAX, -INF, 0.0], &want).index, 0);
    assert_eq!(fails(&[NAN, -INF, 0.0], &want).index, 0);
    // an infinity where a finite value is expected, whatever the bound
    assert_eq!(fails(&[INF, -INF, INF], &want).index, 2);
    assert_eq!(fails(&[INF, -INF, -INF], &want).index, 2);
}

#[test]
fn the_bound_is_inclusive_and_one_step_past_it_fails() {
    for (value, bound) in [(1.0, 0.25), (-3.5, 1e-7), (0.0, 1e-30), (1e10, 3.0)] {
        let want = expected(&[value], &[bound]);
        let at = value + bound;
        assert!(compare(&[at], &want).is_ok(), "{value} {bound}");
        assert!(compare(&[value - bound], &want).is_ok(), "{value} {bound}");
        let past = next_up(at);
        let m = fails(&[past], &want);
        assert_eq!((m.got, m.expected, m.bound), (past, value, bound));
    }
    // a zero bound accepts only the value itself (and -0 for 0)
    let want = expected(&[0.0, 1.0], &[0.0, 0.0]);
    assert!(compare(&[-0.0, 1.0], &want).is_ok());
    assert!(compare(&[f64::from_bits(1), 1.0], &want).is_err());
}

#[test]
fn the_worst_element_and_the_count_are_reported() {
    let want = expected(&[0.0; 6], &[1.0; 6]);
    let m = fails(&[0.5, 3.0, 1.5, 10.0, -1.0, 2.0], &want);
    assert_eq!(
        m,
        Mismatch {
            count: 4,
            len: 6,
            index: 3,
            got: 10.0,
            expected: 0.0,
            bound: 1.0
        }
    );
    // a non-finite mismatch is worse than any finite one
    assert_eq!(fails(&[1e30, NAN, 0.0, 0.0, 0.0, 0.0], &want).index, 1);
    // a length mismatch fails
    assert!(compare(&[0.0; 5], &want).is_err());
    assert!(compare(&[0.0; 7], &want).is_err());
}

#[test]
#[should_panic(expected = "shapes differ")]
fn a_wrong_shape_fails() {
    let t = Tensor::<f32>::zeros(&[2, 3]).unwrap();
    let want = Expected::exact(&Tensor::<f32>::zeros(&[3, 2]).unwrap());
    assert_matches("transposed", &t, &want);
}

#[test]
#[should_panic(expected = "worst at 4 [1, 0, 1]")]
fn the_panic_message_names_the_worst_element() {
    let mut t = Tensor::<f32>::zeros(&[2, 1, 3]).unwrap();
    let want = Expected::exact(&t);
    t.data_mut()[4] = f32::NAN;
    assert_matches("poisoned", &t, &want);
}

#[test]
fn sum_bounds_follow_the_dtype_and_the_terms() {
    // one unit of the storage precision at the value, plus f32 accumulation over the terms
    let b = sum_bound(DType::Bf16, 1, 1.0, 0.0);
    assert!((b - 2f64.powi(-7)).abs() < 1e-30, "{b}");
    let b = sum_bound(DType::F16, 1, 2.0, 0.0);
    assert_eq!(b, 2f64.powi(-9) + 2f64.powi(-24)); // plus the smallest f16 step
                                                   // short sums: one unit per term (the worst case)
    let b = sum_bound(DType::F32, 16, 0.0, 3.0);
    assert!((b - 48.0 * f32::EPSILON as f64).abs() < 1e-12, "{b}");
    // long sums: 5 sqrt(terms) units (the statistical bound)
    let b = sum_bound(DType::F32, 100, 0.0, 3.0);
    assert!((b - 150.0 * f32::EPSILON as f64).abs() < 1e-12, "{b}");
    let b = sum_bound(DType::F32, 1_000_000, 0.0, 1.0);
    assert!((b - 5000.0 * f32::EPSILON as f64).abs() < 1e-12, "{b}");
    assert!(sum_bound(DType::F32, 1000, 1.0, 1.0) > sum_bound(DType::F32, 10, 1.0, 1.0));
}

/// A weight gradient over a batch of 64 56x56 maps sums 200704 products per tap: an all-zero
/// result must fail (the worst-case bound, 200704 units of the magnitude, admitted it). Each tap
/// admits zero with a chance of about 7%, so at least half of 36 rejecting it never fails by luck.
#[test]
fn a_long_weight_gradient_reduction_rejects_zeros() {
    let mut rng = common::rng();
    let conv = DwConv2d::new(3, 3);
    let x = random::<f32>(&[64, 4, 56, 56], &mut rng);
    let dy = random::<f32>(&[64, 4, 56, 56], &mut rng);
    let want = Expected::weight_grad(&conv, &x, &dy);
    let zeros = vec![0.0; want.value.len()];
    let m = fails(&zeros, &want);
    assert!(m.count >= 18, "only {} of 36 taps rejected zero", m.count);
    // and the reference's own value, rounded to f32, passes
    let rounded: Vec<f64> = want.value.iter().map(|&v| v as f32 as f64).collect();
    assert_eq!(compare(&rounded, &want), Ok(()));
}

/// Bounds that would let an all-zero result pass are refused when the comparison is built.
#[test]
#[should_panic(expected = "could not fail")]
fn bounds_that_admit_zero_are_refused() {
    let value = Tensor::from_vec(&[32], vec![1e-6f32; 32]).unwrap();
    let magnitude = Tensor::from_vec(&[32], vec![1.0f32; 32]).unwrap();
    Expected::of_sum(DType::F32, 1_000_000, &value, &magnitude);
}

/// A convolution with a mistake (wrong padding, a dropped tap, a bias twice) fails.
#[test]
fn real_convolution_mistakes_fail() {
    let mut rng = Rng::new(3);
    let conv = DwConv2d::new(5, 4);
    let x: Tensor<f32> = random(&[2, 3, 9, 11], &mut rng);
    let w: Tensor<f32> = random(&[3, 1, 5, 4], &mut rng);
    let b: Tensor<f32> = random(&[3], &mut rng);
    let want = Expected::forward(&conv, &x, &w, Some(&b));
    let right = cpu::reference::forward(&conv, &x, &w, Some(&b)).unwrap();
    assert!(compare(&f64s(&right), &want).is_ok());

    let shifted = conv.with_padding(2, 1);
    let wrong = cpu::reference::forward(&shifted, &x, &w, Some(&b)).unwrap();
    assert!(compare(&f64s(&wrong), &want).is_err(), "wrong padding");

    let mut w_dropped = w.clone();
    w_dropped.data_mut()[7] = 0.0;
    let wrong = cpu::reference::forward(&conv, &x, &w_dropped, Some(&b)).unwrap();
    assert!(compare(&f64s(&wrong), &want).is_err(), "dropped tap");

    let b2 = Tensor::from_vec(&[3], b.data().iter().map(|v| 2.0 * v).collect()).unwrap();
    let wrong = cpu::reference::forward(&conv, &x, &w, Some(&b2)).unwrap();
    assert!(compare(&f64s(&wrong), &want).is_err(), "bias twice");
}

/// Half-precision results: the exact result rounded is accepted; two units of the dtype off in
/// one element is not (the tolerance is about one unit, not a multiple of the result's scale).
#[test]
fn half_precision_results_within_one_unit() {
    check_half::<f16>();
    check_half::<bf16>();
}

fn check_half<T: Element>() {
    let mut rng = Rng::new(11);
    let conv = DwConv2d::new(3, 3);
    let x: Tensor<T> = random(&[1, 2, 6, 7], &mut rng);
    let w: Tensor<T> = random(&[2, 1, 3, 3], &mut rng);
    let want = Expected::forward(&conv, &x, &w, None);
    let rounded = cpu::reference::forward(&conv, &x, &w, None).unwrap();
    assert_matches("reference rounded to T", &rounded, &want);
    // two units of T off at the largest element
    let (i, v) = rounded
        .data()
        .iter()
        .map(|v| v.to_f64())
        .enumerate()
        .max_by(|a, b| a.1.abs().total_cmp(&b.1.abs()))
        .unwrap();
    let mut off = f64s(&rounded);
    off[i] = v + 2.0 * T::DTYPE.epsilon() * v.abs();
    assert!(compare(&off, &want).is_err(), "{}", T::DTYPE);
    // f32 results of the same inputs pass their own (tighter) expectation, not a wrong one
    let wf = w.cast::<f32>();
    let xf = x.cast::<f32>();
    let want32 = Expected::forward(&conv, &xf, &wf, None);
    assert!(compare(&off, &want32).is_err());
}

/// The next f64 above `v` (finite `v`).
fn next_up(v: f64) -> f64 {
    match v {
        0.0 => f64::from_bits(1),
        v if v > 0.0 => f64::from_bits(v.to_bits() + 1),
        v => f64::from_bits(v.to_bits() - 1),
    }
}

fn f64s<T: Element>(t: &Tensor<T>) -> Vec<f64> {
    t.data().iter().map(|v| v.to_f64()).collect()
}
