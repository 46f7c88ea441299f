// Block-tiled depthwise convolution, stride 1 / dilation 1: forward, and the data gradient as the
// same kernel with the filter rotated 180 degrees (done while staging it) and padding K-1-p.
//
// Launch (planned in src/plan/tiled.rs):
//   grid  = (ceil(N*C / P), tiles along y, tiles along x), block = (TX, TH, P)
//   slice z of a block computes a TH x TW output tile (TW = TX * RX) of plane blockIdx.x*P + z
//   (P > 1 packs several planes of a small image into one block); each thread one row of RX = 8
//   consecutive outputs (a 1 x 8 register tile). Each slice has its own shared-memory region.
//   Shared memory (f32, dynamic): the filter chunk [KCH][round4(KCW)] (zero-padded columns), then
//   the input halo tile [TH + KCH - 1][TW + round4(KCW)], zero outside the image.
//   Template K > 0: a K x K filter staged at once; the inner loops are fully unrolled: per filter
//   row, a register window of RX + round4(K) inputs is read with 16-byte loads and each weight
//   (read 4 at a time, broadcast) feeds RX FMAs.
//   K == 0 (generic): any KH x KW; the filter is processed in chunks of aux2 rows x aux3 columns
//   (so that shared memory stays small for any size); a shift register of RX inputs slides along
//   the filter row (one shared load + one broadcast weight load per RX FMAs).
//   Per thread, only filter rows that touch the image are visited (ky range clamped per output
//   row, rows past the plane skipped); chunks that cannot touch the image are skipped block-wide;
//   the filter columns are clamped per thread too: to quads of 4 taps (templated, guarded quads
//   of the unrolled loop) or to single taps (generic).
//   dgrad: in0 = dy (the "source" plane is OH x OW), out = dx (H x W), padding KH-1-top, KW-1-left.
#include "lk_exact.cuh"

