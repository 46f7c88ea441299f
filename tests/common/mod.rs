//! Shared helpers for the test files: random data, and the suite's one comparator.
//!
//! The comparator checks every element against an [`Expected`]: an f64 value and a bound on
//! |got - value| per element, NaN-aware (NaN must match NaN, an infinity the same-signed
//! infinity, nothing else passes a non-finite value). The bounds come from the element type and
//! the number of terms summed: for a convolution the reference is computed on the very inputs the
//! implementation saw (already rounded to f16/bf16), so the implementation may differ by the f32
//! accumulation error plus one unit of its storage precision. The accumulation error is bounded
//! by `min(terms, 5 sqrt(terms)) * eps_f32 * sum|terms|`: the worst case for short sums, and for
//! long ones (a weight gradient sums N*OH*OW products) the statistical bound, since the
//! worst case there grows so large that it would admit an all-zero result.
//!
//! Every test binary compiles this file (`mod common;`) and uses a part of it: the public items
//! carry `#[allow(dead_code)]` for the binaries that do not use them; anything no binary uses is
//! removed.

use lkconv::cpu::reference;
use lkconv::{ConvShape, DType, DwConv2d, Element, Op, Rng, Tensor};

/// A generator with a fresh seed (printed so that a failure can be replayed with LKCONV_SEED).
#[allow(dead_code)]
pub fn rng() -> Rng {
    Rng::for_test(std::thread::current().name().unwrap_or("test"))
}

#[allow(dead_code)]
pub fn random<T: Element>(shape: &[usize], rng: &mut Rng) -> Tensor<T> {
    Tensor::random(shape, rng).expect("valid shape")
}

/// What a result must be: per element the exact value and the largest admissible |got - value|.
#[derive(Clone, Debug)]
#[allow(dead_code)]
pub struct Expected {
    pub shape: Vec<usize>,
    pub value: Vec<f64>,
    pub bound: Vec<f64>,
}

/// Smallest positive (subnormal) value of a storage type: the absolute rounding floor.
fn smallest_step(dtype: DType) -> f64 {
    match dtype {
        DType::F32 => f32::from_bits(1) as f64,
        DType::F16 => half::f16::from_bits(1).to_f64(),
        DType::Bf16 => half::bf16::from_bits(1).to_f64(),
    }
}

/// Rounding errors of a long f32 sum behave as a random walk: their total stays within this many
/// times sqrt(terms) units of the magnitude (a 5-sigma margin over one unit per term).
const ROUNDING_SPREAD: f64 = 5.0;

/// Bound for a sum of `terms` products accumulated in f32 and stored as `dtype`: the f32
/// accumulation error `min(terms, 5 sqrt(terms)) * eps_f32 * magnitude` (magnitude = sum of
/// |term|) plus one unit of the storage precision at `value`.
#[allow(dead_code)]
pub fn sum_bound(dtype: DType, terms: usize, value: f64, magnitude: f64) -> f64 {
    let terms = terms.max(1) as f64;
    terms.min(ROUNDING_SPREAD * terms.sqrt()) * f32::EPSILON as f64 * magnitude
        + dtype.epsilon() * value.abs()
        + smallest_step(dtype)
}

#[allow(dead_code)]
impl Expected {
    /// A sum of `terms` products stored as `dtype`: `value` the exact result (f64-accumulated),
    /// `magnitude` the same sum over absolute values.
    pub fn of_sum(
        dtype: DType,
        terms: usize,
        value: &Tensor<f32>,
        magnitude: &Tensor<f32>,
    ) -> Self {
        assert_eq!(
            value.shape(),
            magnitude.shape(),
            "value and magnitude shapes"
        );
        let value_of = |v: f32| {
            // a result beyond the storage range is an infinity in that type
            let stored = match dtype {
                DType::F32 => v as f64,
                DType::F16 => half::f16::from_f32(v).to_f64(),
                DType::Bf16 => half::bf16::from_f32(v).to_f64(),
            };
            if stored.is_infinite() {
                stored
            } else {
                v as f64
            }
        };
        let value: Vec<f64> = value.data().iter().map(|&v| value_of(v)).collect();
        let bound: Vec<f64> = value
            .iter()
            .zip(magnitude.data())
            .map(|(&v, &m)| sum_bound(dtype, terms, v, m as f64))
            .collect();
        // A comparison that an all-zero result would pass cannot fail: refuse to build one.
        let nonzero = value.iter().filter(|v| v.is_finite() && **v != 0.0).count();
        let admit_zero = value
            .iter()
            .zip(&bound)
            .filter(|(v, b)| v.is_finite() && **v != 0.0 && v.abs() <= **b)
            .count();
        assert!(
            nonzero < 16 || 2 * admit_zero <= nonzero,
            "the bounds of {admit_zero} of {nonzero} nonzero elements admit 0 ({terms} terms): \
             this comparison could not fail"
        );
        Expected {
            shape: magnitude.shape().to_vec(),
            value,
            bound,
        }
    }

