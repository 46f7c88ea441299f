//! Safe SGEMM over the `gemm` crate (AVX-512 / AVX2 micro-kernels chosen at run time): the one
//! place that calls it (the im2col baseline and RepLKNet's 1x1 and stem convolutions use it).

/// Threads one GEMM may use: callers that already split the work over the pool pass `Single`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Threads {
    Single,
    /// The rayon pool.
    Pool,
}

/// C[m x n] = op(A) * B + beta * C, row-major and contiguous. op(A) is A [m x k], or with
/// `a_transposed` the transpose of A stored as [k x m]. Single-threaded.
#[allow(clippy::too_many_arguments)]
pub fn sgemm(
    m: usize,
    k: usize,
    n: usize,
    a: &[f32],
    a_transposed: bool,
    b: &[f32],
    beta: f32,
    c: &mut [f32],
) {
    let a_view = if a_transposed {
        MatRef::transposed(a, m)
    } else {
        MatRef::rows(a, k)
    };
    sgemm_view(
        m,
        k,
        n,
        a_view,
        MatRef::rows(b, n),
        beta,
        c,
        n,
        Threads::Single,
    )
}

/// A read-only matrix in a slice: element (i, j) at `i * row_stride + j * col_stride`.
#[derive(Clone, Copy, Debug)]
pub struct MatRef<'a> {
    pub data: &'a [f32],
    pub row_stride: usize,
    pub col_stride: usize,
}

impl<'a> MatRef<'a> {
    /// Row-major with `ld` floats per row.
    pub fn rows(data: &'a [f32], ld: usize) -> Self {
        MatRef {
            data,
            row_stride: ld,
            col_stride: 1,
        }
    }
    /// The transpose of a row-major matrix with `ld` floats per row.
    pub fn transposed(data: &'a [f32], ld: usize) -> Self {
        MatRef {
            data,
            row_stride: 1,
            col_stride: ld,
        }
    }
    /// Whether every element of an r x c view lies inside the slice.
    fn fits(&self, r: usize, c: usize) -> bool {
        r == 0 || c == 0 || (r - 1) * self.row_stride + (c - 1) * self.col_stride < self.data.len()
    }
}

/// C[m x n] (row-major, `ldc` floats per row) = A[m x k] * B[k x n] + beta * C.
#[allow(clippy::too_many_arguments)]
pub fn sgemm_view(
    m: usize,
    k: usize,
    n: usize,
    a: MatRef,
    b: MatRef,
    beta: f32,
    c: &mut [f32],
    ldc: usize,
    threads: Threads,
) {
    assert!(
        a.fits(m, k) && b.fits(k, n) && MatRef::rows(c, ldc).fits(m, n) && n <= ldc,
        "sgemm operand too short"
    );
    // SAFETY: the assert above guarantees that every element of the m x n block lies inside
    // `c`, whose rows are `ldc >= n` apart, and `c` is exclusively borrowed.
    unsafe { sgemm_view_raw(m, k, n, a, b, beta, c.as_mut_ptr(), ldc, threads) }
}

/// `sgemm_view` into a raw C: for callers that hand disjoint blocks of one matrix to
/// parallel tasks (overlapping `&mut` slices would be unsound).
///
/// # Safety
/// C[i * ldc + j] for i < m, j < n must be valid for writes (and reads when beta != 0), with
/// `ldc >= n`, and no other thread may access those elements during the call.
#[allow(clippy::too_many_arguments)]
pub unsafe fn sgemm_view_raw(
    m: usize,
    k: usize,
    n: usize,
    a: MatRef,
    b: MatRef,
    beta: f32,
    c: *mut f32,
    ldc: usize,
    threads: Threads,
) {
    assert!(
        a.fits(m, k) && b.fits(k, n) && n <= ldc,
        "sgemm operand too short"
    );
    if m == 0 || n == 0 || k == 0 {
        if k == 0 {
            for i in 0..m {
                // SAFETY: row i of the block is valid and ours (the caller's contract).
                let row = unsafe { std::slice::from_raw_parts_mut(c.add(i * ldc), n) };
                row.iter_mut()
                    .for_each(|v| *v = if beta == 0.0 { 0.0 } else { *v * beta });
            }
        }
        return;
    }
    let tail = n % NARROW_LANES;
    if tail != 0 && n > NARROW_LANES && a.col_stride == 1 && narrow_supported() {
        // The gemm crate's micro-kernels vectorise along n; a remainder of a few columns
        // (RepLKNet's 14x14 = 196 = 12 * 16 + 4 pixels) would take a whole 16-lane pass of its
        // one-vector kernel. Those columns go to dot products along k instead.
        let main = n - tail;
        // SAFETY: columns [0, main) of the caller's block (same contract).
        unsafe { sgemm_view_raw(m, k, main, a, b, beta, c, ldc, threads) };
        // SAFETY: columns [main, n) of the caller's block; AVX-512F detected.
        unsafe { sgemm_narrow(m, k, main, tail, a, b, beta, c, ldc) };
        return;
    }
    let parallelism = match threads {
        Threads::Single => gemm::Parallelism::None,
        Threads::Pool => gemm::Parallelism::Rayon(rayon::current_num_threads()),
    };
    // SAFETY: A and B lie inside their slices (assert above); the C block is valid and ours
    // (the caller's contract). With `read_dst` false (beta = 0) C is only written.
    unsafe {
        gemm::gemm(
            m,
            n,
            k,
            c,
            1,
            ldc as isize,
            beta != 0.0,
            a.data.as_ptr(),
            a.col_stride as isize,
            a.row_stride as isize,
            b.data.as_ptr(),
            b.col_stride as isize,
            b.row_stride as isize,
            beta,
            1.0,
            false,
            false,
            false,
            parallelism,
        );
    }
}

