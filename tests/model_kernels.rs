//! The model engine's own CPU kernels against f64 references: the vectorised activations
//! (`cpu::activation`, every ISA, the whole f32 line) and the small grouped convolutions of the
//! stem and transitions (`cpu::small_conv`: dense 3x3 stride 2, depthwise stride 1 and 2).

mod common;

use common::{assert_matches, erfc_hp, rng, sum_bound, Expected};
use lkconv::cpu::activation::{bias_act, Activation, GELU_REL_ERROR};
use lkconv::cpu::small_conv::GroupedConv;
use lkconv::model::deploy::Dims;
use lkconv::model::reference::{conv, Act64};
use lkconv::{DType, Rng, Tensor};

/// The exact GELU in f64: x Phi(x), Phi from erfc so that the negative tail keeps its digits.
fn gelu_hp(x: f64) -> f64 {
    let z = x.abs() * std::f64::consts::FRAC_1_SQRT_2;
    if x.is_nan() {
        return f64::NAN;
    }
    if x == f64::INFINITY {
        return x;
    }
    if x == f64::NEG_INFINITY {
        return x * 0.0; // NaN, as x * Phi(x) evaluates
    }
    let half = 0.5 * erfc_hp(z);
    x * if x >= 0.0 { 1.0 - half } else { half }
}

/// The admissible error of GELU at the f64 value `want` (see `cpu::activation`).
fn gelu_bound(want: f64) -> f64 {
    GELU_REL_ERROR * want.abs() + 1e-37
}

/// Every 997th f32 bit pattern of both signs (all exponents, NaNs and infinities included)
/// and a dense sweep of [-20, 20].
fn whole_line() -> Vec<f32> {
    let mut xs: Vec<f32> = (0..=u32::MAX / 997)
        .map(|i| f32::from_bits(i * 997))
        .collect();
    xs.extend((-200_000..=200_000).map(|i| i as f32 * 1e-4));
    xs.extend([
        0.0,
        -0.0,
        f32::MIN_POSITIVE,
        -f32::MIN_POSITIVE,
        f32::MAX,
        f32::MIN,
        f32::INFINITY,
        f32::NEG_INFINITY,
        f32::NAN,
        -13.0,
        -13.1,
        -14.0,
    ]);
    xs
}

#[test]
fn gelu_matches_f64_on_the_whole_line() {
    let xs = whole_line();
    let mut got = xs.clone();
    bias_act(&mut got, 0.0, Activation::Gelu);
    let (mut worst_rel, mut at) = (0.0f64, 0.0f32);
    for (&x, &g) in xs.iter().zip(&got) {
        let want = gelu_hp(x as f64);
        let g = g as f64;
        if want.is_nan() || g.is_nan() {
            assert!(
                want.is_nan() && g.is_nan(),
                "gelu({x:e}) = {g:e}, want {want:e}"
            );
            continue;
        }
        if want.is_infinite() || g.is_infinite() {
            assert_eq!(g, want, "gelu({x:e})");
            continue;
        }
        let err = (g - want).abs();
        assert!(
            err <= gelu_bound(want),
            "gelu({x:e}) = {g:e}, want {want:e}: error {err:e}"
        );
        if want.abs() >= 1e-30 && err / want.abs() > worst_rel {
            (worst_rel, at) = (err / want.abs(), x);
        }
    }
    eprintln!("gelu max relative error {worst_rel:e} at x = {at:e}");
    // The reference model's f64 GELU agrees with the high-precision one (it is the oracle of
    // the model tests).
    for i in -16_000..=16_000 {
        let x = i as f32 * 1e-3;
        let want = gelu_hp(x as f64);
        let r = lkconv::model::cpu::gelu(x) as f64;
        assert!(
            (r - want).abs() <= 3e-7 * want.abs() + 1e-37,
            "reference gelu({x})"
        );
    }
}

