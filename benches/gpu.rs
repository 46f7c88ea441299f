//! GPU benchmarks: fwd / dgrad / wgrad x {fast, naive, im2col} x {f32, f16, bf16} on the four
//! RepLKNet-31B layer shapes at N=1 and N=64, the RepLKNet paper's 64x384x32x32 K31 setting and
//! the wide 8x128x256x200 K31 case. Timed with CUDA events (`iter_custom`): each sample queues
//! its iterations back to back on one stream between two events. Throughput is nominal FLOPs
//! (2 N C OH OW KH KW), shown by criterion as "elem/s".
//!
//! Without a GPU (no driver, no device, or a build without nvcc) it prints one line,
//! "skipping GPU benchmarks: <reason>", and exits 0.
//!
//! `LKCONV_BENCH_QUICK=1` (the GPU bundle): short warm-up and measurement, half types only on
//! the N=64 and extra shapes, and a wall-clock budget (`LKCONV_BENCH_BUDGET_S`, default 150 s in
//! quick mode) after which the remaining benchmarks are skipped with a printed line.
//! Problems that cannot run (e.g. im2col's patch matrix does not fit in device memory) are
//! skipped with a printed line.

use std::sync::Arc;
use std::time::{Duration, Instant};

use criterion::{BenchmarkId, Criterion, SamplingMode, Throughput};
use lkconv::cuda::{self, CudaDevice, PreparedOp, ProblemBuffers};
use lkconv::{ConvShape, DType, DwConv2d, Impl, Op};

const IMPLS: [Impl; 3] = [Impl::Fast, Impl::Naive, Impl::Im2col];

/// (label, convolution, shape), N=64 layers first.
fn problems(quick_half: bool) -> Vec<(String, DwConv2d, ConvShape)> {
    let layers = [(128, 56, 31), (256, 28, 29), (512, 14, 27), (1024, 7, 13)];
    let mut v = Vec::new();
    let mut push = |n: usize, c: usize, h: usize, w: usize, k: usize| {
        let conv = DwConv2d::new(k, k);
        let shape = conv
            .resolve(n, c, h, w)
            .expect("benchmark shapes are valid");
        v.push((format!("n{n}_c{c}_{h}x{w}_k{k}"), conv, shape));
    };
    for &(c, hw, k) in &layers {
        push(64, c, hw, hw, k);
    }
    push(64, 384, 32, 32, 31);
    push(8, 128, 256, 200, 31);
    if !quick_half {
        for &(c, hw, k) in &layers {
            push(1, c, hw, hw, k);
        }
    }
    v
}

/// The GPU with its kernels, or why not.
fn device() -> Result<Arc<CudaDevice>, String> {
    if !cuda::kernels_compiled() {
        return Err("built without CUDA kernels (nvcc not found at build time)".into());
    }
    let dev = CudaDevice::shared(0).map_err(|e| e.to_string())?;
    if !dev.kernels_loaded() {
        return Err("the embedded CUDA kernels failed to load on this device".into());
    }
    Ok(dev)
}

fn main() {
    let dev = match device() {
        Ok(d) => d,
        Err(reason) => {
            println!("skipping GPU benchmarks: {reason}");
            return;
        }
    };
    let quick = std::env::var("LKCONV_BENCH_QUICK").is_ok_and(|v| v == "1");
    let budget = std::env::var("LKCONV_BENCH_BUDGET_S")
        .ok()
        .and_then(|v| v.parse::<f64>().ok())
        .or(quick.then_some(150.0))
        .map(Duration::from_secs_f64);
    println!("{}", dev.info().summary());
    println!("FP32 peak: {}", dev.info().peak_fp32_note());
    println!(
        "kernels: {} ({})",
        cuda::nvcc_version(),
        cuda::compiled_archs()
    );

    let mut c = Criterion::default();
    c = if quick {
        c.warm_up_time(Duration::from_millis(50))
            .measurement_time(Duration::from_millis(250))
            .sample_size(10)
    } else {
        c.warm_up_time(Duration::from_millis(500))
            .measurement_time(Duration::from_secs(2))
            .sample_size(20)
    };
    let mut c = c.configure_from_args();
    let start = Instant::now();
    let over_budget = || budget.is_some_and(|b| start.elapsed() > b);

    for dtype in DType::ALL {
        let half = dtype != DType::F32;
        for (label, conv, shape) in problems(quick && half) {
            if over_budget() {
                println!("skip {dtype}/{label}: time budget spent");
                continue;
            }
            let stream = match dev.new_stream() {
                Ok(s) => s,
                Err(e) => {
                    println!("skip {dtype}/{label}: {e}");
                    continue;
                }
            };
            let bufs = match ProblemBuffers::new(&stream, dtype, &conv, &shape, 0xbe4c) {
                Ok(b) => Arc::new(b),
                Err(e) => {
                    println!("skip {dtype}/{label}: {e}");
                    continue;
                }
            };
            let mut group = c.benchmark_group(format!("{dtype}/{label}"));
            group
                .sampling_mode(SamplingMode::Flat)
                .throughput(Throughput::Elements(conv.flops(&shape) as u64));
            for op in Op::ALL {
                for imp in IMPLS {
                    let id = format!("{}/{}", op.name(), imp.name());
                    if over_budget() {
                        println!("skip {dtype}/{label}/{id}: time budget spent");
                        continue;
                    }
                    let prepared =
                        PreparedOp::new(dev.clone(), stream.clone(), bufs.clone(), op, imp);
                    // One trial run, so that a failure is reported here and not inside criterion.
                    let mut p = match prepared.and_then(|mut p| p.time_batch_ms(1).map(|_| p)) {
                        Ok(p) => p,
                        Err(e) => {
                            println!("skip {dtype}/{label}/{id}: {e}");
                            continue;
                        }
                    };
                    group.bench_function(BenchmarkId::new(op.name(), imp.name()), |b| {
                        b.iter_custom(|iters| {
                            let ms = p
                                .time_batch_ms(iters as usize)
                                .unwrap_or_else(|e| panic!("{dtype}/{label}/{id}: {e}"));
                            Duration::from_secs_f64(ms / 1e3)
                        })
                    });
                }
            }
            group.finish();
        }
    }
    c.final_summary();
}