/// Columns are split off for [`sgemm_narrow`] when n is not a multiple of this.
const NARROW_LANES: usize = 16;

fn narrow_supported() -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        super::simd::uses_avx512()
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        false
    }
}

/// Columns [j0, j0 + cols) (cols < 16) of C = A * B + beta * C as dot products along k: those
/// columns of B are copied into rows of a small buffer, then each block of 4 rows of A x 4
/// columns keeps 16 accumulators (8 loads per 16 FMAs), a leftover column 8 rows.
///
/// # Safety
/// As `sgemm_view_raw` for columns [j0, j0 + cols); AVX-512F must be present.
#[allow(clippy::too_many_arguments)]
unsafe fn sgemm_narrow(
    m: usize,
    k: usize,
    j0: usize,
    cols: usize,
    a: MatRef,
    b: MatRef,
    beta: f32,
    c: *mut f32,
    ldc: usize,
) {
    // B's columns as rows.
    let mut bt = vec![0.0f32; cols * k];
    for (j, row) in bt.chunks_exact_mut(k).take(cols).enumerate() {
        for (kk, v) in row.iter_mut().enumerate() {
            *v = b.data[kk * b.row_stride + (j0 + j) * b.col_stride];
        }
    }
    #[cfg(target_arch = "x86_64")]
    // SAFETY: the caller's contract; AVX-512F present (the caller checked).
    unsafe {
        narrow_avx512(m, k, j0, cols, a, &bt, beta, c, ldc)
    };
    #[cfg(not(target_arch = "x86_64"))]
    unreachable!(
        "narrow_supported is false off x86-64: {m} {j0} {beta} {ldc} {:?}",
        (a, c)
    );
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
#[allow(clippy::too_many_arguments)]
unsafe fn narrow_avx512(
    m: usize,
    k: usize,
    j0: usize,
    cols: usize,
    a: MatRef,
    bt: &[f32],
    beta: f32,
    c: *mut f32,
    ldc: usize,
) {
    // Blocks of 4 columns x 4 rows (16 accumulators, FMA-bound), single leftover columns
    // x 8 rows; rows past m are computed on row 0 again and dropped.
    let mut jb = 0;
    while jb < cols {
        let q = if cols - jb >= 4 { 4 } else { 1 };
        let step = if q == 4 { 4 } else { 8 };
        for i in (0..m).step_by(step) {
            let rows: [&[f32]; 8] = std::array::from_fn(|r| {
                let row = if i + r < m { i + r } else { 0 };
                &a.data[row * a.row_stride..row * a.row_stride + k]
            });
            let put = |r: usize, jq: usize, v: f32| {
                if i + r < m {
                    // SAFETY: row i + r < m, column j0 + jb + jq < j0 + cols of the caller's
                    // block (read only when beta != 0, as the gemm crate does).
                    unsafe {
                        let dst = c.add((i + r) * ldc + j0 + jb + jq);
                        *dst = if beta == 0.0 { v } else { v + beta * *dst };
                    }
                }
            };
            if q == 4 {
                let sums = narrow_block::<4, 4>(k, rows[..4].try_into().unwrap(), &bt[jb * k..]);
                for (r, row) in sums.iter().enumerate() {
                    for (jq, &v) in row.iter().enumerate() {
                        put(r, jq, v);
                    }
                }
            } else {
                let sums = narrow_block::<8, 1>(k, rows[..8].try_into().unwrap(), &bt[jb * k..]);
                for (r, row) in sums.iter().enumerate() {
                    put(r, 0, row[0]);
                }
            }
        }
        jb += q;
    }
}

/// R rows of A (k values each) dotted with Q rows of `bt` (k apart).
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
fn narrow_block<const R: usize, const Q: usize>(
    k: usize,
    a: [&[f32]; R],
    bt: &[f32],
) -> [[f32; Q]; R] {
    use std::arch::x86_64::*;
    assert!(a.iter().all(|r| r.len() >= k) && bt.len() >= Q * k);
    let mut acc = [[_mm512_setzero_ps(); Q]; R];
    let mut kk = 0;
    while kk < k {
        let mask: __mmask16 = if k - kk >= 16 {
            u16::MAX
        } else {
            ((1u32 << (k - kk)) - 1) as u16
        };
        let mut bv = [_mm512_setzero_ps(); Q];
        for (q, v) in bv.iter_mut().enumerate() {
            // SAFETY: lanes kk..kk + 16 masked to < k of row q (bt holds Q rows of k).
            *v = unsafe { _mm512_maskz_loadu_ps(mask, bt.as_ptr().add(q * k + kk)) };
        }
        for (row, acc_r) in a.iter().zip(acc.iter_mut()) {
            // SAFETY: lanes masked to < k of this row (checked above).
            let av = unsafe { _mm512_maskz_loadu_ps(mask, row.as_ptr().add(kk)) };
            for (s, &b) in acc_r.iter_mut().zip(&bv) {
                *s = _mm512_fmadd_ps(av, b, *s);
            }
        }
        kk += 16;
    }
    acc.map(|row| row.map(|v| _mm512_reduce_add_ps(v)))
}
