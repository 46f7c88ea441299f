//! Every CUDA kernel run in the kernel simulator against the f64 CPU reference, on small random
//! shapes (seed printed; rerun a failure with LKCONV_SEED=<seed>).

mod common;

use common::{assert_matches, Case};
use half::{bf16, f16};
use lkconv::device::{self, Device};
use lkconv::plan::{self, Family};
use lkconv::{sim, DType, DwConv2d, Element, Error, Impl, Op, Padding, Problem, Rng, Tensor};

fn rand_case(rng: &mut Rng, kh: usize, kw: usize, max_hw: usize) -> Case {
    Case {
        n: rng.range(1, 2),
        c: rng.range(1, 3),
        h: rng.range(5, max_hw),
        w: rng.range(5, max_hw),
        conv: DwConv2d::new(kh, kw),
        bias: rng.range(0, 1) == 1,
    }
}

/// Runs `op` with `imp` in the simulator and compares with the reference on the same inputs.
fn check<T: Element>(rng: &mut Rng, op: Op, imp: Impl, k: &Case) {
    let conv = &k.conv;
    let s = k.shape();
    let t = k.inputs::<T>(rng);
    let got = match op {
        Op::Forward => device::forward(Device::Sim, imp, conv, &t.x, &t.w, t.bias.as_ref()),
        Op::DataGrad => device::data_grad(Device::Sim, imp, conv, &t.dy, &t.w, (s.h, s.w)),
        Op::WeightGrad => device::weight_grad(Device::Sim, imp, conv, &t.x, &t.dy),
    };
    let got = got.unwrap_or_else(|e| panic!("{op:?} {imp:?} {} {k:?}: {e}", T::DTYPE));
    assert_matches(
        &format!("{op:?} {imp:?} {k:?}"),
        &got,
        &t.expected(op, conv),
    );
}

fn check_all_dtypes(rng: &mut Rng, op: Op, imp: Impl, k: &Case) {
    check::<f32>(rng, op, imp, k);
    check::<f16>(rng, op, imp, k);
    check::<bf16>(rng, op, imp, k);
}

/// The kernel the fast plan picks, to make sure a case exercises what it means to.
fn planned_kernel(op: Op, imp: Impl, k: &Case) -> String {
    let s = k.conv.resolve(k.n, k.c, k.h, k.w).unwrap();
    plan::plan(&Problem::new(op, imp, DType::F32, &k.conv, &s).unwrap())
        .unwrap()
        .launches[0]
        .kernel
        .name()
}

#[test]
fn registry_matches_catalogue() {
    let reg = sim::registered_kernels().expect("simulator built");
    assert_eq!(reg, plan::kernel_names());
}

#[test]
fn fast_templated_fwd_dgrad() {
    let mut rng = Rng::for_test("fast_templated_fwd_dgrad");
    for k in plan::TEMPLATE_SIZES {
        for op in [Op::Forward, Op::DataGrad] {
            let case = rand_case(&mut rng, k, k, 40);
            assert!(planned_kernel(op, Impl::Fast, &case).ends_with(&format!("_k{k}")));
            check_all_dtypes(&mut rng, op, Impl::Fast, &case);
        }
    }
    // K larger than the image, batch 1, one channel, asymmetric padding, partial tiles
    let pad = Padding {
        top: 3,
        bottom: 17,
        left: 20,
        right: 1,
    };
    for (n, c, h, w, k) in [(1, 1, 9, 7, 31), (2, 1, 13, 70, 13), (1, 2, 33, 5, 25)] {
        for conv in [
            DwConv2d::new(k, k),
            DwConv2d::new(k, k).with_padding_sides(pad),
        ] {
            let case = Case {
                n,
                c,
                h,
                w,
                conv,
                bias: true,
            };
            if conv.resolve(n, c, h, w).is_err() {
                continue;
            }
            for op in [Op::Forward, Op::DataGrad] {
                check_all_dtypes(&mut rng, op, Impl::Fast, &case);
            }
        }
    }
}

