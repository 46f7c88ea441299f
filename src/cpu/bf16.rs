//! bf16 on the CPU: operands rounded to bf16 (round to nearest even), products summed in f32.
//!
//! Three instruction sets, picked at run time (best first): AMX (`tdpbf16ps`, 16x16 f32 tiles,
//! `bf16_amx.rs`), AVX-512 BF16 (`vdpbf16ps`, two products per f32 lane) and a fallback that
//! runs the f32 kernels on the bf16-rounded values. All three compute the same products (a
//! product of two bf16 values is exact in f32); only the order of the f32 sums differs, and
//! `tdpbf16ps` / `vdpbf16ps` treat subnormal inputs and results as zero.
//! Measured on this project's Xeon (BENCHMARKS.md, "CPU bf16"): AMX 2-4x the f32 SGEMM on
//! RepLKNet's 1x1 shapes; the `vdpbf16ps` GEMM 0.5-0.7x (it issues at half the FMA rate there),
//! so it only helps where that instruction is as fast as an FMA (not measured).
//!
//! The GEMM here serves the 1x1 convolutions: `C[m x n] = A[m x k] * B[k x n] + beta * C` with A
//! the weights (packed once, [`Bf16Weights`]) and B the activations (packed per call,
//! [`Bf16Input`]) in the pair-interleaved ("VNNI") layout both AMX and `vdpbf16ps` read: element
//! pair (B[2p][j], B[2p+1][j]) is one 32-bit word at row p, column j.

// The register-block loops index several fixed-size arrays in step; ranges read best there.
#![allow(clippy::needless_range_loop)]

pub use super::bf16_amx::cpu_has_amx;
use super::bf16_amx::{BlockOut, Blocks};
use super::gemm::{sgemm_view_raw, MatRef, Threads};
use crate::error::{Error, Result};

/// The bf16 instruction set, ordered from least to most capable.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Bf16Isa {
    /// The f32 kernels on bf16-rounded operands (any CPU).
    Fallback,
    /// AVX-512F + AVX-512 BF16 (`vdpbf16ps`).
    Avx512Bf16,
    /// AMX-TILE + AMX-BF16 (`tdpbf16ps`).
    Amx,
}

impl Bf16Isa {
    pub const ALL: [Bf16Isa; 3] = [Bf16Isa::Fallback, Bf16Isa::Avx512Bf16, Bf16Isa::Amx];

    pub fn name(self) -> &'static str {
        match self {
            Bf16Isa::Fallback => "f32 fallback",
            Bf16Isa::Avx512Bf16 => "AVX-512 BF16",
            Bf16Isa::Amx => "AMX-BF16",
        }
    }

    /// Whether this CPU (and, for AMX, the operating system) can run it.
    pub fn available(self) -> bool {
        match self {
            Bf16Isa::Fallback => true,
            Bf16Isa::Avx512Bf16 => has_avx512_bf16(),
            Bf16Isa::Amx => super::bf16_amx::enabled(),
        }
    }

    /// Every instruction set this machine can run.
    pub fn all_available() -> Vec<Bf16Isa> {
        Self::ALL.into_iter().filter(|i| i.available()).collect()
    }

    fn check(self) -> Result<()> {
        if self.available() {
            Ok(())
        } else {
            Err(Error::Unsupported(format!(
                "{} is not available on this CPU",
                self.name()
            )))
        }
    }
}

fn has_avx512_bf16() -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        std::is_x86_feature_detected!("avx512f") && std::is_x86_feature_detected!("avx512bf16")
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        false
    }
}

/// The best bf16 instruction set of this machine, capped by `LKCONV_CPU_ISA` when set: `amx`,
/// `avx512bf16`, or any of the f32 caps (`avx512`, `avx2`, `portable`), which mean the fallback.
pub fn detect() -> Bf16Isa {
    static ISA: std::sync::OnceLock<Bf16Isa> = std::sync::OnceLock::new();
    *ISA.get_or_init(|| {
        let cap = match std::env::var("LKCONV_CPU_ISA").as_deref() {
            Ok("avx512bf16") => Bf16Isa::Avx512Bf16,
            Ok("avx512" | "avx2" | "portable") => Bf16Isa::Fallback,
            _ => Bf16Isa::Amx,
        };
        Bf16Isa::all_available()
            .into_iter()
            .filter(|&i| i <= cap)
            .max()
            .unwrap_or(Bf16Isa::Fallback)
    })
}

/// f32 -> bf16 bits, rounded to nearest even; NaN stays NaN (quiet), infinities stay infinite.
#[inline(always)]
pub fn to_bf16_bits(v: f32) -> u16 {
    let b = v.to_bits();
    // Both computed, one selected: the loops over this vectorise.
    let rounded = (b.wrapping_add(0x7fff + ((b >> 16) & 1)) >> 16) as u16;
    let quiet_nan = ((b >> 16) | 0x40) as u16;
    if v.is_nan() {
        quiet_nan
    } else {
        rounded
    }
}

