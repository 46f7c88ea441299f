//! Element-wise epilogues of RepLKNet's convolutions: `v = act(v + bias)` over a slice, with
//! identity, ReLU or the exact (erf) GELU. AVX-512 and AVX2 + FMA paths picked at run time
//! (capped by `LKCONV_CPU_ISA`, like the rest of the CPU engine), a portable fallback with the
//! same arithmetic.
//!
//! GELU: x * Phi(x) with Phi = 1 - erfc(z)/2 (x >= 0) or erfc(z)/2 (x < 0), z = |x|/sqrt 2,
//! erfc(z) = t * exp(P(t) - z^2), t = 1/(1 + z/2) (the Numerical Recipes Chebyshev fit,
//! relative error < 1.2e-7), exp by range reduction and a degree-7 polynomial. Computing
//! erfc rather than erf keeps the negative tail accurate in relative terms. Measured against
//! the f64 GELU (`tests/model_kernels.rs`, every ISA, the whole f32 line): error below
//! [`GELU_REL_ERROR`] * |GELU(x)| + 1e-37 (the absolute floor for x < -13, where GELU(x)
//! underflows to subnormals and this returns -0.0). GELU(NaN) = NaN, GELU(+inf) = +inf,
//! GELU(-inf) = NaN (-inf * 0, as the reference computes it).

use super::direct::{detect_isa, Isa};

/// The activation applied after the bias.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Activation {
    Identity,
    Relu,
    Gelu,
}

/// The bound on GELU's relative error against the f64 GELU (see the module comment); measured
/// maximum 5.5e-7 (AVX2), 4.8e-7 (AVX-512 and portable).
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

