//! The CUDA device against the f64 reference.
//!
//! Every test that needs a GPU prints "skipped: no CUDA device (<reason>)" and returns when
//! there is none (no driver, no device, or a build without nvcc), unless
//! `LKCONV_REQUIRE_GPU=1`, which turns the skip into a failure (the GPU bundle sets it).
//! The shape-checking and no-driver tests run everywhere.

use std::sync::Arc;

use cudarc::driver::{DevicePtr, DevicePtrMut};
use half::{bf16, f16};
use lkconv::cpu::reference;
use lkconv::cuda::{self, CudaDevice, CudaElement, CudaExec, DeviceTensor, RawOperands};
use lkconv::{DType, Device, DwConv2d, Element, Error, Impl, Op, Padding, Problem, Rng, Tensor};

const IMPLS: [Impl; 3] = [Impl::Fast, Impl::Naive, Impl::Im2col];

fn require_gpu() -> bool {
    std::env::var("LKCONV_REQUIRE_GPU").is_ok_and(|v| v == "1")
}

/// The GPU with its kernels loaded, or None after printing why (panics when a GPU is required).
fn gpu() -> Option<Arc<CudaDevice>> {
    let reason = if !cuda::kernels_compiled() {
        "built without CUDA kernels".to_string()
    } else {
        match CudaDevice::shared(0) {
            Ok(d) if d.kernels_loaded() => return Some(d),
            Ok(_) => "the embedded kernels failed to load".to_string(),
            Err(e) => e.to_string(),
        }
    };
    if require_gpu() {
        panic!("LKCONV_REQUIRE_GPU=1 but no usable CUDA device: {reason}");
    }
    println!("skipped: no CUDA device ({reason})");
    None
}

/// One problem: sizes and the convolution.
#[derive(Clone, Copy, Debug)]
struct Case {
    n: usize,
    c: usize,
    h: usize,
    w: usize,
    conv: DwConv2d,
}

