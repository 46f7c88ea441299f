//! Element-wise epilogues of RepLKNet's convolutions: `v = act(v + bias)` over a slice, with
//! identity, ReLU or the exact (erf) GELU. One vector body over `cpu::simd` (AVX-512, AVX2 +
//! FMA), picked at run time (capped by `LKCONV_CPU_ISA`, like the rest of the CPU engine), and
//! a portable fallback with the same formula (exact division, separate multiply and add).
//!
//! GELU: x * Phi(x) with Phi = 1 - erfc(z)/2 (x >= 0) or erfc(z)/2 (x < 0), z = |x|/sqrt 2,
//! erfc(z) = t * exp(P(t) - z^2), t = 1/(1 + z/2) (the Numerical Recipes Chebyshev fit,
//! relative error < 1.2e-7), exp by range reduction and a degree-7 polynomial. Computing
//! erfc rather than erf keeps the negative tail accurate in relative terms. Measured against
//! the f64 GELU (`tests/model_kernels.rs`, every ISA, the whole f32 line): error below
//! [`GELU_REL_ERROR`] * |GELU(x)| + 1e-37 (the absolute floor for x < -13, where GELU(x)
//! underflows to subnormals and this returns -0.0). GELU(NaN) = NaN, GELU(+inf) = +inf,
//! GELU(-inf) = NaN (-inf * 0, as the reference computes it).

use super::simd::{dispatch, Simd, SimdOp};

/// The activation applied after the bias.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Activation {
    Identity,
    Relu,
    Gelu,
}

/// The bound on GELU's relative error against the f64 GELU (see the module comment); measured
/// maximum 5.8e-7 (AVX2, polynomials by Estrin's scheme, 2026-12-07), 4.8e-7 (portable; AVX-512
/// before the switch to Estrin's scheme, not measured since: no AVX-512 machine).
pub const GELU_REL_ERROR: f64 = 1e-6;

/// Above this z = |x|/sqrt 2 the erfc term is below f32's normal range: it is flushed to zero
/// (exp's range reduction builds normal powers of two only).
const Z_FLUSH: f32 = 9.2;
/// 1.5 * 2^23: adding it rounds a float in [-2^22, 2^22] to an integer, which then sits in the
/// low mantissa bits.
const MAGIC: f32 = 12_582_912.0;
const LN2_HI: f32 = 0.693_359_4;
const LN2_LO: f32 = -2.121_944_4e-4;
/// erfc's polynomial in t, highest degree first.
const ERFC_P: [f32; 10] = [
    0.170_872_77,
    -0.822_152_23,
    1.488_515_9,
    -1.135_204,
    0.278_868_07,
    -0.186_288_06,
    0.096_784_18,
    0.374_091_96,
    1.000_023_7,
    -1.265_512_2,
];
/// exp's Taylor polynomial on |r| <= ln2/2, highest degree first.
const EXP_P: [f32; 8] = [
    1.0 / 5040.0,
    1.0 / 720.0,
    1.0 / 120.0,
    1.0 / 24.0,
    1.0 / 6.0,
    0.5,
    1.0,
    1.0,
];

/// Vectors per step of `bias_act`'s main loop (see `act_lanes_n`).
const BLOCK: usize = 4;

/// `v = act(v + bias)` over a slice.
pub fn bias_act(v: &mut [f32], bias: f32, act: Activation) {
    dispatch(BiasAct { v, bias, act });
}

/// [`bias_act`] as a kernel for every instruction set; `V` is the storage of the values,
/// handed back by the kernel.
struct BiasAct<V> {
    v: V,
    bias: f32,
    act: Activation,
}

impl<V: AsMut<[f32]>> SimdOp for BiasAct<V> {
    type Output = V;

