// The im2col + GEMM baseline (any stride, dilation, padding). All GEMM operands live in the f32
// workspace; the GEMM itself is the plan's GemmStep (cuBLAS on the GPU, a host loop in the
// simulator). With M = N*OH*OW and KK = KH*KW, workspace layouts in f32 elements:
//   mode 0 (fwd):   P[C][M][KK] at 0 | W32[C][KK] at C*M*KK | OUT[C][M] at C*M*KK + C*KK
//                   GEMM per c: OUT_c[M x 1] = P_c[M x KK] * W32_c[KK x 1]
//   mode 1 (wgrad): P[C][M][KK] at 0 | DY32[C][M] at C*M*KK | OUT[C][KK] at C*M*KK + C*M
//                   GEMM per c: OUT_c[KK x 1] = P_c^T[KK x M] * DY32_c[M x 1]
//   mode 2 (dgrad): DY32[C][M] at 0 | W32[C][KK] at C*M | DCOL[C][M][KK] at C*M + C*KK
//                   GEMM per c: DCOL_c[M x KK] = DY32_c[M x 1] * W32_c[1 x KK]; then col2im.
// Row m = n*OH*OW + oy*OW + ox, column t = ky*KW + kx.
//   lk_im2col_<t>:          writes P and the f32 copies (aux0 = mode); in0/in1 as for the op
//   lk_im2col_epilogue_<t>: mode 0: y = OUT (+ bias) in NCHW and storage type; mode 1: dw = OUT
//   lk_col2im_<t>:          dx[n,c,iy,ix] = sum of the DCOL entries of the (m, t) that read it
// All three: grid-stride loops, grid = (min(ceil(total / 256), 1048576)), block = (256).
#include "lk_exact.cuh"

