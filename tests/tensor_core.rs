//! The tensor-core path: the simulator's warp-level matrix operation against a plain matrix
//! product, its warp primitives and divergence errors, and the tensor-core kernels against the
//! f64 reference (simulator always; a CUDA GPU when present).

mod common;

use half::{bf16, f16};
use lkconv::{sim, DType, Rng};

/// Random f16/bf16 bits of values uniform in +-1 times 2^[-3, 3].
fn random_bits(dtype: DType, len: usize, rng: &mut Rng) -> Vec<u16> {
    (0..len)
        .map(|_| {
            let v = rng.uniform_pm1() * (2f32).powi(rng.range(0, 6) as i32 - 3);
            match dtype {
                DType::Bf16 => bf16::from_f32(v).to_bits(),
                _ => f16::from_f32(v).to_bits(),
            }
        })
        .collect()
}

fn bits_to_f64(dtype: DType, b: u16) -> f64 {
    match dtype {
        DType::Bf16 => bf16::from_bits(b).to_f64(),
        _ => f16::from_bits(b).to_f64(),
    }
}

#[test]
fn warp_primitives_and_divergence_errors() {
    sim::warp::selftest().expect("warp self-test");
}

/// Both fragment shapes the kernels use (m16n8k16 and m16n8k8), both dtypes, one and many warps.
#[test]
fn mma_m16n8_matches_a_plain_product() {
    let mut rng = common::rng();
    for dtype in [DType::F16, DType::Bf16] {
        for kd in [16usize, 8] {
            for count in [1usize, 3, 32] {
                let a = random_bits(dtype, count * 16 * kd, &mut rng);
                let b = random_bits(dtype, count * kd * 8, &mut rng);
                let c: Vec<f32> = (0..count * 128).map(|_| rng.uniform_pm1() * 4.0).collect();
                let d = sim::warp::mma_m16n8(dtype, kd, &a, &b, &c).expect("mma runs");
                for w in 0..count {
                    for i in 0..16 {
                        for j in 0..8 {
                            let mut want = c[w * 128 + i * 8 + j] as f64;
                            let mut mag = want.abs();
                            for k in 0..kd {
                                let p = bits_to_f64(dtype, a[w * 16 * kd + i * kd + k])
                                    * bits_to_f64(dtype, b[w * kd * 8 + k * 8 + j]);
                                want += p;
                                mag += p.abs();
                            }
                            let got = d[w * 128 + i * 8 + j] as f64;
                            // kd + 1 f32 additions of exact products
                            let tol = (kd + 1) as f64 * f32::EPSILON as f64 * mag;
                            assert!(
                                (got - want).abs() <= tol,
                                "{dtype} m16n8k{kd} product {w} of {count}: D[{i}][{j}] = {got}, expected {want}"
                            );
                        }
                    }
                }
            }
        }
    }
}

#[test]
fn mma_rejects_bad_sizes() {
    let m = sim::warp::mma_m16n8;
    assert!(m(DType::F32, 16, &[0; 256], &[0; 128], &[0.0; 128]).is_err());
    assert!(m(DType::F16, 16, &[0; 255], &[0; 128], &[0.0; 128]).is_err());
    assert!(m(DType::F16, 8, &[0; 256], &[0; 128], &[0.0; 128]).is_err());
    assert!(m(DType::F16, 4, &[0; 64], &[0; 32], &[0.0; 128]).is_err());
    assert!(m(DType::F16, 16, &[], &[], &[]).is_err());
}

// ---- the tensor-core kernels against the f64 reference -----------------------------------------

use common::{case, Case, Expected};
use lkconv::plan::{self as kernels, tensor_core, Family, KernelId};
use lkconv::{Device, DwConv2d, Element, Error, Impl, Op, Padding, Problem, Tensor};

/// The kernel the tensor-core plan picks for this case.
fn planned(op: Op, dtype: DType, k: &Case) -> String {
    let s = k.conv.resolve(k.n, k.c, k.h, k.w).unwrap();
    let p = Problem::new(op, Impl::TensorCore, dtype, &k.conv, &s).unwrap();
    kernels::plan(&p).unwrap().launches[0].kernel.name()
}

