//! The simulator as a sanitizer: every kernel gives bit-identical results under every thread
//! schedule (no races), a deliberately racy kernel does not, and memcheck stops a deliberately
//! out-of-bounds kernel by name.

mod common;

use std::collections::BTreeSet;

use common::{case, Case};

use half::{bf16, f16};
use lkconv::plan::model::{self as model_plan, DenseConvShape};
use lkconv::plan::{self, DwArgs, Launch, ModelAct};
use lkconv::problem::Problem;
use lkconv::sim::sanitize::{run_launches, LaunchData, NamedLaunch};
use lkconv::sim::{self, Schedule};
use lkconv::{device, Device};
use lkconv::{DType, DwConv2d, Element, Error, Impl, Op, Padding, Rng, Tensor};

/// The schedules every kernel must agree under (forward is the reference).
/// Forward and reverse first (the tensor-core check uses only those two).
fn schedules(rng: &mut Rng) -> [Schedule; 4] {
    let seed = rng.range(0, 1 << 30) as u64;
    [
        Schedule::Forward,
        Schedule::Reverse,
        Schedule::Random(seed),
        Schedule::Random(seed + 1),
    ]
}

/// Runs `f` under every schedule; Err names the first schedule whose result differs (bit for
/// bit) from the forward schedule's, or the first error.
fn schedule_invariant(
    what: &str,
    schedules: &[Schedule],
    f: impl Fn() -> lkconv::Result<Vec<u32>>,
) -> Result<(), String> {
    let run = |s: Schedule| sim::with_schedule(s, &f).map_err(|e| format!("{what} ({s}): {e}"));
    let want = run(schedules[0])?;
    for &s in &schedules[1..] {
        let got = run(s)?;
        if got != want {
            let i = got.iter().zip(&want).position(|(a, b)| a != b).unwrap_or(0);
            return Err(format!(
                "{what}: schedule {s} differs from {} at element {i} ({:#x} vs {:#x})",
                schedules[0],
                got.get(i).copied().unwrap_or(0),
                want.get(i).copied().unwrap_or(0)
            ));
        }
    }
    Ok(())
}

fn bits<T: Element>(t: Tensor<T>) -> Vec<u32> {
    t.data().iter().map(|v| v.to_f32().to_bits()).collect()
}

/// The kernel family of a name: dtype and template size stripped (`lk_fwd_f32_k31` -> `lk_fwd`).
fn family(name: &str) -> String {
    name.split('_')
        .filter(|p| !["f32", "f16", "bf16"].contains(p))
        .filter(|p| !(p.starts_with('k') && p[1..].parse::<u32>().is_ok()))
        .collect::<Vec<_>>()
        .join("_")
}

/// The usual shape families: odd and even kernels, a kernel larger than the image, batch 1 and
/// one channel, non-square images, several planes per block, filter chunks, stride, dilation, asymmetric padding.
fn cases() -> Vec<Case> {
    vec![
        case(2, 3, 13, 10, DwConv2d::new(7, 7)),
        case(1, 1, 9, 17, DwConv2d::new(5, 5)),
        case(2, 2, 6, 9, DwConv2d::new(13, 13)),
        case(1, 40, 5, 5, DwConv2d::new(3, 3)),
        case(2, 3, 20, 40, DwConv2d::new(3, 3)),
        case(1, 2, 11, 14, DwConv2d::new(4, 6)),
        case(1, 1, 30, 12, DwConv2d::new(101, 5)),
        case(
            1,
            2,
            12,
            15,
            DwConv2d::new(6, 3).with_padding_sides(Padding {
                top: 1,
                bottom: 4,
                left: 2,
                right: 0,
            }),
        ),
        case(
            2,
            2,
            14,
            11,
            DwConv2d::new(5, 5).with_stride(2, 2).with_padding(2, 2),
        ),
        // more than 64 taps: the strided weight gradient makes several passes
        case(
            1,
            2,
            12,
            12,
            DwConv2d::new(9, 9).with_stride(2, 2).with_padding(4, 4),
        ),
        case(
            1,
            3,
            13,
            13,
            DwConv2d::new(3, 4)
                .with_stride(1, 2)
                .with_dilation(2, 1)
                .with_padding(2, 1),
        ),
    ]
}

