// Tensor-core depthwise convolution, f16/bf16 inputs with f32 accumulation, stride 1 / dilation 1:
// forward, and the data gradient as the same kernel with the filter rotated 180 degrees (done
// while staging it) and padding K-1-p. sm_80+ (mma.sync.aligned.m16n8k16); the sm_75 build of
// the fatbin compiles these entry points empty and the planner never launches them there.
//
// Mapping (analysis in BENCHMARKS.md, "Tensor-core path"): for one plane and one filter row ky,
// a 16-row x 8-column output tile is the product of a 16 x 16k input-row tile and a banded
// Toeplitz matrix built from filter row ky:
//   Y[oy, ox] += sum_j X[oy + ky - pt, j] * T_ky[j, ox],  T_ky[j, ox] = w[ky, j - ox + pl]
// (zero outside the band). One mma.m16n8k16 per (16 output rows, 8 output columns, 16 input
// columns): A = the input rows (row-major, straight from the staged tile), B = 16 x 8 of the
// Toeplitz band, accumulated in f32 over S = ceil((KW + 7) / 16) k-steps and every filter row;
// the last k-step is an mma.m16n8k8 when the band ends in its first 8 columns (templated
// K = 31, 29, 27, 13).
// B depends only on ky and the k-step (not on the output tile), so each warp builds its S B
// fragments per filter row from the staged filter row in registers once and reuses them for all
// its n-tiles; A's 8-column blocks are shared by neighbouring (n-tile, k-step) pairs (window of
// n-tile q, step s = blocks q + 2s and q + 2s + 1), so a warp loads nt - 1 + 2S blocks per filter
// row for nt * S mma.
//
// Launch (planned in src/tensor_core.rs): grid (N*C, tiles_y, tiles_x), block (32 * warps, 1, 1);
// warp w computes output rows oy0 + 16 w .. + 15 and aux0 = nt n-tiles of 8 columns (TW = 8 nt).
// Shared memory (16-bit storage, no conversion): the input tile [16 warps + KH - 1][LD] (TWI =
// 8 (nt - 1) + 16 S columns used, zero outside the image; LD = tc_ld(TWI) so that the 8 rows x 4
// words of a fragment load hit 32 different banks), then the filter [KH][2][16 S + 10]: two
// copies of each row, copy e with 8 + e zero taps before kx = 0 and zeros after KW - 1 (the
// band's edges read them), so that every B register is one aligned 32-bit load.
// Templated K (square K x K, S constant, fully unrolled); K == 0: any KH x KW with KW <= 57.
#include "lk_exact.cuh"
#include "lk_tc.cuh"