#[test]
fn fast_small_images_pack_several_planes_per_block() {
    let mut rng = Rng::for_test("fast_small_images_pack_several_planes_per_block");
    for (n, c, hw, k) in [(1, 555, 14, 27), (1, 601, 7, 13), (1, 601, 9, 10)] {
        let case = Case {
            n,
            c,
            h: hw,
            w: hw,
            conv: DwConv2d::new(k, k),
            bias: true,
        };
        let s = case.conv.resolve(n, c, hw, hw).unwrap();
        for op in [Op::Forward, Op::DataGrad] {
            let p = plan::plan(&Problem::new(op, Impl::Fast, DType::F32, &case.conv, &s).unwrap())
                .unwrap();
            let planes_per_block = p.launches[0].block.2 as usize;
            assert!(
                planes_per_block > 1 && (n * c) % planes_per_block != 0,
                "{p:?}"
            );
            check_all_dtypes(&mut rng, op, Impl::Fast, &case);
        }
    }
}

#[test]
fn fast_generic_fwd_dgrad() {
    let mut rng = Rng::for_test("fast_generic_fwd_dgrad");
    let mut sizes: Vec<(usize, usize)> = (1..=31)
        .filter(|k| !plan::TEMPLATE_SIZES.contains(k))
        .map(|k| (k, k))
        .collect();
    sizes.extend([
        (31, 5),
        (5, 31),
        (51, 5),
        (5, 51),
        (3, 7),
        (2, 9),
        (45, 45),
        (70, 3),
    ]);
    for (i, &(kh, kw)) in sizes.iter().enumerate() {
        let mut case = rand_case(&mut rng, kh, kw, 30);
        if i % 3 == 0 {
            case.conv = case.conv.with_padding_sides(Padding {
                top: kh / 3,
                bottom: kh - 1 - kh / 3,
                left: kw - 1,
                right: 0,
            });
        }
        if case.conv.resolve(case.n, case.c, case.h, case.w).is_err() {
            case.h = case.h.max(kh);
            case.w = case.w.max(kw);
        }
        let op = if i % 2 == 0 {
            Op::Forward
        } else {
            Op::DataGrad
        };
        assert!(planned_kernel(op, Impl::Fast, &case).ends_with("_generic"));
        check_all_dtypes(&mut rng, op, Impl::Fast, &case);
        let other = if op == Op::Forward {
            Op::DataGrad
        } else {
            Op::Forward
        };
        check::<f32>(&mut rng, other, Impl::Fast, &case);
    }
}

#[test]
fn generic_fwd_chunks_large_filters() {
    // a filter too large for one shared-memory stage: processed in row/column chunks
    let mut rng = Rng::for_test("generic_fwd_chunks_large_filters");
    for (kh, kw) in [(101, 9), (9, 101), (75, 75)] {
        let case = Case {
            n: 1,
            c: 2,
            h: 40,
            w: 37,
            conv: DwConv2d::new(kh, kw),
            bias: true,
        };
        for op in [Op::Forward, Op::DataGrad] {
            check::<f32>(&mut rng, op, Impl::Fast, &case);
        }
    }
}

#[test]
fn fast_wgrad() {
    let mut rng = Rng::for_test("fast_wgrad");
    let mut sizes: Vec<(usize, usize)> = plan::TEMPLATE_SIZES.iter().map(|&k| (k, k)).collect();
    sizes.extend([
        (1, 1),
        (2, 2),
        (4, 4),
        (9, 9),
        (16, 16),
        (31, 5),
        (5, 31),
        (51, 5),
        (45, 45),
    ]);
    for (i, &(kh, kw)) in sizes.iter().enumerate() {
        let mut case = rand_case(&mut rng, kh, kw, 36);
        if i % 4 == 1 {
            case.conv = case.conv.with_padding_sides(Padding {
                top: 0,
                bottom: kh - 1,
                left: kw / 2 + 1,
                right: (kw - 1).saturating_sub(kw / 2 + 1),
            });
        }
        if case.conv.resolve(case.n, case.c, case.h, case.w).is_err() {
            case.conv = DwConv2d::new(kh, kw);
        }
        assert!(planned_kernel(Op::WeightGrad, Impl::Fast, &case).starts_with("lk_wgrad_partial"));
        if i % 3 == 0 {
            check_all_dtypes(&mut rng, Op::WeightGrad, Impl::Fast, &case);
        } else {
            check::<f32>(&mut rng, Op::WeightGrad, Impl::Fast, &case);
        }
    }
    // bigger batch: several partial blocks per channel
    let case = Case {
        n: 3,
        c: 2,
        h: 37,
        w: 41,
        conv: DwConv2d::new(13, 13),
        bias: false,
    };
    check_all_dtypes(&mut rng, Op::WeightGrad, Impl::Fast, &case);
}

