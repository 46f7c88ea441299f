// Baselines (and the generic path for stride/dilation != 1): one thread per output, no shared
// memory, what PyTorch's native NCHW depthwise path does. Any size, stride, dilation, padding.
//   fwd:   one thread per y element; grid = ceil(N*C*OH*OW / block), block = (256)
//   dgrad: one thread per dx element, gathering from dy (no atomics); grid over N*C*H*W
//   wgrad: one thread per (c, ky, kx), looping over N, OH, OW in a fixed order (deterministic)
#include "lk_exact.cuh"

namespace lk {

__device__ __forceinline__ long long global_thread() {
    return (long long)blockIdx.x * blockDim.x + threadIdx.x;
}

template <typename T>
__device__ __forceinline__ void naive_fwd(const DwArgs& a) {
    const long long total = (long long)a.n * a.c * a.oh * a.ow;
    const long long i = global_thread();
    if (i >= total) return;
    const int ox = (int)(i % a.ow);
    const long long t = i / a.ow;
    const int oy = (int)(t % a.oh);
    const long long plane = t / a.oh;
    const int c = (int)(plane % a.c);
    const T* __restrict__ x = reinterpret_cast<const T*>(a.in0) + plane * a.h * a.w;
    const T* __restrict__ w = reinterpret_cast<const T*>(a.in1) + (long long)c * a.kh * a.kw;
    float acc = exact_correlate(x, a.h, a.w, w, a.kh, a.kw, a.sh, a.sw, a.dh, a.dw, a.pad_top,
                                a.pad_left, false, oy, ox);
    if (a.bias) acc += to_f32(reinterpret_cast<const T*>(a.bias)[c]);
    reinterpret_cast<T*>(a.out)[i] = from_f32<T>(acc);
}

template <typename T>
__device__ __forceinline__ void naive_dgrad(const DwArgs& a) {
    const long long total = (long long)a.n * a.c * a.h * a.w;
    const long long i = global_thread();
    if (i >= total) return;
    const int ix = (int)(i % a.w);
    const long long t = i / a.w;
    const int iy = (int)(t % a.h);
    const long long plane = t / a.h;
    const int c = (int)(plane % a.c);
    const T* __restrict__ dy = reinterpret_cast<const T*>(a.in0) + plane * a.oh * a.ow;
    const T* __restrict__ w = reinterpret_cast<const T*>(a.in1) + (long long)c * a.kh * a.kw;
    float acc = 0.f;
    for (int ky = 0; ky < a.kh; ++ky) {
        const int ty = iy + a.pad_top - ky * a.dh;  // = oy * sh
        if (ty < 0 || ty % a.sh != 0) continue;
        const int oy = ty / a.sh;
        if (oy >= a.oh) continue;
        for (int kx = 0; kx < a.kw; ++kx) {
            const int tx = ix + a.pad_left - kx * a.dw;
            if (tx < 0 || tx % a.sw != 0) continue;
            const int ox = tx / a.sw;
            if (ox >= a.ow) continue;
            acc = madd(to_f32(dy[(long long)oy * a.ow + ox]), to_f32(w[ky * a.kw + kx]), acc);
        }
    }
    reinterpret_cast<T*>(a.out)[i] = from_f32<T>(acc);
}

template <typename T>
__device__ __forceinline__ void naive_wgrad(const DwArgs& a) {
    const long long total = (long long)a.c * a.kh * a.kw;
    const long long i = global_thread();
    if (i >= total) return;
    const int kx = (int)(i % a.kw);
    const int ky = (int)((i / a.kw) % a.kh);
    const int c = (int)(i / ((long long)a.kh * a.kw));
    const float acc = exact_wgrad_tap<T>(a, c, ky, kx);
    reinterpret_cast<T*>(a.out)[i] = from_f32<T>(acc);
}

}  // namespace lk

#define LK_NAIVE_TYPE(TN, T)                                        \
    LK_KERNEL(lk_naive_fwd_##TN, (lk::naive_fwd<T>(args)))        \
    LK_KERNEL(lk_naive_dgrad_##TN, (lk::naive_dgrad<T>(args)))    \
    LK_KERNEL(lk_naive_wgrad_##TN, (lk::naive_wgrad<T>(args)))

LK_NAIVE_TYPE(f32, float)
LK_NAIVE_TYPE(f16, __half)
LK_NAIVE_TYPE(bf16, __nv_bfloat16)