fn check_op<T: Element>(
    rng: &mut Rng,
    sch: &[Schedule],
    op: Op,
    imp: Impl,
    k: &Case,
    ran: &mut BTreeSet<String>,
) {
    let conv = &k.conv;
    let s = conv.resolve(k.n, k.c, k.h, k.w).expect("valid case");
    let x = Tensor::<T>::random(&s.input_dims(), rng).unwrap();
    let w = Tensor::<T>::random(&conv.weight_dims(s.c), rng).unwrap();
    let dy = Tensor::<T>::random(&s.output_dims(), rng).unwrap();
    let b = Tensor::<T>::random(&[s.c], rng).unwrap();
    let plan = plan::plan(&Problem::new(op, imp, T::DTYPE, conv, &s).unwrap()).unwrap();
    ran.extend(plan.launches.iter().map(|l| family(&l.kernel.name())));
    let what = format!(
        "{op:?} {imp:?} {} {:?} on {:?}",
        T::DTYPE,
        conv,
        s.input_dims()
    );
    let res = schedule_invariant(&what, sch, || {
        let out = match op {
            Op::Forward => device::forward(Device::Sim, imp, conv, &x, &w, Some(&b))?,
            Op::DataGrad => device::data_grad(Device::Sim, imp, conv, &dy, &w, (s.h, s.w))?,
            Op::WeightGrad => device::weight_grad(Device::Sim, imp, conv, &x, &dy)?,
        };
        assert!(
            out.data().iter().all(|v| v.to_f32().is_finite()),
            "{what}: non-finite output"
        );
        Ok(bits(out))
    });
    res.unwrap_or_else(|e| panic!("{e}"));
}

#[test]
fn every_conv_kernel_is_schedule_invariant() {
    let mut rng = common::rng();
    let sch = schedules(&mut rng);
    let mut ran = BTreeSet::new();
    for (i, k) in cases().iter().enumerate() {
        for op in Op::ALL {
            for imp in [Impl::Fast, Impl::Naive, Impl::Im2col] {
                check_op::<f32>(&mut rng, &sch, op, imp, k, &mut ran);
            }
            // the storage types share the code paths: one of them per case, fast path
            // and the tensor-core path (f16/bf16 only; warp-level mma between barriers).
            for imp in [Impl::Fast, Impl::TensorCore] {
                if i % 2 == 0 {
                    check_op::<f16>(&mut rng, &sch, op, imp, k, &mut ran);
                } else {
                    check_op::<bf16>(&mut rng, &sch, op, imp, k, &mut ran);
                }
            }
        }
    }
    // many channels: each block of the weight gradient loops over several (image, tile) items
    let k = case(2, 300, 16, 40, DwConv2d::new(3, 3));
    check_op::<f32>(&mut rng, &sch, Op::WeightGrad, Impl::Fast, &k, &mut ran);
    let model: BTreeSet<String> = ["lk_bias_act", "lk_affine", "lk_avgpool", "lk_dense_conv"]
        .map(String::from)
        .into();
    let all: BTreeSet<String> = plan::kernel_names().iter().map(|n| family(n)).collect();
    let missing: Vec<_> = all
        .difference(&ran)
        .filter(|f| !model.contains(*f))
        .collect();
    assert!(missing.is_empty(), "kernel families not run: {missing:?}");
}

/// Random f32 values as bytes.
fn random_bytes(rng: &mut Rng, n: usize) -> Vec<u8> {
    (0..n)
        .flat_map(|_| (rng.range(0, 2000) as f32 / 1000.0 - 1.0).to_le_bytes())
        .collect()
}

fn run_bits(l: &Launch, data: &LaunchData) -> lkconv::Result<Vec<u32>> {
    run_named(&NamedLaunch::from(l), data)
}

