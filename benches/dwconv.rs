//! CPU benchmarks: fwd / dgrad / wgrad x {fast, naive, im2col} on RepLKNet-31B's four
//! large-kernel layers (batch 1). Throughput is nominal FLOPs (2*N*C*OH*OW*KH*KW).
//! GPU benchmarks live in benches/gpu.rs.

use std::time::Duration;

use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};
use lkconv::device::{self, Device, Impl, Op};
use lkconv::{DwConv2d, Rng, Tensor};

const LAYERS: [(usize, usize, usize); 4] =
    [(128, 56, 31), (256, 28, 29), (512, 14, 27), (1024, 7, 13)];

fn bench_cpu(c: &mut Criterion) {
    let mut rng = Rng::new(42);
    for op in Op::ALL {
        let mut group = c.benchmark_group(format!("cpu_{}", op.name()));
        group
            .sample_size(10)
            .warm_up_time(Duration::from_millis(500))
            .measurement_time(Duration::from_secs(3));
        for (ch, hw, k) in LAYERS {
            let conv = DwConv2d::new(k, k);
            let s = conv.resolve(1, ch, hw, hw).expect("valid layer");
            let x = Tensor::<f32>::random(&s.input_dims(), &mut rng).expect("shape");
            let w = Tensor::<f32>::random(&conv.weight_dims(ch), &mut rng).expect("shape");
            let dy = Tensor::<f32>::random(&s.output_dims(), &mut rng).expect("shape");
            group.throughput(Throughput::Elements(conv.flops(&s) as u64));
            for imp in [Impl::Fast, Impl::Naive, Impl::Im2col] {
                let id = BenchmarkId::new(imp.name(), format!("c{ch}_{hw}x{hw}_k{k}"));
                group.bench_with_input(id, &imp, |b, &imp| {
                    b.iter(|| match op {
                        Op::Forward => {
                            device::forward(Device::Cpu, imp, &conv, &x, &w, None).map(drop)
                        }
                        Op::DataGrad => {
                            device::data_grad(Device::Cpu, imp, &conv, &dy, &w, (hw, hw)).map(drop)
                        }
                        Op::WeightGrad => {
                            device::weight_grad(Device::Cpu, imp, &conv, &x, &dy).map(drop)
                        }
                    })
                });
            }
        }
        group.finish();
    }
}

criterion_group!(benches, bench_cpu);
criterion_main!(benches);
