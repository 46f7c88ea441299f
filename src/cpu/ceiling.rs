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

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
fn fma_chains_avx512(iters: u64, seed: f32) -> f32 {
    use std::arch::x86_64::*;
    let mut acc = [_mm512_set1_ps(seed); CHAINS];
    let a = _mm512_set1_ps(0.999_999);
    let b = _mm512_set1_ps(1e-7);
    for _ in 0..iters {
        for v in acc.iter_mut() {
            *v = _mm512_fmadd_ps(*v, a, b);
        }
    }
    let mut sum = _mm512_setzero_ps();
    for v in acc {
        sum = _mm512_add_ps(sum, v);
    }
    _mm512_reduce_add_ps(sum)
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

/// Runs the chains; with `wide`, 16-lane AVX-512 FMAs (twice the FLOPs per iteration).
fn run_chains(iters: u64, seed: f32, wide: bool) -> f32 {
    #[cfg(target_arch = "x86_64")]
    if wide {
        // SAFETY: callers pass `wide` only when AVX-512F was detected at run time.
        return unsafe { fma_chains_avx512(iters, seed) };
    }
    #[cfg(target_arch = "x86_64")]
    if super::simd::has_avx2_fma() {
        // SAFETY: AVX2 and FMA were detected at run time.
        return unsafe { fma_chains_avx2(iters, seed) };
    }
    fma_chains_portable(iters, seed)
}

/// Peak f32 GFLOP/s over all rayon threads with the widest FMA the fast path uses
/// (AVX-512 where present, else AVX2), best of a few ~50 ms trials.
pub fn fma_ceiling_gflops() -> f64 {
    measure(super::simd::uses_avx512())
}

/// Peak f32 GFLOP/s with 8-lane AVX2 FMAs (the ceiling without AVX-512).
pub fn avx2_ceiling_gflops() -> f64 {
    measure(false)
}

fn measure(wide: bool) -> f64 {
    let threads = rayon::current_num_threads();
    let iters = if wide { 10_000_000u64 } else { 20_000_000u64 };
    let lanes = if wide { 2.0 } else { 1.0 };
    let mut best = 0.0f64;
    for _ in 0..3 {
        let t0 = Instant::now();
        let sink: f32 = (0..threads)
            .into_par_iter()
            .map(|i| run_chains(iters, 1.0 + i as f32, wide))
            .sum();
        let secs = t0.elapsed().as_secs_f64();
        std::hint::black_box(sink);
        best = best.max(lanes * flops_per_thread(iters) * threads as f64 / secs / 1e9);
    }
    best
}
