// Deterministic weight gradient, stride 1 / dilation 1 (no float atomics anywhere):
//   kernel 1, lk_wgrad_partial_<t>: grid = (C, B), block = (G * TPG).
//     Block (c, b) owns a fixed, contiguous range of the work items (n, output tile of TH x TW)
//     of channel c (items [b*I/B, (b+1)*I/B), I = N * tiles). Per item it stages the dy tile
//     [TH][round8(TW)] and the x halo tile [TH + KH - 1][KWB*RX + round8(TW) + RX] (zero outside
//     the image) in shared memory.
//     A thread owns one "unit": a filter row ky and RX = 8 consecutive filter columns
//     (KWB = ceil(KW / RX) units per row, U = KH * KWB units); G groups of TPG threads split the
//     tile rows (row oy goes to group oy % G). Per row, the thread walks the tile row RX columns
//     per step: two 16-byte dy loads (broadcast) and four 16-byte x loads feed RX*RX = 64 FMAs.
//     Only tile rows whose x row lies inside the image are visited for each ky, and only column
//     steps that can touch it.
//     When U > TPG the units are processed in passes (re-staging the tiles).
//     The G group sums are added in group order in shared memory and the block writes its partial
//     K x K sums to workspace[(c * B + b) * KH*KW + tap].
//     aux0 = TH, aux1 = TW, aux2 = G.
//   kernel 2, lk_wgrad_reduce_<t>: one thread per (c, tap): dw = sum over b = 0..B-1 in order;
//     a non-finite sum is recomputed exactly (a NaN/Inf times a staged zero is a spurious NaN).
//     grid = ceil(C*KH*KW / 256), block = 256; aux0 = B.
#include "lk_exact.cuh"

