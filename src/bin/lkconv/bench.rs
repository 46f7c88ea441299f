//! `lkconv bench`: median time, GFLOP/s and share of the machine's ceiling for each pass and
//! implementation, on the RepLKNet-31B layer shapes or a given one.

use std::time::{Duration, Instant};

use half::{bf16, f16};
use lkconv::device::{self, Device, Impl, Op};
use lkconv::{ConvShape, DType, DwConv2d, Element, Error, Result, Rng, Tensor};

use crate::args::{kernel_list, pair, shape4};
use crate::plot;
use crate::BenchArgs;

/// RepLKNet-31B's four large-kernel layers at batch 1: (C, H=W, K).
pub const REPLKNET_31B_LAYERS: [(usize, usize, usize); 4] =
    [(128, 56, 31), (256, 28, 29), (512, 14, 27), (1024, 7, 13)];

struct Record {
    op: Op,
    imp: Impl,
    conv: DwConv2d,
    shape: ConvShape,
    timing: Timing,
    gflops: f64,
}

/// What one case's repetitions measured.
#[derive(Clone, Copy, Debug)]
pub struct Timing {
    pub median_ms: f64,
    pub min_ms: f64,
    /// Process CPU time per repetition (all threads), where the OS reports it: on a machine
    /// shared with other work, wall-clock times include waiting for a core and CPU time does not.
    pub cpu_ms: Option<f64>,
}

/// CPU time consumed by this process so far (all threads), in milliseconds.
pub fn process_cpu_ms() -> Option<f64> {
    #[cfg(target_os = "linux")]
    {
        #[repr(C)]
        struct Timespec {
            sec: i64,
            nsec: i64,
        }
        extern "C" {
            fn clock_gettime(clock: i32, ts: *mut Timespec) -> i32;
        }
        const CLOCK_PROCESS_CPUTIME_ID: i32 = 2;
        let mut ts = Timespec { sec: 0, nsec: 0 };
        // SAFETY: FFI to libc's clock_gettime with a valid, exclusively borrowed timespec
        // (two 64-bit fields on 64-bit Linux, as declared).
        let rc = unsafe { clock_gettime(CLOCK_PROCESS_CPUTIME_ID, &mut ts) };
        if rc == 0 && cfg!(target_pointer_width = "64") {
            return Some(ts.sec as f64 * 1e3 + ts.nsec as f64 / 1e6);
        }
        None
    }
    #[cfg(not(target_os = "linux"))]
    None
}

/// Peak resident memory of this process so far (VmHWM), in MiB, where the OS reports it.
pub fn peak_rss_mib() -> Option<f64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = status.lines().find(|l| l.starts_with("VmHWM:"))?;
    let kib: f64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kib / 1024.0)
}

/// Times `run` `reps` times (after one warm-up), for at most ~`budget_s` seconds of measuring
/// (infinite: exactly `reps`).
pub fn time_reps(
    reps: usize,
    budget_s: f64,
    mut run: impl FnMut() -> Result<()>,
) -> Result<(Timing, Vec<f64>)> {
    run()?;
    let budget = Instant::now();
    // Capped: a huge --reps must not reserve memory before the budget stops it.
    let mut times = Vec::with_capacity(reps.min(4096));
    let cpu0 = process_cpu_ms();
    while times.len() < reps.max(1)
        && (times.is_empty() || budget.elapsed().as_secs_f64() < budget_s)
    {
        let t0 = Instant::now();
        run()?;
        times.push(t0.elapsed().as_secs_f64() * 1e3);
    }
    let cpu_ms = match (cpu0, process_cpu_ms()) {
        (Some(a), Some(b)) => Some((b - a) / times.len() as f64),
        _ => None,
    };
    let mut sorted = times.clone();
    sorted.sort_by(f64::total_cmp);
    let timing = Timing {
        median_ms: sorted[sorted.len() / 2],
        min_ms: sorted[0],
        cpu_ms,
    };
    Ok((timing, times))
}