#[test]
fn bias_act_adds_bias_and_keeps_nan_in_every_lane() {
    let mut r = rng();
    for len in [1, 7, 8, 15, 16, 17, 33, 100] {
        let mut xs: Vec<f32> = (0..len).map(|_| r.uniform_pm1() * 8.0).collect();
        xs[len / 2] = f32::NAN;
        for act in [Activation::Identity, Activation::Relu, Activation::Gelu] {
            let bias = r.uniform_pm1();
            let mut got = vec![f32::NAN; len];
            got.copy_from_slice(&xs);
            bias_act(&mut got, bias, act);
            for (i, (&x, &g)) in xs.iter().zip(&got).enumerate() {
                let s = x as f64 + bias as f64;
                let want = match act {
                    Activation::Identity => s,
                    // NaN to 0, as the f64 reference model's max(0) does.
                    Activation::Relu => s.max(0.0),
                    Activation::Gelu => gelu_hp(s),
                };
                // The f32 sum x + bias rounds once (GELU's slope is below 1.13).
                let bound = match act {
                    Activation::Gelu => gelu_bound(want) + 1.13 * f32::EPSILON as f64 * s.abs(),
                    _ => f32::EPSILON as f64 * want.abs(),
                };
                let ok = if want.is_nan() {
                    g.is_nan()
                } else {
                    (g as f64 - want).abs() <= bound
                };
                assert!(ok, "{act:?} len {len} lane {i}: got {g:e}, want {want:e}");
            }
        }
    }
}

#[test]
fn activations_on_every_isa() {
    common::rerun_with_each_isa(&[
        "gelu_matches_f64_on_the_whole_line",
        "bias_act_adds_bias_and_keeps_nan_in_every_lane",
        "small_convs_match_reference",
        "small_convs_propagate_non_finite_like_reference",
        "sgemm_matches_f64_with_narrow_column_tails",
    ]);
}

/// One case: the convolution, the input size (n, h, w) and the activation.
struct ConvCase {
    conv: GroupedConv,
    n: usize,
    h: usize,
    w: usize,
    act: Activation,
}

fn dense(cin: usize, cout: usize, k: usize, stride: usize) -> GroupedConv {
    GroupedConv {
        cin,
        cout,
        groups: 1,
        k,
        stride,
        pad: k / 2,
    }
}

fn depthwise(c: usize, k: usize, stride: usize) -> GroupedConv {
    GroupedConv {
        groups: c,
        ..dense(c, c, k, stride)
    }
}

fn cases() -> Vec<ConvCase> {
    use Activation::*;
    let case = |conv, n, h, w, act| ConvCase { conv, n, h, w, act };
    vec![
        // The stem's dense conv and depthwise convs (small), odd and non-square images.
        case(dense(3, 8, 3, 2), 1, 23, 17, Relu),
        case(dense(3, 5, 3, 2), 2, 12, 9, Gelu),
        case(dense(2, 3, 3, 1), 1, 5, 6, Identity),
        case(depthwise(4, 3, 1), 2, 19, 37, Relu),
        case(depthwise(3, 3, 2), 1, 29, 35, Relu),
        case(depthwise(1, 3, 2), 1, 8, 8, Gelu),
        case(depthwise(2, 3, 2), 3, 1, 1, Relu),
        case(depthwise(5, 5, 2), 1, 14, 11, Identity),
        case(depthwise(2, 5, 3), 1, 13, 16, Relu),
        case(depthwise(3, 1, 2), 1, 7, 9, Relu),
        // Stride 2, odd pad with odd width and even pad with even width (the other pairings are
        // above): the column-pair split.
        case(depthwise(3, 7, 2), 1, 10, 21, Relu),
        case(depthwise(2, 5, 2), 1, 9, 16, Identity),
        // A kernel larger than the image, and grouped (neither dense nor depthwise).
        case(depthwise(2, 5, 1), 1, 2, 3, Gelu),
        case(
            GroupedConv {
                groups: 2,
                ..dense(4, 6, 3, 2)
            },
            2,
            9,
            10,
            Relu,
        ),
        // Wide rows (several register blocks and a masked tail).
        case(depthwise(2, 3, 1), 1, 3, 150, Relu),
        case(depthwise(2, 3, 2), 1, 4, 227, Relu),
    ]
}

