//! One vector vocabulary for the CPU kernels: a kernel body is written once, generic over
//! [`Simd`], and instantiated per instruction set.
//!
//! Each instruction set is a zero-sized token type (`Avx512`, `Avx2`) whose value exists
//! only where [`detect_isa`] found its features, so holding one is the proof that its
//! intrinsics may run: the arithmetic methods are safe, only the memory accesses are `unsafe`.
//! A kernel is a [`SimdOp`]; [`dispatch`] picks the instruction set once per call and runs the
//! op's generic body inside a `#[target_feature]` wrapper. Every method and every body is
//! `#[inline(always)]`, so the whole body is compiled into the wrapper with its features (a
//! body that is not inlined there would call each intrinsic out of line).

/// The instruction set the micro-kernels use, detected once per call.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub(crate) enum Isa {
    Portable,
    Avx2,
    /// AVX-512F: 16-lane FMAs, half the instructions of AVX2 for the same work.
    Avx512,
}

impl Isa {
    /// f32 lanes per vector (1: scalar).
    pub(crate) fn lanes(self) -> usize {
        match self {
            Isa::Portable => 1,
            Isa::Avx2 => 8,
            Isa::Avx512 => 16,
        }
    }
}

/// The best ISA of this CPU, capped by `LKCONV_CPU_ISA` (portable, avx2 or avx512) when set;
/// the tests use the cap to check every micro-kernel on one machine.
pub(crate) fn detect_isa() -> Isa {
    static ISA: std::sync::OnceLock<Isa> = std::sync::OnceLock::new();
    *ISA.get_or_init(|| {
        let cap = match std::env::var("LKCONV_CPU_ISA").as_deref() {
            Ok("portable") => Isa::Portable,
            Ok("avx2") => Isa::Avx2,
            _ => Isa::Avx512,
        };
        let mut best = Isa::Portable;
        #[cfg(target_arch = "x86_64")]
        {
            if has_avx2_fma() {
                best = Isa::Avx2;
                if std::is_x86_feature_detected!("avx512f") {
                    best = Isa::Avx512;
                }
            }
        }
        best.min(cap)
    })
}

/// Whether the fast path uses AVX-512 on this CPU.
pub fn uses_avx512() -> bool {
    detect_isa() == Isa::Avx512
}

/// Whether the fast path uses vector kernels (AVX2 + FMA or wider) on this CPU.
pub fn uses_vector_isa() -> bool {
    detect_isa() >= Isa::Avx2
}

/// Whether the AVX2 + FMA kernels can run on this CPU.
pub fn has_avx2_fma() -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        std::is_x86_feature_detected!("avx2") && std::is_x86_feature_detected!("fma")
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        false
    }
}

/// The lane operations the kernels use, on vectors of `LANES` f32.
pub(crate) trait Simd: Copy {
    /// f32 lanes per vector.
    const LANES: usize;
    /// A vector of f32.
    type V: Copy;
    /// A vector of i32 (the bit patterns of a `V`).
    type Vi: Copy;
    /// A set of lanes: a comparison's result or a tail.
    type Mask: Copy;

    fn splat(self, x: f32) -> Self::V;
    fn zero(self) -> Self::V;
    fn add(self, a: Self::V, b: Self::V) -> Self::V;
    fn sub(self, a: Self::V, b: Self::V) -> Self::V;
    fn mul(self, a: Self::V, b: Self::V) -> Self::V;
    /// max(a, b); b where either is NaN.
    fn max(self, a: Self::V, b: Self::V) -> Self::V;
    /// min(a, b); b where either is NaN.
    fn min(self, a: Self::V, b: Self::V) -> Self::V;
    /// |a| (the sign bit cleared).
    fn abs(self, a: Self::V) -> Self::V;
    /// The sum of the lanes.
    fn reduce_add(self, a: Self::V) -> f32;
    /// Transposes the LANES x LANES block in `r` (`r.len() == LANES`): afterwards `r[j]`
    /// lane `i` is the old `r[i]` lane `j`.
    fn transpose(self, r: &mut [Self::V]);
    /// a * b + c, one rounding.
    fn fma(self, a: Self::V, b: Self::V, c: Self::V) -> Self::V;
    /// c - a * b, one rounding.
    fn fnma(self, a: Self::V, b: Self::V, c: Self::V) -> Self::V;
    /// a * b - c, one rounding.
    fn fms(self, a: Self::V, b: Self::V, c: Self::V) -> Self::V;
    /// The hardware estimate of 1/a (12 bits on AVX2, 14 on AVX-512).
    fn recip_estimate(self, a: Self::V) -> Self::V;
    /// a < b, ordered (false for NaN).
    fn lt(self, a: Self::V, b: Self::V) -> Self::Mask;
    /// a >= b, ordered (false for NaN).
    fn ge(self, a: Self::V, b: Self::V) -> Self::Mask;
    /// `yes` in the lanes of `m`, `no` elsewhere.
    fn select(self, m: Self::Mask, yes: Self::V, no: Self::V) -> Self::V;
    /// `a` in the lanes of `m`, +0 elsewhere.
    fn zero_unless(self, m: Self::Mask, a: Self::V) -> Self::V;
    /// The first `n` (<= LANES) lanes.
    fn tail(self, n: usize) -> Self::Mask;
    fn to_bits(self, a: Self::V) -> Self::Vi;
    fn splat_i32(self, x: i32) -> Self::Vi;
    fn sub_i32(self, a: Self::Vi, b: Self::Vi) -> Self::Vi;
    /// 2^n for integer lanes n in f32's normal exponent range.
    fn pow2(self, n: Self::Vi) -> Self::V;

