//! The CUDA device against the f64 reference.
//!
//! Every test that needs a GPU prints "skipped: no CUDA device (<reason>)" and returns when
//! there is none (no driver, no device, or a build without nvcc), unless
//! `LKCONV_REQUIRE_GPU=1`, which turns the skip into a failure (the GPU bundle sets it).
//! The shape-checking and no-driver tests run everywhere.

mod common;

use std::sync::Arc;

use common::{assert_matches, case, Case, Expected};
use cudarc::driver::{DevicePtr, DevicePtrMut};
use half::{bf16, f16};
use lkconv::cuda::{self, CudaDevice, CudaElement, CudaExec, DeviceTensor, RawOperands};
use lkconv::{DType, Device, DwConv2d, Element, Error, Impl, Op, Padding, Problem, Rng, Tensor};

const IMPLS: [Impl; 3] = [Impl::Fast, Impl::Naive, Impl::Im2col];

fn require_gpu() -> bool {
    std::env::var("LKCONV_REQUIRE_GPU").is_ok_and(|v| v == "1")
}

/// The GPU with its kernels loaded, or None after printing why (panics when a GPU is required).
fn gpu() -> Option<Arc<CudaDevice>> {
    common::have_gpu().then(|| CudaDevice::shared(0).expect("have_gpu() opened it"))
}

/// The shapes every op and implementation is checked on.
fn cases() -> Vec<Case> {
    vec![
        // a RepLKNet stage-1 filter on a cut-down map
        case(1, 4, 56, 56, DwConv2d::new(31, 31)),
        // the filter is larger than the image
        case(2, 3, 20, 17, DwConv2d::new(31, 31)),
        // even, rectangular, asymmetric padding
        case(
            2,
            4,
            13,
            11,
            DwConv2d::new(4, 6).with_padding_sides(Padding {
                top: 1,
                bottom: 2,
                left: 3,
                right: 0,
            }),
        ),
        case(1, 2, 16, 40, DwConv2d::new(51, 5)),
        case(1, 2, 40, 16, DwConv2d::new(5, 51)),
        // stride 2 and dilation 2 (the generic path)
        case(2, 3, 15, 15, DwConv2d::new(7, 7).with_stride(2, 2)),
        case(
            1,
            3,
            17,
            19,
            DwConv2d::new(5, 5).with_dilation(2, 2).with_padding(4, 4),
        ),
        // the C1024 7x7 K13 layer, cut down
        case(3, 8, 7, 7, DwConv2d::new(13, 13)),
        // odd sizes that leave partial tiles, small filters
        case(2, 16, 33, 35, DwConv2d::new(3, 3)),
        case(1, 5, 9, 70, DwConv2d::new(29, 29)),
        case(1, 1, 1, 1, DwConv2d::new(1, 1)),
        case(1, 2, 12, 12, DwConv2d::new(2, 2).with_padding(0, 0)),
    ]
}

/// Inputs of one case: x, w, bias, dy (dy shaped like the output).
struct Data<T> {
    x: Tensor<T>,
    w: Tensor<T>,
    b: Tensor<T>,
    dy: Tensor<T>,
}

/// Fresh data each run: `seed` separates the cases, the run's printed seed (replayable with
/// LKCONV_SEED) varies them.
fn data<T: Element>(cs: &Case, seed: u64) -> Data<T> {
    let mut rng = Rng::new(seed ^ common::rng().next_u64());
    let s = cs.conv.resolve(cs.n, cs.c, cs.h, cs.w).unwrap();
    Data {
        x: Tensor::<f32>::random(&s.input_dims(), &mut rng)
            .unwrap()
            .cast(),
        w: Tensor::<f32>::random(&cs.conv.weight_dims(cs.c), &mut rng)
            .unwrap()
            .cast(),
        b: Tensor::<f32>::random(&[cs.c], &mut rng).unwrap().cast(),
        dy: Tensor::<f32>::random(&s.output_dims(), &mut rng)
            .unwrap()
            .cast(),
    }
}

/// What `op` must give on the inputs of a case (the suite's one comparator, tests/common).
fn expected<T: Element>(op: Op, cs: &Case, d: &Data<T>) -> Expected {
    match op {
        Op::Forward => Expected::forward(&cs.conv, &d.x, &d.w, Some(&d.b)),
        Op::DataGrad => Expected::data_grad(&cs.conv, &d.dy, &d.w, (cs.h, cs.w)),
        Op::WeightGrad => Expected::weight_grad(&cs.conv, &d.x, &d.dy),
    }
}

fn nan_tensor<T: Element>(shape: &[usize]) -> Tensor<T> {
    Tensor::full(shape, T::from_f32(f32::NAN)).unwrap()
}