fn act64(v: f64, act: Activation) -> f64 {
    match act {
        Activation::Identity => v,
        Activation::Relu => v.max(0.0),
        Activation::Gelu => gelu_hp(v),
    }
}

/// Runs one case on the given data and compares with the f64 reference (NaN-aware).
fn check_case(c: &ConvCase, x: &Tensor<f32>, w: &Tensor<f32>, b: &[f32]) {
    let g = c.conv;
    let (oh, ow) = g.out_hw(c.h, c.w).unwrap();
    let mut y = vec![f32::NAN; c.n * g.cout * oh * ow]; // poisoned
    let got_hw = g
        .forward_into(x.data(), [c.n, c.h, c.w], w.data(), b, c.act, &mut y)
        .unwrap();
    assert_eq!(got_hw, (oh, ow));
    let x64 = Act64::from_tensor(x).unwrap();
    let value = conv(&x64, w, Some(b), g.stride, g.pad, g.groups).unwrap();
    let abs = |t: &Tensor<f32>| {
        Tensor::from_vec(t.shape(), t.data().iter().map(|v| v.abs()).collect()).unwrap()
    };
    let absb: Vec<f32> = b.iter().map(|v| v.abs()).collect();
    let mag = conv(
        &Act64::from_tensor(&abs(x)).unwrap(),
        &abs(w),
        Some(&absb),
        g.stride,
        g.pad,
        g.groups,
    )
    .unwrap();
    assert_eq!(
        value.d,
        Dims {
            n: c.n,
            c: g.cout,
            h: oh,
            w: ow
        }
    );
    let terms = (g.cin / g.groups) * g.k * g.k + 1;
    let (vals, bounds): (Vec<f64>, Vec<f64>) = value
        .v
        .iter()
        .zip(&mag.v)
        .map(|(&v, &m)| {
            // Where a non-finite operand was summed the result must match exactly.
            let sum = if m.is_finite() {
                sum_bound(DType::F32, terms, v, m)
            } else {
                0.0
            };
            let a = act64(v, c.act);
            // GELU's slope is below 1.13; its own error is relative.
            let bound = match c.act {
                Activation::Gelu => 1.13 * sum + gelu_bound(a) + f32::EPSILON as f64 * a.abs(),
                _ => sum,
            };
            (a, bound)
        })
        .unzip();
    let want = Expected {
        shape: vec![c.n, g.cout, oh, ow],
        value: vals,
        bound: bounds,
    };
    let got = Tensor::from_vec(&[c.n, g.cout, oh, ow], y).unwrap();
    assert_matches(&format!("{:?} on {}x{}x{}", g, c.n, c.h, c.w), &got, &want);
}

fn random_case(c: &ConvCase, r: &mut Rng) -> (Tensor<f32>, Tensor<f32>, Vec<f32>) {
    let g = c.conv;
    let x = common::random(&[c.n, g.cin, c.h, c.w], r);
    let w = common::random(&[g.cout, g.cin / g.groups, g.k, g.k], r);
    let b = r.vec_pm1(g.cout);
    (x, w, b)
}

#[test]
fn small_convs_match_reference() {
    let mut r = rng();
    for c in cases() {
        let (x, w, b) = random_case(&c, &mut r);
        check_case(&c, &x, &w, &b);
    }
}

#[test]
fn small_convs_propagate_non_finite_like_reference() {
    let mut r = rng();
    for c in cases() {
        let (mut x, mut w, b) = random_case(&c, &mut r);
        // A NaN and an infinity in the input, an infinity in the weights: padded taps must
        // not turn into NaN (0 * inf), real ones must.
        let xl = x.len();
        x.data_mut()[r.range(0, xl - 1)] = f32::NAN;
        x.data_mut()[r.range(0, xl - 1)] = f32::INFINITY;
        check_case(&c, &x, &w, &b);
        let wl = w.len();
        w.data_mut()[r.range(0, wl - 1)] = f32::NEG_INFINITY;
        check_case(&c, &x, &w, &b);
    }
}