fn case(n: usize, c: usize, h: usize, w: usize, conv: DwConv2d) -> Case {
    Case { n, c, h, w, conv }
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

fn data<T: Element>(cs: &Case, seed: u64) -> Data<T> {
    let mut rng = Rng::new(seed);
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

fn abs(t: &Tensor<f32>) -> Tensor<f32> {
    Tensor::from_vec(t.shape(), t.data().iter().map(|v| v.abs()).collect()).unwrap()
}

/// The reference result in f32 (from the f64 oracle on the exact f32 images of the inputs)
/// and the magnitude bound (the same op on absolute values) that scales the tolerance.
fn reference_of<T: Element>(op: Op, cs: &Case, d: &Data<T>) -> (Tensor<f32>, Tensor<f32>) {
    let (x, w, b, dy) = (
        d.x.cast::<f32>(),
        d.w.cast::<f32>(),
        d.b.cast::<f32>(),
        d.dy.cast::<f32>(),
    );
    let conv = &cs.conv;
    match op {
        Op::Forward => (
            reference::forward(conv, &x, &w, Some(&b)).unwrap(),
            reference::forward(conv, &abs(&x), &abs(&w), Some(&abs(&b))).unwrap(),
        ),
        Op::DataGrad => (
            reference::data_grad(conv, &dy, &w, (cs.h, cs.w)).unwrap(),
            reference::data_grad(conv, &abs(&dy), &abs(&w), (cs.h, cs.w)).unwrap(),
        ),
        Op::WeightGrad => (
            reference::weight_grad(conv, &x, &dy).unwrap(),
            reference::weight_grad(conv, &abs(&x), &abs(&dy)).unwrap(),
        ),
    }
}

/// |got - want| <= eps(T) |want| + 3e-5 * magnitude + 1e-6 everywhere (NaN fails).
fn assert_close<T: Element>(what: &str, got: &Tensor<T>, want: &Tensor<f32>, mag: &Tensor<f32>) {
    assert_eq!(got.shape(), want.shape(), "{what}: shape");
    let eps = T::DTYPE.epsilon();
    let mut bad = Vec::new();
    let mut worst = 0f64;
    for (i, ((g, r), m)) in got
        .data()
        .iter()
        .zip(want.data())
        .zip(mag.data())
        .enumerate()
    {
        let (g, r, m) = (g.to_f64(), *r as f64, *m as f64);
        let tol = eps * r.abs() + 3e-5 * m + 1e-6;
        let err = (g - r).abs();
        worst = worst.max(err / tol);
        // NaN compares false, so an unwritten (poisoned) element fails here.
        if err.is_nan() || err > tol {
            bad.push(format!("[{i}] got {g} want {r} (tol {tol:.3e})"));
        }
    }
    assert!(
        bad.is_empty(),
        "{what}: {} of {} elements wrong, e.g. {:?}",
        bad.len(),
        got.len(),
        &bad[..bad.len().min(6)]
    );
    assert!(worst.is_finite(), "{what}: non-finite error");
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
            let (want, mag) = reference_of(op, cs, &d);
            for imp in IMPLS {
                let what = format!("{} {} {} {:?}", T::DTYPE, op.name(), imp.name(), cs);
                let got = run_device::<T>(&mut ex, op, imp, cs, &d)
                    .unwrap_or_else(|e| panic!("{what}: {e}"));
                assert_close(&what, &got, &want, &mag);
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
            let (want, mag) = reference_of(Op::Forward, cs, &d);
            assert_close(&format!("host fwd {imp:?} {cs:?}"), &y, &want, &mag);
            let y0 =
                lkconv::device::forward(Device::Cuda(0), imp, &cs.conv, &d.x, &d.w, None).unwrap();
            let want0 = reference::forward(&cs.conv, &d.x, &d.w, None).unwrap();
            assert_close(
                &format!("host fwd no bias {imp:?} {cs:?}"),
                &y0,
                &want0,
                &mag,
            );
            let dx = lkconv::device::data_grad(
                Device::Cuda(0),
                imp,
                &cs.conv,
                &d.dy,
                &d.w,
                (cs.h, cs.w),
            )
            .unwrap();
            let (want, mag) = reference_of(Op::DataGrad, cs, &d);
            assert_close(&format!("host dgrad {imp:?} {cs:?}"), &dx, &want, &mag);
            let dw =
                lkconv::device::weight_grad(Device::Cuda(0), imp, &cs.conv, &d.x, &d.dy).unwrap();
            let (want, mag) = reference_of(Op::WeightGrad, cs, &d);
            assert_close(&format!("host wgrad {imp:?} {cs:?}"), &dw, &want, &mag);
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
    let (want, mag) = reference_of(Op::Forward, &cs, &d);
    assert_close("host f16 fwd", &y, &want, &mag);
    let d = data::<bf16>(&cs, 4);
    let dw =
        lkconv::device::weight_grad(Device::Cuda(0), Impl::Fast, &cs.conv, &d.x, &d.dy).unwrap();
    let (want, mag) = reference_of(Op::WeightGrad, &cs, &d);
    assert_close("host bf16 wgrad", &dw, &want, &mag);
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
    let mut y = DeviceTensor::<f32>::zeros(&stream, &s.output_dims()).unwrap();
    let mut dx = DeviceTensor::<f32>::zeros(&stream, &s.input_dims()).unwrap();
    let mut dw = DeviceTensor::<f32>::zeros(&stream, &cs.conv.weight_dims(cs.c)).unwrap();
    // y = conv(x, w); then use y as the output gradient: dx = conv^T(y, w), dw = corr(x, y).
    cuda::forward(&mut ex, Impl::Fast, &cs.conv, &x, &w, None, &mut y).unwrap();
    cuda::data_grad(&mut ex, Impl::Fast, &cs.conv, &y, &w, &mut dx).unwrap();
    cuda::weight_grad(&mut ex, Impl::Fast, &cs.conv, &x, &y, &mut dw).unwrap();
    let y_ref = reference::forward(&cs.conv, &d.x, &d.w, None).unwrap();
    let y_host = y.to_host().unwrap();
    let mag = reference::forward(&cs.conv, &abs(&d.x), &abs(&d.w), None).unwrap();
    assert_close("chained fwd", &y_host, &y_ref, &mag);
    let dx_ref = reference::data_grad(&cs.conv, &y_host, &d.w, (cs.h, cs.w)).unwrap();
    let dx_mag = reference::data_grad(&cs.conv, &mag, &abs(&d.w), (cs.h, cs.w)).unwrap();
    assert_close("chained dgrad", &dx.to_host().unwrap(), &dx_ref, &dx_mag);
    let dw_ref = reference::weight_grad(&cs.conv, &d.x, &y_host).unwrap();
    let dw_mag = reference::weight_grad(&cs.conv, &abs(&d.x), &mag).unwrap();
    assert_close("chained wgrad", &dw.to_host().unwrap(), &dw_ref, &dw_mag);
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
    let mut y = DeviceTensor::from_host(&stream, &nan_tensor::<f32>(&s.output_dims())).unwrap();
    let mut dx = DeviceTensor::from_host(&stream, &nan_tensor::<f32>(&s.input_dims())).unwrap();
    let mut dw =
        DeviceTensor::from_host(&stream, &nan_tensor::<f32>(&cs.conv.weight_dims(cs.c))).unwrap();
    for imp in IMPLS {
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
            let (want, mag) = reference_of(op, &cs, &d);
            let got = match op {
                Op::Forward => y.to_host(),
                Op::DataGrad => dx.to_host(),
                Op::WeightGrad => dw.to_host(),
            }
            .unwrap();
            assert_close(
                &format!("raw {} {}", op.name(), imp.name()),
                &got,
                &want,
                &mag,
            );
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