/// bf16 bits -> f32 (exact).
#[inline(always)]
pub fn from_bf16_bits(h: u16) -> f32 {
    f32::from_bits((h as u32) << 16)
}

/// `v` rounded to the nearest bf16 value, as f32.
#[inline(always)]
pub fn round_bf16(v: f32) -> f32 {
    from_bf16_bits(to_bf16_bits(v))
}

/// Rounds every element to bf16 (as f32 values).
pub fn round_slice(src: &[f32], dst: &mut [f32]) {
    #[inline(always)]
    fn body(src: &[f32], dst: &mut [f32]) {
        for (d, s) in dst.iter_mut().zip(src) {
            *d = round_bf16(*s);
        }
    }
    #[cfg(target_arch = "x86_64")]
    #[target_feature(enable = "avx512f")]
    fn avx512(src: &[f32], dst: &mut [f32]) {
        body(src, dst)
    }
    #[cfg(target_arch = "x86_64")]
    if super::simd::uses_avx512() {
        // SAFETY: the engine's ISA is AVX-512 only where AVX-512F was detected.
        return unsafe { avx512(src, dst) };
    }
    body(src, dst)
}

/// `out[j]` = the pair word of (`lo[j]`, `hi[j]`) (`hi` zero when absent): one row of pairs.
pub(crate) fn pack_pairs(out: &mut [u32], lo: &[f32], hi: Option<&[f32]>) {
    #[inline(always)]
    fn body(out: &mut [u32], lo: &[f32], hi: Option<&[f32]>) {
        match hi {
            Some(hi) => {
                for ((o, &a), &b) in out.iter_mut().zip(lo).zip(hi) {
                    *o = pair(a, b);
                }
            }
            None => {
                for (o, &a) in out.iter_mut().zip(lo) {
                    *o = pair(a, 0.0);
                }
            }
        }
    }
    #[cfg(target_arch = "x86_64")]
    #[target_feature(enable = "avx512f")]
    fn avx512(out: &mut [u32], lo: &[f32], hi: Option<&[f32]>) {
        body(out, lo, hi)
    }
    #[cfg(target_arch = "x86_64")]
    if super::simd::uses_avx512() {
        // SAFETY: the engine's ISA is AVX-512 only where AVX-512F was detected.
        return unsafe { avx512(out, lo, hi) };
    }
    body(out, lo, hi)
}

/// One pair word: `lo` in the low half (the even k), `hi` in the high half.
#[inline(always)]
fn pair(lo: f32, hi: f32) -> u32 {
    to_bf16_bits(lo) as u32 | (to_bf16_bits(hi) as u32) << 16
}

/// Rows of packed A beyond `m` (zeros): a kernel may compute whole 32-row blocks from any row.
const ROW_SLACK: usize = 32;
/// Columns of packed B beyond `n` (zeros): a kernel may compute whole 32-column blocks.
const COL_SLACK: usize = 32;
/// k is padded (with zeros) to a multiple of this: one AMX tile holds 32 bf16 per row.
const K_STEP: usize = 32;

/// The weights of a GEMM, `[m x k]` row-major, rounded to bf16 once and packed for one ISA.
#[derive(Clone, Debug)]
pub struct Bf16Weights {
    isa: Bf16Isa,
    m: usize,
    k: usize,
    data: WeightData,
}

#[derive(Clone, Debug)]
enum WeightData {
    /// Rows of `k_pad / 2` pair words (bf16 pairs along k), `m + ROW_SLACK` rows.
    Pairs { words: Vec<u32>, k_pad: usize },
    /// The rounded values as f32, `[m x k]` (the fallback runs the f32 GEMM on them).
    Rounded(Vec<f32>),
}

impl Bf16Weights {
    /// Packs `w` (`[m x k]`, row-major) for `isa`.
    pub fn new(isa: Bf16Isa, m: usize, k: usize, w: &[f32]) -> Result<Self> {
        isa.check()?;
        super::direct::check_len("bf16 weights", w.len(), m * k)?;
        let data = if isa == Bf16Isa::Fallback {
            let mut r = vec![0.0; m * k];
            round_slice(w, &mut r);
            WeightData::Rounded(r)
        } else {
            let k_pad = k.div_ceil(K_STEP) * K_STEP;
            let mut words = vec![0u32; (m + ROW_SLACK) * k_pad / 2];
            if k > 0 {
                for (row, out) in w.chunks(k).zip(words.chunks_mut(k_pad / 2)) {
                    for (p, o) in out.iter_mut().enumerate().take(k.div_ceil(2)) {
                        let hi = if 2 * p + 1 < k { row[2 * p + 1] } else { 0.0 };
                        *o = pair(row[2 * p], hi);
                    }
                }
            }
            WeightData::Pairs { words, k_pad }
        };
        Ok(Bf16Weights { isa, m, k, data })
    }