namespace lk {
namespace tc {

template <typename T, int K, bool DGRAD>
__device__ __forceinline__ void conv_tc(const DwArgs& a) {
#ifdef LK_TC_ENABLED
    constexpr int NT_MAX = 8;  // n-tiles (8 output columns each) per warp
    constexpr int S_MAX = 4;   // k-steps of 16 input columns: KW + 7 <= 64, so KW <= 57
    const int KH = K ? K : a.kh;
    const int KW = K ? K : a.kw;
    constexpr int SK = K ? (K + 7 + 15) / 16 : S_MAX;  // k-steps (upper bound when generic)
    const int S = K ? SK : (KW + 7 + 15) / 16;
    // the band of 8 outputs spans KW + 7 columns: when they end in the first half of the last
    // k-step, that step is an m16n8k8 (K = 31: 16 + 16 + 8 columns instead of 48); templated
    // sizes only (a runtime choice costs the generic kernel a stack frame)
    constexpr bool tail8 = K > 0 && K + 7 <= 16 * SK - 8;
    const auto [SH, SW, OH, OW, pt, pl] = pass_geometry<DGRAD>(a, KH, KW);

    const int tid = threadIdx.x, nthreads = blockDim.x;
    const int warp = tid >> 5, lane = tid & 31;
    const int g = lane >> 2, t = lane & 3;
    const int nt = a.aux0;
    const int TH = 16 * (nthreads >> 5), TW = 8 * nt;
    const long long plane = blockIdx.x;
    const int c = (int)(plane % a.c);
    const int oy0 = blockIdx.y * TH, ox0 = blockIdx.z * TW;
    const int sy0 = oy0 - pt, sx0 = ox0 - pl;  // source row / column of tile element (0, 0)

    const uint16_t* __restrict__ src = reinterpret_cast<const uint16_t*>(a.in0) + plane * SH * SW;
    const uint16_t* __restrict__ wt = reinterpret_cast<const uint16_t*>(a.in1) + (long long)c * KH * KW;
    T* __restrict__ dst = reinterpret_cast<T*>(a.out) + plane * OH * OW;

    const int twi = 8 * (nt - 1) + 16 * S;
    const int ld = tc_ld(twi);
    const int rows = TH + KH - 1;
    const int fw = 16 * S + 10;  // one filter copy: 8 + e zeros, KW taps, zeros
    LK_DYNAMIC_SMEM(smem_f);
    uint16_t* s_in = reinterpret_cast<uint16_t*>(smem_f);
    uint16_t* s_w = s_in + ((rows * ld + 7) & ~7);

    for (int i = tid; i < rows * twi; i += nthreads) {
        const int r = i / twi, cc = i - r * twi;
        const int gy = sy0 + r, gx = sx0 + cc;
        s_in[r * ld + cc] = (gy >= 0 && gy < SH && gx >= 0 && gx < SW) ? src[(long long)gy * SW + gx] : (uint16_t)0;
    }
    for (int i = tid; i < KH * 2 * fw; i += nthreads) {
        const int r = i / (2 * fw), e = (i / fw) & 1, kx = i - (2 * r + e) * fw - 8 - e;
        uint16_t v = 0;
        if (kx >= 0 && kx < KW) v = DGRAD ? wt[(KH - 1 - r) * KW + (KW - 1 - kx)] : wt[r * KW + kx];
        s_w[i] = v;
    }
    __syncthreads();

    const int wy0 = oy0 + 16 * warp;  // output row of the warp's m = 0
    const int rows_out = min(16, OH - wy0);
    if (rows_out <= 0) return;  // warp-uniform; no barrier follows
    const int cols_out = min(TW, OW - ox0);
    const int nt_used = (cols_out + 7) / 8;

    float acc[NT_MAX][4];
#pragma unroll
    for (int q = 0; q < NT_MAX; ++q)
#pragma unroll
        for (int e = 0; e < 4; ++e) acc[q][e] = 0.f;

    // filter rows whose source rows (wy0 - pt + ky + [0, rows_out)) touch the image
    const int ky_lo = max(0, pt - wy0 - rows_out + 1);
    const int ky_hi = min(KH, SH + pt - wy0);
    constexpr int NB = NT_MAX - 1 + 2 * SK;  // 8-column A blocks per filter row
#pragma unroll 1
    for (int ky = ky_lo; ky < ky_hi; ++ky) {
        // B of k-step s: B[k][n] = w[ky][16 s + k - n]; lane holds k = 2t, 2t+1 (b0, b1) and
        // 2t+8, 2t+9 (b2, b3) of column n = g: two 32-bit loads from the copy of the filter row
        // shifted by e = g & 1 (tap kx at 8 + e + kx), where 16 s + 2t - g + 8 + e is even.
        // Only k-steps that some n-tile uses (source columns inside the image).
        const int e = g & 1;
        const uint16_t* wr = s_w + (2 * ky + e) * fw + 8 + e;
        uint32_t b0[SK], b1[SK];
#pragma unroll
        for (int s = 0; s < SK; ++s) {
            b0[s] = 0u;
            b1[s] = 0u;
            if (s < S && sx0 + 16 * s + 8 * nt_used + 8 > 0 && sx0 + 16 * s < SW) {
                const int k0 = 16 * s + 2 * t - g;
                b0[s] = lds32(wr + k0);
                if (!(tail8 && s == S - 1)) b1[s] = lds32(wr + k0 + 8);
            }
        }
        // A blocks: tile rows 16 warp + ky + g (a0a1 / a4a5) and + 8 (a2a3 / a6a7), columns
        // 8 blk + 2t, 2t+1; blocks wholly outside the image are zeros, not loaded
        const uint16_t* r0 = s_in + (16 * warp + ky + g) * ld + 2 * t;
        const uint16_t* r1 = r0 + 8 * ld;
        uint32_t alo[NB], ahi[NB];
#pragma unroll
        for (int blk = 0; blk < NB; ++blk) {
            if (blk < nt_used - 1 + 2 * S - (tail8 ? 1 : 0)) {
                const bool inside = sx0 + 8 * blk + 8 > 0 && sx0 + 8 * blk < SW;
                alo[blk] = inside ? lds32(r0 + 8 * blk) : 0u;
                ahi[blk] = inside ? lds32(r1 + 8 * blk) : 0u;
            }
        }
#pragma unroll
        for (int q = 0; q < NT_MAX; ++q) {
            if (q < nt_used) {
#pragma unroll
                for (int s = 0; s < SK; ++s) {
                    // skip k-steps whose source columns all lie outside the image (zeros)
                    const int gx = sx0 + 8 * q + 16 * s;
                    const bool k8 = tail8 && s == S - 1;
                    if (s < S && gx + (k8 ? 8 : 16) > 0 && gx < SW) {
                        if (k8) {
                            const uint32_t fa[2] = {alo[q + 2 * s], ahi[q + 2 * s]};
                            const uint32_t fb[1] = {b0[s]};
                            mma8<T>(acc[q], fa, fb);
                        } else {
                            const uint32_t fa[4] = {alo[q + 2 * s], ahi[q + 2 * s], alo[q + 2 * s + 1],
                                                    ahi[q + 2 * s + 1]};
                            const uint32_t fb[2] = {b0[s], b1[s]};
                            mma<T>(acc[q], fa, fb);
                        }
                    }
                }
            }
        }
    }
    // D fragment: c0, c1 at row g, columns 2t, 2t+1; c2, c3 at row g + 8
    const float bias = (!DGRAD && a.bias) ? to_f32(reinterpret_cast<const T*>(a.bias)[c]) : 0.f;
#pragma unroll
    for (int q = 0; q < NT_MAX; ++q) {
        if (q < nt_used) {
#pragma unroll
            for (int e = 0; e < 4; ++e) {
                const int oy = wy0 + g + 8 * (e / 2);
                const int ox = ox0 + 8 * q + 2 * t + (e % 2);
                if (oy < OH && ox < OW) {
                    float v = acc[q][e] + bias;
                    // a NaN/Inf times a zero of the band or the padding is a spurious NaN:
                    // recompute exactly (lk_exact.cuh)
                    if (!finite_f32(v))
                        v = exact_correlate(reinterpret_cast<const T*>(src), SH, SW, reinterpret_cast<const T*>(wt),
                                            KH, KW, 1, 1, 1, 1, pt, pl, DGRAD, oy, ox) +
                            bias;
                    dst[(long long)oy * OW + ox] = from_f32<T>(v);
                }
            }
        }
    }
#endif
}

}  // namespace tc
}  // namespace lk

#define LK_TC_K(TN, T, K)                                                      \
    LK_KERNEL(lk_tc_fwd_##TN##_k##K, (lk::tc::conv_tc<T, K, false>(args)))    \
    LK_KERNEL(lk_tc_dgrad_##TN##_k##K, (lk::tc::conv_tc<T, K, true>(args)))

#define LK_TC_TYPE(TN, T)                                                       \
    LK_FOR_TEMPLATE_SIZES(LK_TC_K, TN, T)                                       \
    LK_KERNEL(lk_tc_fwd_##TN##_generic, (lk::tc::conv_tc<T, 0, false>(args)))  \
    LK_KERNEL(lk_tc_dgrad_##TN##_generic, (lk::tc::conv_tc<T, 0, true>(args)))

LK_TC_TYPE(f16, __half)
LK_TC_TYPE(bf16, __nv_bfloat16)
