//! Measures this machine's f32 FMA ceiling: independent FMA chains on every rayon thread.

use rayon::prelude::*;
use std::time::Instant;

const CHAINS: usize = 10;

/// FLOPs of `iters` iterations on one thread (CHAINS vectors of 8 lanes, 2 FLOPs per FMA).
fn flops_per_thread(iters: u64) -> f64 {
    iters as f64 * (CHAINS * 8 * 2) as f64
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
fn fma_chains_avx2(iters: u64, seed: f32) -> f32 {
    use std::arch::x86_64::*;
    let mut acc = [_mm256_set1_ps(seed); CHAINS];
    let a = _mm256_set1_ps(0.999_999);
    let b = _mm256_set1_ps(1e-7);
    for _ in 0..iters {
        for v in acc.iter_mut() {
            *v = _mm256_fmadd_ps(*v, a, b);
        }
    }
    let mut lanes = [0.0f32; 8];
    let mut sum = _mm256_setzero_ps();
    for v in acc {
        sum = _mm256_add_ps(sum, v);
    }
    // SAFETY: `lanes` holds 8 floats; storeu has no alignment need.
    unsafe { _mm256_storeu_ps(lanes.as_mut_ptr(), sum) };
    lanes.iter().sum()
}

fn fma_chains_portable(iters: u64, seed: f32) -> f32 {
    let mut acc = [[seed; 8]; CHAINS];
    for _ in 0..iters {
        for v in acc.iter_mut() {
            for l in v.iter_mut() {
                *l = *l * 0.999_999 + 1e-7;
            }
        }
    }
    acc.iter().flatten().sum()
}

fn run_chains(iters: u64, seed: f32) -> f32 {
    #[cfg(target_arch = "x86_64")]
    if super::direct::has_avx2_fma() {
        // SAFETY: AVX2 and FMA were detected at run time.
        return unsafe { fma_chains_avx2(iters, seed) };
    }
    fma_chains_portable(iters, seed)
}

/// Peak f32 GFLOP/s over all rayon threads (best of a few ~50 ms trials).
pub fn fma_ceiling_gflops() -> f64 {
    let threads = rayon::current_num_threads();
    let iters = 20_000_000u64;
    let mut best = 0.0f64;
    for _ in 0..3 {
        let t0 = Instant::now();
        let sink: f32 = (0..threads).into_par_iter().map(|i| run_chains(iters, 1.0 + i as f32)).sum();
        let secs = t0.elapsed().as_secs_f64();
        std::hint::black_box(sink);
        best = best.max(flops_per_thread(iters) * threads as f64 / secs / 1e9);
    }
    best
}