    pub fn isa(&self) -> Bf16Isa {
        self.isa
    }
    /// Rows (output channels).
    pub fn rows(&self) -> usize {
        self.m
    }
    /// Columns (input channels).
    pub fn cols(&self) -> usize {
        self.k
    }
}

/// The activations of a GEMM, `[k x n]`, rounded to bf16 and packed for one ISA.
#[derive(Clone, Debug, Default)]
pub struct Bf16Input {
    isa: Option<Bf16Isa>,
    k: usize,
    n: usize,
    /// Pair words per row (Pairs) or floats per row (Rounded).
    ld: usize,
    words: Vec<u32>,
    rounded: Vec<f32>,
}

impl Bf16Input {
    /// An empty buffer; [`Bf16Input::pack`] fills it (and reuses its memory on the next call).
    pub fn new() -> Self {
        Self::default()
    }

    /// Packs `x` (`[k x n]`, rows `ldx` floats apart) for `isa`, reusing this buffer.
    pub fn pack(&mut self, isa: Bf16Isa, k: usize, n: usize, x: &[f32], ldx: usize) -> Result<()> {
        isa.check()?;
        if n > ldx || (k > 0 && n > 0 && (k - 1) * ldx + n > x.len()) {
            return Err(Error::BufferLength {
                what: "bf16 GEMM input".into(),
                expected: if k == 0 { 0 } else { (k - 1) * ldx + n },
                got: x.len(),
            });
        }
        self.isa = Some(isa);
        self.k = k;
        self.n = n;
        if isa == Bf16Isa::Fallback {
            self.ld = n;
            self.rounded.clear();
            self.rounded.resize(k * n, 0.0);
            if n > 0 {
                for (r, out) in self.rounded.chunks_mut(n).enumerate() {
                    round_slice(&x[r * ldx..r * ldx + n], out);
                }
            }
            return Ok(());
        }
        let kp = k.div_ceil(K_STEP) * K_STEP / 2;
        self.ld = n.div_ceil(16) * 16 + COL_SLACK;
        self.words.clear();
        self.words.resize(kp * self.ld, 0);
        let ld = self.ld;
        use rayon::prelude::*;
        self.words
            .par_chunks_mut(ld)
            .take(k.div_ceil(2))
            .enumerate()
            .for_each(|(p, out)| {
                let lo = &x[2 * p * ldx..2 * p * ldx + n];
                let hi = (2 * p + 1 < k).then(|| &x[(2 * p + 1) * ldx..(2 * p + 1) * ldx + n]);
                pack_pairs(out, lo, hi);
            });
        Ok(())
    }

    pub fn rows(&self) -> usize {
        self.k
    }
    pub fn cols(&self) -> usize {
        self.n
    }
}

/// Rows x columns of the AVX-512 BF16 register block (16 accumulators).
const DP_ROWS: usize = 8;
const DP_COLS: usize = 32;

/// `C[r0.., c0..]` (an `m x nc` block, rows `ldc` floats apart) = A[r0..r0+m] * B[:, c0..c0+nc]
/// + beta * C, single-threaded, on the ISA both operands were packed for.
///
/// # Safety
/// `C[i * ldc + j]` for `i < m`, `j < nc` must be valid for writes (and reads when beta != 0)
/// and accessed by no other thread during the call.
#[allow(clippy::too_many_arguments)]
pub unsafe fn gemm_raw(
    a: &Bf16Weights,
    r0: usize,
    m: usize,
    b: &Bf16Input,
    c0: usize,
    nc: usize,
    beta: f32,
    c: *mut f32,
    ldc: usize,
) {
    assert!(
        b.isa == Some(a.isa) && a.k == b.k,
        "bf16 GEMM operands packed for different ISAs or sizes"
    );
    assert!(
        r0 + m <= a.m && c0 + nc <= b.n && nc <= ldc,
        "bf16 GEMM block"
    );
    if m == 0 || nc == 0 {
        return;
    }
    match &a.data {
        WeightData::Rounded(w) => {
            // SAFETY: the caller's contract is sgemm_view_raw's.
            unsafe {
                sgemm_view_raw(
                    m,
                    a.k,
                    nc,
                    MatRef::rows(&w[r0 * a.k..], a.k),
                    MatRef::rows(&b.rounded[c0..], b.ld),
                    beta,
                    c,
                    ldc,
                    Threads::Single,
                )
            }
        }
        WeightData::Pairs { words, k_pad } => {
            let out = BlockOut { c, ldc, beta };
            let blocks = Blocks {
                a: words,
                lda: k_pad / 2,
                b: &b.words,
                ldb: b.ld,
                kp: k_pad / 2,
            };
            if a.isa == Bf16Isa::Amx {
                super::bf16_amx::gemm(&blocks, r0, m, c0, nc, &out);
            } else {
                #[cfg(target_arch = "x86_64")]
                // SAFETY: the weights were packed for Avx512Bf16 only after `check` found it.
                unsafe {
                    dp_gemm(&blocks, r0, m, c0, nc, &out)
                }
            }
        }
    }
}

