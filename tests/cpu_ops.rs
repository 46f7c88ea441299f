//! The fast CPU path and the baselines against the f64 reference on many random shapes.

mod common;

use std::collections::HashSet;

use common::{assert_matches, case, random, rng, Case};
use half::{bf16, f16};
use lkconv::cpu::direct::{kernel_path, KernelPath};
use lkconv::device::{self, Device, Impl, Op};
use lkconv::{cpu, DwConv2d, Element, Padding, Tensor};

fn cases() -> Vec<Case> {
    let mut v = Vec::new();
    // Square kernels 1..=31, odd and even, same padding, assorted image sizes.
    for k in 1..=31 {
        let (h, w) = [(9, 13), (16, 16), (23, 7), (40, 33)][k % 4];
        v.push(case(1 + k % 2, 1 + k % 3, h, w, DwConv2d::new(k, k)));
    }
    v.push(case(1, 3, 56, 56, DwConv2d::new(31, 31)));
    v.push(case(2, 2, 14, 14, DwConv2d::new(27, 27))); // K > image
    v.push(case(1, 1, 5, 5, DwConv2d::new(13, 13))); // K >> image, one channel
    v.push(case(1, 2, 20, 40, DwConv2d::new(31, 5))); // rectangular
    v.push(case(1, 2, 40, 20, DwConv2d::new(5, 31)));
    v.push(case(2, 2, 30, 17, DwConv2d::new(51, 5)));
    v.push(case(1, 3, 17, 19, DwConv2d::new(7, 7).with_stride(2, 2)));
    v.push(case(1, 2, 18, 21, DwConv2d::new(5, 5).with_dilation(2, 2)));
    v.push(case(
        2,
        2,
        19,
        16,
        DwConv2d::new(4, 6)
            .with_stride(2, 1)
            .with_dilation(1, 2)
            .with_padding(1, 3),
    ));
    v.push(case(
        1,
        2,
        15,
        22,
        DwConv2d::new(9, 8).with_padding_sides(Padding {
            top: 1,
            bottom: 6,
            left: 7,
            right: 0,
        }),
    ));
    v.push(case(1, 2, 12, 12, DwConv2d::new(5, 5).with_padding(0, 0))); // valid conv
    v.push(case(1, 2, 10, 11, DwConv2d::new(3, 3).with_padding(4, 5))); // padding > kernel
    v.push(case(3, 1, 7, 7, DwConv2d::new(13, 13)));
    // Small planes, one channel per lane (AVX-512): groups of 16 channels, the last one partial,
    // batches; the weight gradient's row-pair kernel (x and dy rows of width W <= 7 with padding
    // >= W - 1 on both sides) and its general kernel; kernels smaller than the image (edges),
    // even and rectangular kernels, asymmetric and cropping padding, up to 16x16 planes.
    v.push(case(2, 20, 7, 7, DwConv2d::new(13, 13)));
    v.push(case(1, 17, 9, 6, DwConv2d::new(5, 3)));
    v.push(case(3, 33, 5, 5, DwConv2d::new(9, 9)));
    v.push(case(2, 70, 5, 5, DwConv2d::new(9, 9))); // 5 groups: batch reduced per group
    v.push(case(2, 18, 3, 6, DwConv2d::new(7, 11)));
    v.push(case(1, 16, 7, 7, DwConv2d::new(31, 31)));
    v.push(case(4, 3, 14, 14, DwConv2d::new(27, 27)));
    v.push(case(2, 19, 16, 16, DwConv2d::new(6, 4)));
    v.push(case(1, 5, 16, 17, DwConv2d::new(9, 9))); // 272 pixels: rows
    v.push(case(
        2,
        21,
        8,
        11,
        DwConv2d::new(7, 4).with_padding_sides(Padding {
            top: 5,
            bottom: 0,
            left: 0,
            right: 3,
        }),
    ));
    // The data gradient crops (padding > kernel - 1).
    v.push(case(1, 17, 6, 9, DwConv2d::new(3, 5).with_padding(4, 6)));
    // Larger planes with 16+ channels: lanes up to 28x28 (forward) and 64x64 (weight gradient).
    v.push(case(1, 16, 20, 30, DwConv2d::new(9, 9)));
    v.push(case(2, 17, 36, 30, DwConv2d::new(15, 14)));
    v
}

fn check_all<T: Element>(device: Device, imp: Impl) {
    let mut rng = rng();
    for cs in cases() {
        let conv = cs.conv;
        let (kh, kw) = conv.kernel;
        let s = cs.shape();
        let t = cs.inputs::<T>(&mut rng);
        let label = format!(
            "{:?} {} n{} c{} {}x{} k{kh}x{kw} {conv:?}",
            device,
            imp.name(),
            s.n,
            s.c,
            s.h,
            s.w
        );
        let got = device::forward(device, imp, &conv, &t.x, &t.w, t.bias.as_ref()).unwrap();
        assert_matches(
            &format!("fwd {label}"),
            &got,
            &t.expected(Op::Forward, &conv),
        );
        let got = device::data_grad(device, imp, &conv, &t.dy, &t.w, (s.h, s.w)).unwrap();
        assert_matches(
            &format!("dgrad {label}"),
            &got,
            &t.expected(Op::DataGrad, &conv),
        );
        let got = device::weight_grad(device, imp, &conv, &t.x, &t.dy).unwrap();
        assert_matches(
            &format!("wgrad {label}"),
            &got,
            &t.expected(Op::WeightGrad, &conv),
        );
    }
}