pub fn run(args: &BenchArgs) -> Result<()> {
    // a chart that cannot be written fails before the measuring, not after it
    if let Some(path) = &args.plot {
        plot::check_target(path)?;
    }
    let device = if args.device == "auto" {
        Device::auto()
    } else {
        args.device.parse()?
    };
    let dtype: DType = args.dtype.parse()?;
    let ops: Vec<Op> = if args.op == "all" {
        Op::ALL.to_vec()
    } else {
        vec![args.op.parse()?]
    };
    let impls: Vec<Impl> = match &args.implementation {
        Some(s) => vec![s.parse()?],
        None => match device {
            Device::Cuda(_) | Device::Sim => vec![Impl::Fast, Impl::Naive, Impl::Im2col],
            Device::CpuRef => vec![Impl::Reference],
            Device::Cpu => vec![Impl::Fast, Impl::Naive, Impl::Im2col, Impl::Reference],
        },
    };
    let kernels: Vec<(usize, usize)> = match &args.kernels {
        Some(list) => kernel_list(list)?.into_iter().map(|k| (k, k)).collect(),
        None => vec![pair("--kernel", args.kernel.as_deref().unwrap_or("31"))?],
    };
    let problems: Vec<(DwConv2d, ConvShape)> = match &args.shape {
        Some(s) => {
            let [n, c, h, w] = shape4(s)?;
            kernels
                .iter()
                .map(|&(kh, kw)| {
                    let conv = DwConv2d::new(kh, kw);
                    conv.resolve(n, c, h, w).map(|s| (conv, s))
                })
                .collect::<Result<_>>()?
        }
        None => REPLKNET_31B_LAYERS
            .iter()
            .map(|&(c, hw, k)| {
                let conv = DwConv2d::new(k, k);
                conv.resolve(1, c, hw, hw).map(|s| (conv, s))
            })
            .collect::<Result<_>>()?,
    };
    if args.reps == 0 {
        return Err(Error::InvalidArgument("--reps must be at least 1".into()));
    }
    let (ceiling, ceiling_label) = match device {
        Device::Cuda(ordinal) => lkconv::cuda::peak_fp32_gflops(ordinal)?,
        _ => (
            lkconv::cpu::ceiling::fma_ceiling_gflops(),
            format!("measured with {}", lkconv::cpu::direct::simd_description()),
        ),
    };

    let start = Instant::now();
    let total = problems.len() * ops.len() * impls.len();
    let mut records = Vec::new();
    for (conv, shape) in &problems {
        for &op in &ops {
            for &imp in &impls {
                if start.elapsed() > Duration::from_secs(1) {
                    eprintln!(
                        "[{}/{}] {} {} {} C{} {}x{} K{}",
                        records.len() + 1,
                        total,
                        op.name(),
                        imp.name(),
                        device,
                        shape.c,
                        shape.h,
                        shape.w,
                        conv.kernel.0
                    );
                }
                let timing = match dtype {
                    DType::F32 => time_case::<f32>(device, op, imp, conv, shape, args.reps)?,
                    DType::F16 => time_case::<f16>(device, op, imp, conv, shape, args.reps)?,
                    DType::Bf16 => time_case::<bf16>(device, op, imp, conv, shape, args.reps)?,
                };
                let gflops = conv.flops(shape) / (timing.median_ms * 1e6);
                records.push(Record {
                    op,
                    imp,
                    conv: *conv,
                    shape: *shape,
                    timing,
                    gflops,
                });
            }
        }
    }

    if let Some(path) = &args.plot {
        let fig = figure(args, device, dtype, &records)?;
        plot::render(&fig, path)?;
        eprintln!("chart: {}", path.display());
    }
    if args.json {
        let items: Vec<serde_json::Value> = records
            .iter()
            .map(|r| {
                serde_json::json!({
                    "op": r.op.name(), "device": device.to_string(), "dtype": dtype.name(), "impl": r.imp.name(),
                    "n": r.shape.n, "c": r.shape.c, "h": r.shape.h, "w": r.shape.w,
                    "kh": r.conv.kernel.0, "kw": r.conv.kernel.1,
                    "median_ms": r.timing.median_ms, "min_ms": r.timing.min_ms,
                    "cpu_ms": r.timing.cpu_ms, "gflops": r.gflops,
                })
            })
            .collect();
        println!("{}", serde_json::Value::Array(items));
        return Ok(());
    }
    println!("device {device}, dtype {dtype}; GFLOP/s nominal (2*N*C*OH*OW*KH*KW); ceiling {ceiling:.1} GFLOP/s ({ceiling_label})");
    println!(
        "{:<6} {:<10} {:>5} {:>5} {:>9} {:>7} {:>11} {:>10} {:>9} {:>10}",
        "op", "impl", "N", "C", "HxW", "K", "median ms", "GFLOP/s", "% ceil", "vs naive"
    );
    for r in &records {
        let naive = records
            .iter()
            .find(|o| {
                o.imp == Impl::Naive && o.op == r.op && o.shape == r.shape && o.conv == r.conv
            })
            .map(|o| format!("{:.1}x", o.timing.median_ms / r.timing.median_ms))
            .unwrap_or_else(|| "-".into());
        println!(
            "{:<6} {:<10} {:>5} {:>5} {:>9} {:>7} {:>11.3} {:>10.2} {:>8.1}% {:>10}",
            r.op.name(),
            r.imp.name(),
            r.shape.n,
            r.shape.c,
            format!("{}x{}", r.shape.h, r.shape.w),
            format!("{}x{}", r.conv.kernel.0, r.conv.kernel.1),
            r.timing.median_ms,
            r.gflops,
            100.0 * r.gflops / ceiling,
            naive
        );
    }
    Ok(())
}