/// Runs `op` with `Impl::TensorCore` on `device` and the reference on the same rounded inputs, with the per-element bound of f32 accumulation stored as T (outputs NaN-poisoned by
/// the device before the kernels run; NaN fails the comparison).
fn check<T: Element>(device: Device, rng: &mut Rng, op: Op, k: &Case) {
    let conv = &k.conv;
    let s = conv.resolve(k.n, k.c, k.h, k.w).expect("valid case");
    let w = Tensor::<T>::random(&conv.weight_dims(s.c), rng).unwrap();
    let (got, want) = match op {
        Op::Forward => {
            let x = Tensor::<T>::random(&s.input_dims(), rng).unwrap();
            let b = Tensor::<T>::random(&[s.c], rng).unwrap();
            let bias = k.bias.then_some(&b);
            (
                lkconv::device::forward(device, Impl::TensorCore, conv, &x, &w, bias),
                Expected::forward(conv, &x, &w, bias),
            )
        }
        Op::DataGrad => {
            let dy = Tensor::<T>::random(&s.output_dims(), rng).unwrap();
            (
                lkconv::device::data_grad(device, Impl::TensorCore, conv, &dy, &w, (s.h, s.w)),
                Expected::data_grad(conv, &dy, &w, (s.h, s.w)),
            )
        }
        Op::WeightGrad => {
            let x = Tensor::<T>::random(&s.input_dims(), rng).unwrap();
            let dy = Tensor::<T>::random(&s.output_dims(), rng).unwrap();
            (
                lkconv::device::weight_grad(device, Impl::TensorCore, conv, &x, &dy),
                Expected::weight_grad(conv, &x, &dy),
            )
        }
    };
    let what = format!("{op:?} {} {k:?} on {device}", T::DTYPE);
    let got = got.unwrap_or_else(|e| panic!("{what}: {e}"));
    common::assert_matches(&what, &got, &want);
}

/// Every pass in both dtypes.
fn check_both(device: Device, rng: &mut Rng, k: &Case) {
    for op in Op::ALL {
        check::<f16>(device, rng, op, k);
        check::<bf16>(device, rng, op, k);
    }
}

#[test]
fn templated_sizes_in_the_simulator() {
    let mut rng = common::rng();
    for k in kernels::TEMPLATE_SIZES {
        let c = Case {
            n: rng.range(1, 2),
            c: rng.range(1, 3),
            h: rng.range(5, 40),
            w: rng.range(5, 40),
            conv: DwConv2d::new(k, k),
            bias: rng.range(0, 1) == 1,
        };
        for dtype in [DType::F16, DType::Bf16] {
            for op in [Op::Forward, Op::DataGrad] {
                let name = planned(op, dtype, &c);
                assert!(
                    name.starts_with("lk_tc_") && name.ends_with(&format!("_k{k}")),
                    "{name}"
                );
            }
            // one weight-gradient kernel for every filter size
            let name = planned(Op::WeightGrad, dtype, &c);
            assert_eq!(name, format!("lk_tc_wgrad_{dtype}"));
        }
        check_both(Device::Sim, &mut rng, &c);
    }
}

#[test]
fn generic_even_and_rectangular_in_the_simulator() {
    let mut rng = common::rng();
    for (kh, kw) in [
        (2, 2),
        (4, 4),
        (12, 12),
        (31, 13),
        (13, 31),
        (1, 57),
        (9, 1),
        (30, 30),
        (45, 37),
    ] {
        let c = Case {
            n: rng.range(1, 2),
            c: rng.range(1, 2),
            h: rng.range(5, 36),
            w: rng.range(5, 36),
            conv: DwConv2d::new(kh, kw),
            bias: true,
        };
        assert!(planned(Op::Forward, DType::F16, &c).ends_with("_generic"));
        check_both(Device::Sim, &mut rng, &c);
    }
}

#[test]
fn edge_shapes_in_the_simulator() {
    let mut rng = common::rng();
    let pad = Padding {
        top: 3,
        bottom: 17,
        left: 20,
        right: 1,
    };
    let cases = [
        // K larger than the image, batch 1, one channel
        case(1, 1, 9, 7, DwConv2d::new(31, 31)),
        case(1, 1, 3, 3, DwConv2d::new(13, 13)),
        // non-square, several column tiles, several row tiles
        case(2, 1, 13, 150, DwConv2d::new(13, 13)),
        case(1, 2, 150, 11, DwConv2d::new(27, 27)),
        // asymmetric padding
        case(1, 2, 33, 21, DwConv2d::new(25, 25).with_padding_sides(pad)),
        case(2, 1, 20, 44, DwConv2d::new(7, 9).with_padding_sides(pad)),
    ];
    for k in &cases {
        check_both(Device::Sim, &mut rng, k);
    }
    // no bias
    let k = Case {
        bias: false,
        ..case(1, 3, 18, 18, DwConv2d::new(29, 29))
    };
    check::<f16>(Device::Sim, &mut rng, Op::Forward, &k);
    // weight gradient: many channels, so that each block loops over several (image, tile) items
    let k = case(3, 600, 9, 11, DwConv2d::new(5, 5));
    check::<bf16>(Device::Sim, &mut rng, Op::WeightGrad, &k);
}