    /// `value` within `tol * max(max |value|, 1)` everywhere (for whole-network results, whose
    /// error is not a single sum's).
    pub fn scaled<T: Element>(value: &Tensor<T>, tol: f64) -> Self {
        let scale = value
            .data()
            .iter()
            .map(|v| v.to_f64())
            .filter(|v| v.is_finite())
            .fold(1.0f64, |m, v| m.max(v.abs()));
        Self::within(value, tol * scale)
    }

    /// `value` within the absolute `bound` everywhere.
    pub fn within<T: Element>(value: &Tensor<T>, bound: f64) -> Self {
        Expected {
            shape: value.shape().to_vec(),
            value: value.data().iter().map(|v| v.to_f64()).collect(),
            bound: vec![bound; value.len()],
        }
    }

    /// Exactly `value`, bit for bit up to the sign of zero and NaN payloads.
    pub fn exact<T: Element>(value: &Tensor<T>) -> Self {
        Self::within(value, 0.0)
    }

    /// Forward `conv(x, w) + bias` as computed by an implementation storing T.
    pub fn forward<T: Element>(
        conv: &DwConv2d,
        x: &Tensor<T>,
        w: &Tensor<T>,
        bias: Option<&Tensor<T>>,
    ) -> Self {
        let (x, w, b) = (
            x.cast::<f32>(),
            w.cast::<f32>(),
            bias.map(|b| b.cast::<f32>()),
        );
        let value = reference::forward(conv, &x, &w, b.as_ref()).expect("reference forward");
        let (xa, wa, ba) = (abs(&x), abs(&w), b.as_ref().map(abs));
        let magnitude = reference::forward(conv, &xa, &wa, ba.as_ref()).expect("magnitude");
        let terms = conv.kernel.0 * conv.kernel.1 + usize::from(bias.is_some());
        Self::of_sum(T::DTYPE, terms, &value, &magnitude)
    }

    /// Data gradient dx for an input of `input_hw`.
    pub fn data_grad<T: Element>(
        conv: &DwConv2d,
        dy: &Tensor<T>,
        w: &Tensor<T>,
        input_hw: (usize, usize),
    ) -> Self {
        let (dy, w) = (dy.cast::<f32>(), w.cast::<f32>());
        let value = reference::data_grad(conv, &dy, &w, input_hw).expect("reference dgrad");
        let magnitude = reference::data_grad(conv, &abs(&dy), &abs(&w), input_hw).unwrap();
        Self::of_sum(T::DTYPE, conv.kernel.0 * conv.kernel.1, &value, &magnitude)
    }

    /// Weight gradient dw.
    pub fn weight_grad<T: Element>(conv: &DwConv2d, x: &Tensor<T>, dy: &Tensor<T>) -> Self {
        let (x, dy) = (x.cast::<f32>(), dy.cast::<f32>());
        let value = reference::weight_grad(conv, &x, &dy).expect("reference wgrad");
        let magnitude = reference::weight_grad(conv, &abs(&x), &abs(&dy)).unwrap();
        let [n, _, oh, ow] = <[usize; 4]>::try_from(dy.shape()).expect("4-d dy");
        Self::of_sum(T::DTYPE, n * oh * ow, &value, &magnitude)
    }
}

fn abs(t: &Tensor<f32>) -> Tensor<f32> {
    Tensor::from_vec(t.shape(), t.data().iter().map(|v| v.abs()).collect()).unwrap()
}