#[test]
fn small_conv_bad_sizes_are_errors() {
    let g = dense(3, 4, 3, 2);
    let (x, w, b) = (vec![0.5; 3 * 5 * 5], vec![0.5; 4 * 3 * 9], vec![0.5; 4]);
    let mut y = vec![0.0; 4 * 3 * 3];
    assert!(g
        .forward_into(&x, [1, 5, 5], &w, &b, Activation::Relu, &mut y)
        .is_ok());
    assert!(g
        .forward_into(&x[1..], [1, 5, 5], &w, &b, Activation::Relu, &mut y)
        .is_err());
    assert!(g
        .forward_into(&x, [1, 5, 5], &w[1..], &b, Activation::Relu, &mut y)
        .is_err());
    assert!(g
        .forward_into(&x, [1, 5, 5], &w, &b[1..], Activation::Relu, &mut y)
        .is_err());
    assert!(g
        .forward_into(&x, [1, 5, 5], &w, &b, Activation::Relu, &mut y[1..])
        .is_err());
    let bad_groups = GroupedConv { groups: 2, ..g };
    assert!(bad_groups
        .forward_into(&x, [1, 5, 5], &w, &b, Activation::Relu, &mut y)
        .is_err());
    let no_inputs = GroupedConv { cin: 0, ..g };
    assert!(no_inputs
        .forward_into(&[], [1, 5, 5], &[], &b, Activation::Relu, &mut y)
        .is_err());
    let too_big = GroupedConv {
        pad: 0,
        ..dense(3, 4, 9, 1)
    };
    assert!(too_big.out_hw(3, 3).is_err());
}

/// The 1x1 convolutions' GEMM (`cpu::gemm`), including the narrow column remainders that
/// take the dot-product kernel on AVX-512 and AVX2 (n % 16 != 0, n > 16), against f64 sums.
#[test]
fn sgemm_matches_f64_with_narrow_column_tails() {
    use lkconv::cpu::gemm::{sgemm_view, MatRef, Threads};
    let mut r = rng();
    for &(m, k, n) in &[
        (1, 1, 17),
        (3, 5, 31),
        (8, 33, 49),
        (7, 64, 196),
        (16, 130, 20),
        (5, 17, 16),
        (2, 3, 5),
        // Tails of 2 and 3 columns, rows not a multiple of their row blocks (6 and 4).
        (9, 41, 18),
        (13, 24, 35),
    ] {
        for beta in [0.0f32, 1.0] {
            // Strided views: B's rows and C's rows wider than n.
            let (ldb, ldc) = (n + 3, n + 5);
            let a = r.vec_pm1(m * k);
            let b = r.vec_pm1(k * ldb);
            let c0: Vec<f32> = if beta == 0.0 {
                vec![f32::NAN; m * ldc] // must be overwritten, never read
            } else {
                r.vec_pm1(m * ldc)
            };
            let mut c = c0.clone();
            sgemm_view(
                m,
                k,
                n,
                MatRef::rows(&a, k),
                MatRef::rows(&b, ldb),
                beta,
                &mut c,
                ldc,
                Threads::Single,
            );
            let (mut value, mut bound) = (Vec::new(), Vec::new());
            for i in 0..m {
                for j in 0..ldc {
                    if j >= n {
                        // Outside the block: untouched (NaN stays NaN).
                        value.push(c0[i * ldc + j] as f64);
                        bound.push(0.0);
                        continue;
                    }
                    let (mut v, mut mag) = (0.0f64, 0.0f64);
                    for kk in 0..k {
                        let t = a[i * k + kk] as f64 * b[kk * ldb + j] as f64;
                        v += t;
                        mag += t.abs();
                    }
                    if beta != 0.0 {
                        let old = c0[i * ldc + j] as f64;
                        v += old;
                        mag += old.abs();
                    }
                    value.push(v);
                    bound.push(sum_bound(DType::F32, k + 1, v, mag));
                }
            }
            let want = Expected {
                shape: vec![m, ldc],
                value,
                bound,
            };
            let got = Tensor::from_vec(&[m, ldc], c).unwrap();
            assert_matches(&format!("sgemm {m}x{k}x{n} beta {beta}"), &got, &want);
        }
    }
}