    #[inline(always)]
    fn vector<S: Simd>(mut self, s: S) -> V {
        let b = s.splat(self.bias);
        let mut blocks = self.v.as_mut().chunks_exact_mut(BLOCK * S::LANES);
        for c in &mut blocks {
            let mut x = [b; BLOCK];
            for (j, v) in x.iter_mut().enumerate() {
                // SAFETY: `c` holds BLOCK * LANES floats; load needs no alignment.
                *v = s.add(unsafe { s.load(c.as_ptr().add(j * S::LANES)) }, b);
            }
            let y = act_lanes_n(s, x, self.act);
            for (j, v) in y.iter().enumerate() {
                // SAFETY: as above.
                unsafe { s.store(c.as_mut_ptr().add(j * S::LANES), *v) };
            }
        }
        let mut chunks = blocks.into_remainder().chunks_exact_mut(S::LANES);
        for c in &mut chunks {
            // SAFETY: `c` holds LANES floats; load/store need no alignment.
            unsafe {
                let x = s.add(s.load(c.as_ptr()), b);
                s.store(c.as_mut_ptr(), act_lanes(s, x, self.act));
            }
        }
        let rest = chunks.into_remainder();
        if !rest.is_empty() {
            let mask = s.tail(rest.len());
            // SAFETY: masked lanes are neither read nor written; the others lie inside `rest`.
            unsafe {
                let x = s.add(s.load_masked(rest.as_ptr(), mask), b);
                s.store_masked(rest.as_mut_ptr(), mask, act_lanes(s, x, self.act));
            }
        }
        self.v
    }

    fn portable(mut self) -> V {
        let (v, bias) = (self.v.as_mut(), self.bias);
        match self.act {
            Activation::Identity => v.iter_mut().for_each(|e| *e += bias),
            Activation::Relu => v.iter_mut().for_each(|e| *e = relu(*e + bias)),
            Activation::Gelu => v.iter_mut().for_each(|e| *e = gelu(*e + bias)),
        }
        self.v
    }
}

/// max(x, 0), NaN to 0 as the f64 reference model computes it (f32::max; the vector paths'
/// max returns its second operand, 0, for NaN).
#[inline(always)]
pub fn relu(x: f32) -> f32 {
    x.max(0.0)
}

/// The exact GELU of one value, portable arithmetic (the vector paths compute the same
/// formula with FMAs and a refined reciprocal).
#[inline(always)]
pub fn gelu(x: f32) -> f32 {
    // min as a comparison: NaN becomes Z_FLUSH here and comes back through `x * phi`.
    let z0 = x.abs() * std::f32::consts::FRAC_1_SQRT_2;
    let z = if z0 < Z_FLUSH { z0 } else { Z_FLUSH };
    let t = 1.0 / (1.0 + 0.5 * z);
    let mut p = ERFC_P[0];
    for &c in &ERFC_P[1..] {
        p = p * t + c;
    }
    // exp(p - x^2/2) with x^2 = hi + lo exactly: the range reduction runs on -hi/2 (exact),
    // so the exponent's rounding error stays at r's ulp instead of x^2's.
    let hi = x * x;
    let lo = x.mul_add(x, -hi);
    let a = -0.5 * hi;
    let kf = (a + p) * std::f32::consts::LOG2_E + MAGIC;
    let n = kf - MAGIC;
    let ni = kf.to_bits().wrapping_sub(MAGIC.to_bits());
    let r = (a - n * LN2_HI) - n * LN2_LO + (p - 0.5 * lo);
    let mut q = EXP_P[0];
    for &c in &EXP_P[1..] {
        q = q * r + c;
    }
    let ex = q * f32::from_bits(ni.wrapping_add(127) << 23);
    let half_erfc = if z0 < Z_FLUSH { 0.5 * t * ex } else { 0.0 };
    let phi = if x >= 0.0 { 1.0 - half_erfc } else { half_erfc };
    x * phi
}

/// The activation of one vector.
#[inline(always)]
pub(crate) fn act_lanes<S: Simd>(s: S, x: S::V, act: Activation) -> S::V {
    act_lanes_n(s, [x], act)[0]
}

