//! Safe single-threaded SGEMM over `matrixmultiply`: the one place that calls it (the im2col
//! baseline and RepLKNet's 1x1 and stem convolutions use it; callers parallelise over blocks).

/// C[m x n] = op(A) * B + beta * C, row-major and contiguous. op(A) is A [m x k], or with
/// `a_transposed` the transpose of A stored as [k x m].
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
    assert!(
        a.len() >= m * k && b.len() >= k * n && c.len() >= m * n,
        "sgemm operand too short"
    );
    if m == 0 || n == 0 {
        return;
    }
    if k == 0 {
        c[..m * n].iter_mut().for_each(|v| *v *= beta);
        return;
    }
    let (rsa, csa) = if a_transposed {
        (1, m as isize)
    } else {
        (k as isize, 1)
    };
    // SAFETY: the assert above guarantees that every element the strides address lies inside
    // `a`, `b` and `c`; `c` is exclusively borrowed and does not alias `a` or `b`.
    unsafe {
        matrixmultiply::sgemm(
            m,
            k,
            n,
            1.0,
            a.as_ptr(),
            rsa,
            csa,
            b.as_ptr(),
            n as isize,
            1,
            beta,
            c.as_mut_ptr(),
            n as isize,
            1,
        );
    }
}