namespace lk {

struct Im2colDims {
    long long M, KK, OHOW;
};

__device__ __forceinline__ Im2colDims im2col_dims(const DwArgs& a) {
    Im2colDims d;
    d.OHOW = (long long)a.oh * a.ow;
    d.M = (long long)a.n * d.OHOW;
    d.KK = (long long)a.kh * a.kw;
    return d;
}

__device__ __forceinline__ long long grid_start() {
    return (long long)blockIdx.x * blockDim.x + threadIdx.x;
}
__device__ __forceinline__ long long grid_step() { return (long long)gridDim.x * blockDim.x; }

template <typename T>
__device__ __forceinline__ float patch_value(const DwArgs& a, const Im2colDims& d, long long idx) {
    const long long c = idx / (d.M * d.KK);
    const long long rem = idx - c * d.M * d.KK;
    const long long m = rem / d.KK;
    const int t = (int)(rem - m * d.KK);
    const long long n = m / d.OHOW;
    const long long p = m - n * d.OHOW;
    const int oy = (int)(p / a.ow), ox = (int)(p - (long long)oy * a.ow);
    const int ky = t / a.kw, kx = t - (t / a.kw) * a.kw;
    const int iy = oy * a.sh - a.pad_top + ky * a.dh;
    const int ix = ox * a.sw - a.pad_left + kx * a.dw;
    if (iy < 0 || iy >= a.h || ix < 0 || ix >= a.w) return 0.f;
    const T* x = reinterpret_cast<const T*>(a.in0);
    return to_f32(x[((n * a.c + c) * a.h + iy) * a.w + ix]);
}

// f32 copy of dy in [C][M] order.
template <typename T>
__device__ __forceinline__ float dy_value(const DwArgs& a, const Im2colDims& d, const T* dy, long long idx) {
    const long long c = idx / d.M;
    const long long m = idx - c * d.M;
    const long long n = m / d.OHOW;
    const long long p = m - n * d.OHOW;
    return to_f32(dy[(n * a.c + c) * d.OHOW + p]);
}

template <typename T>
__device__ __forceinline__ void im2col(const DwArgs& a) {
    const Im2colDims d = im2col_dims(a);
    const int mode = a.aux0;
    float* ws = reinterpret_cast<float*>(a.workspace);
    const long long CMKK = (long long)a.c * d.M * d.KK;
    const long long CKK = (long long)a.c * d.KK;
    const long long CM = (long long)a.c * d.M;
    const long long lenA = mode == 2 ? CM : CMKK;
    const long long lenB = mode == 1 ? CM : CKK;
    for (long long i = grid_start(); i < lenA + lenB; i += grid_step()) {
        if (mode == 2) {
            if (i < lenA) ws[i] = dy_value(a, d, reinterpret_cast<const T*>(a.in0), i);
            else ws[i] = to_f32(reinterpret_cast<const T*>(a.in1)[i - lenA]);
        } else if (i < lenA) {
            ws[i] = patch_value<T>(a, d, i);
        } else if (mode == 0) {
            ws[i] = to_f32(reinterpret_cast<const T*>(a.in1)[i - lenA]);
        } else {
            ws[i] = dy_value(a, d, reinterpret_cast<const T*>(a.in1), i - lenA);
        }
    }
}

template <typename T>
__device__ __forceinline__ void im2col_epilogue(const DwArgs& a) {
    const Im2colDims d = im2col_dims(a);
    const float* ws = reinterpret_cast<const float*>(a.workspace);
    T* out = reinterpret_cast<T*>(a.out);
    if (a.aux0 == 0) {
        const float* res = ws + (long long)a.c * d.M * d.KK + (long long)a.c * d.KK;
        const long long total = (long long)a.n * a.c * d.OHOW;
        for (long long i = grid_start(); i < total; i += grid_step()) {
            const long long p = i % d.OHOW;
            const long long plane = i / d.OHOW;
            const long long c = plane % a.c, n = plane / a.c;
            float v = res[c * d.M + n * d.OHOW + p];
            // padding zeros of P times a NaN/Inf weight are spurious NaNs: recompute exactly
            if (!finite_f32(v)) {
                const T* x = reinterpret_cast<const T*>(a.in0) + plane * a.h * a.w;
                const T* w = reinterpret_cast<const T*>(a.in1) + c * d.KK;
                v = exact_correlate(x, a.h, a.w, w, a.kh, a.kw, a.sh, a.sw, a.dh, a.dw, a.pad_top,
                                    a.pad_left, false, (int)(p / a.ow), (int)(p % a.ow));
            }
            if (a.bias) v += to_f32(reinterpret_cast<const T*>(a.bias)[c]);
            out[i] = from_f32<T>(v);
        }
    } else {
        const float* res = ws + (long long)a.c * d.M * d.KK + (long long)a.c * d.M;
        const long long total = (long long)a.c * d.KK;
        for (long long i = grid_start(); i < total; i += grid_step()) {
            float v = res[i];
            // padding zeros of P times a NaN/Inf in dy are spurious NaNs: recompute exactly
            if (!finite_f32(v)) {
                const int t = (int)(i % d.KK);
                v = exact_wgrad_tap<T>(a, (int)(i / d.KK), t / a.kw, t % a.kw);
            }
            out[i] = from_f32<T>(v);
        }
    }
}

template <typename T>
__device__ __forceinline__ void col2im(const DwArgs& a) {
    const Im2colDims d = im2col_dims(a);
    const float* dcol = reinterpret_cast<const float*>(a.workspace) + (long long)a.c * d.M + (long long)a.c * d.KK;
    T* dx = reinterpret_cast<T*>(a.out);
    const long long total = (long long)a.n * a.c * a.h * a.w;
    for (long long i = grid_start(); i < total; i += grid_step()) {
        const int ix = (int)(i % a.w);
        const long long t = i / a.w;
        const int iy = (int)(t % a.h);
        const long long plane = t / a.h;
        const long long c = plane % a.c, n = plane / a.c;
        const float* col = dcol + (c * d.M + n * d.OHOW) * d.KK;
        float acc = 0.f;
        for (int ky = 0; ky < a.kh; ++ky) {
            const int ty = iy + a.pad_top - ky * a.dh;
            if (ty < 0 || ty % a.sh != 0) continue;
            const int oy = ty / a.sh;
            if (oy >= a.oh) continue;
            for (int kx = 0; kx < a.kw; ++kx) {
                const int tx = ix + a.pad_left - kx * a.dw;
                if (tx < 0 || tx % a.sw != 0) continue;
                const int ox = tx / a.sw;
                if (ox >= a.ow) continue;
                acc += col[((long long)oy * a.ow + ox) * d.KK + ky * a.kw + kx];
            }
        }
        dx[i] = from_f32<T>(acc);
    }
}

}  // namespace lk

#define LK_IM2COL_TYPE(TN, T)                                                  \
    LK_KERNEL(lk_im2col_##TN, (lk::im2col<T>(args)))                         \
    LK_KERNEL(lk_im2col_epilogue_##TN, (lk::im2col_epilogue<T>(args)))       \
    LK_KERNEL(lk_col2im_##TN, (lk::col2im<T>(args)))

LK_IM2COL_TYPE(f32, float)
LK_IM2COL_TYPE(f16, __half)
LK_IM2COL_TYPE(bf16, __nv_bfloat16)