/// The activation of `N` independent vectors. GELU is two long dependent chains of FMAs (the
/// erfc and exp polynomials); stepping `N` vectors through each step together gives the core
/// independent work to overlap (a loop over single vectors left it latency-bound).
#[inline(always)]
fn act_lanes_n<S: Simd, const N: usize>(s: S, mut x: [S::V; N], act: Activation) -> [S::V; N] {
    match act {
        Activation::Identity => {}
        Activation::Relu => {
            for v in &mut x {
                *v = s.max(*v, s.zero());
            }
        }
        Activation::Gelu => x = gelu_lanes(s, x),
    }
    x
}

/// GELU of `N` vectors (see `gelu` for the steps; FMAs, the polynomials by `estrin`, and 1/d
/// from the hardware estimate refined by one Newton step, d being in [1, 5.6]); every step
/// runs across the `N` vectors.
// Plain index loops (no closures): every step stays inside the caller's target_feature body.
#[allow(clippy::needless_range_loop)]
#[inline(always)]
fn gelu_lanes<S: Simd, const N: usize>(s: S, x: [S::V; N]) -> [S::V; N] {
    let (zero, magic) = (s.zero(), s.splat(MAGIC));
    let (mut z0, mut t, mut p, mut hi, mut lo) =
        ([zero; N], [zero; N], [zero; N], [zero; N], [zero; N]);
    for i in 0..N {
        z0[i] = s.mul(s.abs(x[i]), s.splat(std::f32::consts::FRAC_1_SQRT_2));
        // min returns its second operand when the first is NaN.
        let z = s.min(z0[i], s.splat(Z_FLUSH));
        let d = s.fma(z, s.splat(0.5), s.splat(1.0));
        let r0 = s.recip_estimate(d);
        t[i] = s.mul(r0, s.fnma(d, r0, s.splat(2.0)));
        p[i] = estrin(s, &ERFC_P, t[i]);
    }
    let (mut kf, mut q) = ([zero; N], [zero; N]);
    for i in 0..N {
        hi[i] = s.mul(x[i], x[i]);
        lo[i] = s.fms(x[i], x[i], hi[i]);
        let a = s.mul(s.splat(-0.5), hi[i]);
        kf[i] = s.fma(s.add(a, p[i]), s.splat(std::f32::consts::LOG2_E), magic);
        let n = s.sub(kf[i], magic);
        let r = s.fnma(n, s.splat(LN2_HI), a);
        let r = s.fnma(n, s.splat(LN2_LO), r);
        let r = s.add(r, s.fnma(s.splat(0.5), lo[i], p[i]));
        q[i] = estrin(s, &EXP_P, r);
    }
    let mut out = [zero; N];
    for i in 0..N {
        let ni = s.sub_i32(s.to_bits(kf[i]), s.splat_i32(MAGIC.to_bits() as i32));
        let ex = s.mul(q[i], s.pow2(ni));
        let keep = s.lt(z0[i], s.splat(Z_FLUSH));
        let half_erfc = s.zero_unless(keep, s.mul(s.mul(s.splat(0.5), t[i]), ex));
        let pos = s.ge(x[i], zero);
        let phi = s.select(pos, s.sub(s.splat(1.0), half_erfc), half_erfc);
        out[i] = s.mul(x[i], phi);
    }
    out
}

/// The polynomial with coefficients `c` (highest degree first, 8 or 10 of them) at `x` by
/// Estrin's scheme: pairs, then powers x^2, x^4, x^8, so the dependent chain is about half as
/// long as Horner's (bias_act GELU 0.76-0.90x its time with Horner's 9- and 7-deep chains,
/// AVX2 Zen 3, benches/epilogue.rs).
#[inline(always)]
fn estrin<S: Simd, const C: usize>(s: S, c: &[f32; C], x: S::V) -> S::V {
    const { assert!(C == 8 || C == 10) };
    let x2 = s.mul(x, x);
    let x4 = s.mul(x2, x2);
    let low = s.fma(pair(s, c, 1, x), x2, pair(s, c, 0, x));
    let high = s.fma(pair(s, c, 3, x), x2, pair(s, c, 2, x));
    let p = s.fma(high, x4, low);
    if C == 10 {
        s.fma(pair(s, c, 4, x), s.mul(x4, x4), p)
    } else {
        p
    }
}