/// The processor's or GPU's name, for charts.
pub fn machine_name(device: Device) -> String {
    if let Device::Cuda(ordinal) = device {
        return lkconv::cuda::CudaDevice::shared(ordinal)
            .map(|d| d.info().name.clone())
            .unwrap_or_else(|_| device.to_string());
    }
    let cpu = std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|t| {
            t.lines()
                .find(|l| l.starts_with("model name"))
                .and_then(|l| l.split(':').nth(1))
                .map(|m| m.split_whitespace().collect::<Vec<_>>().join(" "))
        })
        .unwrap_or_else(|| "CPU".into());
    format!(
        "{cpu}, {} threads, {}",
        rayon::current_num_threads(),
        lkconv::cpu::direct::simd_description()
    )
}

/// The chart of a run: one panel per pass; bars per layer and implementation, or (with
/// --kernels) time against kernel size per implementation.
fn figure(
    args: &BenchArgs,
    device: Device,
    dtype: DType,
    records: &[Record],
) -> Result<plot::Figure> {
    let sweep = args.kernels.is_some();
    let points: Vec<plot::Point> = records
        .iter()
        .map(|r| {
            let s = &r.shape;
            let (kh, kw) = r.conv.kernel;
            let k = if kh == kw {
                format!("K{kh}")
            } else {
                format!("K{kh}x{kw}")
            };
            let n = if s.n == 1 {
                String::new()
            } else {
                format!("N{} ", s.n)
            };
            plot::Point {
                panel: pass_title(r.op).into(),
                series: r.imp.name().into(),
                x: if sweep {
                    plot::XKey::Kernel(kh)
                } else {
                    plot::XKey::Category(format!("{n}C{} {}x{} {k}", s.c, s.h, s.w))
                },
                value: r.timing.median_ms,
            }
        })
        .collect();
    let (kind, title, x_label) = if sweep {
        let s = &records[0].shape;
        (
            plot::Kind::KernelSweep,
            format!(
                "lkconv bench: time against kernel size, {}x{}x{}x{}",
                s.n, s.c, s.h, s.w
            ),
            "kernel size K (KxK, same padding)",
        )
    } else {
        (
            plot::Kind::Bars,
            "lkconv bench: time per layer and implementation".to_string(),
            "layer (N=1 unless given; C, HxW, kernel)",
        )
    };
    let subtitle = format!(
        "{device}: {}; {dtype}; median of at least {} run{}; lower is better",
        machine_name(device),
        args.reps,
        if args.reps == 1 { "" } else { "s" }
    );
    plot::Figure::new(
        kind,
        &title,
        &subtitle,
        x_label,
        "median time (ms)",
        &points,
    )
}

fn pass_title(op: Op) -> &'static str {
    match op {
        Op::Forward => "forward (fwd)",
        Op::DataGrad => "data gradient (dgrad)",
        Op::WeightGrad => "weight gradient (wgrad)",
    }
}

/// Times `reps` runs (after one warm-up), at most ~3 s of measuring.
fn time_case<T: Element>(
    device: Device,
    op: Op,
    imp: Impl,
    conv: &DwConv2d,
    s: &ConvShape,
    reps: usize,
) -> Result<Timing> {
    if let Device::Cuda(ordinal) = device {
        let p = lkconv::Problem::new(op, imp, T::DTYPE, conv, s)?;
        let ms = lkconv::cuda::time_op(ordinal, &p, 3, reps.max(10))?;
        return Ok(Timing {
            median_ms: ms,
            min_ms: ms,
            cpu_ms: None,
        });
    }
    let mut rng = Rng::new(0x5eed);
    let x = Tensor::<T>::random(&s.input_dims(), &mut rng)?;
    let w = Tensor::<T>::random(&conv.weight_dims(s.c), &mut rng)?;
    let dy = Tensor::<T>::random(&s.output_dims(), &mut rng)?;
    let run = || -> Result<()> {
        match op {
            Op::Forward => device::forward(device, imp, conv, &x, &w, None).map(drop),
            Op::DataGrad => device::data_grad(device, imp, conv, &dy, &w, (s.h, s.w)).map(drop),
            Op::WeightGrad => device::weight_grad(device, imp, conv, &x, &dy).map(drop),
        }
    };
    Ok(time_reps(reps, 3.0, run)?.0)
}