/// Runs one op through the stream API with the output poisoned (NaN) before the launch.
fn run_device<T: CudaElement>(
    ex: &mut CudaExec,
    op: Op,
    imp: Impl,
    cs: &Case,
    d: &Data<T>,
) -> lkconv::Result<Tensor<T>> {
    let s = cs.conv.resolve(cs.n, cs.c, cs.h, cs.w)?;
    let stream = &ex.stream().clone();
    let conv = &cs.conv;
    match op {
        Op::Forward => {
            let x = DeviceTensor::from_host(stream, &d.x)?;
            let w = DeviceTensor::from_host(stream, &d.w)?;
            let b = DeviceTensor::from_host(stream, &d.b)?;
            let mut y = DeviceTensor::from_host(stream, &nan_tensor::<T>(&s.output_dims()))?;
            cuda::forward(ex, imp, conv, &x, &w, Some(&b), &mut y)?;
            y.to_host()
        }
        Op::DataGrad => {
            let dy = DeviceTensor::from_host(stream, &d.dy)?;
            let w = DeviceTensor::from_host(stream, &d.w)?;
            let mut dx = DeviceTensor::from_host(stream, &nan_tensor::<T>(&s.input_dims()))?;
            cuda::data_grad(ex, imp, conv, &dy, &w, &mut dx)?;
            dx.to_host()
        }
        Op::WeightGrad => {
            let x = DeviceTensor::from_host(stream, &d.x)?;
            let dy = DeviceTensor::from_host(stream, &d.dy)?;
            let mut dw = DeviceTensor::from_host(stream, &nan_tensor::<T>(&conv.weight_dims(s.c)))?;
            cuda::weight_grad(ex, imp, conv, &x, &dy, &mut dw)?;
            dw.to_host()
        }
    }
}

/// Every case, op and implementation for one element type.
fn check_all<T: CudaElement>(cases: &[Case]) {
    let Some(dev) = gpu() else { return };
    let stream = dev.new_stream().unwrap();
    let mut ex = CudaExec::on_stream(dev.clone(), stream).unwrap();
    for (i, cs) in cases.iter().enumerate() {
        let d = data::<T>(cs, 100 + i as u64);
        for op in Op::ALL {
            let want = expected(op, cs, &d);
            for imp in IMPLS {
                let what = format!("{} {} {} {:?}", T::DTYPE, op.name(), imp.name(), cs);
                let got = run_device::<T>(&mut ex, op, imp, cs, &d)
                    .unwrap_or_else(|e| panic!("{what}: {e}"));
                assert_matches(&what, &got, &want);
            }
        }
    }
}

#[test]
fn f32_all_ops_all_impls_match_the_reference() {
    check_all::<f32>(&cases());
}

#[test]
fn f16_all_ops_all_impls_match_the_reference() {
    let c = cases();
    check_all::<f16>(&[c[0], c[1], c[2], c[5], c[7], c[9]]);
}

#[test]
fn bf16_all_ops_all_impls_match_the_reference() {
    let c = cases();
    check_all::<bf16>(&[c[0], c[1], c[2], c[5], c[7], c[9]]);
}

/// Small and quick: the test that the bundle runs under compute-sanitizer (memcheck and
/// racecheck). Every op, implementation and a K31 filter larger than the image.
#[test]
fn sanitizer_small() {
    let cases = [
        case(1, 2, 20, 20, DwConv2d::new(7, 7)),
        case(1, 1, 9, 40, DwConv2d::new(31, 31)),
        case(1, 2, 11, 11, DwConv2d::new(5, 5).with_stride(2, 2)),
    ];
    check_all::<f32>(&cases);
    check_all::<f16>(&cases[..2]);
}

#[test]
fn host_api_matches_the_reference_with_and_without_bias() {
    if gpu().is_none() {
        return;
    }
    for (i, cs) in [cases()[0], cases()[2], cases()[5]].iter().enumerate() {
        let d = data::<f32>(cs, 7 + i as u64);
        for imp in IMPLS {
            let y = lkconv::device::forward(Device::Cuda(0), imp, &cs.conv, &d.x, &d.w, Some(&d.b))
                .unwrap();
            let want = expected(Op::Forward, cs, &d);
            assert_matches(&format!("host fwd {imp:?} {cs:?}"), &y, &want);
            let y0 =
                lkconv::device::forward(Device::Cuda(0), imp, &cs.conv, &d.x, &d.w, None).unwrap();
            let want0 = Expected::forward(&cs.conv, &d.x, &d.w, None);
            assert_matches(&format!("host fwd no bias {imp:?} {cs:?}"), &y0, &want0);
            let dx = lkconv::device::data_grad(
                Device::Cuda(0),
                imp,
                &cs.conv,
                &d.dy,
                &d.w,
                (cs.h, cs.w),
            )
            .unwrap();
            let want = expected(Op::DataGrad, cs, &d);
            assert_matches(&format!("host dgrad {imp:?} {cs:?}"), &dx, &want);
            let dw =
                lkconv::device::weight_grad(Device::Cuda(0), imp, &cs.conv, &d.x, &d.dy).unwrap();
            let want = expected(Op::WeightGrad, cs, &d);
            assert_matches(&format!("host wgrad {imp:?} {cs:?}"), &dw, &want);
        }
    }
}

