// Small kernels for the RepLKNet forward pass on the device (src/model/gpu.rs): the deploy-form
// graph's element-wise epilogues, the head's pooling, and the stem's dense convolution. The
// depthwise layers use lk_conv.cu / lk_naive.cu and the 1x1 convs a GEMM (cuBLAS, or the host
// in the simulator). Storage f32, f16 or bf16; arithmetic in f32. Planned in src/plan/model.rs
// (`model_*_launch`); every tensor NCHW and contiguous.
//
//   lk_bias_act_<t>:   y[i] = act(x[i] + bias[c]) + res[i]     (in0 = x, bias = bias or 0,
//                      in1 = res or 0, out = y; y may alias x or res: each element is read
//                      and written by the same thread). aux0 = activation (0 none, 1 ReLU,
//                      2 GELU exact erf). Dims n, c, h, w; c = (i / (h*w)) % c. Grid-stride.
//   lk_affine_<t>:     y[i] = x[i] * scale[c] + shift[c]       (in0 = x, in1 = scale or 0 for 1,
//                      bias = shift or 0 for 0, out = y: y must not alias x). Grid-stride.
//   lk_avgpool_<t>:    one thread per plane (n, c): f = mean(x[n, c]) * scale[c] + shift[c]
//                      (in1 = scale or 0, bias = shift or 0), written to out[n * C + c], or to
//                      out[c * N + n] with aux1 = 1 (transposed: feeds the head GEMM). Dims
//                      n, c, h, w. The sum runs in a fixed order (deterministic).
//   lk_dense_conv_<t>: one thread per output (n, co, oy, ox) of a dense conv with bias and
//                      activation: in0 = x [N, Cin, H, W], in1 = w [Cout, Cin, KH, KW],
//                      bias [Cout] or 0, out = y [N, Cout, OH, OW]; c = Cin, aux1 = Cout,
//                      aux0 = activation; sh, sw, pad_top, pad_left, dh, dw as usual.
#include "lk_common.cuh"