fn run_named(l: &NamedLaunch, data: &LaunchData) -> lkconv::Result<Vec<u32>> {
    let r = run_launches(std::slice::from_ref(l), data)?;
    Ok(r.out
        .bytes()
        .chunks_exact(4)
        .map(|c| u32::from_le_bytes([c[0], c[1], c[2], c[3]]))
        .collect())
}

#[test]
fn model_kernels_are_schedule_invariant() {
    let mut rng = common::rng();
    let sch = schedules(&mut rng);
    let (n, c, h, w) = (2, 5, 7, 9);
    let len = n * c * h * w;
    let x = random_bytes(&mut rng, len);
    let res = random_bytes(&mut rng, len);
    let per_channel = random_bytes(&mut rng, c);
    let per_channel2 = random_bytes(&mut rng, c);
    for act in [ModelAct::None, ModelAct::Relu, ModelAct::Gelu] {
        let l = model_plan::bias_act_launch(DType::F32, [n, c, h, w], act).unwrap();
        let data = LaunchData {
            in0: &x,
            in1: &res,
            bias: &per_channel,
            out_bytes: 4 * len,
            workspace_bytes: 0,
        };
        schedule_invariant(&format!("bias_act {act:?}"), &sch, || run_bits(&l, &data)).unwrap();
    }
    let l = model_plan::affine_launch(DType::F32, [n, c, h, w]).unwrap();
    let data = LaunchData {
        in0: &x,
        in1: &per_channel,
        bias: &per_channel2,
        out_bytes: 4 * len,
        workspace_bytes: 0,
    };
    schedule_invariant("affine", &sch, || run_bits(&l, &data)).unwrap();
    for transposed in [false, true] {
        let l = model_plan::avgpool_launch(DType::F32, [n, c, h, w], transposed).unwrap();
        let data = LaunchData {
            in0: &x,
            in1: &per_channel,
            bias: &per_channel2,
            out_bytes: 4 * n * c,
            workspace_bytes: 0,
        };
        schedule_invariant("avgpool", &sch, || run_bits(&l, &data)).unwrap();
    }
    let (cout, k, stride, pad) = (4, 3, 2, 1);
    let wt = random_bytes(&mut rng, cout * c * k * k);
    let bias = random_bytes(&mut rng, cout);
    let dense = DenseConvShape {
        cout,
        k,
        stride,
        pad,
    };
    let l = model_plan::dense_conv_launch(DType::F32, [n, c, h, w], dense, ModelAct::Relu).unwrap();
    let (oh, ow) = (
        (h + 2 * pad - k) / stride + 1,
        (w + 2 * pad - k) / stride + 1,
    );
    let data = LaunchData {
        in0: &x,
        in1: &wt,
        bias: &bias,
        out_bytes: 4 * n * cout * oh * ow,
        workspace_bytes: 0,
    };
    schedule_invariant("dense_conv", &sch, || run_bits(&l, &data)).unwrap();
}

fn test_launch(kernel: &str, grid: u32, block: u32, shared: u32, args: DwArgs) -> NamedLaunch {
    NamedLaunch {
        kernel: kernel.to_string(),
        grid: (grid, 1, 1),
        block: (block, 1, 1),
        shared_bytes: shared,
        args,
    }
}

#[test]
fn a_racy_kernel_fails_the_schedule_check() {
    let mut rng = common::rng();
    let l = test_launch("lksim_test_racy", 3, 64, 256, DwArgs::default());
    let data = LaunchData {
        out_bytes: 4 * 3 * 64,
        ..LaunchData::default()
    };
    let err = schedule_invariant("racy", &schedules(&mut rng), || run_named(&l, &data))
        .expect_err("the race must be seen");
    assert!(err.contains("differs"), "{err}");
    // and it passes a check that only repeats the forward schedule
    schedule_invariant("racy", &[Schedule::Forward; 2], || run_named(&l, &data)).unwrap();
}

#[test]
fn a_bad_schedule_is_a_typed_error() {
    assert!(matches!(
        "random:".parse::<Schedule>(),
        Err(Error::InvalidArgument(_))
    ));
}