/// The inputs of one problem, for every pass: x, w, bias, dy.
#[allow(dead_code)]
pub struct Inputs<T> {
    pub x: Tensor<T>,
    pub w: Tensor<T>,
    pub bias: Option<Tensor<T>>,
    pub dy: Tensor<T>,
}

#[allow(dead_code)]
impl<T: Element> Inputs<T> {
    /// The result `op` must give on these inputs.
    pub fn expected(&self, op: Op, conv: &DwConv2d) -> Expected {
        match op {
            Op::Forward => Expected::forward(conv, &self.x, &self.w, self.bias.as_ref()),
            Op::DataGrad => {
                let hw = (self.x.shape()[2], self.x.shape()[3]);
                Expected::data_grad(conv, &self.dy, &self.w, hw)
            }
            Op::WeightGrad => Expected::weight_grad(conv, &self.x, &self.dy),
        }
    }
}

/// The element where a comparison fails worst.
#[derive(Clone, Debug, PartialEq)]
#[allow(dead_code)]
pub struct Mismatch {
    /// Elements out of bounds.
    pub count: usize,
    pub len: usize,
    pub index: usize,
    pub got: f64,
    pub expected: f64,
    pub bound: f64,
}

/// Index `i` of a row-major `shape` as coordinates.
fn coords(shape: &[usize], mut i: usize) -> Vec<usize> {
    let mut c = vec![0; shape.len()];
    for (d, &n) in shape.iter().enumerate().rev() {
        if n > 0 {
            c[d] = i % n;
            i /= n;
        }
    }
    c
}

/// How far outside its bound an element is: 0 when it passes, infinity for a non-finite value
/// where another was expected.
fn excess(got: f64, expected: f64, bound: f64) -> f64 {
    if expected.is_nan() || got.is_nan() {
        return if expected.is_nan() && got.is_nan() {
            0.0
        } else {
            f64::INFINITY
        };
    }
    if expected.is_infinite() || got.is_infinite() {
        return if got == expected { 0.0 } else { f64::INFINITY };
    }
    let err = (got - expected).abs();
    if bound.is_nan() {
        return f64::INFINITY; // a broken bound never passes
    }
    if err <= bound {
        0.0
    } else if bound > 0.0 {
        err / bound
    } else {
        f64::MAX
    }
}

/// Compares `got` with `want` element by element; the worst failing element on failure.
#[allow(dead_code)]
pub fn compare(got: &[f64], want: &Expected) -> Result<(), Mismatch> {
    assert_eq!(
        want.value.len(),
        want.bound.len(),
        "expected value/bound lengths"
    );
    if got.len() != want.value.len() {
        return Err(Mismatch {
            count: got.len().abs_diff(want.value.len()),
            len: want.value.len(),
            index: got.len().min(want.value.len()),
            got: f64::NAN,
            expected: f64::NAN,
            bound: f64::NAN,
        });
    }
    let mut worst: Option<(f64, Mismatch)> = None;
    let mut count = 0;
    for (i, ((&g, &e), &b)) in got.iter().zip(&want.value).zip(&want.bound).enumerate() {
        let x = excess(g, e, b);
        if x > 0.0 {
            count += 1;
            if worst.as_ref().is_none_or(|(w, _)| x > *w) {
                let m = Mismatch {
                    count: 0,
                    len: got.len(),
                    index: i,
                    got: g,
                    expected: e,
                    bound: b,
                };
                worst = Some((x, m));
            }
        }
    }
    match worst {
        None => Ok(()),
        Some((_, m)) => Err(Mismatch { count, ..m }),
    }
}

/// Asserts `got` matches `want` (shape and every element), naming the worst element.
#[allow(dead_code)]
pub fn assert_matches<T: Element>(what: &str, got: &Tensor<T>, want: &Expected) {
    let values: Vec<f64> = got.data().iter().map(|v| v.to_f64()).collect();
    assert_eq!(got.shape(), &want.shape[..], "{what}: shapes differ");
    if let Err(m) = compare(&values, want) {
        panic!(
            "{what} ({}): {} of {} elements out of bounds; worst at {} {:?}: got {:e}, \
             expected {:e}, bound {:e}",
            T::DTYPE,
            m.count,
            m.len,
            m.index,
            coords(got.shape(), m.index),
            m.got,
            m.expected,
            m.bound
        );
    }
}

