//! Random problems over the whole parameter space against the f64 reference: padding per side,
//! stride, dilation, rectangular and even kernels, kernels larger than the image, batch 1, one
//! channel, empty outputs (typed errors), f32/f16/bf16, every implementation on the CPU and in the
//! kernel simulator, and non-finite values (NaN, +Inf, -Inf) in x, w, bias and dy.
//!
//! Seeded: the seed is printed, and `LKCONV_PROPTEST_SEED=<seed>` replays a run;
//! `LKCONV_PROPTEST_CASES=<n>` changes the number of problems (CPU; the simulator runs a third).

mod common;

use std::sync::OnceLock;

use common::{assert_matches, Inputs};
use half::{bf16, f16};
use lkconv::device::{self, Device, Impl, Op};
use lkconv::{DType, DwConv2d, Element, Error, Padding, Rng, Tensor};

/// Valid (non-empty) problems per pass and implementation on the CPU in one run.
const CPU_PROBLEMS: usize = 1500;
/// Valid problems per pass and implementation in the simulator in one run.
const SIM_PROBLEMS: usize = 500;

/// The run's seed: `LKCONV_PROPTEST_SEED`, else the clock; printed once per test.
fn seed() -> u64 {
    static SEED: OnceLock<u64> = OnceLock::new();
    *SEED.get_or_init(|| {
        std::env::var("LKCONV_PROPTEST_SEED")
            .ok()
            .and_then(|s| s.parse().ok())
            .unwrap_or_else(|| Rng::from_time().1)
    })
}

fn problems_wanted(default: usize) -> usize {
    std::env::var("LKCONV_PROPTEST_CASES")
        .ok()
        .and_then(|s| s.parse::<usize>().ok())
        .map_or(default, |n| if default == SIM_PROBLEMS { n / 3 } else { n })
        .max(1)
}