namespace lk {

template <typename T>
__device__ __forceinline__ void wgrad_partial(const DwArgs& a) {
    const int KH = a.kh, KW = a.kw;
    const int H = a.h, W = a.w, OH = a.oh, OW = a.ow;
    const int pt = a.pad_top, pl = a.pad_left;
    const int TH = a.aux0, TW = a.aux1, G = a.aux2;
    const int nthreads = blockDim.x;
    const int TPG = nthreads / G;
    const int tid = threadIdx.x;
    const int g = tid / TPG;
    const int lane = tid - g * TPG;
    const int KWB = ceil_div(KW, RX);
    const int U = KH * KWB;
    const int c = blockIdx.x;
    const int b = blockIdx.y;
    const int B = gridDim.y;
    const int tiles_y = ceil_div(OH, TH), tiles_x = ceil_div(OW, TW);
    const long long tiles = (long long)tiles_y * tiles_x;
    const long long items = (long long)a.n * tiles;
    const long long it0 = items * b / B, it1 = items * (b + 1) / B;

    const int TWP = wgrad_dy_ld(TW);     // dy tile row stride
    const int ldx = wgrad_x_ld(KW, TW);  // x tile row stride (room for the 16-wide window)
    const int xrows = TH + KH - 1;
    LK_CHECKED_SMEM(smem);
    smem_ptr<float> s_x = smem;
    smem_ptr<float> s_dy = s_x + xrows * ldx;
    smem_ptr<float> s_red = s_dy + TH * TWP;

    const T* __restrict__ xg = reinterpret_cast<const T*>(a.in0);
    const T* __restrict__ dyg = reinterpret_cast<const T*>(a.in1);
    float* __restrict__ ws = reinterpret_cast<float*>(a.workspace);
    const int KK = KH * KW;

    for (int u0 = 0; u0 < U; u0 += TPG) {
        const int u = u0 + lane;
        const bool valid = g < G && u < U;
        const int ky = valid ? u / KWB : 0;
        const int kx0 = valid ? (u - ky * KWB) * RX : 0;
        float acc[RX];
#pragma unroll
        for (int j = 0; j < RX; ++j) acc[j] = 0.f;

        for (long long it = it0; it < it1; ++it) {
            const int n = (int)(it / tiles);
            const long long rem = it - (long long)n * tiles;
            const int ty_t = (int)(rem / tiles_x);
            const int tx_t = (int)(rem - (long long)ty_t * tiles_x);
            const int oy0 = ty_t * TH, ox0 = tx_t * TW;
            const long long plane = (long long)n * a.c + c;
            __syncthreads();  // the previous item is consumed
            {
                const T* xp = xg + plane * H * W;
                const int r0 = oy0 - pt, c0 = ox0 - pl;
                const int total = xrows * ldx;
                for (int i = tid; i < total; i += nthreads) {
                    const int r = i / ldx, cc = i - r * ldx;
                    const int gy = r0 + r, gx = c0 + cc;
                    float v = 0.f;
                    if (gy >= 0 && gy < H && gx >= 0 && gx < W) v = to_f32(xp[(long long)gy * W + gx]);
                    s_x[i] = v;
                }
                const T* dp = dyg + plane * OH * OW;
                const int dtotal = TH * TWP;
                for (int i = tid; i < dtotal; i += nthreads) {
                    const int r = i / TWP, cc = i - r * TWP;
                    const int gy = oy0 + r, gx = ox0 + cc;
                    float v = 0.f;
                    if (gy < OH && cc < TW && gx < OW) v = to_f32(dp[(long long)gy * OW + gx]);
                    s_dy[i] = v;
                }
            }
            __syncthreads();
            if (valid) {
                // rows whose x row oy0 + oy - pt + ky is inside the image, and inside the output
                const int oy_lo = max(0, pt - ky - oy0);
                const int oy_hi = min(min(TH, OH - oy0), H + pt - ky - oy0);
                // columns that can touch the image for one of the RX taps: x column ox0 + ox - pl + kx0 + j
                const int gx0 = ox0 - pl + kx0;
                const int ox_lo = max(0, -(gx0 + RX - 1));
                const int ox_hi = min(min(TW, OW - ox0), W - gx0);
                // RX columns at a time from an aligned start: the extra products read zeros
                // (dy outside the tile/image, or x outside the image)
                const int ox_a = ox_lo & ~(RX - 1);
                int oy = oy_lo + ((g - oy_lo % G) + G) % G;  // first row of this group
                if (ox_lo >= ox_hi) oy = oy_hi;
                for (; oy < oy_hi; oy += G) {
                    smem_ptr<const float> xrow = s_x + (oy + ky) * ldx + kx0;
                    smem_ptr<const float> drow = s_dy + oy * TWP;
                    for (int ox = ox_a; ox < ox_hi; ox += RX) {
                        float d[RX], v[2 * RX];
#pragma unroll
                        for (int q = 0; q < RX / 4; ++q) {
                            const float4 t = lds4(drow + ox + 4 * q);
                            d[4 * q] = t.x;
                            d[4 * q + 1] = t.y;
                            d[4 * q + 2] = t.z;
                            d[4 * q + 3] = t.w;
                        }
#pragma unroll
                        for (int q = 0; q < RX / 2; ++q) {
                            const float4 t = lds4(xrow + ox + 4 * q);
                            v[4 * q] = t.x;
                            v[4 * q + 1] = t.y;
                            v[4 * q + 2] = t.z;
                            v[4 * q + 3] = t.w;
                        }
#pragma unroll
                        for (int o = 0; o < RX; ++o) {
#pragma unroll
                            for (int j = 0; j < RX; ++j) acc[j] = madd(d[o], v[o + j], acc[j]);
                        }
                    }
                }
            }
        }
        // ordered reduction of the G group sums, then one partial per block
        __syncthreads();
#pragma unroll
        for (int j = 0; j < RX; ++j) s_red[(g * TPG + lane) * RX + j] = acc[j];
        __syncthreads();
        if (g == 0 && u < U) {
            float sum[RX];
#pragma unroll
            for (int j = 0; j < RX; ++j) sum[j] = 0.f;
            for (int gg = 0; gg < G; ++gg) {
#pragma unroll
                for (int j = 0; j < RX; ++j) sum[j] += s_red[(gg * TPG + lane) * RX + j];
            }
            float* dst = ws + ((long long)c * B + b) * KK + ky * KW;
#pragma unroll
            for (int j = 0; j < RX; ++j)
                if (kx0 + j < KW) dst[kx0 + j] = sum[j];
        }
    }
}

template <typename T>
__device__ __forceinline__ void wgrad_reduce(const DwArgs& a) {
    const int KK = a.kh * a.kw;
    const long long total = (long long)a.c * KK;
    const long long i = (long long)blockIdx.x * blockDim.x + threadIdx.x;
    if (i >= total) return;
    const int B = a.aux0;
    const long long c = i / KK;
    const int t = (int)(i - c * KK);
    const float* ws = reinterpret_cast<const float*>(a.workspace) + c * B * KK + t;
    float s = 0.f;
    for (int b = 0; b < B; ++b) s += ws[(long long)b * KK];
    // the partial kernels multiply padding zeros too: repair their spurious NaNs (lk_exact.cuh)
    if (!finite_f32(s)) s = exact_wgrad_tap<T>(a, (int)c, t / a.kw, t % a.kw);
    reinterpret_cast<T*>(a.out)[i] = from_f32<T>(s);
}

}  // namespace lk

#define LK_WGRAD_TYPE(TN, T)                                             \
    LK_KERNEL(lk_wgrad_partial_##TN, (lk::wgrad_partial<T>(args)))     \
    LK_KERNEL(lk_wgrad_reduce_##TN, (lk::wgrad_reduce<T>(args)))

LK_WGRAD_TYPE(f32, float)
LK_WGRAD_TYPE(f16, __half)
LK_WGRAD_TYPE(bf16, __nv_bfloat16)
