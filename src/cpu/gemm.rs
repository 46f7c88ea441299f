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