/// Where non-finite values go in one problem.
#[derive(Clone, Copy, Debug, PartialEq)]
enum Poison {
    None,
    /// One or two of NaN / +Inf / -Inf in the named input.
    In(&'static str, [f32; 2]),
}

#[derive(Clone, Copy, Debug)]
struct Problem {
    n: usize,
    c: usize,
    h: usize,
    w: usize,
    conv: DwConv2d,
    bias: bool,
    dtype: DType,
    poison: Poison,
}

fn draw(rng: &mut Rng, index: usize) -> Problem {
    // kernels mostly up to 9, one in five up to 17 (larger than most images)
    let kmax = if rng.range(0, 4) == 0 { 17 } else { 9 };
    let (kh, kw) = (rng.range(1, kmax), rng.range(1, kmax));
    let side = |rng: &mut Rng, k: usize| {
        if rng.range(0, 2) == 0 {
            k / 2
        } else {
            rng.range(0, k + 1)
        }
    };
    let padding = Padding {
        top: side(rng, kh),
        bottom: side(rng, kh),
        left: side(rng, kw),
        right: side(rng, kw),
    };
    let axis = |rng: &mut Rng| {
        if rng.range(0, 1) == 0 {
            1
        } else {
            rng.range(1, 3)
        }
    };
    let conv = DwConv2d::new(kh, kw)
        .with_padding_sides(padding)
        .with_stride(axis(rng), axis(rng))
        .with_dilation(axis(rng), axis(rng));
    let specials = [f32::NAN, f32::INFINITY, f32::NEG_INFINITY];
    let poison = if rng.range(0, 3) == 0 {
        let what = ["x", "w", "bias", "dy"][rng.range(0, 3)];
        Poison::In(what, [specials[rng.range(0, 2)], specials[rng.range(0, 2)]])
    } else {
        Poison::None
    };
    Problem {
        n: rng.range(1, 2),
        c: rng.range(1, 3),
        h: rng.range(1, 12),
        w: rng.range(1, 12),
        conv,
        bias: rng.range(0, 1) == 1,
        dtype: DType::ALL[index % 3],
        poison,
    }
}

fn inputs<T: Element>(p: &Problem, rng: &mut Rng) -> Inputs<T> {
    let s = p.conv.resolve(p.n, p.c, p.h, p.w).expect("valid problem");
    let mut t = Inputs {
        x: Tensor::<T>::random(&s.input_dims(), rng).unwrap(),
        w: Tensor::<T>::random(&p.conv.weight_dims(s.c), rng).unwrap(),
        bias: p.bias.then(|| Tensor::<T>::random(&[s.c], rng).unwrap()),
        dy: Tensor::<T>::random(&s.output_dims(), rng).unwrap(),
    };
    if let Poison::In(what, values) = p.poison {
        let target = match what {
            "x" => Some(&mut t.x),
            "w" => Some(&mut t.w),
            "bias" => t.bias.as_mut(),
            _ => Some(&mut t.dy),
        };
        if let Some(target) = target {
            let len = target.len();
            for v in values {
                target.data_mut()[rng.range(0, len - 1)] = T::from_f32(v);
            }
        }
    }
    t
}

fn run<T: Element>(
    device: Device,
    imp: Impl,
    op: Op,
    conv: &DwConv2d,
    t: &Inputs<T>,
) -> lkconv::Result<Tensor<T>> {
    let hw = (t.x.shape()[2], t.x.shape()[3]);
    match op {
        Op::Forward => device::forward(device, imp, conv, &t.x, &t.w, t.bias.as_ref()),
        Op::DataGrad => device::data_grad(device, imp, conv, &t.dy, &t.w, hw),
        Op::WeightGrad => device::weight_grad(device, imp, conv, &t.x, &t.dy),
    }
}

/// A problem whose output is empty: every pass of every implementation returns
/// `Error::EmptyOutput`.
fn check_empty<T: Element>(p: &Problem, impls: &[(Device, Impl)], label: &str) {
    let (n, c) = (p.n, p.c);
    let t = Inputs::<T> {
        x: Tensor::full(&[n, c, p.h, p.w], T::from_f32(0.5)).unwrap(),
        w: Tensor::full(&p.conv.weight_dims(c), T::from_f32(0.5)).unwrap(),
        bias: None,
        dy: Tensor::full(&[n, c, 1, 1], T::from_f32(0.5)).unwrap(),
    };
    for &(device, imp) in impls {
        for op in Op::ALL {
            match run(device, imp, op, &p.conv, &t) {
                Err(Error::EmptyOutput(_)) => {}
                other => panic!(
                    "{label} {device} {} {op:?}: expected Error::EmptyOutput, got {other:?}",
                    imp.name()
                ),
            }
        }
    }
}

/// Checks one problem on `impls`; returns whether it had an output.
fn check_problem<T: Element>(
    p: &Problem,
    rng: &mut Rng,
    impls: &[(Device, Impl)],
    label: &str,
) -> bool {
    match p.conv.resolve(p.n, p.c, p.h, p.w) {
        Err(Error::EmptyOutput(_)) => {
            check_empty::<T>(p, impls, label);
            return false;
        }
        Err(e) => panic!("{label}: drawn problem invalid: {e}"),
        Ok(_) => {}
    }
    let t = inputs::<T>(p, rng);
    for op in Op::ALL {
        let want = t.expected(op, &p.conv);
        for &(device, imp) in impls {
            let got = run(device, imp, op, &p.conv, &t)
                .unwrap_or_else(|e| panic!("{label} {device} {} {op:?}: {e}", imp.name()));
            assert_matches(
                &format!("{label} {device} {} {op:?}", imp.name()),
                &got,
                &want,
            );
        }
    }
    true
}

/// Draws problems until `wanted` have an output, checking each; returns (valid, empty, poisoned).
fn property(stream: u64, wanted: usize, impls: &[(Device, Impl)]) -> (usize, usize, usize) {
    let seed = seed();
    eprintln!("property seed {seed} (replay with LKCONV_PROPTEST_SEED={seed})");
    let mut master = Rng::new(seed ^ stream);
    let (mut valid, mut empty, mut poisoned) = (0, 0, 0);
    let mut index = 0;
    while valid < wanted {
        let problem_seed = master.next_u64();
        let mut rng = Rng::new(problem_seed);
        let p = draw(&mut rng, index);
        let label = format!("LKCONV_PROPTEST_SEED={seed} problem {index} {p:?}");
        let had_output = match p.dtype {
            DType::F32 => check_problem::<f32>(&p, &mut rng, impls, &label),
            DType::F16 => check_problem::<f16>(&p, &mut rng, impls, &label),
            DType::Bf16 => check_problem::<bf16>(&p, &mut rng, impls, &label),
        };
        if had_output {
            valid += 1;
            poisoned += usize::from(p.poison != Poison::None);
        } else {
            empty += 1;
        }
        index += 1;
    }
    (valid, empty, poisoned)
}

#[test]
fn cpu_random_problems_match_the_reference() {
    let impls = [
        (Device::Cpu, Impl::Fast),
        (Device::Cpu, Impl::Naive),
        (Device::Cpu, Impl::Im2col),
    ];
    let (valid, empty, poisoned) = property(1, problems_wanted(CPU_PROBLEMS), &impls);
    println!(
        "cpu: {valid} problems x 3 passes x fast/naive/im2col ({poisoned} with NaN/Inf), \
         {empty} empty-output problems rejected"
    );
}

#[test]
fn simulator_random_problems_match_the_reference() {
    assert!(
        lkconv::sim::available(),
        "the kernel simulator was not built"
    );
    let impls = [
        (Device::Sim, Impl::Fast),
        (Device::Sim, Impl::Naive),
        (Device::Sim, Impl::Im2col),
    ];
    let (valid, empty, poisoned) = property(2, problems_wanted(SIM_PROBLEMS), &impls);
    println!(
        "sim: {valid} problems x 3 passes x fast/naive/im2col ({poisoned} with NaN/Inf), \
         {empty} empty-output problems rejected"
    );
}