#[test]
fn host_api_half_types() {
    if gpu().is_none() {
        return;
    }
    let cs = cases()[0];
    let d = data::<f16>(&cs, 3);
    let y = lkconv::device::forward(
        Device::Cuda(0),
        Impl::Fast,
        &cs.conv,
        &d.x,
        &d.w,
        Some(&d.b),
    )
    .unwrap();
    assert_matches("host f16 fwd", &y, &expected(Op::Forward, &cs, &d));
    let d = data::<bf16>(&cs, 4);
    let dw =
        lkconv::device::weight_grad(Device::Cuda(0), Impl::Fast, &cs.conv, &d.x, &d.dy).unwrap();
    assert_matches("host bf16 wgrad", &dw, &expected(Op::WeightGrad, &cs, &d));
}

fn weight_grad_bits<T: CudaElement>(
    dev: &Arc<CudaDevice>,
    stream: &Arc<cuda::CudaStream>,
    cs: &Case,
    d: &Data<T>,
) -> Vec<u32> {
    let mut ex = CudaExec::on_stream(dev.clone(), stream.clone()).unwrap();
    run_device::<T>(&mut ex, Op::WeightGrad, Impl::Fast, cs, d)
        .unwrap()
        .data()
        .iter()
        .map(|v| v.to_f32().to_bits())
        .collect()
}

#[test]
fn weight_grad_is_deterministic() {
    let Some(dev) = gpu() else { return };
    // Many blocks per channel (large N * H * W, few channels) so that a non-deterministic
    // reduction would show.
    let cs = case(8, 4, 56, 56, DwConv2d::new(31, 31));
    let s1 = dev.new_stream().unwrap();
    let s2 = dev.new_stream().unwrap();
    let d = data::<f32>(&cs, 11);
    let a = weight_grad_bits(&dev, &s1, &cs, &d);
    for _ in 0..3 {
        assert_eq!(
            a,
            weight_grad_bits(&dev, &s1, &cs, &d),
            "f32 wgrad differs between runs"
        );
    }
    assert_eq!(
        a,
        weight_grad_bits(&dev, &s2, &cs, &d),
        "f32 wgrad differs between streams"
    );
    let d = data::<bf16>(&cs, 12);
    let a = weight_grad_bits(&dev, &s1, &cs, &d);
    assert_eq!(
        a,
        weight_grad_bits(&dev, &s1, &cs, &d),
        "bf16 wgrad differs between runs"
    );
}

#[test]
fn chained_ops_on_one_stream_need_no_synchronisation() {
    let Some(dev) = gpu() else { return };
    let cs = cases()[0];
    let d = data::<f32>(&cs, 21);
    let s = cs.conv.resolve(cs.n, cs.c, cs.h, cs.w).unwrap();
    let stream = dev.new_stream().unwrap();
    let mut ex = CudaExec::on_stream(dev.clone(), stream.clone()).unwrap();
    let x = DeviceTensor::from_host(&stream, &d.x).unwrap();
    let w = DeviceTensor::from_host(&stream, &d.w).unwrap();
    let mut y = DeviceTensor::from_host(&stream, &nan_tensor::<f32>(&s.output_dims())).unwrap();
    let mut dx = DeviceTensor::from_host(&stream, &nan_tensor::<f32>(&s.input_dims())).unwrap();
    let mut dw =
        DeviceTensor::from_host(&stream, &nan_tensor::<f32>(&cs.conv.weight_dims(cs.c))).unwrap();
    // y = conv(x, w); then use y as the output gradient: dx = conv^T(y, w), dw = corr(x, y).
    cuda::forward(&mut ex, Impl::Fast, &cs.conv, &x, &w, None, &mut y).unwrap();
    cuda::data_grad(&mut ex, Impl::Fast, &cs.conv, &y, &w, &mut dx).unwrap();
    cuda::weight_grad(&mut ex, Impl::Fast, &cs.conv, &x, &y, &mut dw).unwrap();
    let y_host = y.to_host().unwrap();
    let want = Expected::forward(&cs.conv, &d.x, &d.w, None);
    assert_matches("chained fwd", &y_host, &want);
    let want = Expected::data_grad(&cs.conv, &y_host, &d.w, (cs.h, cs.w));
    assert_matches("chained dgrad", &dx.to_host().unwrap(), &want);
    let want = Expected::weight_grad(&cs.conv, &d.x, &y_host);
    assert_matches("chained wgrad", &dw.to_host().unwrap(), &want);
}

