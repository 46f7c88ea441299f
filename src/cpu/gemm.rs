//! Safe SGEMM over the `gemm` crate (AVX-512 / AVX2 micro-kernels chosen at run time): the one
//! place that calls it (the im2col baseline and RepLKNet's 1x1 and stem convolutions use it).

use super::simd::{dispatch, Simd, SimdOp};

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
        // SAFETY: columns [main, n) of the caller's block; A's rows are contiguous.
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

/// Columns are split off for [`sgemm_narrow`] when n is not a multiple of this: the `gemm`
/// crate's micro-kernels cover 16 columns (one AVX-512 vector, two AVX2 vectors).
const NARROW_LANES: usize = 16;

fn narrow_supported() -> bool {
    super::simd::detect_isa() >= super::simd::Isa::Avx2
}

/// Columns [j0, j0 + cols) (cols < 16) of C = A * B + beta * C as dot products along k: those
/// columns of B are copied into rows of a small buffer, then blocks of rows of A x up to 4
/// columns are reduced in vector accumulators.
///
/// # Safety
/// As `sgemm_view_raw` for columns [j0, j0 + cols); A's rows contiguous (`col_stride` 1).
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
    dispatch(Narrow {
        m,
        k,
        j0,
        cols,
        a,
        bt: &bt,
        beta,
        c,
        ldc,
    })
}

/// [`sgemm_narrow`]'s dot products, one body per instruction set.
struct Narrow<'a> {
    m: usize,
    k: usize,
    j0: usize,
    cols: usize,
    a: MatRef<'a>,
    /// B's `cols` columns as rows of k.
    bt: &'a [f32],
    beta: f32,
    c: *mut f32,
    ldc: usize,
}

impl Narrow<'_> {
    /// C[i, j0 + j] = v (+ beta * C): row i < m, column j < cols of the caller's block.
    fn put(&self, i: usize, j: usize, v: f32) {
        // SAFETY: i < m and j < cols (the callers' loops), inside the block `sgemm_narrow`'s
        // caller hands over (read only when beta != 0, as the gemm crate does).
        unsafe {
            let dst = self.c.add(i * self.ldc + self.j0 + j);
            *dst = if self.beta == 0.0 {
                v
            } else {
                v + self.beta * *dst
            };
        }
    }

    fn row(&self, i: usize) -> &[f32] {
        &self.a.data[i * self.a.row_stride..i * self.a.row_stride + self.k]
    }

    /// Columns [jb, jb + Q) of the block, R rows of A at a time; rows past m are computed on
    /// row 0 again and dropped.
    #[inline(always)]
    fn columns<S: Simd, const R: usize, const Q: usize>(&self, s: S, jb: usize) {
        let m = self.m;
        let bt = &self.bt[jb * self.k..];
        for i in (0..m).step_by(R) {
            let rows: [&[f32]; R] =
                std::array::from_fn(|r| self.row(if i + r < m { i + r } else { 0 }));
            let sums = narrow_block::<S, R, Q>(s, self.k, rows, bt);
            for (r, row) in sums.iter().enumerate().take(m - i) {
                for (jq, &v) in row.iter().enumerate() {
                    self.put(i + r, jb + jq, v);
                }
            }
        }
    }
}

impl SimdOp for Narrow<'_> {
    type Output = ();

    #[inline(always)]
    fn vector<S: Simd>(self, s: S) {
        // Column groups of 4, 3 and 2 with as many rows of A as keep the accumulators, one
        // side's vectors and the other's current one within AVX2's 16 vector registers (a
        // 4 x 4 block spilled its accumulators to the stack); a single column 8 rows.
        let mut jb = 0;
        while jb < self.cols {
            let q = (self.cols - jb).min(4);
            match q {
                4 => self.columns::<S, 3, 4>(s, jb),
                3 => self.columns::<S, 4, 3>(s, jb),
                2 => self.columns::<S, 6, 2>(s, jb),
                _ => self.columns::<S, 8, 1>(s, jb),
            }
            jb += q;
        }
    }

    fn portable(self) {
        for i in 0..self.m {
            for j in 0..self.cols {
                let bt = &self.bt[j * self.k..(j + 1) * self.k];
                let v = self.row(i).iter().zip(bt).map(|(a, b)| a * b).sum();
                self.put(i, j, v);
            }
        }
    }
}

/// R rows of A (k values each) dotted with Q rows of `bt` (k apart).
#[inline(always)]
fn narrow_block<S: Simd, const R: usize, const Q: usize>(
    s: S,
    k: usize,
    a: [&[f32]; R],
    bt: &[f32],
) -> [[f32; Q]; R] {
    assert!(a.iter().all(|r| r.len() >= k) && bt.len() >= Q * k);
    let mut acc = [[s.zero(); Q]; R];
    let whole_k = k - k % S::LANES;
    let mut kk = 0;
    while kk < whole_k {
        // SAFETY: lanes kk..kk + LANES <= k of every row (asserted above).
        unsafe { narrow_step(s, &mut acc, &a, bt, k, kk, S::LANES) };
        kk += S::LANES;
    }
    if kk < k {
        // SAFETY: lanes kk..k of every row (asserted above).
        unsafe { narrow_step(s, &mut acc, &a, bt, k, kk, k - kk) };
    }
    // Plain loops, not `map` closures: every call stays inside the caller's target_feature body.
    let mut sums = [[0.0; Q]; R];
    for (sum_r, acc_r) in sums.iter_mut().zip(&acc) {
        for (sum, &v) in sum_r.iter_mut().zip(acc_r) {
            *sum = s.reduce_add(v);
        }
    }
    sums
}