/// Runs `lksim_test_oob` on buffers of `len` f32 elements: thread idx < threads touches element
/// idx + offset of `out` (write) or of `in0` (read).
fn oob(len: usize, threads: usize, offset: i64, read: bool) -> lkconv::Result<()> {
    let args = DwArgs {
        aux0: threads as i32,
        aux1: read as i32,
        aux2: offset as i32,
        ..DwArgs::default()
    };
    let l = test_launch("lksim_test_oob", threads.div_ceil(128) as u32, 128, 0, args);
    let input = vec![0u8; 4 * len];
    let data = LaunchData {
        in0: &input,
        out_bytes: 4 * len,
        ..LaunchData::default()
    };
    run_launches(&[l], &data).map(|_| ())
}

fn expect_oob(r: lkconv::Result<()>, want: &[&str]) {
    match r {
        Err(Error::Simulator(m)) => {
            assert!(m.starts_with("lksim_test_oob"), "{m}");
            for w in want {
                assert!(m.contains(w), "{m} lacks {w}");
            }
        }
        other => panic!("out-of-bounds access not reported: {other:?}"),
    }
}

#[test]
fn memcheck_stops_out_of_bounds_kernels_by_name() {
    const PAGE: usize = 4096;
    for len in [1000, 1003, 1024, 4096] {
        let bytes = 4 * len;
        oob(len, len, 0, false).unwrap();
        oob(len, len, 0, true).unwrap();
        // every thread one element further: the last one touches the element past the end,
        // in the guard page when the size is a multiple of 16 bytes, else in the canary
        if bytes % 16 == 0 {
            expect_oob(
                oob(len, len, 1, false),
                &["write 0 bytes past the end of `out`"],
            );
            expect_oob(oob(len, len, 1, true), &["0 bytes past the end of `in0`"]);
        } else {
            expect_oob(oob(len, len, 1, false), &["write next to `out`"]);
        }
        // almost a page past the end: the guard page
        expect_oob(
            oob(len, 1, len as i64 + 1000, true),
            &["past the end of `in0`"],
        );
        // one element before the start: the canary in front of the buffer
        expect_oob(oob(len, 1, -1, false), &["write next to `out`"]);
        // the first element of the front guard page (the layout of sim_memcheck.h)
        let data = (bytes + 16).div_ceil(PAGE) * PAGE;
        let front = (data - bytes) & !15;
        let want = format!("write {} bytes before the start of `out`", front + 4);
        expect_oob(oob(len, 1, -((front / 4) as i64) - 1, false), &[&want]);
    }
}

#[test]
fn guarded_buffers_hold_their_data() {
    let data: Vec<f32> = (0..777).map(|i| i as f32 * 0.5).collect();
    let b = sim::GuardedBuf::copy_of(&data, "x").unwrap();
    assert_eq!(b.len(), 777 * 4);
    assert_eq!(b.addr() % 16, 0);
    assert_eq!(b.to_vec::<f32>(), data);
}

#[test]
fn initcheck_stops_reads_of_never_written_shared_memory() {
    let run = |kernel: &'static str, all_write: bool| {
        let args = DwArgs {
            aux0: all_write as i32,
            ..DwArgs::default()
        };
        let l = test_launch(kernel, 2, 64, 256, args);
        let data = LaunchData {
            out_bytes: 4 * 2 * 64,
            ..LaunchData::default()
        };
        run_launches(&[l], &data)
    };
    let r = run("lksim_test_uninit", true).unwrap();
    let got = r.out.to_vec::<f32>();
    assert!(got
        .iter()
        .enumerate()
        .all(|(i, &v)| v == ((i % 64) ^ 1) as f32));
    for kernel in ["lksim_test_uninit", "lksim_test_uninit_vec"] {
        match run(kernel, false) {
            Err(Error::Simulator(m)) => {
                assert!(m.starts_with(kernel), "{m}");
                assert!(m.contains("never-written shared memory"), "{m}");
            }
            other => panic!("{kernel}: uninitialised read not reported: {other:?}"),
        }
    }
}