#[test]
fn raw_pointer_entry_points_match_the_safe_ops() {
    let Some(dev) = gpu() else { return };
    let cs = cases()[2];
    let s = cs.conv.resolve(cs.n, cs.c, cs.h, cs.w).unwrap();
    let d = data::<f32>(&cs, 31);
    let stream = dev.new_stream().unwrap();
    let mut ex = CudaExec::on_stream(dev.clone(), stream.clone()).unwrap();
    let x = DeviceTensor::from_host(&stream, &d.x).unwrap();
    let w = DeviceTensor::from_host(&stream, &d.w).unwrap();
    let b = DeviceTensor::from_host(&stream, &d.b).unwrap();
    let dy = DeviceTensor::from_host(&stream, &d.dy).unwrap();
    for imp in IMPLS {
        // fresh poison per implementation: none may pass on another's results
        let mut y = DeviceTensor::from_host(&stream, &nan_tensor::<f32>(&s.output_dims())).unwrap();
        let mut dx = DeviceTensor::from_host(&stream, &nan_tensor::<f32>(&s.input_dims())).unwrap();
        let mut dw =
            DeviceTensor::from_host(&stream, &nan_tensor::<f32>(&cs.conv.weight_dims(cs.c)))
                .unwrap();
        let need = [Op::Forward, Op::DataGrad, Op::WeightGrad]
            .map(|op| cuda::workspace_bytes(op, imp, DType::F32, &cs.conv, &s).unwrap())
            .into_iter()
            .max()
            .unwrap();
        let mut ws = stream.alloc_zeros::<u8>(need.max(1)).unwrap();
        {
            let (xp, _a) = x.slice().device_ptr(&stream);
            let (wp, _b) = w.slice().device_ptr(&stream);
            let (bp, _c) = b.slice().device_ptr(&stream);
            let (dyp, _d) = dy.slice().device_ptr(&stream);
            let (yp, _e) = y.slice_mut().device_ptr_mut(&stream);
            let (dxp, _f) = dx.slice_mut().device_ptr_mut(&stream);
            let (dwp, _g) = dw.slice_mut().device_ptr_mut(&stream);
            let (wsp, _h) = ws.device_ptr_mut(&stream);
            for (op, [in0, in1, bias, out]) in [
                (Op::Forward, [xp, wp, bp, yp]),
                (Op::DataGrad, [dyp, wp, 0, dxp]),
                (Op::WeightGrad, [xp, dyp, 0, dwp]),
            ] {
                let p = Problem::new(op, imp, DType::F32, &cs.conv, &s).unwrap();
                let o = RawOperands {
                    in0,
                    in1,
                    bias,
                    out,
                    workspace: wsp,
                    workspace_bytes: need,
                };
                // SAFETY: every pointer is a live allocation of this device sized for its
                // tensor, the workspace holds the largest requirement, and the buffers outlive
                // the work (they are read back below, which synchronises).
                unsafe { cuda::run_raw(&mut ex, &p, o) }.unwrap();
            }
        }
        for op in Op::ALL {
            let got = match op {
                Op::Forward => y.to_host(),
                Op::DataGrad => dx.to_host(),
                Op::WeightGrad => dw.to_host(),
            }
            .unwrap();
            let what = format!("raw {} {}", op.name(), imp.name());
            assert_matches(&what, &got, &expected(op, &cs, &d));
        }
        // A workspace that is too small is refused before anything is launched.
        if need > 0 {
            let (xp, _a) = x.slice().device_ptr(&stream);
            let (wp, _b) = w.slice().device_ptr(&stream);
            let (yp, _c) = y.slice_mut().device_ptr_mut(&stream);
            let (wsp, _d) = ws.device_ptr_mut(&stream);
            let fwd_need =
                cuda::workspace_bytes(Op::Forward, imp, DType::F32, &cs.conv, &s).unwrap();
            if fwd_need > 0 {
                // SAFETY: nothing is launched: the call fails its workspace check first.
                let r = unsafe {
                    cuda::run_raw(
                        &mut ex,
                        &Problem::new(Op::Forward, imp, DType::F32, &cs.conv, &s).unwrap(),
                        RawOperands {
                            in0: xp,
                            in1: wp,
                            bias: 0,
                            out: yp,
                            workspace: wsp,
                            workspace_bytes: fwd_need - 1,
                        },
                    )
                };
                assert!(matches!(r, Err(Error::BufferLength { .. })), "{r:?}");
            }
        }
    }
}

