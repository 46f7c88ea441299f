//! bf16 CPU kernels beside their f32 counterparts, in one run (ratios are what to read on a
//! shared machine): the depthwise forward, data gradient and weight gradient at RepLKNet-31B's
//! four large-kernel layers, and the 1x1 convolutions at the ConvFFN / RepLK-block shapes (the
//! engine's own layer, `Pointwise::forward_into`, over the pool as the model runs them).
//! `cargo bench --bench bf16` (`-- --reps N`).

use lkconv::cpu::activation::Activation;
use lkconv::cpu::bf16::{self as b16, Bf16Input, Bf16Isa, Bf16Weights};
use lkconv::model::deploy::Pointwise;
use lkconv::{cpu, DwConv2d, Rng, Tensor};
use std::sync::Arc;
use std::time::Instant;

fn time(reps: usize, mut f: impl FnMut()) -> (f64, f64) {
    f();
    let mut t: Vec<f64> = (0..reps)
        .map(|_| {
            let s = Instant::now();
            f();
            s.elapsed().as_secs_f64() * 1e3
        })
        .collect();
    t.sort_by(f64::total_cmp);
    (t[0], t[t.len() / 2])
}

/// A 1x1 layer (no bias) in f32, or in bf16 on `isa` (weights packed once, outside the timing;
/// the engine packs the activations inside it).
fn layer(cout: usize, cin: usize, w: &[f32], isa: Option<Bf16Isa>) -> Pointwise {
    Pointwise {
        cin,
        cout,
        w: w.to_vec(),
        b: vec![0.0; cout],
        bf16: isa.map(|i| Arc::new(Bf16Weights::new(i, cout, cin, w).unwrap())),
    }
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    let reps = args
        .iter()
        .position(|a| a == "--reps")
        .and_then(|i| args.get(i + 1))
        .and_then(|v| v.parse().ok())
        .unwrap_or(20);
    let isas = Bf16Isa::all_available();
    println!(
        "bf16 ISAs here: {isas:?}; {} threads; {reps} reps; min / median ms",
        rayon::current_num_threads()
    );
    let mut rng = Rng::new(7);
    println!("| layer | pass | f32 fast | bf16 (rounded operands, f32 kernel) |");
    println!("|---|---|---|---|");
    for (c, hw, k) in [(128, 56, 31), (256, 28, 29), (512, 14, 27), (1024, 7, 13)] {
        let conv = DwConv2d::new(k, k);
        let s = conv.resolve(1, c, hw, hw).unwrap();
        let x = Tensor::<f32>::random(&s.input_dims(), &mut rng).unwrap();
        let w = Tensor::<f32>::random(&conv.weight_dims(c), &mut rng).unwrap();
        let dy = Tensor::<f32>::random(&s.output_dims(), &mut rng).unwrap();
        let mut y = vec![0.0f32; s.output_len()];
        let mut dw = vec![0.0f32; w.len()];
        let (x, w, dy) = (x.data(), w.data(), dy.data());
        for pass in ["fwd", "dgrad", "wgrad"] {
            let mut run = |bf16: bool| {
                time(reps, || match (pass, bf16) {
                    ("fwd", false) => cpu::forward_f32_into(&conv, &s, x, w, None, &mut y).unwrap(),
                    ("fwd", true) => {
                        cpu::bf16_dw::forward_f32_into(&conv, &s, x, w, None, &mut y).unwrap()
                    }
                    ("dgrad", false) => cpu::data_grad_f32_into(&conv, &s, dy, w, &mut y).unwrap(),
                    ("dgrad", true) => {
                        cpu::bf16_dw::data_grad_f32_into(&conv, &s, dy, w, &mut y).unwrap()
                    }
                    (_, false) => cpu::weight_grad_f32_into(&conv, &s, x, dy, &mut dw).unwrap(),
                    (_, true) => {
                        cpu::bf16_dw::weight_grad_f32_into(&conv, &s, x, dy, &mut dw).unwrap()
                    }
                })
            };
            let (f, b) = (run(false), run(true));
            println!(
                "| C{c} {hw}x{hw} K{k} | {pass} | {:.3} / {:.3} | {:.3} / {:.3} ({:.2}x) |",
                f.0,
                f.1,
                b.0,
                b.1,
                f.0 / b.0
            );
        }
    }
    println!();
    println!(
        "| 1x1 conv (cout x cin x pixels) | f32 SGEMM | {} |",
        isas.iter()
            .map(|i| format!("bf16 {}", i.name()))
            .collect::<Vec<_>>()
            .join(" | ")
    );
    println!("|---|---|{}", "---|".repeat(isas.len()));
    let mut packed = Bf16Input::new();
    for (cout, cin, hw) in [
        (512, 128, 3136),
        (128, 512, 3136),
        (1024, 256, 784),
        (256, 1024, 784),
        (2048, 512, 196),
        (512, 2048, 196),
        (4096, 1024, 49),
        (1024, 4096, 49),
    ] {
        let w = Tensor::<f32>::random(&[cout, cin], &mut rng).unwrap();
        let x = Tensor::<f32>::random(&[cin, hw], &mut rng).unwrap();
        let mut y = vec![0.0f32; cout * hw];
        let gflop = 2.0 * (cout * cin * hw) as f64 / 1e9;
        // The engine's own 1x1 layer (its task split over the pool, its epilogue).
        let mut run = |l: &Pointwise| {
            time(reps, || {
                l.forward_into(x.data(), 1, hw, &mut y, Activation::Identity, false)
                    .unwrap()
            })
        };
        let f = run(&layer(cout, cin, w.data(), None));
        let cells: Vec<String> = isas
            .iter()
            .map(|&i| {
                let t = run(&layer(cout, cin, w.data(), Some(i)));
                format!(
                    "{:.3} ms, {:.0} GFLOP/s ({:.2}x)",
                    t.0,
                    gflop / t.0 * 1e3,
                    f.0 / t.0
                )
            })
            .collect();
        println!(
            "| {cout} x {cin} x {hw} | {:.3} ms, {:.0} GFLOP/s | {} |",
            f.0,
            gflop / f.0 * 1e3,
            cells.join(" | ")
        );
    }
    println!();
    println!("One task on one core (128 rows x up to 512 pixels; activations packed outside the timing):");
    for (cout, cin, hw) in [
        (512, 128, 512),
        (128, 512, 512),
        (2048, 512, 196),
        (512, 2048, 196),
    ] {
        let m = 128;
        let w = Tensor::<f32>::random(&[cout, cin], &mut rng).unwrap();
        let x = Tensor::<f32>::random(&[cin, hw], &mut rng).unwrap();
        let mut y = vec![0.0f32; m * hw];
        let gflop = 2.0 * (m * cin * hw) as f64 / 1e9;
        let cells: Vec<String> = isas
            .iter()
            .map(|&i| {
                let wb = Bf16Weights::new(i, cout, cin, w.data()).unwrap();
                packed.pack(i, cin, hw, x.data(), hw).unwrap();
                let tp = time(reps, || packed.pack(i, cin, hw, x.data(), hw).unwrap());
                let t = time(reps, || {
                    // SAFETY: y holds m x hw floats.
                    unsafe { b16::gemm_raw(&wb, 0, m, &packed, 0, hw, 0.0, y.as_mut_ptr(), hw) }
                });
                format!(
                    "{}: {:.0} GFLOP/s (packing the input {:.3} ms)",
                    i.name(),
                    gflop / t.0 * 1e3,
                    tp.0
                )
            })
            .collect();
        println!("  {m} x {cin} x {hw}: {}", cells.join("; "));
    }
    println!();
    model_error(reps.min(5));
}