#[test]
fn replknet_shapes_at_small_batch_in_the_simulator() {
    let mut rng = common::rng();
    for (c, hw, k) in [(2, 56, 31), (2, 28, 29), (3, 14, 27), (4, 7, 13)] {
        check_both(
            Device::Sim,
            &mut rng,
            &case(1, c, hw, hw, DwConv2d::new(k, k)),
        );
    }
}

#[test]
fn fallbacks_and_errors() {
    let mut rng = common::rng();
    // wider than the generic kernel, and strided: the SIMT kernels
    let wide = case(1, 2, 12, 70, DwConv2d::new(3, 61));
    assert!(!planned(Op::Forward, DType::F16, &wide).starts_with("lk_tc_"));
    check_both(Device::Sim, &mut rng, &wide);
    let strided = case(1, 2, 20, 20, DwConv2d::new(5, 5).with_stride(2, 2));
    assert!(!planned(Op::Forward, DType::Bf16, &strided).starts_with("lk_tc_"));
    check::<bf16>(Device::Sim, &mut rng, Op::Forward, &strided);
    check::<bf16>(Device::Sim, &mut rng, Op::WeightGrad, &strided);
    // the weight gradient beyond 64 filter rows or columns: the SIMT kernels
    let tall = case(1, 2, 30, 12, DwConv2d::new(65, 5));
    assert!(!planned(Op::WeightGrad, DType::F16, &tall).starts_with("lk_tc_"));
    check::<f16>(Device::Sim, &mut rng, Op::WeightGrad, &tall);
    let s = DwConv2d::new(31, 31).resolve(1, 2, 20, 20).unwrap();
    let p = Problem::new(
        Op::WeightGrad,
        Impl::TensorCore,
        DType::F16,
        &DwConv2d::new(31, 31),
        &s,
    )
    .unwrap();
    let plan = kernels::plan(&p).unwrap();
    assert_eq!(plan.launches[0].kernel.family, Family::TcWgrad);
    assert_eq!(plan.launches[1].kernel.family, Family::WgradReduce);
    // f32 and the CPU are typed errors
    let conv = DwConv2d::new(31, 31);
    let x = Tensor::<f32>::random(&[1, 2, 20, 20], &mut rng).unwrap();
    let w = Tensor::<f32>::random(&[2, 1, 31, 31], &mut rng).unwrap();
    let e = lkconv::device::forward(Device::Sim, Impl::TensorCore, &conv, &x, &w, None);
    assert!(matches!(e, Err(Error::Unsupported(_))), "{e:?}");
    let xh = x.cast::<f16>();
    let wh = w.cast::<f16>();
    let e = lkconv::device::forward(Device::Cpu, Impl::TensorCore, &conv, &xh, &wh, None);
    assert!(matches!(e, Err(Error::Unsupported(_))), "{e:?}");
    // a device below sm_80 is refused
    let tc = KernelId::tiled(Family::TcFwd, DType::F16, 31, 31);
    assert_eq!(tc.name(), "lk_tc_fwd_f16_k31");
    assert!(tensor_core::check_device(tc, (7, 5), "T4").is_err());
    assert!(tensor_core::check_device(tc, (8, 0), "A100").is_ok());
    let simt = KernelId::tiled(Family::TiledFwd, DType::F16, 31, 31);
    assert!(tensor_core::check_device(simt, (7, 5), "T4").is_ok());
}

#[test]
fn plan_work_share_and_bounds() {
    // the benchmark shapes (RepLKNet-31B layers at batch 64, and batch 1): every plan is a
    // tensor-core plan within the launch limits, with a useful share in (0, 1]
    println!("op    shape              K  kernel                 grid             block smem  mma/plane useful  TC-bound  smem-bound  HBM-bound");
    for (n, c, hw, k) in [
        (64, 128, 56, 31),
        (64, 256, 28, 29),
        (64, 512, 14, 27),
        (64, 1024, 7, 13),
        (1, 128, 56, 31),
    ] {
        let conv = DwConv2d::new(k, k);
        let s = conv.resolve(n, c, hw, hw).unwrap();
        for op in Op::ALL {
            let p = Problem::new(op, Impl::TensorCore, DType::F16, &conv, &s).unwrap();
            let r = tensor_core::work_report(&p)
                .unwrap()
                .expect("a tensor-core plan");
            let l = &r.launch;
            assert!(l.kernel.family.is_tensor_core(), "{l:?}");
            assert!(l.block.0.is_multiple_of(32) && l.block.0 <= 256, "{l:?}");
            assert!(
                l.shared_bytes as usize <= kernels::SHARED_TARGET_BYTES,
                "{l:?}"
            );
            assert!(r.useful_share > 0.0 && r.useful_share <= 1.0, "{r:?}");
            println!(
                "{:<5} {:<16} {k:>3}  {:<22} {:<16} {:>5} {:>5} {:>9.0} {:>5.1}% {:>7.1} us {:>7.1} us {:>7.1} us",
                op.name(),
                format!("{n}x{c}x{hw}x{hw}"),
                l.kernel,
                format!("{:?}", l.grid),
                l.block.0,
                l.shared_bytes,
                r.mma / (n * c) as f64,
                100.0 * r.useful_share,
                r.tc_bound_s * 1e6,
                r.smem_bound_s * 1e6,
                r.memory_bound_s * 1e6
            );
        }
    }
}