#[test]
fn wgrad_is_bit_identical_across_runs() {
    let mut rng = Rng::for_test("wgrad_is_bit_identical_across_runs");
    let conv = DwConv2d::new(31, 31);
    let x = Tensor::<f32>::random(&[2, 3, 45, 38], &mut rng).unwrap();
    let dy = Tensor::<f32>::random(&[2, 3, 45, 38], &mut rng).unwrap();
    for imp in [Impl::Fast, Impl::Naive, Impl::Im2col] {
        let a = device::weight_grad(Device::Sim, imp, &conv, &x, &dy).unwrap();
        let b = device::weight_grad(Device::Sim, imp, &conv, &x, &dy).unwrap();
        let bits = |t: &Tensor<f32>| t.data().iter().map(|v| v.to_bits()).collect::<Vec<_>>();
        assert_eq!(bits(&a), bits(&b), "{imp:?}");
    }
}

fn strided_cases(rng: &mut Rng) -> Vec<Case> {
    let mut v = Vec::new();
    for (kh, kw, s, d) in [
        (3, 3, (2, 2), (1, 1)),
        (5, 4, (1, 1), (2, 2)),
        (7, 7, (2, 1), (2, 3)),
        (31, 31, (2, 2), (1, 1)),
        (13, 13, (1, 1), (1, 1)),
        (6, 1, (3, 2), (1, 2)),
    ] {
        let mut case = rand_case(rng, kh, kw, 30);
        case.conv = case.conv.with_stride(s.0, s.1).with_dilation(d.0, d.1);
        case.conv.padding = Padding {
            top: (kh - 1) * d.0 / 2,
            bottom: (kh - 1) * d.0 - (kh - 1) * d.0 / 2 + 1,
            left: (kw - 1) * d.1,
            right: 0,
        };
        case.h = case.h.max((kh - 1) * d.0);
        case.w = case.w.max((kw - 1) * d.1);
        v.push(case);
    }
    v
}

#[test]
fn naive_all_ops() {
    let mut rng = Rng::for_test("naive_all_ops");
    for case in strided_cases(&mut rng) {
        for op in Op::ALL {
            check_all_dtypes(&mut rng, op, Impl::Naive, &case);
        }
    }
}

#[test]
fn fast_strided_and_dilated_use_the_generic_path() {
    let mut rng = Rng::for_test("fast_strided_and_dilated_use_the_generic_path");
    for case in strided_cases(&mut rng) {
        let wgrad = planned_kernel(Op::WeightGrad, Impl::Fast, &case);
        if case.conv.is_unit() {
            assert!(wgrad.starts_with("lk_wgrad_partial"), "{wgrad}");
        } else {
            assert!(wgrad.starts_with("lk_wgrad_strided"), "{wgrad}");
        }
        for op in Op::ALL {
            check::<f32>(&mut rng, op, Impl::Fast, &case);
        }
    }
}

/// Strided / dilated weight-gradient cases: (n, c, h, w, kernel, stride, dilation, padding
/// top/bottom/left/right).
type StridedWgrad = (
    usize,
    usize,
    usize,
    usize,
    (usize, usize),
    (usize, usize),
    (usize, usize),
    [usize; 4],
);