/// C (`m x ldc` floats, row-major) = A * B + beta * C for whole operands, single-threaded.
pub fn gemm(a: &Bf16Weights, b: &Bf16Input, beta: f32, c: &mut [f32], ldc: usize) -> Result<()> {
    if a.k != b.k || b.isa != Some(a.isa) {
        return Err(Error::InvalidArgument(
            "bf16 GEMM operands packed for different ISAs or inner sizes".into(),
        ));
    }
    if b.n > ldc || (a.m > 0 && b.n > 0 && (a.m - 1) * ldc + b.n > c.len()) {
        return Err(Error::BufferLength {
            what: "bf16 GEMM output".into(),
            expected: a.m.saturating_sub(1) * ldc + b.n,
            got: c.len(),
        });
    }
    // SAFETY: checked above that the m x n block with row stride ldc lies inside `c`, which is
    // exclusively borrowed.
    unsafe { gemm_raw(a, 0, a.m, b, 0, b.n, beta, c.as_mut_ptr(), ldc) };
    Ok(())
}

/// The AVX-512 BF16 GEMM: register blocks of DP_ROWS x DP_COLS; each pair-row of B is two
/// vector loads, each A pair one broadcast, each product pair one `vdpbf16ps`.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx512bf16")]
fn dp_gemm(p: &Blocks, r0: usize, m: usize, c0: usize, nc: usize, out: &BlockOut) {
    use std::arch::x86_64::*;
    let mut acc_mem = [0.0f32; DP_ROWS * DP_COLS];
    for jb in (0..nc).step_by(DP_COLS) {
        let col = c0 + jb;
        for ib in (0..m).step_by(DP_ROWS) {
            let row = r0 + ib;
            p.check(row, DP_ROWS, col, DP_COLS);
            let mut acc = [[_mm512_setzero_ps(); 2]; DP_ROWS];
            let a0 = p.a[row * p.lda..].as_ptr();
            let b0 = p.b[col..].as_ptr();
            for kp in 0..p.kp {
                // SAFETY: pair row kp, columns col..col + 32 lie inside B (`check`).
                let (bv0, bv1) = unsafe {
                    let bp = b0.add(kp * p.ldb);
                    (
                        _mm512_loadu_si512(bp as *const __m512i),
                        _mm512_loadu_si512(bp.add(16) as *const __m512i),
                    )
                };
                let (bv0, bv1) = (as_bf16_pairs(bv0), as_bf16_pairs(bv1));
                for i in 0..DP_ROWS {
                    // SAFETY: row `row + i` < rows of packed A (`check`), kp < lda.
                    let aw = unsafe { *a0.add(i * p.lda + kp) };
                    let av = as_bf16_pairs(_mm512_set1_epi32(aw as i32));
                    acc[i][0] = _mm512_dpbf16_ps(acc[i][0], av, bv0);
                    acc[i][1] = _mm512_dpbf16_ps(acc[i][1], av, bv1);
                }
            }
            for i in 0..DP_ROWS {
                for h in 0..2 {
                    // SAFETY: acc_mem holds DP_ROWS x 32 floats.
                    unsafe {
                        _mm512_storeu_ps(acc_mem.as_mut_ptr().add(i * DP_COLS + 16 * h), acc[i][h])
                    };
                }
            }
            // SAFETY: rows ib.. and columns jb.. of the caller's block (`gemm_raw`'s contract).
            unsafe {
                out.merge(
                    ib,
                    jb,
                    &acc_mem,
                    DP_COLS,
                    DP_ROWS.min(m - ib),
                    DP_COLS.min(nc - jb),
                )
            };
        }
    }
}

/// A vector of 32 bf16 bit patterns as the type `vdpbf16ps` takes.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
#[inline]
pub(crate) fn as_bf16_pairs(v: std::arch::x86_64::__m512i) -> std::arch::x86_64::__m512bh {
    use std::arch::x86_64::{__m512bh, __m512i};
    // SAFETY: both are 64-byte vectors of plain bits; every bit pattern is valid for both.
    unsafe { std::mem::transmute::<__m512i, __m512bh>(v) }
}