/// `v = act(v + bias)` over a slice.
pub fn bias_act(v: &mut [f32], bias: f32, act: Activation) {
    #[cfg(target_arch = "x86_64")]
    match detect_isa() {
        // SAFETY: AVX-512F was detected at run time.
        Isa::Avx512 => return unsafe { bias_act_avx512(v, bias, act) },
        // SAFETY: AVX2 and FMA were detected at run time.
        Isa::Avx2 => return unsafe { bias_act_avx2(v, bias, act) },
        Isa::Portable => {}
    }
    match act {
        Activation::Identity => v.iter_mut().for_each(|e| *e += bias),
        Activation::Relu => v.iter_mut().for_each(|e| *e = relu(*e + bias)),
        Activation::Gelu => v.iter_mut().for_each(|e| *e = gelu(*e + bias)),
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

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
fn bias_act_avx512(v: &mut [f32], bias: f32, act: Activation) {
    use std::arch::x86_64::*;
    let b = _mm512_set1_ps(bias);
    let mut chunks = v.chunks_exact_mut(16);
    for c in &mut chunks {
        // SAFETY: `c` holds 16 floats; loadu/storeu have no alignment need.
        unsafe {
            let x = _mm512_add_ps(_mm512_loadu_ps(c.as_ptr()), b);
            _mm512_storeu_ps(c.as_mut_ptr(), act16(x, act));
        }
    }
    let rest = chunks.into_remainder();
    if !rest.is_empty() {
        let mask: __mmask16 = (1u32 << rest.len()) as u16 - 1;
        // SAFETY: masked lanes are neither read nor written; the others lie inside `rest`.
        unsafe {
            let x = _mm512_add_ps(_mm512_maskz_loadu_ps(mask, rest.as_ptr()), b);
            _mm512_mask_storeu_ps(rest.as_mut_ptr(), mask, act16(x, act));
        }
    }
}

/// The activation of 16 lanes.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
#[inline]
pub(crate) fn act16(x: std::arch::x86_64::__m512, act: Activation) -> std::arch::x86_64::__m512 {
    use std::arch::x86_64::*;
    match act {
        Activation::Identity => x,
        Activation::Relu => _mm512_max_ps(x, _mm512_setzero_ps()),
        Activation::Gelu => gelu16(x),
    }
}

/// GELU of 16 lanes (see `gelu` for the steps).
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
fn gelu16(x: std::arch::x86_64::__m512) -> std::arch::x86_64::__m512 {
    use std::arch::x86_64::*;
    let z0 = _mm512_mul_ps(
        _mm512_abs_ps(x),
        _mm512_set1_ps(std::f32::consts::FRAC_1_SQRT_2),
    );
    // min returns its second operand when the first is NaN.
    let z = _mm512_min_ps(z0, _mm512_set1_ps(Z_FLUSH));
    let d = _mm512_fmadd_ps(z, _mm512_set1_ps(0.5), _mm512_set1_ps(1.0));
    // 1/d: 14-bit estimate and one Newton step (d is in [1, 5.6]).
    let r0 = _mm512_rcp14_ps(d);
    let t = _mm512_mul_ps(r0, _mm512_fnmadd_ps(d, r0, _mm512_set1_ps(2.0)));
    let mut p = _mm512_set1_ps(ERFC_P[0]);
    for &c in &ERFC_P[1..] {
        p = _mm512_fmadd_ps(p, t, _mm512_set1_ps(c));
    }
    let hi = _mm512_mul_ps(x, x);
    let lo = _mm512_fmsub_ps(x, x, hi);
    let a = _mm512_mul_ps(_mm512_set1_ps(-0.5), hi);
    let magic = _mm512_set1_ps(MAGIC);
    let kf = _mm512_fmadd_ps(
        _mm512_add_ps(a, p),
        _mm512_set1_ps(std::f32::consts::LOG2_E),
        magic,
    );
    let n = _mm512_sub_ps(kf, magic);
    let rr = _mm512_fnmadd_ps(n, _mm512_set1_ps(LN2_HI), a);
    let rr = _mm512_fnmadd_ps(n, _mm512_set1_ps(LN2_LO), rr);
    let rr = _mm512_add_ps(rr, _mm512_fnmadd_ps(_mm512_set1_ps(0.5), lo, p));
    let mut q = _mm512_set1_ps(EXP_P[0]);
    for &c in &EXP_P[1..] {
        q = _mm512_fmadd_ps(q, rr, _mm512_set1_ps(c));
    }
    let ni = _mm512_sub_epi32(
        _mm512_castps_si512(kf),
        _mm512_set1_epi32(MAGIC.to_bits() as i32),
    );
    let scale = _mm512_slli_epi32::<23>(_mm512_add_epi32(ni, _mm512_set1_epi32(127)));
    let ex = _mm512_mul_ps(q, _mm512_castsi512_ps(scale));
    let keep = _mm512_cmp_ps_mask::<_CMP_LT_OQ>(z0, _mm512_set1_ps(Z_FLUSH));
    let half_erfc = _mm512_maskz_mul_ps(keep, _mm512_mul_ps(_mm512_set1_ps(0.5), t), ex);
    let pos = _mm512_cmp_ps_mask::<_CMP_GE_OQ>(x, _mm512_setzero_ps());
    let phi = _mm512_mask_blend_ps(
        pos,
        half_erfc,
        _mm512_sub_ps(_mm512_set1_ps(1.0), half_erfc),
    );
    _mm512_mul_ps(x, phi)
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
fn bias_act_avx2(v: &mut [f32], bias: f32, act: Activation) {
    use std::arch::x86_64::*;
    let b = _mm256_set1_ps(bias);
    let mut chunks = v.chunks_exact_mut(8);
    for c in &mut chunks {
        // SAFETY: `c` holds 8 floats; loadu/storeu have no alignment need.
        unsafe {
            let x = _mm256_add_ps(_mm256_loadu_ps(c.as_ptr()), b);
            _mm256_storeu_ps(c.as_mut_ptr(), act8(x, act));
        }
    }
    let rest = chunks.into_remainder();
    if !rest.is_empty() {
        let mask = tail_mask8(rest.len());
        // SAFETY: masked lanes are neither read nor written; the others lie inside `rest`.
        unsafe {
            let x = _mm256_add_ps(_mm256_maskload_ps(rest.as_ptr(), mask), b);
            _mm256_maskstore_ps(rest.as_mut_ptr(), mask, act8(x, act));
        }
    }
}

/// The AVX2 lane mask of the first `n` (< 8) lanes.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
#[inline]
pub(crate) fn tail_mask8(n: usize) -> std::arch::x86_64::__m256i {
    use std::arch::x86_64::*;
    let lanes = _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7);
    _mm256_cmpgt_epi32(_mm256_set1_epi32(n as i32), lanes)
}

/// The activation of 8 lanes.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
#[inline]
pub(crate) fn act8(x: std::arch::x86_64::__m256, act: Activation) -> std::arch::x86_64::__m256 {
    use std::arch::x86_64::*;
    match act {
        Activation::Identity => x,
        Activation::Relu => _mm256_max_ps(x, _mm256_setzero_ps()),
        Activation::Gelu => gelu8(x),
    }
}

/// GELU of 8 lanes (see `gelu` for the steps).
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
fn gelu8(x: std::arch::x86_64::__m256) -> std::arch::x86_64::__m256 {
    use std::arch::x86_64::*;
    let abs_mask = _mm256_castsi256_ps(_mm256_set1_epi32(0x7fff_ffff));
    let z0 = _mm256_mul_ps(
        _mm256_and_ps(x, abs_mask),
        _mm256_set1_ps(std::f32::consts::FRAC_1_SQRT_2),
    );
    // min returns its second operand when the first is NaN.
    let z = _mm256_min_ps(z0, _mm256_set1_ps(Z_FLUSH));
    let d = _mm256_fmadd_ps(z, _mm256_set1_ps(0.5), _mm256_set1_ps(1.0));
    // 1/d: 12-bit estimate and one Newton step.
    let r0 = _mm256_rcp_ps(d);
    let t = _mm256_mul_ps(r0, _mm256_fnmadd_ps(d, r0, _mm256_set1_ps(2.0)));
    let mut p = _mm256_set1_ps(ERFC_P[0]);
    for &c in &ERFC_P[1..] {
        p = _mm256_fmadd_ps(p, t, _mm256_set1_ps(c));
    }
    let hi = _mm256_mul_ps(x, x);
    let lo = _mm256_fmsub_ps(x, x, hi);
    let a = _mm256_mul_ps(_mm256_set1_ps(-0.5), hi);
    let magic = _mm256_set1_ps(MAGIC);
    let kf = _mm256_fmadd_ps(
        _mm256_add_ps(a, p),
        _mm256_set1_ps(std::f32::consts::LOG2_E),
        magic,
    );
    let n = _mm256_sub_ps(kf, magic);
    let rr = _mm256_fnmadd_ps(n, _mm256_set1_ps(LN2_HI), a);
    let rr = _mm256_fnmadd_ps(n, _mm256_set1_ps(LN2_LO), rr);
    let rr = _mm256_add_ps(rr, _mm256_fnmadd_ps(_mm256_set1_ps(0.5), lo, p));
    let mut q = _mm256_set1_ps(EXP_P[0]);
    for &c in &EXP_P[1..] {
        q = _mm256_fmadd_ps(q, rr, _mm256_set1_ps(c));
    }
    let ni = _mm256_sub_epi32(
        _mm256_castps_si256(kf),
        _mm256_set1_epi32(MAGIC.to_bits() as i32),
    );
    let scale = _mm256_slli_epi32::<23>(_mm256_add_epi32(ni, _mm256_set1_epi32(127)));
    let ex = _mm256_mul_ps(q, _mm256_castsi256_ps(scale));
    let keep = _mm256_cmp_ps::<_CMP_LT_OQ>(z0, _mm256_set1_ps(Z_FLUSH));
    let half_erfc = _mm256_and_ps(
        keep,
        _mm256_mul_ps(_mm256_mul_ps(_mm256_set1_ps(0.5), t), ex),
    );
    let pos = _mm256_cmp_ps::<_CMP_GE_OQ>(x, _mm256_setzero_ps());
    let phi = _mm256_blendv_ps(
        half_erfc,
        _mm256_sub_ps(_mm256_set1_ps(1.0), half_erfc),
        pos,
    );
    _mm256_mul_ps(x, phi)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn simd_tails_match_full_vectors() {
        // Lengths that leave every remainder; the tail goes through the padded-lane path.
        let xs: Vec<f32> = (0..37).map(|i| (i as f32 - 18.0) * 0.37).collect();
        let mut whole = xs.clone();
        bias_act(&mut whole, 0.25, Activation::Gelu);
        for len in 0..xs.len() {
            let mut part = xs[..len].to_vec();
            bias_act(&mut part, 0.25, Activation::Gelu);
            assert_eq!(part, whole[..len], "len {len}");
        }
    }
}