/// `estrin`'s pair k: c[C-1-2k] + c[C-2-2k] * x, the terms of x^2k and x^(2k+1) over x^2k.
// A function, not a closure: it inlines into the caller's target_feature body.
#[inline(always)]
fn pair<S: Simd, const C: usize>(s: S, c: &[f32; C], k: usize, x: S::V) -> S::V {
    s.fma(s.splat(c[C - 2 - 2 * k]), x, s.splat(c[C - 1 - 2 * k]))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::rng::Rng;

    fn bits(v: &[f32]) -> Vec<u32> {
        v.iter().map(|f| f.to_bits()).collect()
    }

    #[test]
    fn simd_tails_match_full_vectors() {
        // Lengths that leave every remainder; the tail goes through the masked-lane path.
        let xs: Vec<f32> = (0..37).map(|i| (i as f32 - 18.0) * 0.37).collect();
        let mut whole = xs.clone();
        whole.push(f32::NAN); // poison beyond the slice
        bias_act(&mut whole[..xs.len()], 0.25, Activation::Gelu);
        assert!(whole[xs.len()].is_nan(), "wrote past the slice");
        for len in 0..xs.len() {
            let mut part = xs[..len].to_vec();
            bias_act(&mut part, 0.25, Activation::Gelu);
            assert_eq!(bits(&part), bits(&whole[..len]), "len {len}");
        }
    }

    /// Every vector body this CPU can run, in this process: against the scalar path (ReLU and
    /// identity exactly, GELU within twice the documented error bound, NaN where it gives
    /// NaN), and each prefix (every tail length) as the whole slice computes it.
    #[cfg(target_arch = "x86_64")]
    #[test]
    fn every_vector_isa_matches_the_scalar_path() {
        use crate::cpu::simd::each_vector_isa;
        use std::collections::HashMap;
        let mut rng = Rng::for_test("every_vector_isa_matches_the_scalar_path");
        let mut xs: Vec<f32> = (0..4000).map(|_| rng.uniform_pm1() * 12.0).collect();
        xs.extend([
            f32::NAN,
            f32::INFINITY,
            f32::NEG_INFINITY,
            -0.0,
            0.0,
            1e-40,
            -20.0,
            9.0,
        ]);
        let bias = rng.uniform_pm1();
        let mut checked = Vec::new();
        for act in [Activation::Identity, Activation::Relu, Activation::Gelu] {
            let op = |v: &[f32]| BiasAct {
                v: v.to_vec(),
                bias,
                act,
            };
            let want = op(&xs).portable();
            let mut whole = HashMap::new();
            each_vector_isa(
                || op(&xs),
                |isa, got| {
                    checked.push(format!("{isa} {act:?}"));
                    for (i, (&g, &w)) in got.iter().zip(&want).enumerate() {
                        let tol = match act {
                            Activation::Gelu => 2.0 * GELU_REL_ERROR * w.abs() as f64 + 2e-37,
                            _ => 0.0,
                        };
                        let ok = g == w
                            || (g.is_nan() && w.is_nan())
                            || (g as f64 - w as f64).abs() <= tol;
                        assert!(ok, "{isa} {act:?}: x = {} -> {g}, want {w}", xs[i] + bias);
                    }
                    whole.insert(isa.to_string(), got);
                },
            );
            // Past two blocks of BLOCK vectors on AVX-512 (2 * 4 * 16), every remainder.
            for len in 0..140 {
                each_vector_isa(
                    || op(&xs[..len]),
                    |isa, got| assert_eq!(bits(&got), bits(&whole[isa][..len]), "{isa} {len}"),
                );
            }
        }
        // Every CPU with AVX2 + FMA runs at least that body: nothing checked would be a defect.
        assert_eq!(
            checked.is_empty(),
            !crate::cpu::simd::has_avx2_fma(),
            "checked {checked:?}"
        );
        println!("checked in-process: {checked:?}");
    }
}