#[test]
fn fast_f32_matches_reference() {
    check_all::<f32>(Device::Cpu, Impl::Fast);
}

#[test]
fn fast_f16_matches_reference() {
    check_all::<f16>(Device::Cpu, Impl::Fast);
}

#[test]
fn fast_bf16_matches_reference() {
    check_all::<bf16>(Device::Cpu, Impl::Fast);
}

#[test]
fn naive_matches_reference() {
    check_all::<f32>(Device::Cpu, Impl::Naive);
}

#[test]
fn im2col_matches_reference() {
    check_all::<f32>(Device::Cpu, Impl::Im2col);
}

/// `cases()` reach every kernel of the fast path on this machine (with AVX2 or AVX-512, the
/// lane-per-channel ones too), so the comparisons above check each of them.
#[test]
fn cases_reach_every_fast_kernel() {
    let mut seen = HashSet::new();
    for cs in cases() {
        let s = cs.shape();
        for op in Op::ALL {
            seen.insert((op, kernel_path(op, &cs.conv, &s)));
        }
    }
    let mut want = vec![];
    for op in Op::ALL {
        want.extend([(op, KernelPath::Plain), (op, KernelPath::Rows)]);
    }
    if cpu::direct::uses_vector_isa() {
        for op in Op::ALL {
            want.push((op, KernelPath::Lanes));
        }
        want.push((Op::WeightGrad, KernelPath::LanesPairs));
    }
    for w in want {
        assert!(seen.contains(&w), "no case takes {w:?}");
    }
}

/// The weight gradient's bits do not depend on the number of threads (every kernel: rows,
/// lane per channel, row pairs; batches reduced in a fixed order).
#[test]
fn weight_grad_is_bit_identical_across_thread_counts() {
    let mut rng = rng();
    for (n, c, h, w, k) in [
        (3, 5, 40, 33, 31),
        (3, 40, 7, 7, 13),
        (2, 24, 14, 14, 27),
        (5, 17, 6, 9, 5),
        (2, 16, 36, 30, 15),
    ] {
        let conv = DwConv2d::new(k, k);
        let x: Tensor<f32> = random(&[n, c, h, w], &mut rng);
        let dy: Tensor<f32> = random(&[n, c, h, w], &mut rng);
        let with_threads = |threads: usize| {
            let pool = rayon::ThreadPoolBuilder::new()
                .num_threads(threads)
                .build()
                .unwrap();
            pool.install(|| cpu::weight_grad(&conv, &x, &dy).unwrap())
        };
        let one = with_threads(1);
        for threads in [2, 3, 8] {
            let other = with_threads(threads);
            let same = one
                .data()
                .iter()
                .zip(other.data())
                .all(|(a, b)| a.to_bits() == b.to_bits());
            assert!(
                same,
                "n{n} c{c} {h}x{w} k{k}: {threads} threads differ from one"
            );
        }
    }
}

#[test]
fn weight_grad_is_bit_identical_across_runs() {
    let mut rng = rng();
    let conv = DwConv2d::new(31, 31);
    let x: Tensor<f32> = random(&[4, 3, 40, 40], &mut rng);
    let dy: Tensor<f32> = random(&[4, 3, 40, 40], &mut rng);
    let first = cpu::weight_grad(&conv, &x, &dy).unwrap();
    for _ in 0..3 {
        let again = cpu::weight_grad(&conv, &x, &dy).unwrap();
        let same = first
            .data()
            .iter()
            .zip(again.data())
            .all(|(a, b)| a.to_bits() == b.to_bits());
        assert!(same, "weight gradient differs between runs");
    }
}

#[test]
fn into_variants_reject_wrong_buffer_lengths() {
    let conv = DwConv2d::new(3, 3);
    let s = conv.resolve(1, 2, 5, 5).unwrap();
    let x = vec![1.0f32; s.input_len()];
    let w = vec![1.0f32; 18];
    let mut y = vec![f32::NAN; s.output_len() - 1];
    assert!(matches!(
        cpu::forward_f32_into(&conv, &s, &x, &w, None, &mut y),
        Err(lkconv::Error::BufferLength { .. })
    ));
}

/// Runs the f32 and weight-gradient checks again with the micro-kernels capped at each lower
/// instruction set (`LKCONV_CPU_ISA`), so AVX-512, AVX2 and portable code are all tested here.
#[test]
fn every_instruction_set_matches_reference() {
    common::rerun_with_each_isa(&["fast_f32_matches_reference", "fast_bf16_matches_reference"]);
}