fn strided_wgrad_cases() -> Vec<StridedWgrad> {
    vec![
        // RepLKNet's 3x3 stride-2 transition, batch 3: several blocks per channel
        (3, 2, 64, 62, (3, 3), (2, 2), (1, 1), [1, 1, 1, 1]),
        // stride 3, odd sizes, one channel
        (1, 1, 29, 31, (5, 5), (3, 3), (1, 1), [2, 2, 2, 2]),
        // dilation 2, K7, batch 3
        (3, 3, 23, 19, (7, 7), (1, 1), (2, 2), [6, 6, 6, 6]),
        // asymmetric stride and dilation, rectangular filter, asymmetric padding
        (2, 1, 17, 26, (3, 6), (2, 3), (3, 1), [0, 5, 4, 1]),
        // filter larger than the image (padding), stride 2: more than 8 chunks of taps (passes)
        (1, 2, 9, 7, (31, 31), (2, 2), (1, 1), [15, 15, 15, 15]),
        // filter larger than the image, dilation 2
        (2, 1, 6, 11, (9, 13), (1, 2), (2, 1), [8, 8, 12, 0]),
        // 1x1 filter, stride 2
        (1, 3, 12, 15, (1, 1), (2, 2), (1, 1), [0, 0, 0, 0]),
    ]
}

fn strided_wgrad_case(c: &StridedWgrad) -> Case {
    let &(n, ch, h, w, (kh, kw), (sh, sw), (dh, dw), [top, bottom, left, right]) = c;
    Case {
        n,
        c: ch,
        h,
        w,
        conv: DwConv2d::new(kh, kw)
            .with_stride(sh, sw)
            .with_dilation(dh, dw)
            .with_padding_sides(Padding {
                top,
                bottom,
                left,
                right,
            }),
        bias: false,
    }
}

#[test]
fn fast_strided_wgrad() {
    let mut rng = Rng::for_test("fast_strided_wgrad");
    let mut multi_block = false;
    for c in strided_wgrad_cases() {
        let case = strided_wgrad_case(&c);
        let s = case.conv.resolve(case.n, case.c, case.h, case.w).unwrap();
        let p = plan::plan(
            &Problem::new(Op::WeightGrad, Impl::Fast, DType::F32, &case.conv, &s).unwrap(),
        )
        .unwrap();
        assert_eq!(p.launches.len(), 2, "{p:?}");
        assert_eq!(p.launches[0].kernel.family, Family::WgradStrided, "{p:?}");
        assert_eq!(p.launches[1].kernel.family, Family::WgradReduce, "{p:?}");
        multi_block |= p.launches[0].grid.1 > 1;
        check_all_dtypes(&mut rng, Op::WeightGrad, Impl::Fast, &case);
    }
    assert!(multi_block, "no case splits a channel over several blocks");
    // Impl::Naive stays the naive baseline
    let case = strided_wgrad_case(&strided_wgrad_cases()[0]);
    assert!(planned_kernel(Op::WeightGrad, Impl::Naive, &case).starts_with("lk_naive_wgrad"));
}

#[test]
fn strided_wgrad_is_bit_identical_across_runs() {
    let mut rng = Rng::for_test("strided_wgrad_is_bit_identical_across_runs");
    for c in [strided_wgrad_cases()[0], strided_wgrad_cases()[2]] {
        let case = strided_wgrad_case(&c);
        let s = case.conv.resolve(case.n, case.c, case.h, case.w).unwrap();
        let x = Tensor::<f32>::random(&s.input_dims(), &mut rng).unwrap();
        let dy = Tensor::<f32>::random(&s.output_dims(), &mut rng).unwrap();
        let a = device::weight_grad(Device::Sim, Impl::Fast, &case.conv, &x, &dy).unwrap();
        let b = device::weight_grad(Device::Sim, Impl::Fast, &case.conv, &x, &dy).unwrap();
        let bits = |t: &Tensor<f32>| t.data().iter().map(|v| v.to_bits()).collect::<Vec<_>>();
        assert_eq!(bits(&a), bits(&b), "{case:?}");
    }
}

