// Deterministic weight gradient for any stride / dilation / padding (no float atomics):
//   lk_wgrad_strided_<t>: grid = (C, B), block = (256), shared = 256 * TC floats (8 KB).
//     Block (c, b) owns a fixed, contiguous slice of the P = N * OH * OW output positions of
//     channel c (flat index p = (n * OH + oy) * OW + ox, slice [b*P/B, (b+1)*P/B)).
//     The filter taps (t = ky * KW + kx) are cut into chunks of TC = 8; the block's threads are
//     TG = aux0 tap groups (a power of two <= 8) x PT = 256 / TG position lanes: thread
//     (tg, q) owns one chunk (8 taps, accumulators in registers) and the positions
//     p0 + q, p0 + q + PT, ... of the slice (a warp reads 32 consecutive positions: coalesced
//     dy loads, x loads at the stride). Only taps whose x lies inside the image are multiplied.
//     When the chunks outnumber TG, the block makes ceil(chunks / TG) passes over its slice.
//     Per pass the PT lane sums of each tap are added by a fixed pairwise tree in shared memory,
//     and the block writes its partial sums to workspace[(c * B + b) * KH*KW + tap]; then
//     lk_wgrad_reduce_<t> (kernels/lk_wgrad.cu, aux0 = B) adds the B partials in order.
//     aux0 = TG.
#include "lk_common.cuh"

namespace lk {

constexpr int WG_TC = 8;         // taps per thread
constexpr int WG_THREADS = 256;  // threads per block (must match src/plan/geometry.rs)

template <typename T>
__device__ __forceinline__ void wgrad_strided(const DwArgs& a) {
    const int KH = a.kh, KW = a.kw, KK = KH * KW;
    const int H = a.h, W = a.w, OW = a.ow;
    const int OHW = a.oh * a.ow;
    const int TG = a.aux0;
    const int PT = WG_THREADS / TG;
    const int tid = threadIdx.x;
    const int tg = tid / PT;
    const int q = tid - tg * PT;
    const int c = blockIdx.x;
    const int b = blockIdx.y;
    const int B = gridDim.y;
    const long long P = (long long)a.n * OHW;
    const long long p0 = P * b / B, p1 = P * (b + 1) / B;
    const int chunks = ceil_div(KK, WG_TC);

    LK_CHECKED_SMEM(s_red);  // [TG * TC rows][PT lanes]

    const T* __restrict__ xg = reinterpret_cast<const T*>(a.in0);
    const T* __restrict__ dyg = reinterpret_cast<const T*>(a.in1);
    float* __restrict__ ws = reinterpret_cast<float*>(a.workspace);

    for (int cb = 0; cb < chunks; cb += TG) {
        const int chunk = cb + tg;
        // tap offsets of this thread's chunk; taps past the filter never pass the bounds test
        int offy[WG_TC], offx[WG_TC];
        unsigned valid = 0;
#pragma unroll
        for (int j = 0; j < WG_TC; ++j) {
            const int t = chunk * WG_TC + j;
            const int ky = t / KW;
            offy[j] = ky * a.dh;
            offx[j] = (t - ky * KW) * a.dw;
            if (t < KK) valid |= 1u << j;
        }
        float acc[WG_TC];
#pragma unroll
        for (int j = 0; j < WG_TC; ++j) acc[j] = 0.f;

        if (valid != 0 && p0 + q < p1) {
            long long p = p0 + q;
            int n = (int)(p / OHW);
            int rem = (int)(p - (long long)n * OHW);
            for (; p < p1; p += PT) {
                const int oy = rem / OW;
                const int ox = rem - oy * OW;
                const long long plane = (long long)n * a.c + c;
                const float d = to_f32(dyg[plane * OHW + rem]);
                const T* __restrict__ xp = xg + plane * H * W;
                const int iy0 = oy * a.sh - a.pad_top;
                const int ix0 = ox * a.sw - a.pad_left;
#pragma unroll
                for (int j = 0; j < WG_TC; ++j) {
                    const int iy = iy0 + offy[j];
                    const int ix = ix0 + offx[j];
                    if (((valid >> j) & 1u) && iy >= 0 && iy < H && ix >= 0 && ix < W)
                        acc[j] = madd(d, to_f32(xp[(long long)iy * W + ix]), acc[j]);
                }
                rem += PT;
                while (rem >= OHW) {
                    rem -= OHW;
                    ++n;
                }
            }
        }
        // fixed-order reduction of the PT lane sums of every tap
        __syncthreads();  // the previous pass has read s_red
#pragma unroll
        for (int j = 0; j < WG_TC; ++j) s_red[(tg * WG_TC + j) * PT + q] = acc[j];
        __syncthreads();
        const int rows = TG * WG_TC;
        for (int s = PT / 2; s >= 1; s >>= 1) {
            for (int i = tid; i < rows * s; i += WG_THREADS) {
                const int r = i / s, l = i - r * s;
                s_red[r * PT + l] += s_red[r * PT + l + s];
            }
            __syncthreads();
        }
        if (tid < rows) {
            const int t = cb * WG_TC + tid;
            if (t < KK) ws[((long long)c * B + b) * KK + t] = s_red[tid * PT];
        }
    }
}

}  // namespace lk

#define LK_WGRAD_STRIDED_TYPE(TN, T) \
    LK_KERNEL(lk_wgrad_strided_##TN, (lk::wgrad_strided<T>(args)))

LK_WGRAD_STRIDED_TYPE(f32, float)
LK_WGRAD_STRIDED_TYPE(f16, __half)
LK_WGRAD_STRIDED_TYPE(bf16, __nv_bfloat16)