#[test]
fn on_a_cuda_device_when_present() {
    if !common::have_gpu() {
        return;
    }
    let mut rng = common::rng();
    let k = case(2, 3, 56, 56, DwConv2d::new(31, 31));
    let s = k.conv.resolve(k.n, k.c, k.h, k.w).unwrap();
    let x = Tensor::<f16>::random(&s.input_dims(), &mut rng).unwrap();
    let w = Tensor::<f16>::random(&k.conv.weight_dims(s.c), &mut rng).unwrap();
    // Skipped only on a GPU older than sm_80; there any error fails the test.
    let cc = lkconv::cuda::CudaDevice::shared(0)
        .expect("have_gpu said the device is usable")
        .info()
        .compute_capability;
    if cc < (8, 0) {
        println!(
            "skipped: the GPU (sm_{}{}) has no sm_80 tensor cores",
            cc.0, cc.1
        );
        return;
    }
    lkconv::device::forward(Device::Cuda(0), Impl::TensorCore, &k.conv, &x, &w, None)
        .expect("tensor-core forward on the GPU");
    for k in [
        k,
        case(1, 1, 9, 7, DwConv2d::new(31, 31)),
        case(2, 2, 28, 28, DwConv2d::new(29, 29)),
        case(4, 8, 14, 14, DwConv2d::new(27, 27)),
        case(4, 8, 7, 7, DwConv2d::new(13, 13)),
        case(1, 2, 40, 130, DwConv2d::new(13, 31)),
        case(1, 2, 224, 224, DwConv2d::new(31, 31)),
    ] {
        check_both(Device::Cuda(0), &mut rng, &k);
    }
}

/// The weight-gradient test harness catches a wrong fragment index: the simulator's mutants of
/// `lk_tc_wgrad_f16` (A's last register from the wrong block; D's rows and columns exchanged)
/// fail the comparison that the real kernel passes on the same launch and data.
#[test]
fn a_wrong_wgrad_fragment_index_fails() {
    use lkconv::sim::sanitize::{run_launches, LaunchData, NamedLaunch};
    let mut rng = common::rng();
    let conv = DwConv2d::new(13, 13);
    let s = conv.resolve(2, 2, 20, 27).unwrap();
    let x = Tensor::<f16>::random(&s.input_dims(), &mut rng).unwrap();
    let dy = Tensor::<f16>::random(&s.output_dims(), &mut rng).unwrap();
    let want = Expected::weight_grad(&conv, &x, &dy);
    let p = Problem::new(Op::WeightGrad, Impl::TensorCore, DType::F16, &conv, &s).unwrap();
    let plan = kernels::plan(&p).unwrap();
    assert_eq!(plan.launches[0].kernel.name(), "lk_tc_wgrad_f16");
    let bytes = |t: &Tensor<f16>| -> Vec<u8> {
        t.data()
            .iter()
            .flat_map(|v| v.to_bits().to_le_bytes())
            .collect()
    };
    let (xb, dyb) = (bytes(&x), bytes(&dy));
    let data = LaunchData {
        in0: &xb,
        in1: &dyb,
        bias: &[],
        out_bytes: 2 * s.c * 13 * 13,
        workspace_bytes: plan.workspace_bytes,
    };
    let run = |partial: &str| {
        let mut launches: Vec<NamedLaunch> = plan.launches.iter().map(NamedLaunch::from).collect();
        launches[0].kernel = partial.to_string();
        let r = run_launches(&launches, &data).expect("the launches run");
        let got: Vec<f64> = r.out.to_vec::<f16>().iter().map(|v| v.to_f64()).collect();
        common::compare(&got, &want)
    };
    assert!(run("lk_tc_wgrad_f16").is_ok(), "the real kernel passes");
    for mutant in [
        "lksim_test_tc_wgrad_mutant_a",
        "lksim_test_tc_wgrad_mutant_d",
    ] {
        let m = run(mutant).expect_err(mutant);
        assert!(m.count > 0, "{mutant}: {m:?}");
    }
}