#[test]
fn im2col_all_ops() {
    let mut rng = Rng::for_test("im2col_all_ops");
    for case in strided_cases(&mut rng) {
        for op in Op::ALL {
            check_all_dtypes(&mut rng, op, Impl::Im2col, &case);
        }
    }
}

#[test]
fn bad_shapes_give_typed_errors() {
    let conv = DwConv2d::new(5, 5);
    let mut rng = Rng::new(1);
    let x = Tensor::<f32>::random(&[1, 2, 8, 8], &mut rng).unwrap();
    let w_bad = Tensor::<f32>::random(&[3, 1, 5, 5], &mut rng).unwrap();
    assert!(matches!(
        device::forward(Device::Sim, Impl::Fast, &conv, &x, &w_bad, None),
        Err(Error::Shape { .. })
    ));
    let w = Tensor::<f32>::random(&[2, 1, 5, 5], &mut rng).unwrap();
    let bias_bad = Tensor::<f32>::random(&[3], &mut rng).unwrap();
    assert!(matches!(
        device::forward(Device::Sim, Impl::Fast, &conv, &x, &w, Some(&bias_bad)),
        Err(Error::Shape { .. })
    ));
    assert!(matches!(
        device::forward(Device::Sim, Impl::Reference, &conv, &x, &w, None),
        Err(Error::Unsupported(_))
    ));
    let dy_bad = Tensor::<f32>::random(&[1, 2, 7, 8], &mut rng).unwrap();
    assert!(matches!(
        device::data_grad(Device::Sim, Impl::Fast, &conv, &dy_bad, &w, (8, 8)),
        Err(Error::Shape { .. })
    ));
    assert!(matches!(
        device::weight_grad(Device::Sim, Impl::Fast, &conv, &x, &dy_bad),
        Err(Error::Shape { .. })
    ));
    let no_pad = DwConv2d::new(9, 9).with_padding(0, 0);
    assert!(matches!(
        device::forward(
            Device::Sim,
            Impl::Fast,
            &no_pad,
            &x,
            &Tensor::<f32>::random(&[2, 1, 9, 9], &mut rng).unwrap(),
            None
        ),
        Err(Error::EmptyOutput(_))
    ));
    // sizes that do not fit the kernels' 32-bit ints are rejected before planning
    let huge = DwConv2d::new(3, 1).with_padding(1, 0);
    let s = huge.resolve(1, 1, 1_200_000_000, 1).unwrap();
    assert!(matches!(
        plan::plan(&Problem::new(Op::Forward, Impl::Fast, DType::F32, &huge, &s).unwrap()),
        Err(Error::Overflow(_))
    ));
}

#[test]
fn simulator_runtime_selftest() {
    sim::selftest().unwrap();
}

#[test]
fn simulator_conversions_are_bit_exact() {
    let conv = sim::conversions().unwrap();
    let (to_f16, from_f16, to_bf16) = (
        conv.f32_to_f16_bits,
        conv.f16_bits_to_f32,
        conv.f32_to_bf16_bits,
    );
    for b in 0..=u16::MAX {
        let h = f16::from_bits(b);
        let (got, want) = (from_f16(b), h.to_f32());
        assert!(
            got.to_bits() == want.to_bits() || (got.is_nan() && want.is_nan()),
            "f16 {b:#06x}: {got} vs {want}"
        );
    }
    let mut rng = Rng::for_test("simulator_conversions_are_bit_exact");
    let specials = [
        0.0f32,
        -0.0,
        1.0,
        65504.0,
        65520.0,
        65519.99,
        5.96e-8,
        2.98e-8,
        2.99e-8,
        6.1e-5,
        f32::INFINITY,
        f32::NEG_INFINITY,
        f32::MAX,
        f32::MIN_POSITIVE,
        1.0 + f32::EPSILON,
    ];
    let randoms = (0..200_000).map(|i| {
        let bits = rng.next_u64() as u32;
        // half of them near the f16 range, half anywhere
        if i % 2 == 0 {
            f32::from_bits((bits & 0x807f_ffff) | ((0x67 + (bits >> 23) % 0x1f) << 23))
        } else {
            f32::from_bits(bits)
        }
    });
    for v in specials.into_iter().chain(randoms) {
        if v.is_nan() {
            assert!(f16::from_bits(to_f16(v)).is_nan() && bf16::from_bits(to_bf16(v)).is_nan());
            continue;
        }
        assert_eq!(to_f16(v), f16::from_f32(v).to_bits(), "f16 of {v:e}");
        assert_eq!(to_bf16(v), bf16::from_f32(v).to_bits(), "bf16 of {v:e}");
    }
}