#[test]
fn device_tensor_shape_errors_are_typed() {
    let Some(dev) = gpu() else { return };
    let stream = dev.new_stream().unwrap();
    let mut ex = CudaExec::on_stream(dev.clone(), stream.clone()).unwrap();
    let conv = DwConv2d::new(7, 7);
    let x = DeviceTensor::<f32>::zeros(&stream, &[1, 4, 16, 16]).unwrap();
    let w = DeviceTensor::<f32>::zeros(&stream, &[4, 1, 7, 7]).unwrap();
    let w_bad = DeviceTensor::<f32>::zeros(&stream, &[4, 1, 5, 7]).unwrap();
    let b_bad = DeviceTensor::<f32>::zeros(&stream, &[3]).unwrap();
    let mut y = DeviceTensor::<f32>::zeros(&stream, &[1, 4, 16, 16]).unwrap();
    let mut y_bad = DeviceTensor::<f32>::zeros(&stream, &[1, 4, 16, 15]).unwrap();
    let r = cuda::forward(&mut ex, Impl::Fast, &conv, &x, &w_bad, None, &mut y);
    assert!(matches!(r, Err(Error::Shape { .. })), "{r:?}");
    let r = cuda::forward(&mut ex, Impl::Fast, &conv, &x, &w, Some(&b_bad), &mut y);
    assert!(matches!(r, Err(Error::Shape { .. })), "{r:?}");
    let r = cuda::forward(&mut ex, Impl::Fast, &conv, &x, &w, None, &mut y_bad);
    assert!(matches!(r, Err(Error::Shape { .. })), "{r:?}");
    let r = cuda::forward(&mut ex, Impl::Reference, &conv, &x, &w, None, &mut y);
    assert!(matches!(r, Err(Error::Unsupported(_))), "{r:?}");
    let mut dx_bad = DeviceTensor::<f32>::zeros(&stream, &[1, 4, 17, 16]).unwrap();
    let r = cuda::data_grad(&mut ex, Impl::Fast, &conv, &y, &w, &mut dx_bad);
    assert!(matches!(r, Err(Error::Shape { .. })), "{r:?}");
    let mut dw_bad = DeviceTensor::<f32>::zeros(&stream, &[4, 1, 7, 6]).unwrap();
    let r = cuda::weight_grad(&mut ex, Impl::Fast, &conv, &x, &y, &mut dw_bad);
    assert!(matches!(r, Err(Error::Shape { .. })), "{r:?}");
    let r = cuda::weight_grad(&mut ex, Impl::Fast, &conv, &x, &y_bad, &mut dw_bad);
    assert!(matches!(r, Err(Error::Shape { .. })), "{r:?}");
    // A shape the convolution does not give is refused when the raw call's problem is built.
    let s = conv.resolve(1, 4, 16, 16).unwrap();
    let wrong = lkconv::ConvShape { oh: 15, ..s };
    let r = Problem::new(Op::Forward, Impl::Fast, DType::F32, &conv, &wrong);
    assert!(matches!(r, Err(Error::InvalidArgument(_))), "{r:?}");
    // A pointer that is not aligned to its elements is refused before any launch.
    {
        let (xp, _a) = x.slice().device_ptr(&stream);
        let (wp, _b) = w.slice().device_ptr(&stream);
        let (yp, _c) = y.slice_mut().device_ptr_mut(&stream);
        // SAFETY: nothing is launched: the alignment check fails first.
        let r = unsafe {
            cuda::run_raw(
                &mut ex,
                &Problem::new(Op::Forward, Impl::Fast, DType::F32, &conv, &s).unwrap(),
                RawOperands {
                    in0: xp + 2,
                    in1: wp,
                    bias: 0,
                    out: yp,
                    workspace: 0,
                    workspace_bytes: 0,
                },
            )
        };
        assert!(matches!(r, Err(Error::InvalidArgument(_))), "{r:?}");
    }
    // The device is still healthy afterwards.
    cuda::forward(&mut ex, Impl::Fast, &conv, &x, &w, None, &mut y).unwrap();
    y.to_host().unwrap();
}