/// True when a CUDA device with the embedded kernels is usable; otherwise prints "skipped: no
/// CUDA device (why)" and returns false (panics instead with `LKCONV_REQUIRE_GPU=1`).
#[allow(dead_code)]
pub fn have_gpu() -> bool {
    let reason = if !lkconv::cuda::kernels_compiled() {
        "built without CUDA kernels".to_string()
    } else {
        match lkconv::cuda::CudaDevice::shared(0) {
            Ok(d) if d.kernels_loaded() => return true,
            Ok(_) => "the embedded kernels failed to load".to_string(),
            Err(e) => e.to_string(),
        }
    };
    if std::env::var("LKCONV_REQUIRE_GPU").is_ok_and(|v| v == "1") {
        panic!("LKCONV_REQUIRE_GPU=1 but no usable CUDA device: {reason}");
    }
    println!("skipped: no CUDA device ({reason})");
    false
}

/// Reruns the named tests of this test binary with the CPU micro-kernels capped at each lower
/// instruction set (`LKCONV_CPU_ISA`; read once per process, hence the child processes), so that
/// AVX-512, AVX2 and portable code are all checked on one machine. Returns at once in a child.
#[allow(dead_code)]
pub fn rerun_with_each_isa(tests: &[&str]) {
    if std::env::var_os("LKCONV_CPU_ISA").is_some() {
        return; // this is a child run
    }
    let exe = std::env::current_exe().expect("test binary path");
    for isa in ["portable", "avx2"] {
        for test in tests {
            let out = std::process::Command::new(&exe)
                .args(["--exact", test])
                .env("LKCONV_CPU_ISA", isa)
                .output()
                .expect("rerun the test binary");
            let stdout = String::from_utf8_lossy(&out.stdout);
            assert!(
                out.status.success() && stdout.contains("1 passed"),
                "{test} with LKCONV_CPU_ISA={isa} failed:\n{stdout}\n{}",
                String::from_utf8_lossy(&out.stderr)
            );
        }
    }
}

/// One problem: N, C, H, W, the convolution, and whether the forward pass adds a bias.
#[derive(Clone, Copy, Debug)]
#[allow(dead_code)]
pub struct Case {
    pub n: usize,
    pub c: usize,
    pub h: usize,
    pub w: usize,
    pub conv: DwConv2d,
    pub bias: bool,
}

/// A case whose forward pass adds a bias.
#[allow(dead_code)]
pub fn case(n: usize, c: usize, h: usize, w: usize, conv: DwConv2d) -> Case {
    Case {
        n,
        c,
        h,
        w,
        conv,
        bias: true,
    }
}

#[allow(dead_code)]
impl Case {
    /// The validated shape (panics on an invalid case: a test's own mistake).
    pub fn shape(&self) -> ConvShape {
        self.conv
            .resolve(self.n, self.c, self.h, self.w)
            .unwrap_or_else(|e| panic!("invalid test case {self:?}: {e}"))
    }

    /// Fresh random inputs for every pass (a bias when the case has one).
    pub fn inputs<T: Element>(&self, rng: &mut Rng) -> Inputs<T> {
        let s = self.shape();
        Inputs {
            x: random(&s.input_dims(), rng),
            w: random(&self.conv.weight_dims(s.c), rng),
            bias: self.bias.then(|| random(&[s.c], rng)),
            dy: random(&s.output_dims(), rng),
        }
    }
}

/// erfc(z) for z >= 0 to ~1e-15 relative: the Taylor series of erf below 2, the continued
/// fraction of erfc above.
#[allow(dead_code)]
pub fn erfc_hp(z: f64) -> f64 {
    if z < 2.0 {
        let (mut term, mut sum, mut n) = (z, z, 0.0);
        loop {
            n += 1.0;
            term *= -z * z / n;
            let t = term / (2.0 * n + 1.0);
            sum += t;
            if t.abs() < 1e-18 {
                break;
            }
        }
        1.0 - sum * std::f64::consts::FRAC_2_SQRT_PI
    } else {
        let mut f = z;
        for k in (1..200).rev() {
            f = z + (k as f64 / 2.0) / f;
        }
        (-z * z).exp() / std::f64::consts::PI.sqrt() / f
    }
}