/// FMAs of the taps inside the image, by enumerating every (output, tap) pair of one plane.
fn useful_fmas_enumerated(conv: &DwConv2d, s: &lkconv::ConvShape) -> f64 {
    let inside = |o: usize, t: usize, stride: usize, dil: usize, pad: usize, len: usize| {
        let i = (o * stride + t * dil) as i64 - pad as i64;
        i >= 0 && i < len as i64
    };
    let (kh, kw) = conv.kernel;
    let mut taps = 0u64;
    for oy in 0..s.oh {
        for ox in 0..s.ow {
            for ky in 0..kh {
                let row = inside(
                    oy,
                    ky,
                    conv.stride.0,
                    conv.dilation.0,
                    conv.padding.top,
                    s.h,
                );
                for kx in 0..kw {
                    let col = inside(
                        ox,
                        kx,
                        conv.stride.1,
                        conv.dilation.1,
                        conv.padding.left,
                        s.w,
                    );
                    taps += u64::from(row && col);
                }
            }
        }
    }
    (s.n * s.c) as f64 * taps as f64
}

#[test]
fn useful_fmas_are_exact() {
    // 3x3 image, 3x3 filter, padding 1: 2+3+2 taps per row and per column -> 7 * 7 = 49
    let conv = DwConv2d::new(3, 3);
    let s = conv.resolve(1, 1, 3, 3).unwrap();
    assert_eq!(conv.useful_flops(&s), 2.0 * 49.0);
    assert_eq!(conv.flops(&s), 2.0 * 81.0);
    // strided, dilated, asymmetric padding, filter larger than the image
    let mut rng = Rng::new(5);
    for _ in 0..200 {
        let (kh, kw) = (rng.range(1, 12), rng.range(1, 12));
        let conv = DwConv2d::new(kh, kw)
            .with_padding_sides(Padding {
                top: rng.range(0, kh),
                bottom: rng.range(0, kh),
                left: rng.range(0, kw),
                right: rng.range(0, kw),
            })
            .with_stride(rng.range(1, 3), rng.range(1, 3))
            .with_dilation(rng.range(1, 3), rng.range(1, 3));
        let Ok(s) = conv.resolve(
            rng.range(1, 2),
            rng.range(1, 3),
            rng.range(1, 15),
            rng.range(1, 15),
        ) else {
            continue;
        };
        let useful = useful_fmas_enumerated(&conv, &s);
        assert_eq!(conv.useful_flops(&s), 2.0 * useful, "{conv:?} {s:?}");
        // the naive kernels (and the strided weight gradient) execute exactly the useful taps;
        // im2col + GEMM executes every tap
        let nominal = (s.n * s.c * s.oh * s.ow * kh * kw) as f64;
        for op in Op::ALL {
            let fmas = |imp| {
                plan::executed_fmas(&Problem::new(op, imp, DType::F32, &conv, &s).unwrap()).unwrap()
            };
            assert_eq!(fmas(Impl::Naive), useful);
            assert_eq!(fmas(Impl::Im2col), nominal);
            if op == Op::WeightGrad && !conv.is_unit() {
                assert_eq!(fmas(Impl::Fast), useful);
            }
        }
    }
}