/// The engine's 1x1 layer (`Pointwise::forward_into`, as a forward pass runs it) against f64:
/// every activation, the residual form, batches, sizes that leave GEMM tails and task-block
/// remainders; then its typed errors.
#[test]
fn pointwise_layer_matches_f64_and_rejects_bad_buffers() {
    use lkconv::model::deploy::Pointwise;
    let mut r = rng();
    for &(n, cout, cin, hw) in &[
        (1, 1, 1, 1),
        (2, 7, 5, 17),
        (1, 130, 33, 49),
        (3, 16, 64, 196),
        (1, 300, 9, 530),
    ] {
        let layer = Pointwise {
            cin,
            cout,
            w: r.vec_pm1(cout * cin),
            b: r.vec_pm1(cout),
            bf16: None,
        };
        let x = r.vec_pm1(n * cin * hw);
        for (act, accumulate) in [
            (Activation::Identity, false),
            (Activation::Relu, false),
            (Activation::Gelu, false),
            (Activation::Identity, true),
        ] {
            let y0 = if accumulate {
                r.vec_pm1(n * cout * hw)
            } else {
                vec![f32::NAN; n * cout * hw] // poisoned: must be overwritten
            };
            let mut y = y0.clone();
            layer
                .forward_into(&x, n, hw, &mut y, act, accumulate)
                .unwrap();
            let (mut value, mut bound) = (Vec::new(), Vec::new());
            for img in 0..n {
                for co in 0..cout {
                    for p in 0..hw {
                        let mut v = layer.b[co] as f64;
                        let mut mag = v.abs();
                        for k in 0..cin {
                            let t =
                                layer.w[co * cin + k] as f64 * x[(img * cin + k) * hw + p] as f64;
                            v += t;
                            mag += t.abs();
                        }
                        let at = (img * cout + co) * hw + p;
                        if accumulate {
                            v += y0[at] as f64;
                            mag += (y0[at] as f64).abs();
                        }
                        let sum = sum_bound(DType::F32, cin + 2, v, mag);
                        let a = act64(v, act);
                        value.push(a);
                        bound.push(match act {
                            Activation::Gelu => {
                                1.13 * sum + gelu_bound(a) + f32::EPSILON as f64 * a.abs()
                            }
                            _ => sum,
                        });
                    }
                }
            }
            let want = Expected {
                shape: vec![n, cout, hw],
                value,
                bound,
            };
            let got = Tensor::from_vec(&[n, cout, hw], y).unwrap();
            let what = format!("1x1 {n}x{cout}x{cin}x{hw} {act:?} accumulate {accumulate}");
            assert_matches(&what, &got, &want);
        }
    }
    let layer = Pointwise {
        cin: 3,
        cout: 2,
        w: vec![0.5; 6],
        b: vec![0.0; 2],
        bf16: None,
    };
    let (x, mut y) = (vec![1.0f32; 3 * 4], vec![0.0f32; 2 * 4]);
    let bad = |e: lkconv::Error| {
        assert!(matches!(e, lkconv::Error::BufferLength { .. }), "{e}");
    };
    bad(layer
        .forward_into(&x[1..], 1, 4, &mut y, Activation::Relu, false)
        .unwrap_err());
    bad(layer
        .forward_into(&x, 1, 4, &mut y[1..], Activation::Relu, false)
        .unwrap_err());
    bad(layer
        .forward_into(&x, 2, 4, &mut y, Activation::Relu, false)
        .unwrap_err());
    let short = Pointwise {
        w: vec![0.5; 5],
        ..layer.clone()
    };
    bad(short
        .forward_into(&x, 1, 4, &mut y, Activation::Relu, false)
        .unwrap_err());
    assert!(matches!(
        layer.forward_into(&x, usize::MAX, 4, &mut y, Activation::Relu, false),
        Err(lkconv::Error::Overflow(_))
    ));
}
