//! NaN and +-Inf in x, w, dy and bias: every implementation must agree with the f64 reference's
//! IEEE semantics (an output is the sum over the taps whose input lies inside the image; padding
//! contributes nothing, it is not 0 * w). An output is NaN exactly when the reference's is, +-Inf
//! with the same sign, and finite values within the suite's bounds (tests/common's comparator).
//! Paths: CPU fast (each instruction set, see `every_instruction_set_handles_nonfinite`), naive,
//! im2col; the simulator's kernels; the CUDA device where present (skipped with a message
//! otherwise).

mod common;

use common::{assert_matches, random, rng, Inputs};
use half::bf16;
use lkconv::device::{self, Device, Impl};
use lkconv::{DwConv2d, Element, Op, Padding, Rng, Tensor};

const IMPLS: [Impl; 3] = [Impl::Fast, Impl::Naive, Impl::Im2col];

/// The non-finite values injected.
const SPECIALS: [f32; 3] = [f32::NAN, f32::INFINITY, f32::NEG_INFINITY];

fn cases() -> Vec<(usize, usize, usize, usize, DwConv2d)> {
    vec![
        (1, 2, 6, 6, DwConv2d::new(3, 3)),   // the reported case
        (2, 2, 9, 13, DwConv2d::new(5, 5)),  // batch, non-square
        (1, 1, 7, 7, DwConv2d::new(13, 13)), // K larger than the image, one channel
        (1, 2, 5, 9, DwConv2d::new(3, 7)),   // rectangular kernel
        (1, 2, 8, 8, DwConv2d::new(4, 4)),   // even kernel
        (1, 2, 21, 19, DwConv2d::new(7, 7)), // several blocks and row bands
        (
            1,
            2,
            11,
            10,
            DwConv2d::new(3, 5).with_padding_sides(Padding {
                top: 2,
                bottom: 0,
                left: 0,
                right: 4,
            }),
        ),
        (
            1,
            2,
            12,
            11,
            DwConv2d::new(5, 5).with_stride(2, 2).with_dilation(1, 2),
        ),
    ]
}

/// Where a special value goes: an interior element or the first element (a corner), so that
/// both the window edges and the padding are exercised.
fn poison<T: Element>(t: &mut Tensor<T>, rng: &mut Rng, value: f32, corner: bool) -> String {
    let len = t.data().len();
    let i = if corner {
        0
    } else {
        (rng.next_u64() % len as u64) as usize
    };
    t.data_mut()[i] = T::from_f64(value as f64);
    format!("{value} at {i}")
}

/// Runs every op on `device` for every case and injection, against the reference.
fn check_device<T: Element>(device: Device, impls: &[Impl]) {
    let mut rng = rng();
    for (n, c, h, w, conv) in cases() {
        let s = conv.resolve(n, c, h, w).expect("valid case");
        for &special in &SPECIALS {
            for corner in [false, true] {
                for target in ["x", "w", "dy", "bias"] {
                    let mut x: Tensor<T> = random(&s.input_dims(), &mut rng);
                    let mut wt: Tensor<T> = random(&conv.weight_dims(s.c), &mut rng);
                    let mut b: Tensor<T> = random(&[s.c], &mut rng);
                    let mut dy: Tensor<T> = random(&s.output_dims(), &mut rng);
                    let at = match target {
                        "x" => poison(&mut x, &mut rng, special, corner),
                        "w" => poison(&mut wt, &mut rng, special, corner),
                        "dy" => poison(&mut dy, &mut rng, special, corner),
                        _ => poison(&mut b, &mut rng, special, corner),
                    };
                    let inputs = Inputs {
                        x,
                        w: wt,
                        bias: Some(b),
                        dy,
                    };
                    let fwd = inputs.expected(Op::Forward, &conv);
                    let dgrad = inputs.expected(Op::DataGrad, &conv);
                    let wgrad = inputs.expected(Op::WeightGrad, &conv);
                    let (x, wt, b, dy) = (&inputs.x, &inputs.w, inputs.bias.as_ref(), &inputs.dy);
                    for &imp in impls {
                        let label = format!(
                            "{device} {} {} n{n} c{c} {h}x{w} {conv:?}, {target} {at}",
                            imp.name(),
                            T::DTYPE
                        );
                        let got = device::forward(device, imp, &conv, x, wt, b).unwrap();
                        assert_matches(&format!("fwd {label}"), &got, &fwd);
                        let got = device::data_grad(device, imp, &conv, dy, wt, (h, w)).unwrap();
                        assert_matches(&format!("dgrad {label}"), &got, &dgrad);
                        let got = device::weight_grad(device, imp, &conv, x, dy).unwrap();
                        assert_matches(&format!("wgrad {label}"), &got, &wgrad);
                    }
                }
            }
        }
    }
}

#[test]
fn cpu_f32_nonfinite_matches_reference() {
    check_device::<f32>(Device::Cpu, &IMPLS);
}

#[test]
fn cpu_bf16_nonfinite_matches_reference() {
    check_device::<bf16>(Device::Cpu, &IMPLS);
}

#[test]
fn sim_f32_nonfinite_matches_reference() {
    check_device::<f32>(Device::Sim, &IMPLS);
}

#[test]
fn sim_bf16_nonfinite_matches_reference() {
    // and the tensor-core kernels (f16/bf16 only)
    check_device::<bf16>(Device::Sim, &[Impl::Fast, Impl::TensorCore]);
}

#[test]
fn cuda_nonfinite_matches_reference() {
    // Skipped only without a usable device; any failure on a GPU fails the test.
    if !common::have_gpu() {
        return;
    }
    check_device::<f32>(Device::Cuda(0), &IMPLS);
    check_device::<bf16>(Device::Cuda(0), &IMPLS);
}

/// The fast CPU checks again with the micro-kernels capped at each lower instruction set.
#[test]
fn every_instruction_set_handles_nonfinite() {
    common::rerun_with_each_isa(&[
        "cpu_f32_nonfinite_matches_reference",
        "cpu_bf16_nonfinite_matches_reference",
    ]);
}