/// Prints which share of the executed FMAs is useful (taps inside the image) for the benchmark
/// shapes (`cargo test --release --test sim useful -- --nocapture`).
#[test]
fn useful_share_of_executed_fmas() {
    let shapes = [
        (64, 128, 56, 56, 31),
        (64, 256, 28, 28, 29),
        (64, 512, 14, 14, 27),
        (64, 1024, 7, 7, 13),
        (1, 128, 56, 56, 31),
        (64, 384, 32, 32, 31),
        (8, 128, 256, 200, 31),
    ];
    for (n, c, h, w, k) in shapes {
        let conv = DwConv2d::new(k, k);
        let s = conv.resolve(n, c, h, w).unwrap();
        let useful = useful_fmas_enumerated(&conv, &s);
        assert_eq!(conv.useful_flops(&s), 2.0 * useful);
        let nominal = conv.flops(&s) / 2.0;
        let mut line = format!(
            "{n}x{c}x{h}x{w} K{k}: useful/nominal {:.0}%",
            100.0 * useful / nominal
        );
        for op in Op::ALL {
            let p = Problem::new(op, Impl::Fast, DType::F32, &conv, &s).unwrap();
            let e = plan::executed_fmas(&p).unwrap();
            assert!(e >= useful, "{op:?}: executed {e} < useful {useful}");
            line += &format!(", {} useful/executed {:.0}%", op.name(), 100.0 * useful / e);
        }
        println!("{line}");
    }
}

/// A RepLKNet-sized layer (1 x 8 x 56 x 56, K31): several row tiles per plane, several partial
/// blocks per channel; prints the simulator's time per pass.
#[test]
fn replknet_sized_layer() {
    let mut rng = Rng::for_test("replknet_sized_layer");
    let case = Case {
        n: 1,
        c: 8,
        h: 56,
        w: 56,
        conv: DwConv2d::new(31, 31),
        bias: true,
    };
    for op in Op::ALL {
        let t = std::time::Instant::now();
        check::<f32>(&mut rng, op, Impl::Fast, &case);
        println!("{op:?}: {:?} (simulator + reference)", t.elapsed());
    }
}

/// The planner's tile geometry (`src/plan/geometry.rs`) and the kernels' own
/// (`kernels/lk_common.cuh`, exported by the simulator library) agree over a sweep of shapes:
/// one source of truth checked on every build.
#[test]
fn planner_and_kernels_agree_on_tile_geometry() {
    let g = sim::kernel_geometry().unwrap();
    assert_eq!(g.rx as usize, plan::RX);
    assert_eq!(
        g.wgrad_strided_threads as usize,
        plan::WGRAD_STRIDED_THREADS
    );
    assert_eq!(g.wgrad_strided_taps as usize, plan::WGRAD_STRIDED_TAPS);
    let mut checked = 0;
    for tw in (8..=64).step_by(8) {
        for kc in 1..=64 {
            assert_eq!(
                (g.tile_ld)(tw as i32, kc as i32) as usize,
                plan::tile_ld(tw, kc)
            );
            for th in [1, 2, 7, 16, 31, 64, 128, 256] {
                for kcw in [1, 3, 4, 8, 13, 31, 64] {
                    let cuda = (g.tiled_smem_floats)(th as i32, tw as i32, kc as i32, kcw as i32);
                    assert_eq!(4 * cuda as usize, plan::tiled_smem(th, tw, kc, kcw));
                    checked += 1;
                }
            }
        }
    }
    for th in 1..=16 {
        for tw in [1, 5, 8, 13, 16, 31, 32] {
            for kh in [1, 2, 3, 7, 13, 27, 31, 51] {
                for kw in [1, 3, 7, 8, 9, 17, 31, 51] {
                    let (tpg, groups) = plan::wgrad_threads(th, kh, kw);
                    let threads = tpg * groups;
                    let cuda = (g.wgrad_smem_floats)(
                        th as i32,
                        tw as i32,
                        kh as i32,
                        kw as i32,
                        threads as i32,
                    );
                    assert_eq!(
                        4 * cuda as usize,
                        plan::wgrad_smem(th, tw, kh, kw, threads),
                        "wgrad th {th} tw {tw} k {kh}x{kw}"
                    );
                    checked += 1;
                }
            }
        }
    }
    assert!(checked > 10_000, "{checked}");
}