/// One vector step of [`narrow_block`] at offset kk: the smaller side's vectors are loaded
/// first and the other side's one at a time, so that R * Q + min(R, Q) + 1 registers suffice.
///
/// # Safety
/// Every row of `a` and the Q rows of `bt` (k apart) are valid for `lanes` floats at kk.
#[inline(always)]
unsafe fn narrow_step<S: Simd, const R: usize, const Q: usize>(
    s: S,
    acc: &mut [[S::V; Q]; R],
    a: &[&[f32]; R],
    bt: &[f32],
    k: usize,
    kk: usize,
    lanes: usize,
) {
    // SAFETY (both branches): the caller's contract.
    unsafe {
        if R <= Q {
            let mut av = [s.zero(); R];
            for (v, row) in av.iter_mut().zip(a) {
                *v = load_part(s, row.as_ptr().add(kk), lanes);
            }
            for q in 0..Q {
                let b = load_part(s, bt.as_ptr().add(q * k + kk), lanes);
                for (acc_r, &v) in acc.iter_mut().zip(&av) {
                    acc_r[q] = s.fma(v, b, acc_r[q]);
                }
            }
        } else {
            let mut bv = [s.zero(); Q];
            for (q, v) in bv.iter_mut().enumerate() {
                *v = load_part(s, bt.as_ptr().add(q * k + kk), lanes);
            }
            for (acc_r, row) in acc.iter_mut().zip(a) {
                let v = load_part(s, row.as_ptr().add(kk), lanes);
                for (sum, &b) in acc_r.iter_mut().zip(&bv) {
                    *sum = s.fma(v, b, *sum);
                }
            }
        }
    }
}

/// `lanes` (<= LANES) floats from `p`, zeros after them.
///
/// # Safety
/// `p` is valid for reading `lanes` floats.
#[inline(always)]
unsafe fn load_part<S: Simd>(s: S, p: *const f32, lanes: usize) -> S::V {
    // SAFETY: the caller's contract (masked lanes are not read).
    unsafe {
        if lanes == S::LANES {
            s.load(p)
        } else {
            s.load_masked(p, s.tail(lanes))
        }
    }
}

#[cfg(all(test, target_arch = "x86_64"))]
mod tests {
    use std::cell::RefCell;

    use super::*;
    use crate::cpu::simd::each_vector_isa;
    use crate::rng::Rng;

    /// Every vector body of the narrow tail this CPU can run, in this process, against f64 dot
    /// products: 1-15 columns (every mix of the 4-, 3-, 2- and 1-column groups), row counts
    /// that leave every block partial, k below, at and off the vector lengths, beta 0 and 1.
    #[test]
    fn narrow_tail_matches_f64_on_every_isa() {
        let mut rng = Rng::for_test("narrow_tail_matches_f64_on_every_isa");
        let mut isas = Vec::new();
        for (m, k) in [(1, 1), (5, 7), (13, 8), (7, 41), (25, 33)] {
            for cols in 1..16 {
                for beta in [0.0f32, 1.0] {
                    let (j0, ldc) = (2, cols + 5);
                    let a = rng.vec_pm1(m * k);
                    let bt = rng.vec_pm1(cols * k);
                    let c0 = rng.vec_pm1(m * ldc);
                    let c = RefCell::new(c0.clone());
                    let make = || {
                        let mut c = c.borrow_mut();
                        c.copy_from_slice(&c0);
                        if beta == 0.0 {
                            c.fill(f32::NAN); // must be overwritten, never read
                        }
                        Narrow {
                            m,
                            k,
                            j0,
                            cols,
                            a: MatRef::rows(&a, k),
                            bt: &bt,
                            beta,
                            c: c.as_mut_ptr(),
                            ldc,
                        }
                    };
                    each_vector_isa(make, |isa, ()| {
                        isas.push(isa.to_string());
                        let c = c.borrow();
                        for i in 0..m {
                            for j in 0..ldc {
                                let got = c[i * ldc + j];
                                let inside = (j0..j0 + cols).contains(&j);
                                if !inside {
                                    let want = if beta == 0.0 {
                                        f32::NAN
                                    } else {
                                        c0[i * ldc + j]
                                    };
                                    assert!(
                                        got.to_bits() == want.to_bits(),
                                        "{isa} m{m} k{k} cols{cols}: ({i}, {j}) outside written"
                                    );
                                    continue;
                                }
                                let (row, col) = (&a[i * k..][..k], &bt[(j - j0) * k..][..k]);
                                let dot: f64 = row
                                    .iter()
                                    .zip(col)
                                    .map(|(&x, &y)| x as f64 * y as f64)
                                    .sum();
                                let mag: f64 = row
                                    .iter()
                                    .zip(col)
                                    .map(|(&x, &y)| (x * y).abs() as f64)
                                    .sum();
                                let old = c0[i * ldc + j] as f64;
                                let want = dot + beta as f64 * old;
                                let bound = (k + 1) as f64
                                    * f32::EPSILON as f64
                                    * (mag + beta as f64 * old.abs())
                                    + f32::MIN_POSITIVE as f64;
                                assert!(
                                    (got as f64 - want).abs() <= bound,
                                    "{isa} m{m} k{k} cols{cols} beta{beta}: ({i}, {j}) {got} vs {want}"
                                );
                            }
                        }
                    });
                }
            }
        }
        assert!(
            !isas.is_empty() || !narrow_supported(),
            "no vector body ran"
        );
    }
}