    /// # Safety
    /// `p` is valid for reading `LANES` floats (no alignment needed).
    unsafe fn load(self, p: *const f32) -> Self::V;
    /// # Safety
    /// `p` is valid for writing `LANES` floats (no alignment needed).
    unsafe fn store(self, p: *mut f32, a: Self::V);
    /// The lanes of `m` read from `p`, +0 elsewhere (those are not read).
    /// # Safety
    /// `p + i` is valid for reading for every lane `i` of `m`.
    unsafe fn load_masked(self, p: *const f32, m: Self::Mask) -> Self::V;
    /// The lanes of `m` written to `p` (the others are not touched).
    /// # Safety
    /// `p + i` is valid for writing for every lane `i` of `m`.
    unsafe fn store_masked(self, p: *mut f32, m: Self::Mask, a: Self::V);
}

/// A kernel with one vector body for every instruction set and a scalar fallback.
pub(crate) trait SimdOp {
    type Output;
    /// The vector body; implementations must be `#[inline(always)]` (see the module comment).
    fn vector<S: Simd>(self, simd: S) -> Self::Output;
    /// Without a vector instruction set (or where the caller picks exact scalar arithmetic).
    fn portable(self) -> Self::Output;
}

/// Runs `op` on the engine's instruction set ([`detect_isa`], capped by `LKCONV_CPU_ISA`).
pub(crate) fn dispatch<O: SimdOp>(op: O) -> O::Output {
    run_on(detect_isa(), op)
}

/// Runs `op` on `isa`, which must not exceed [`detect_isa`] (a kernel that picks a narrower
/// instruction set for some blocks, as the depthwise fast path does for narrow column tails).
pub(crate) fn run_on<O: SimdOp>(isa: Isa, op: O) -> O::Output {
    assert!(isa <= detect_isa(), "{isa:?} is not available here");
    #[cfg(target_arch = "x86_64")]
    match isa {
        // SAFETY: detect_isa found AVX-512F (asserted above).
        Isa::Avx512 => return unsafe { x86::with_avx512(op) },
        // SAFETY: AVX2 and FMA are present wherever detect_isa allows AVX2 or above.
        Isa::Avx2 => return unsafe { x86::with_avx2(op) },
        Isa::Portable => {}
    }
    op.portable()
}

#[cfg(target_arch = "x86_64")]
mod x86 {
    use std::arch::x86_64::*;

    use super::{Simd, SimdOp};

    /// AVX-512F, 16 lanes. A value exists only where the CPU has AVX-512F.
    #[derive(Clone, Copy, Debug)]
    pub(crate) struct Avx512(());

    /// AVX2 + FMA, 8 lanes. A value exists only where the CPU has AVX2 and FMA.
    #[derive(Clone, Copy, Debug)]
    pub(crate) struct Avx2(());

    /// # Safety
    /// The CPU has AVX-512F.
    #[target_feature(enable = "avx512f")]
    pub(super) unsafe fn with_avx512<O: SimdOp>(op: O) -> O::Output {
        op.vector(Avx512(()))
    }