/// RepLKNet-31B (random weights, deploy form) at 1x3x224x224 on 4 random images: bf16 on each
/// ISA against the f32 engine (logit error, top-1 agreement), and batch-1 times, the engines
/// interleaved run by run (min / median).
fn model_error(reps: usize) {
    use lkconv::model::{DeployModel, Replknet, ReplknetConfig, Workspace};
    let model = Replknet::random(&ReplknetConfig::by_name("31b").unwrap(), 1).unwrap();
    let mut rng = Rng::new(2);
    let x = Tensor::<f32>::random(&[4, 3, 224, 224], &mut rng).unwrap();
    let mut ws = Workspace::new();
    let want = model
        .deploy
        .run(&x, None, true, &mut ws)
        .unwrap()
        .logits
        .unwrap();
    let x1 = Tensor::from_vec(&[1, 3, 224, 224], x.data()[..3 * 224 * 224].to_vec()).unwrap();
    let isas = Bf16Isa::all_available();
    let models: Vec<DeployModel> = isas
        .iter()
        .map(|&i| model.deploy.clone().into_cpu_bf16(i).unwrap())
        .collect();
    let engines: Vec<&DeployModel> = std::iter::once(&model.deploy).chain(&models).collect();
    let mut times = vec![Vec::new(); engines.len()];
    for _ in 0..reps + 1 {
        for (e, t) in engines.iter().zip(&mut times) {
            let s = Instant::now();
            e.run(&x1, None, true, &mut ws).unwrap();
            t.push(s.elapsed().as_secs_f64() * 1e3);
        }
    }
    let stats = |t: &mut Vec<f64>| {
        t.remove(0); // warm-up
        t.sort_by(f64::total_cmp);
        (t[0], t[t.len() / 2])
    };
    let f32_ms = stats(&mut times[0]);
    println!(
        "RepLKNet-31B 1x3x224x224: f32 {:.1} / {:.1} ms (min / median of {reps}, interleaved)",
        f32_ms.0, f32_ms.1
    );
    let classes = want.shape()[1];
    let argmax = |v: &[f32]| (0..v.len()).max_by(|&i, &j| v[i].total_cmp(&v[j])).unwrap();
    for ((isa, m), t) in isas.iter().zip(&models).zip(times.iter_mut().skip(1)) {
        let got = m.run(&x, None, true, &mut ws).unwrap().logits.unwrap();
        let err = got
            .data()
            .iter()
            .zip(want.data())
            .map(|(a, b)| (a - b).abs())
            .fold(0.0f32, f32::max);
        let scale = want.data().iter().fold(0.0f32, |m, v| m.max(v.abs()));
        let agree = got
            .data()
            .chunks(classes)
            .zip(want.data().chunks(classes))
            .filter(|(a, b)| argmax(a) == argmax(b))
            .count();
        let t = stats(t);
        println!(
            "  bf16 {}: {:.1} / {:.1} ms ({:.2}x f32 by min); 4 random images: logits max |bf16 - f32| {err:.3e} ({:.2e} of max |logit| {scale:.3}), top-1 agrees on {agree}/4",
            isa.name(),
            t.0,
            t.1,
            f32_ms.0 / t.0,
            err / scale,
        );
    }
}