/// Runs everywhere: bad shapes through the host API are typed errors before any device work.
#[test]
fn host_api_shape_errors_are_typed_without_a_gpu() {
    let conv = DwConv2d::new(5, 5);
    let x = Tensor::<f32>::zeros(&[1, 3, 8, 8]).unwrap();
    let w = Tensor::<f32>::zeros(&[3, 1, 5, 5]).unwrap();
    let w_bad = Tensor::<f32>::zeros(&[3, 1, 5, 4]).unwrap();
    let dev = Device::Cuda(0);
    let r = lkconv::device::forward(dev, Impl::Fast, &conv, &x, &w_bad, None);
    assert!(matches!(r, Err(Error::Shape { .. })), "{r:?}");
    let x3 = Tensor::<f32>::zeros(&[3, 8, 8]).unwrap();
    let r = lkconv::device::forward(dev, Impl::Fast, &conv, &x3, &w, None);
    assert!(matches!(r, Err(Error::Shape { .. })), "{r:?}");
    let dy_bad = Tensor::<f32>::zeros(&[1, 3, 8, 7]).unwrap();
    let r = lkconv::device::data_grad(dev, Impl::Fast, &conv, &dy_bad, &w, (8, 8));
    assert!(matches!(r, Err(Error::Shape { .. })), "{r:?}");
    let r = lkconv::device::weight_grad(dev, Impl::Fast, &conv, &x, &dy_bad);
    assert!(matches!(r, Err(Error::Shape { .. })), "{r:?}");
    let big = DwConv2d::new(9, 9).with_padding(0, 0);
    let r = lkconv::device::forward(
        dev,
        Impl::Fast,
        &big,
        &x,
        &Tensor::zeros(&[3, 1, 9, 9]).unwrap(),
        None,
    );
    assert!(matches!(r, Err(Error::EmptyOutput(_))), "{r:?}");
    let zero_stride = DwConv2d::new(5, 5).with_stride(0, 1);
    let r = lkconv::device::forward(dev, Impl::Fast, &zero_stride, &x, &w, None);
    assert!(matches!(r, Err(Error::ZeroSize { .. })), "{r:?}");
}

/// Runs everywhere: without a driver, a device or kernels, every entry point says so with
/// `CudaUnavailable` instead of panicking; with a GPU, a missing ordinal does the same.
#[test]
fn unavailable_cuda_is_an_error_not_a_panic() {
    let conv = DwConv2d::new(3, 3);
    let x = Tensor::<f32>::zeros(&[1, 2, 6, 6]).unwrap();
    let w = Tensor::<f32>::zeros(&[2, 1, 3, 3]).unwrap();
    let r = CudaDevice::new(4096);
    assert!(matches!(r, Err(Error::CudaUnavailable(_))), "{r:?}");
    let r = lkconv::device::forward(Device::Cuda(4096), Impl::Fast, &conv, &x, &w, None);
    assert!(matches!(r, Err(Error::CudaUnavailable(_))), "{r:?}");
    let s = conv.resolve(1, 2, 6, 6).unwrap();
    let r = cuda::time_op(
        4096,
        &Problem::new(Op::Forward, Impl::Fast, DType::F32, &conv, &s).unwrap(),
        1,
        1,
    );
    assert!(matches!(r, Err(Error::CudaUnavailable(_))), "{r:?}");
    match cuda::describe() {
        Ok(lines) => {
            assert!(!lines.is_empty());
            for l in &lines {
                println!("{l}");
            }
        }
        Err(e) => {
            let msg = e.to_string();
            assert!(matches!(e, Error::CudaUnavailable(_)), "{msg}");
            assert!(
                msg.contains("no CUDA driver") || msg.contains("no CUDA device"),
                "{msg}"
            );
            if require_gpu() {
                panic!("LKCONV_REQUIRE_GPU=1 but describe() failed: {msg}");
            }
            println!("describe(): {msg}");
        }
    }
    if gpu().is_none() {
        let r = lkconv::device::forward(Device::Cuda(0), Impl::Fast, &conv, &x, &w, None);
        assert!(matches!(r, Err(Error::CudaUnavailable(_))), "{r:?}");
        let r = cuda::time_op(
            0,
            &Problem::new(Op::Forward, Impl::Fast, DType::F32, &conv, &s).unwrap(),
            1,
            1,
        );
        assert!(matches!(r, Err(Error::CudaUnavailable(_))), "{r:?}");
    }
}

#[test]
fn time_op_measures_something() {
    let Some(dev) = gpu() else { return };
    println!("{}", dev.info().summary());
    println!("peak: {}", dev.info().peak_fp32_note());
    let conv = DwConv2d::new(31, 31);
    let s = conv.resolve(2, 64, 56, 56).unwrap();
    for op in Op::ALL {
        for imp in IMPLS {
            let ms = cuda::time_op(
                0,
                &Problem::new(op, imp, DType::F32, &conv, &s).unwrap(),
                2,
                5,
            )
            .unwrap();
            assert!(ms > 0.0 && ms.is_finite(), "{op:?} {imp:?}: {ms}");
            println!("{} {} {:.3} ms", op.name(), imp.name(), ms);
        }
    }
}