    /// # Safety
    /// The CPU has AVX2 and FMA.
    #[target_feature(enable = "avx2,fma")]
    pub(super) unsafe fn with_avx2<O: SimdOp>(op: O) -> O::Output {
        op.vector(Avx2(()))
    }

    /// Runs `op` on each vector instruction set this CPU has, whatever `LKCONV_CPU_ISA` says:
    /// the tests check every body in one process.
    #[cfg(test)]
    pub(crate) fn each_vector_isa<O: SimdOp>(
        mut make: impl FnMut() -> O,
        mut check: impl FnMut(&str, O::Output),
    ) {
        if std::is_x86_feature_detected!("avx512f") {
            // SAFETY: AVX-512F was just detected.
            check("avx512", unsafe { with_avx512(make()) });
        }
        if super::has_avx2_fma() {
            // SAFETY: AVX2 and FMA were just detected.
            check("avx2", unsafe { with_avx2(make()) });
        }
    }

    impl Simd for Avx512 {
        const LANES: usize = 16;
        type V = __m512;
        type Vi = __m512i;
        type Mask = __mmask16;

        #[inline(always)]
        fn splat(self, x: f32) -> __m512 {
            // SAFETY: AVX-512F: an `Avx512` exists only where the CPU has it.
            unsafe { _mm512_set1_ps(x) }
        }
        #[inline(always)]
        fn zero(self) -> __m512 {
            // SAFETY: AVX-512F: an `Avx512` exists only where the CPU has it.
            unsafe { _mm512_setzero_ps() }
        }
        #[inline(always)]
        fn add(self, a: __m512, b: __m512) -> __m512 {
            // SAFETY: AVX-512F: an `Avx512` exists only where the CPU has it.
            unsafe { _mm512_add_ps(a, b) }
        }
        #[inline(always)]
        fn sub(self, a: __m512, b: __m512) -> __m512 {
            // SAFETY: AVX-512F: an `Avx512` exists only where the CPU has it.
            unsafe { _mm512_sub_ps(a, b) }
        }
        #[inline(always)]
        fn mul(self, a: __m512, b: __m512) -> __m512 {
            // SAFETY: AVX-512F: an `Avx512` exists only where the CPU has it.
            unsafe { _mm512_mul_ps(a, b) }
        }
        #[inline(always)]
        fn max(self, a: __m512, b: __m512) -> __m512 {
            // SAFETY: AVX-512F: an `Avx512` exists only where the CPU has it.
            unsafe { _mm512_max_ps(a, b) }
        }
        #[inline(always)]
        fn min(self, a: __m512, b: __m512) -> __m512 {
            // SAFETY: AVX-512F: an `Avx512` exists only where the CPU has it.
            unsafe { _mm512_min_ps(a, b) }
        }
        #[inline(always)]
        fn abs(self, a: __m512) -> __m512 {
            // SAFETY: AVX-512F: an `Avx512` exists only where the CPU has it.
            unsafe { _mm512_abs_ps(a) }
        }
        #[inline(always)]
        fn reduce_add(self, a: __m512) -> f32 {
            // SAFETY: AVX-512F: an `Avx512` exists only where the CPU has it.
            unsafe { _mm512_reduce_add_ps(a) }
        }
        #[inline(always)]
        fn transpose(self, r: &mut [__m512]) {
            let r: &mut [__m512; 16] = r.try_into().expect("16 rows");
            // SAFETY: AVX-512F: an `Avx512` exists only where the CPU has it.
            unsafe {
                // Pairs of rows interleaved per 128-bit lane, then pairs of pairs: t[4k + m]
                // holds, in 128-bit lane q, column 4q + m of rows 4k..4k + 4.
                let mut s = [_mm512_setzero_ps(); 16];
                for k in 0..8 {
                    s[2 * k] = _mm512_unpacklo_ps(r[2 * k], r[2 * k + 1]);
                    s[2 * k + 1] = _mm512_unpackhi_ps(r[2 * k], r[2 * k + 1]);
                }
                let mut t = [_mm512_setzero_ps(); 16];
                for k in 0..4 {
                    let (a, b) = (_mm512_castps_pd(s[4 * k]), _mm512_castps_pd(s[4 * k + 2]));
                    let (c, d) = (
                        _mm512_castps_pd(s[4 * k + 1]),
                        _mm512_castps_pd(s[4 * k + 3]),
                    );
                    t[4 * k] = _mm512_castpd_ps(_mm512_unpacklo_pd(a, b));
                    t[4 * k + 1] = _mm512_castpd_ps(_mm512_unpackhi_pd(a, b));
                    t[4 * k + 2] = _mm512_castpd_ps(_mm512_unpacklo_pd(c, d));
                    t[4 * k + 3] = _mm512_castpd_ps(_mm512_unpackhi_pd(c, d));
                }
                // A 4 x 4 transpose of 128-bit lanes among t[m], t[4 + m], t[8 + m], t[12 + m].
                for m in 0..4 {
                    let u0 = _mm512_shuffle_f32x4::<0x44>(t[m], t[4 + m]);
                    let u1 = _mm512_shuffle_f32x4::<0xEE>(t[m], t[4 + m]);
                    let u2 = _mm512_shuffle_f32x4::<0x44>(t[8 + m], t[12 + m]);
                    let u3 = _mm512_shuffle_f32x4::<0xEE>(t[8 + m], t[12 + m]);
                    r[m] = _mm512_shuffle_f32x4::<0x88>(u0, u2);
                    r[4 + m] = _mm512_shuffle_f32x4::<0xDD>(u0, u2);
                    r[8 + m] = _mm512_shuffle_f32x4::<0x88>(u1, u3);
                    r[12 + m] = _mm512_shuffle_f32x4::<0xDD>(u1, u3);
                }
            }
        }
        #[inline(always)]
        fn fma(self, a: __m512, b: __m512, c: __m512) -> __m512 {
            // SAFETY: AVX-512F: an `Avx512` exists only where the CPU has it.
            unsafe { _mm512_fmadd_ps(a, b, c) }
        }
        #[inline(always)]
        fn fnma(self, a: __m512, b: __m512, c: __m512) -> __m512 {
            // SAFETY: AVX-512F: an `Avx512` exists only where the CPU has it.
            unsafe { _mm512_fnmadd_ps(a, b, c) }
        }
        #[inline(always)]
        fn fms(self, a: __m512, b: __m512, c: __m512) -> __m512 {
            // SAFETY: AVX-512F: an `Avx512` exists only where the CPU has it.
            unsafe { _mm512_fmsub_ps(a, b, c) }
        }
        #[inline(always)]
        fn recip_estimate(self, a: __m512) -> __m512 {
            // SAFETY: AVX-512F: an `Avx512` exists only where the CPU has it.
            unsafe { _mm512_rcp14_ps(a) }
        }
        #[inline(always)]
        fn lt(self, a: __m512, b: __m512) -> __mmask16 {
            // SAFETY: AVX-512F: an `Avx512` exists only where the CPU has it.
            unsafe { _mm512_cmp_ps_mask::<_CMP_LT_OQ>(a, b) }
        }
        #[inline(always)]
        fn ge(self, a: __m512, b: __m512) -> __mmask16 {
            // SAFETY: AVX-512F: an `Avx512` exists only where the CPU has it.
            unsafe { _mm512_cmp_ps_mask::<_CMP_GE_OQ>(a, b) }
        }
        #[inline(always)]
        fn select(self, m: __mmask16, yes: __m512, no: __m512) -> __m512 {
            // SAFETY: AVX-512F: an `Avx512` exists only where the CPU has it.
            unsafe { _mm512_mask_blend_ps(m, no, yes) }
        }
        #[inline(always)]
        fn zero_unless(self, m: __mmask16, a: __m512) -> __m512 {
            // SAFETY: AVX-512F: an `Avx512` exists only where the CPU has it.
            unsafe { _mm512_maskz_mov_ps(m, a) }
        }
        #[inline(always)]
        fn tail(self, n: usize) -> __mmask16 {
            ((1u32 << n) - 1) as u16
        }
        #[inline(always)]
        fn to_bits(self, a: __m512) -> __m512i {
            // SAFETY: AVX-512F: an `Avx512` exists only where the CPU has it.
            unsafe { _mm512_castps_si512(a) }
        }
        #[inline(always)]
        fn splat_i32(self, x: i32) -> __m512i {
            // SAFETY: AVX-512F: an `Avx512` exists only where the CPU has it.
            unsafe { _mm512_set1_epi32(x) }
        }
        #[inline(always)]
        fn sub_i32(self, a: __m512i, b: __m512i) -> __m512i {
            // SAFETY: AVX-512F: an `Avx512` exists only where the CPU has it.
            unsafe { _mm512_sub_epi32(a, b) }
        }
        #[inline(always)]
        fn pow2(self, n: __m512i) -> __m512 {
            // SAFETY: AVX-512F: an `Avx512` exists only where the CPU has it.
            unsafe {
                let biased = _mm512_add_epi32(n, _mm512_set1_epi32(127));
                _mm512_castsi512_ps(_mm512_slli_epi32::<23>(biased))
            }
        }
        #[inline(always)]
        unsafe fn load(self, p: *const f32) -> __m512 {
            // SAFETY: the caller keeps the contract; AVX-512F: an `Avx512` exists only where the CPU has it.
            unsafe { _mm512_loadu_ps(p) }
        }
        #[inline(always)]
        unsafe fn store(self, p: *mut f32, a: __m512) {
            // SAFETY: the caller keeps the contract; AVX-512F: an `Avx512` exists only where the CPU has it.
            unsafe { _mm512_storeu_ps(p, a) }
        }
        #[inline(always)]
        unsafe fn load_masked(self, p: *const f32, m: __mmask16) -> __m512 {
            // SAFETY: the caller keeps the contract; AVX-512F: an `Avx512` exists only where the CPU has it.
            unsafe { _mm512_maskz_loadu_ps(m, p) }
        }
        #[inline(always)]
        unsafe fn store_masked(self, p: *mut f32, m: __mmask16, a: __m512) {
            // SAFETY: the caller keeps the contract; AVX-512F: an `Avx512` exists only where the CPU has it.
            unsafe { _mm512_mask_storeu_ps(p, m, a) }
        }
    }