namespace lk {

__device__ __forceinline__ float apply_act(float v, int act) {
    if (act == 1) return v > 0.f ? v : 0.f;
    if (act == 2) return 0.5f * v * (1.f + erff(v * 0.70710678118654752440f));
    return v;
}

__device__ __forceinline__ long long thread_index() {
    return (long long)blockIdx.x * blockDim.x + threadIdx.x;
}

__device__ __forceinline__ long long thread_stride() {
    return (long long)gridDim.x * blockDim.x;
}

// The element loop of lk_bias_act with index type I (32-bit when the tensor allows: cheaper
// division for the channel index).
template <typename T, typename I>
__device__ __forceinline__ void bias_act_loop(const DwArgs& a, I total, I hw) {
    const T* x = reinterpret_cast<const T*>(a.in0);
    const T* res = reinterpret_cast<const T*>(a.in1);
    const T* b = reinterpret_cast<const T*>(a.bias);
    T* y = reinterpret_cast<T*>(a.out);
    const I c = (I)a.c;
    const int act = a.aux0;
    for (I i = (I)thread_index(); i < total; i += (I)thread_stride()) {
        float v = to_f32(x[i]);
        if (b) v += to_f32(b[(i / hw) % c]);
        v = apply_act(v, act);
        if (res) v += to_f32(res[i]);
        y[i] = from_f32<T>(v);
    }
}

template <typename T>
__device__ __forceinline__ void bias_act(const DwArgs& a) {
    const long long hw = (long long)a.h * a.w;
    const long long total = (long long)a.n * a.c * hw;
    // 32-bit indices when every index plus one grid stride stays below 2^32
    if (total + thread_stride() < 4294967295ll) {
        bias_act_loop<T, unsigned>(a, (unsigned)total, (unsigned)hw);
    } else {
        bias_act_loop<T, long long>(a, total, hw);
    }
}

template <typename T>
__device__ __forceinline__ void affine(const DwArgs& a) {
    const long long hw = (long long)a.h * a.w;
    const long long total = (long long)a.n * a.c * hw;
    const T* __restrict__ x = reinterpret_cast<const T*>(a.in0);
    const T* __restrict__ scale = reinterpret_cast<const T*>(a.in1);
    const T* __restrict__ shift = reinterpret_cast<const T*>(a.bias);
    T* __restrict__ y = reinterpret_cast<T*>(a.out);
    for (long long i = thread_index(); i < total; i += thread_stride()) {
        const int c = (int)((i / hw) % a.c);
        float v = to_f32(x[i]);
        if (scale) v *= to_f32(scale[c]);
        if (shift) v += to_f32(shift[c]);
        y[i] = from_f32<T>(v);
    }
}

template <typename T>
__device__ __forceinline__ void avgpool(const DwArgs& a) {
    const long long planes = (long long)a.n * a.c;
    const long long p = thread_index();
    if (p >= planes) return;
    const long long hw = (long long)a.h * a.w;
    const int c = (int)(p % a.c);
    const long long n = p / a.c;
    const T* __restrict__ x = reinterpret_cast<const T*>(a.in0) + p * hw;
    const T* __restrict__ scale = reinterpret_cast<const T*>(a.in1);
    const T* __restrict__ shift = reinterpret_cast<const T*>(a.bias);
    float s = 0.f;
    for (long long i = 0; i < hw; ++i) s += to_f32(x[i]);
    float v = s / (float)hw;
    if (scale) v *= to_f32(scale[c]);
    if (shift) v += to_f32(shift[c]);
    const long long o = a.aux1 ? (long long)c * a.n + n : p;
    reinterpret_cast<T*>(a.out)[o] = from_f32<T>(v);
}

template <typename T>
__device__ __forceinline__ void dense_conv(const DwArgs& a) {
    const int cin = a.c, cout = a.aux1;
    const long long total = (long long)a.n * cout * a.oh * a.ow;
    const long long i = thread_index();
    if (i >= total) return;
    const int ox = (int)(i % a.ow);
    const long long t = i / a.ow;
    const int oy = (int)(t % a.oh);
    const long long t2 = t / a.oh;
    const int co = (int)(t2 % cout);
    const long long n = t2 / cout;
    const T* __restrict__ x = reinterpret_cast<const T*>(a.in0) + n * cin * a.h * a.w;
    const T* __restrict__ w = reinterpret_cast<const T*>(a.in1) + (long long)co * cin * a.kh * a.kw;
    float acc = 0.f;
    for (int ci = 0; ci < cin; ++ci) {
        const T* xp = x + (long long)ci * a.h * a.w;
        const T* wp = w + (long long)ci * a.kh * a.kw;
        for (int ky = 0; ky < a.kh; ++ky) {
            const int iy = oy * a.sh - a.pad_top + ky * a.dh;
            if (iy < 0 || iy >= a.h) continue;
            for (int kx = 0; kx < a.kw; ++kx) {
                const int ix = ox * a.sw - a.pad_left + kx * a.dw;
                if (ix < 0 || ix >= a.w) continue;
                acc = madd(to_f32(xp[(long long)iy * a.w + ix]), to_f32(wp[ky * a.kw + kx]), acc);
            }
        }
    }
    if (a.bias) acc += to_f32(reinterpret_cast<const T*>(a.bias)[co]);
    reinterpret_cast<T*>(a.out)[i] = from_f32<T>(apply_act(acc, a.aux0));
}

}  // namespace lk

#define LK_MODEL_TYPE(TN, T)                                         \
    LK_KERNEL(lk_bias_act_##TN, (lk::bias_act<T>(args)))             \
    LK_KERNEL(lk_affine_##TN, (lk::affine<T>(args)))                 \
    LK_KERNEL(lk_avgpool_##TN, (lk::avgpool<T>(args)))               \
    LK_KERNEL(lk_dense_conv_##TN, (lk::dense_conv<T>(args)))

LK_MODEL_TYPE(f32, float)
LK_MODEL_TYPE(f16, __half)
LK_MODEL_TYPE(bf16, __nv_bfloat16)
