// Exact single values, for repairing the rare non-finite results of kernels that read zero
// padding (of the image, the filter tile or dy) to keep their loops free of bounds checks: a NaN
// or Inf operand times such a zero gives a NaN that the definition does not have (padding
// contributes nothing, it is not 0 * w). Those products only ever add NaN, so every value that
// is non-finite by definition is non-finite in the fast result as well; recomputing the
// non-finite values here gives IEEE-correct results at no cost in the finite case.
#pragma once

#include "lk_common.cuh"

namespace lk {

__device__ __forceinline__ bool finite_f32(float v) {
#ifdef LK_SIM
    return std::isfinite(v);
#else
    return isfinite(v);
#endif
}

// Output (oy, ox) of the correlation of one SH x SW source plane with a KH x KW filter (rotated
// 180 degrees when `flip`), any stride/dilation, signed padding (pt, pl); taps whose source lies
// outside the plane are skipped.
template <typename T>
__device__ float exact_correlate(const T* __restrict__ src, int SH, int SW, const T* __restrict__ w,
                                 int KH, int KW, int sh, int sw, int dh, int dw, int pt, int pl,
                                 bool flip, int oy, int ox) {
    float acc = 0.f;
    for (int ky = 0; ky < KH; ++ky) {
        const int iy = oy * sh + ky * dh - pt;
        if (iy < 0 || iy >= SH) continue;
        for (int kx = 0; kx < KW; ++kx) {
            const int ix = ox * sw + kx * dw - pl;
            if (ix < 0 || ix >= SW) continue;
            const int t = flip ? (KH - 1 - ky) * KW + (KW - 1 - kx) : ky * KW + kx;
            acc = madd(to_f32(src[(long long)iy * SW + ix]), to_f32(w[t]), acc);
        }
    }
    return acc;
}

// Weight gradient dw[c, ky, kx] over the whole batch (in0 = x, in1 = dy), in a fixed order.
template <typename T>
__device__ float exact_wgrad_tap(const DwArgs& a, int c, int ky, int kx) {
    float acc = 0.f;
    for (int n = 0; n < a.n; ++n) {
        const long long plane = (long long)n * a.c + c;
        const T* __restrict__ x = reinterpret_cast<const T*>(a.in0) + plane * a.h * a.w;
        const T* __restrict__ dy = reinterpret_cast<const T*>(a.in1) + plane * a.oh * a.ow;
        for (int oy = 0; oy < a.oh; ++oy) {
            const int iy = oy * a.sh - a.pad_top + ky * a.dh;
            if (iy < 0 || iy >= a.h) continue;
            for (int ox = 0; ox < a.ow; ++ox) {
                const int ix = ox * a.sw - a.pad_left + kx * a.dw;
                if (ix < 0 || ix >= a.w) continue;
                acc = madd(to_f32(dy[(long long)oy * a.ow + ox]), to_f32(x[(long long)iy * a.w + ix]), acc);
            }
        }
    }
    return acc;
}

}  // namespace lk