    impl Simd for Avx2 {
        const LANES: usize = 8;
        type V = __m256;
        type Vi = __m256i;
        /// All ones in the selected lanes (what the compares return and maskload takes).
        type Mask = __m256;

        #[inline(always)]
        fn splat(self, x: f32) -> __m256 {
            // SAFETY: AVX2 and FMA: an `Avx2` exists only where the CPU has them.
            unsafe { _mm256_set1_ps(x) }
        }
        #[inline(always)]
        fn zero(self) -> __m256 {
            // SAFETY: AVX2 and FMA: an `Avx2` exists only where the CPU has them.
            unsafe { _mm256_setzero_ps() }
        }
        #[inline(always)]
        fn add(self, a: __m256, b: __m256) -> __m256 {
            // SAFETY: AVX2 and FMA: an `Avx2` exists only where the CPU has them.
            unsafe { _mm256_add_ps(a, b) }
        }
        #[inline(always)]
        fn sub(self, a: __m256, b: __m256) -> __m256 {
            // SAFETY: AVX2 and FMA: an `Avx2` exists only where the CPU has them.
            unsafe { _mm256_sub_ps(a, b) }
        }
        #[inline(always)]
        fn mul(self, a: __m256, b: __m256) -> __m256 {
            // SAFETY: AVX2 and FMA: an `Avx2` exists only where the CPU has them.
            unsafe { _mm256_mul_ps(a, b) }
        }
        #[inline(always)]
        fn max(self, a: __m256, b: __m256) -> __m256 {
            // SAFETY: AVX2 and FMA: an `Avx2` exists only where the CPU has them.
            unsafe { _mm256_max_ps(a, b) }
        }
        #[inline(always)]
        fn min(self, a: __m256, b: __m256) -> __m256 {
            // SAFETY: AVX2 and FMA: an `Avx2` exists only where the CPU has them.
            unsafe { _mm256_min_ps(a, b) }
        }
        #[inline(always)]
        fn abs(self, a: __m256) -> __m256 {
            // SAFETY: AVX2 and FMA: an `Avx2` exists only where the CPU has them.
            unsafe { _mm256_and_ps(a, _mm256_castsi256_ps(_mm256_set1_epi32(0x7fff_ffff))) }
        }
        #[inline(always)]
        fn reduce_add(self, a: __m256) -> f32 {
            // SAFETY: AVX2 and FMA: an `Avx2` exists only where the CPU has them.
            unsafe {
                let s = _mm_add_ps(_mm256_castps256_ps128(a), _mm256_extractf128_ps::<1>(a));
                let s = _mm_add_ps(s, _mm_movehl_ps(s, s));
                _mm_cvtss_f32(_mm_add_ss(s, _mm_shuffle_ps::<1>(s, s)))
            }
        }
        #[inline(always)]
        fn transpose(self, r: &mut [__m256]) {
            let r: &mut [__m256; 8] = r.try_into().expect("8 rows");
            // SAFETY: AVX2 and FMA: an `Avx2` exists only where the CPU has them.
            unsafe {
                // Pairs of rows interleaved per 128-bit half, then pairs of pairs: t[4k + m]
                // holds, in half q, column 4q + m of rows 4k..4k + 4; then the halves swap.
                let mut s = [_mm256_setzero_ps(); 8];
                for k in 0..4 {
                    s[2 * k] = _mm256_unpacklo_ps(r[2 * k], r[2 * k + 1]);
                    s[2 * k + 1] = _mm256_unpackhi_ps(r[2 * k], r[2 * k + 1]);
                }
                let mut t = [_mm256_setzero_ps(); 8];
                for k in 0..2 {
                    let (a, b) = (s[4 * k], s[4 * k + 2]);
                    let (c, d) = (s[4 * k + 1], s[4 * k + 3]);
                    t[4 * k] = _mm256_shuffle_ps::<0x44>(a, b);
                    t[4 * k + 1] = _mm256_shuffle_ps::<0xEE>(a, b);
                    t[4 * k + 2] = _mm256_shuffle_ps::<0x44>(c, d);
                    t[4 * k + 3] = _mm256_shuffle_ps::<0xEE>(c, d);
                }
                for m in 0..4 {
                    r[m] = _mm256_permute2f128_ps::<0x20>(t[m], t[4 + m]);
                    r[4 + m] = _mm256_permute2f128_ps::<0x31>(t[m], t[4 + m]);
                }
            }
        }
        #[inline(always)]
        fn fma(self, a: __m256, b: __m256, c: __m256) -> __m256 {
            // SAFETY: AVX2 and FMA: an `Avx2` exists only where the CPU has them.
            unsafe { _mm256_fmadd_ps(a, b, c) }
        }
        #[inline(always)]
        fn fnma(self, a: __m256, b: __m256, c: __m256) -> __m256 {
            // SAFETY: AVX2 and FMA: an `Avx2` exists only where the CPU has them.
            unsafe { _mm256_fnmadd_ps(a, b, c) }
        }
        #[inline(always)]
        fn fms(self, a: __m256, b: __m256, c: __m256) -> __m256 {
            // SAFETY: AVX2 and FMA: an `Avx2` exists only where the CPU has them.
            unsafe { _mm256_fmsub_ps(a, b, c) }
        }
        #[inline(always)]
        fn recip_estimate(self, a: __m256) -> __m256 {
            // SAFETY: AVX2 and FMA: an `Avx2` exists only where the CPU has them.
            unsafe { _mm256_rcp_ps(a) }
        }
        #[inline(always)]
        fn lt(self, a: __m256, b: __m256) -> __m256 {
            // SAFETY: AVX2 and FMA: an `Avx2` exists only where the CPU has them.
            unsafe { _mm256_cmp_ps::<_CMP_LT_OQ>(a, b) }
        }
        #[inline(always)]
        fn ge(self, a: __m256, b: __m256) -> __m256 {
            // SAFETY: AVX2 and FMA: an `Avx2` exists only where the CPU has them.
            unsafe { _mm256_cmp_ps::<_CMP_GE_OQ>(a, b) }
        }
        #[inline(always)]
        fn select(self, m: __m256, yes: __m256, no: __m256) -> __m256 {
            // SAFETY: AVX2 and FMA: an `Avx2` exists only where the CPU has them.
            unsafe { _mm256_blendv_ps(no, yes, m) }
        }
        #[inline(always)]
        fn zero_unless(self, m: __m256, a: __m256) -> __m256 {
            // SAFETY: AVX2 and FMA: an `Avx2` exists only where the CPU has them.
            unsafe { _mm256_and_ps(m, a) }
        }
        #[inline(always)]
        fn tail(self, n: usize) -> __m256 {
            // SAFETY: AVX2 and FMA: an `Avx2` exists only where the CPU has them.
            unsafe {
                let lanes = _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7);
                _mm256_castsi256_ps(_mm256_cmpgt_epi32(_mm256_set1_epi32(n as i32), lanes))
            }
        }
        #[inline(always)]
        fn to_bits(self, a: __m256) -> __m256i {
            // SAFETY: AVX2 and FMA: an `Avx2` exists only where the CPU has them.
            unsafe { _mm256_castps_si256(a) }
        }
        #[inline(always)]
        fn splat_i32(self, x: i32) -> __m256i {
            // SAFETY: AVX2 and FMA: an `Avx2` exists only where the CPU has them.
            unsafe { _mm256_set1_epi32(x) }
        }
        #[inline(always)]
        fn sub_i32(self, a: __m256i, b: __m256i) -> __m256i {
            // SAFETY: AVX2 and FMA: an `Avx2` exists only where the CPU has them.
            unsafe { _mm256_sub_epi32(a, b) }
        }
        #[inline(always)]
        fn pow2(self, n: __m256i) -> __m256 {
            // SAFETY: AVX2 and FMA: an `Avx2` exists only where the CPU has them.
            unsafe {
                let biased = _mm256_add_epi32(n, _mm256_set1_epi32(127));
                _mm256_castsi256_ps(_mm256_slli_epi32::<23>(biased))
            }
        }
        #[inline(always)]
        unsafe fn load(self, p: *const f32) -> __m256 {
            // SAFETY: the caller keeps the contract; AVX2 and FMA: an `Avx2` exists only where the CPU has them.
            unsafe { _mm256_loadu_ps(p) }
        }
        #[inline(always)]
        unsafe fn store(self, p: *mut f32, a: __m256) {
            // SAFETY: the caller keeps the contract; AVX2 and FMA: an `Avx2` exists only where the CPU has them.
            unsafe { _mm256_storeu_ps(p, a) }
        }
        #[inline(always)]
        unsafe fn load_masked(self, p: *const f32, m: __m256) -> __m256 {
            // SAFETY: the caller keeps the contract; AVX2 and FMA: an `Avx2` exists only where the CPU has them.
            unsafe { _mm256_maskload_ps(p, _mm256_castps_si256(m)) }
        }
        #[inline(always)]
        unsafe fn store_masked(self, p: *mut f32, m: __m256, a: __m256) {
            // SAFETY: the caller keeps the contract; AVX2 and FMA: an `Avx2` exists only where the CPU has them.
            unsafe { _mm256_maskstore_ps(p, _mm256_castps_si256(m), a) }
        }
    }
}

