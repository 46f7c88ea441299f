//! The 1x1 convolutions' epilogue `v = act(v + bias)` (`cpu::activation::bias_act`) as the
//! RepLKNet engine runs it: rows of 512 floats of one task's 128 x 512 output block (256 KiB,
//! cached), one thread, on the engine's instruction set. `cargo bench --bench epilogue`
//! (`-- --reps N`); prints the best ns per element of each activation.

use lkconv::cpu::activation::{bias_act, Activation};
use std::time::Instant;

fn main() {
    let args: Vec<String> = std::env::args().collect();
    let reps = args
        .iter()
        .position(|a| a == "--reps")
        .and_then(|i| args.get(i + 1))
        .and_then(|v| v.parse().ok())
        .unwrap_or(200);
    let (rows, row) = (128, 512);
    // Values across GELU's interesting range [-4, 4), none repeated within a row.
    let fresh = || -> Vec<f32> {
        (0..rows * row)
            .map(|i| ((i * 7919) % 2000) as f32 / 250.0 - 4.0)
            .collect()
    };
    println!("bias_act, {rows} rows of {row} floats, best of {reps}, ns per element:");
    for act in [Activation::Identity, Activation::Relu, Activation::Gelu] {
        let mut best = f64::INFINITY;
        for _ in 0..reps {
            let mut v = fresh();
            let t = Instant::now();
            for r in v.chunks_mut(row) {
                bias_act(r, 0.125, act);
            }
            best = best.min(t.elapsed().as_secs_f64());
            std::hint::black_box(&v);
        }
        println!("{act:?}: {:.3}", best * 1e9 / (rows * row) as f64);
    }
}