namespace lk {

// Stages rows [r0, r0 + nr) x cols [c0, c0 + nc) of a source plane (SH x SW) as f32 into `s`
// (row stride nc), zero outside the plane.
template <typename T>
__device__ __forceinline__ void stage_plane(smem_ptr<float> s, int nr, int nc, const T* __restrict__ src,
                                            int SH, int SW, int r0, int c0, int tid, int nthreads) {
    const int total = nr * nc;
    for (int i = tid; i < total; i += nthreads) {
        const int r = i / nc;
        const int cc = i - r * nc;
        const int gy = r0 + r, gx = c0 + cc;
        float v = 0.f;
        if (gy >= 0 && gy < SH && gx >= 0 && gx < SW) v = to_f32(src[(long long)gy * SW + gx]);
        s[i] = v;
    }
}

// Stages filter rows [ky0, ky0 + nky) x cols [kx0, kx0 + ld) (zero beyond kx0 + nkx) into s_w
// with row stride ld; `flip` rotates the filter by 180 degrees (data gradient).
template <typename T>
__device__ __forceinline__ void stage_filter(smem_ptr<float> s_w, int ld, const T* __restrict__ w, int KH,
                                             int KW, int ky0, int nky, int kx0, int nkx, bool flip,
                                             int tid, int nthreads) {
    const int total = nky * ld;
    for (int i = tid; i < total; i += nthreads) {
        const int r = i / ld;
        const int q = i - r * ld;
        float v = 0.f;
        if (q < nkx) {
            int ky = ky0 + r, kx = kx0 + q;
            if (flip) {
                ky = KH - 1 - ky;
                kx = KW - 1 - kx;
            }
            v = to_f32(w[ky * KW + kx]);
        }
        s_w[i] = v;
    }
}

template <typename T, int K, bool DGRAD>
__device__ __forceinline__ void conv_tiled(const DwArgs& a) {
    const int KH = K ? K : a.kh;
    const int KW = K ? K : a.kw;
    const auto [SH, SW, OH, OW, pt, pl] = pass_geometry<DGRAD>(a, KH, KW);

    // register tile RY x RX: the templated kernel computes 2 rows per thread so that one window
    // of inputs (16-byte loads) feeds both rows; the generic kernel 1 row
    constexpr int RY = K > 0 ? 2 : 1;
    const int tx = threadIdx.x, ty = threadIdx.y;
    const int bdx = blockDim.x, bdy = blockDim.y;
    const int tid = ty * bdx + tx, nthreads = bdx * bdy;  // within this plane's z-slice
    const int TW = bdx * RX, TH = bdy * RY;
    // blockDim.z planes per block (small images): slice z works on plane blockIdx.x * bdz + z
    const long long plane = (long long)blockIdx.x * blockDim.z + threadIdx.z;
    const bool plane_ok = plane < (long long)a.n * a.c;  // uniform within the slice
    const int c = (int)(plane % a.c);
    const int oy0 = blockIdx.y * TH, ox0 = blockIdx.z * TW;

    const T* __restrict__ src = reinterpret_cast<const T*>(a.in0) + (plane_ok ? plane : 0) * SH * SW;
    const T* __restrict__ wt = reinterpret_cast<const T*>(a.in1) + (long long)c * KH * KW;
    T* __restrict__ dst = reinterpret_cast<T*>(a.out) + plane * OH * OW;

    LK_CHECKED_SMEM(smem_all);
    const int KCH = K ? K : a.aux2;  // filter rows per chunk
    const int KCW = K ? K : a.aux3;  // filter columns per chunk
    const int ldw = round_up4(KCW);
    const int ld = tile_ld(TW, KCW);
    smem_ptr<float> smem = smem_all + threadIdx.z * tiled_smem_floats(TH, TW, KCH, KCW);
    smem_ptr<float> s_w = smem;
    smem_ptr<float> s_in = smem + KCH * ldw;

    float acc[RY][RX];
#pragma unroll
    for (int r = 0; r < RY; ++r)
#pragma unroll
        for (int j = 0; j < RX; ++j) acc[r][j] = 0.f;

    const int ly = ty * RY;                      // first tile row of this thread
    const int oy = plane_ok ? oy0 + ly : OH;     // a slice past the last plane computes nothing
    const int x0 = tx * RX;
    const int tile_rows = min(TH, OH - oy0);
    const int tile_cols = min(TW, OW - ox0);

    for (int kyc = 0; kyc < KH; kyc += KCH) {
        const int nky = min(KCH, KH - kyc);
        // source rows this chunk touches: [oy0 - pt + kyc, oy0 + tile_rows - 1 - pt + kyc + nky - 1]
        const int rlo = oy0 - pt + kyc, rhi = oy0 + tile_rows - 1 - pt + kyc + nky - 1;
        if (rhi < 0 || rlo >= SH) continue;  // block-uniform
        for (int kxc = 0; kxc < KW; kxc += KCW) {
            const int nkx = min(KCW, KW - kxc);
            const int clo = ox0 - pl + kxc, chi = ox0 + tile_cols - 1 - pl + kxc + nkx - 1;
            if (chi < 0 || clo >= SW) continue;  // block-uniform
            __syncthreads();  // the previous chunk is consumed
            stage_filter(s_w, ldw, wt, KH, KW, kyc, nky, kxc, nkx, DGRAD, tid, nthreads);
            stage_plane(s_in, TH + nky - 1, ld, src, SH, SW, rlo, clo, tid, nthreads);
            __syncthreads();
            if (oy < OH) {
                if constexpr (K > 0) {
                    constexpr int KP = (K + 3) & ~3;
                    // output rows of this thread inside the plane (row r >= ry_n is not stored)
                    const int ry_n = min(RY, OH - oy);
                    // filter-column quads [kq_lo, kq_hi) (taps 4 kq .. 4 kq + 3) that can touch
                    // the image for at least one of this thread's stored outputs j < jn (source
                    // column gx0 + j + kx); the others only read zeros. Per-thread constants, so
                    // the guards below are uniform branches around fully unrolled quads.
                    const int jn = min(RX, tile_cols - x0);
                    const int gx0 = ox0 + x0 - pl;
                    const int kx_lo = max(0, -(gx0 + jn - 1));
                    const int kx_hi = min(K, SW - gx0);
                    const int kq_lo = kx_lo >> 2;
                    const int kq_hi = (jn > 0 && kx_lo < kx_hi) ? (kx_hi + 3) >> 2 : kq_lo;
                    // source rows s (tile row ly + s, image row oy - pt + s) inside the image;
                    // row s feeds output row r with filter row s - r
                    const int s_lo = max(0, pt - oy);
                    const int s_hi = kq_lo < kq_hi ? min(ry_n + K - 1, SH + pt - oy) : s_lo;
#pragma unroll 1
                    for (int s = s_lo; s < s_hi; ++s) {
                        smem_ptr<const float> row = s_in + (ly + s) * ld + x0;
                        float v[RX + KP];
#pragma unroll
                        for (int q = 0; q < (RX + KP) / 4; ++q) {
                            const float4 t = lds4(row + 4 * q);
                            v[4 * q] = t.x;
                            v[4 * q + 1] = t.y;
                            v[4 * q + 2] = t.z;
                            v[4 * q + 3] = t.w;
                        }
#pragma unroll
                        for (int r = 0; r < RY; ++r) {
                            const int ky = s - r;
                            if (ky < 0 || ky >= K || r >= ry_n) continue;
                            smem_ptr<const float> wr = s_w + ky * ldw;
#pragma unroll
                            for (int kq = 0; kq < KP / 4; ++kq) {
                                if (kq < kq_lo || kq >= kq_hi) continue;
                                const float4 wv = lds4(wr + 4 * kq);
                                const float wk[4] = {wv.x, wv.y, wv.z, wv.w};
#pragma unroll
                                for (int e = 0; e < 4; ++e) {
                                    if (4 * kq + e < K) {
#pragma unroll
                                        for (int j = 0; j < RX; ++j)
                                            acc[r][j] = madd(v[j + 4 * kq + e], wk[e], acc[r][j]);
                                    }
                                }
                            }
                        }
                    }
                } else {
                    // filter rows r of this chunk whose source row oy - pt + kyc + r is in the image
                    const int r_lo = max(0, pt - kyc - oy);
                    const int r_hi = min(nky, SH + pt - kyc - oy);
                    // filter columns that can touch the image for at least one of this thread's outputs
                    const int gx0 = ox0 + x0 - pl + kxc;  // source column of (output j=0, kx=0)
                    const int kx_lo = max(0, -(gx0 + RX - 1));
                    const int kx_hi = min(nkx, SW - gx0);
                    for (int r = (kx_lo < kx_hi ? r_lo : r_hi); r < r_hi; ++r) {
                        smem_ptr<const float> row = s_in + (ly + r) * ld + x0;
                        smem_ptr<const float> wr = s_w + r * ldw;
                        float v[RX];
#pragma unroll
                        for (int j = 0; j < RX - 1; ++j) v[j] = row[kx_lo + j];
                        for (int kx = kx_lo; kx < kx_hi; ++kx) {
                            v[RX - 1] = row[kx + RX - 1];
                            const float wk = wr[kx];
#pragma unroll
                            for (int j = 0; j < RX; ++j) acc[0][j] = madd(v[j], wk, acc[0][j]);
#pragma unroll
                            for (int j = 0; j < RX - 1; ++j) v[j] = v[j + 1];
                        }
                    }
                }
            }
        }
    }
    const float b = (!DGRAD && a.bias && plane_ok) ? to_f32(reinterpret_cast<const T*>(a.bias)[c]) : 0.f;
#pragma unroll
    for (int r = 0; r < RY; ++r) {
        if (oy + r < OH) {
#pragma unroll
            for (int j = 0; j < RX; ++j) {
                const int ox = ox0 + x0 + j;
                if (ox >= OW) continue;
                float v = acc[r][j] + b;
                // padding zeros times a NaN/Inf weight are spurious NaNs: recompute exactly
                if (!finite_f32(v))
                    v = exact_correlate(src, SH, SW, wt, KH, KW, 1, 1, 1, 1, pt, pl, DGRAD, oy + r, ox) + b;
                dst[(long long)(oy + r) * OW + ox] = from_f32<T>(v);
            }
        }
    }
}

}  // namespace lk

#define LK_CONV_K(TN, T, K)                                                 \
    LK_KERNEL(lk_fwd_##TN##_k##K, (lk::conv_tiled<T, K, false>(args)))    \
    LK_KERNEL(lk_dgrad_##TN##_k##K, (lk::conv_tiled<T, K, true>(args)))

#define LK_CONV_TYPE(TN, T)                                                   \
    LK_FOR_TEMPLATE_SIZES(LK_CONV_K, TN, T)                                   \
    LK_KERNEL(lk_fwd_##TN##_generic, (lk::conv_tiled<T, 0, false>(args)))   \
    LK_KERNEL(lk_dgrad_##TN##_generic, (lk::conv_tiled<T, 0, true>(args)))

LK_CONV_TYPE(f32, float)
LK_CONV_TYPE(f16, __half)
LK_CONV_TYPE(bf16, __nv_bfloat16)