#[cfg(all(test, target_arch = "x86_64"))]
pub(crate) use x86::each_vector_isa;

#[cfg(all(test, target_arch = "x86_64"))]
mod tests {
    use super::{each_vector_isa, Simd, SimdOp};

    /// Loads a LANES x LANES block of distinct values, transposes it in registers and sums
    /// each original row.
    struct TransposeAndSum(Vec<f32>);

    impl SimdOp for TransposeAndSum {
        /// (lanes, the transposed block row-major, the row sums).
        type Output = (usize, Vec<f32>, Vec<f32>);

        #[inline(always)]
        fn vector<S: Simd>(self, s: S) -> Self::Output {
            let n = S::LANES;
            assert!(self.0.len() >= n * n);
            let mut rows: Vec<S::V> = (0..n)
                // SAFETY: row i's n floats lie in self.0 (asserted).
                .map(|i| unsafe { s.load(self.0.as_ptr().add(i * n)) })
                .collect();
            let sums = rows.iter().map(|&r| s.reduce_add(r)).collect();
            s.transpose(&mut rows);
            let mut out = vec![f32::NAN; n * n];
            for (i, &r) in rows.iter().enumerate() {
                // SAFETY: row i's n floats lie in out (n * n long).
                unsafe { s.store(out.as_mut_ptr().add(i * n), r) };
            }
            (n, out, sums)
        }

        fn portable(self) -> Self::Output {
            unreachable!("the test runs vector bodies only")
        }
    }

    #[test]
    fn transpose_and_reduce_add_on_every_vector_isa() {
        // Distinct, exactly representable values (sums of up to 16 of them are exact).
        let block: Vec<f32> = (0..256).map(|i| (i * 7 % 256) as f32 - 100.5).collect();
        let mut isas = vec![];
        each_vector_isa(
            || TransposeAndSum(block.clone()),
            |isa, (n, got, sums)| {
                isas.push(isa.to_string());
                for i in 0..n {
                    for j in 0..n {
                        assert_eq!(got[j * n + i], block[i * n + j], "{isa}: ({i}, {j})");
                    }
                    let want: f32 = block[i * n..(i + 1) * n].iter().sum();
                    assert_eq!(sums[i], want, "{isa}: row {i}");
                }
            },
        );
        assert_eq!(isas.is_empty(), !super::has_avx2_fma(), "checked {isas:?}");
        println!("checked in-process: {isas:?}");
    }
}