// ---- The benchmark shapes ------------------------------------------------------------------------
//
// One test body (`check_benchmark_shapes`), every device (the candle `test_device!` pattern): on
// the GPU at the benchmark shapes (skipped without one), in the kernel simulator at reduced sizes
// that take the same planner branches (the N=64 full-plane tiles, the N=1 split tiles, plane
// packing). Per shape, dtype and pass: the fast kernels against the naive kernel on the same
// device over the whole output (the tolerance scaled by the naive kernel run on |inputs|), and
// against the f64 CPU reference on a slice (two images x three channels; all images of the
// three channels for the weight gradient).

/// Where the body runs: the simulator, or a GPU through the stream API (outputs poisoned with NaN).
enum Runner {
    Sim,
    Gpu(CudaExec),
}

impl Runner {
    fn run<T: CudaElement>(&mut self, op: Op, imp: Impl, cs: &Case, d: &Data<T>) -> Tensor<T> {
        let what = format!("{} {} {} {:?}", T::DTYPE, op.name(), imp.name(), cs);
        let r = match self {
            // the simulator poisons outputs and workspace with NaN itself
            Runner::Sim => match op {
                Op::Forward => {
                    lkconv::device::forward(Device::Sim, imp, &cs.conv, &d.x, &d.w, Some(&d.b))
                }
                Op::DataGrad => {
                    lkconv::device::data_grad(Device::Sim, imp, &cs.conv, &d.dy, &d.w, (cs.h, cs.w))
                }
                Op::WeightGrad => {
                    lkconv::device::weight_grad(Device::Sim, imp, &cs.conv, &d.x, &d.dy)
                }
            },
            Runner::Gpu(ex) => run_device::<T>(ex, op, imp, cs, d),
        };
        r.unwrap_or_else(|e| panic!("{what}: {e}"))
    }
}

/// Planes `(i, j)` for `i in first`, `j in second` of a tensor whose first two dims index planes
/// (x, dy: [N, C, ..]; w, dw: [C, 1, ..]), as a new tensor [first.len(), second.len(), ..].
fn planes<T: Element>(t: &Tensor<T>, first: &[usize], second: &[usize]) -> Tensor<T> {
    let s = t.shape();
    let plane: usize = s[2..].iter().product();
    let mut data = Vec::with_capacity(first.len() * second.len() * plane);
    for &i in first {
        for &j in second {
            let at = (i * s[1] + j) * plane;
            data.extend_from_slice(&t.data()[at..at + plane]);
        }
    }
    let mut shape = vec![first.len(), second.len()];
    shape.extend_from_slice(&s[2..]);
    Tensor::from_vec(&shape, data).unwrap()
}

fn abs_of<T: Element>(t: &Tensor<T>) -> Tensor<T> {
    Tensor::from_vec(
        t.shape(),
        t.data()
            .iter()
            .map(|v| T::from_f32(v.to_f32().abs()))
            .collect(),
    )
    .unwrap()
}

/// The body: every pass of every case, fast against naive on the device and against the f64
/// reference on a slice.
fn check_benchmark_shapes<T: CudaElement>(runner: &mut Runner, cases: &[Case]) {
    for (i, cs) in cases.iter().enumerate() {
        let d = data::<T>(cs, 900 + i as u64);
        let d_abs = Data {
            x: abs_of(&d.x),
            w: abs_of(&d.w),
            b: abs_of(&d.b),
            dy: abs_of(&d.dy),
        };
        // the slice: first and last image, first, middle and last channel
        let mut ns = vec![0, cs.n - 1];
        ns.dedup();
        let mut chans = vec![0, cs.c / 2, cs.c - 1];
        chans.dedup();
        let all_n: Vec<usize> = (0..cs.n).collect();
        for op in Op::ALL {
            let what = format!("{} {} {:?}", T::DTYPE, op.name(), cs);
            let fast = runner.run(op, Impl::Fast, cs, &d);
            let naive = runner.run(op, Impl::Naive, cs, &d);
            let mag = runner.run(op, Impl::Naive, cs, &d_abs);
            let s = cs.conv.resolve(cs.n, cs.c, cs.h, cs.w).unwrap();
            let terms = match op {
                Op::Forward => cs.conv.kernel.0 * cs.conv.kernel.1 + 1,
                Op::DataGrad => cs.conv.kernel.0 * cs.conv.kernel.1,
                Op::WeightGrad => s.n * s.oh * s.ow,
            };
            let like_naive = Expected::of_sum(T::DTYPE, terms, &naive.cast(), &mag.cast());
            assert_matches(&format!("{what} fast vs naive"), &fast, &like_naive);
            // the reference needs every image of a channel for the weight gradient
            let sn = if op == Op::WeightGrad { &all_n } else { &ns };
            let sub = case(sn.len(), chans.len(), cs.h, cs.w, cs.conv);
            let sub_data = Data {
                x: planes(&d.x, sn, &chans),
                w: planes(&d.w, &chans, &[0]),
                b: Tensor::from_vec(
                    &[chans.len()],
                    chans.iter().map(|&c| d.b.data()[c]).collect(),
                )
                .unwrap(),
                dy: planes(&d.dy, sn, &chans),
            };
            let want = expected(op, &sub, &sub_data);
            let got = match op {
                Op::WeightGrad => planes(&fast, &chans, &[0]),
                _ => planes(&fast, &ns, &chans),
            };
            let slice = format!("{what} fast vs f64 reference on images {ns:?} channels {chans:?}");
            assert_matches(&slice, &got, &want);
        }
    }
}

/// The shapes that matter (BENCHMARKS.md): RepLKNet-31B's first and last layers at N=64 and the
/// first at N=1.
fn gpu_benchmark_cases() -> Vec<Case> {
    vec![
        case(64, 128, 56, 56, DwConv2d::new(31, 31)),
        case(64, 1024, 7, 7, DwConv2d::new(13, 13)),
        case(1, 128, 56, 56, DwConv2d::new(31, 31)),
    ]
}

/// Reduced sizes for the simulator that take the planner branches of `gpu_benchmark_cases`:
/// 264 planes of 32x32 K31 (enough blocks for one full-plane tile per plane, as at N=64),
/// 544 planes of 7x7 K13 (plane packing, P=2), 4 planes of 56x56 K31 (split tiles, as at N=1).
fn sim_benchmark_cases() -> Vec<Case> {
    vec![
        case(2, 132, 32, 32, DwConv2d::new(31, 31)),
        case(2, 272, 7, 7, DwConv2d::new(13, 13)),
        case(1, 4, 56, 56, DwConv2d::new(31, 31)),
    ]
}

/// The planner branches the cases must reach (checked on both devices' case lists, so that a
/// planner change that stops packing planes makes this fail instead of silently testing less).
fn assert_plans_cover_packing_and_split_tiles(cases: &[Case]) {
    let plan_of = |cs: &Case| {
        let s = cs.conv.resolve(cs.n, cs.c, cs.h, cs.w).unwrap();
        let p = Problem::new(Op::Forward, Impl::Fast, DType::F32, &cs.conv, &s).unwrap();
        lkconv::plan::plan(&p).unwrap()
    };
    let plans: Vec<_> = cases.iter().map(plan_of).collect();
    assert!(
        plans.iter().any(|p| p.launches[0].block.2 > 1),
        "no case packs several planes into a block: {plans:?}"
    );
    // full-plane tiles (one tile row per plane) and split tiles (batch 1) for the 56x56 K31 layer
    assert_eq!(plans[0].launches[0].grid.1, 1, "{:?}", plans[0]);
    assert!(plans[2].launches[0].grid.1 > 1, "{:?}", plans[2]);
}

#[test]
fn benchmark_shape_cases_reach_the_planner_branches() {
    assert_plans_cover_packing_and_split_tiles(&gpu_benchmark_cases());
    assert_plans_cover_packing_and_split_tiles(&sim_benchmark_cases());
}

/// `$gpu` runs the body on the GPU at the benchmark shapes (skips without one), `$sim` in the
/// simulator at the reduced sizes.
macro_rules! benchmark_shape_tests {
    ($t:ty, $gpu:ident, $sim:ident) => {
        #[test]
        fn $gpu() {
            let Some(dev) = gpu() else { return };
            let stream = dev.new_stream().unwrap();
            let ex = CudaExec::on_stream(dev, stream).unwrap();
            check_benchmark_shapes::<$t>(&mut Runner::Gpu(ex), &gpu_benchmark_cases());
        }

        #[test]
        fn $sim() {
            check_benchmark_shapes::<$t>(&mut Runner::Sim, &sim_benchmark_cases());
        }
    };
}

benchmark_shape_tests!(
    f32,
    benchmark_shapes_f32_gpu,
    benchmark_shapes_f32_simulator
);
benchmark_shape_tests!(
    bf16,
    benchmark_shapes_bf16_gpu,
    benchmark_shapes_bf16_simulator
);
