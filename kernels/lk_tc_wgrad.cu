// Tensor-core weight gradient, f16/bf16 inputs with f32 accumulation, stride 1 / dilation 1,
// deterministic (partials per block in fixed order, then lk_wgrad_reduce_<t> of
// kernels/lk_wgrad.cu adds the B partials of a channel in order; no float atomics). sm_80+
// (mma.sync.aligned.m16n8k16 / m16n8k8); the sm_75 build compiles the entry points empty and the
// planner never launches them there.
//
// Mapping (analysis in BENCHMARKS.md, "Tensor-core path"): in tile coordinates (dY tile row r,
// column q; X halo tile row i = r + ky, column q + kx),
//   dW[ky][kx] = sum_i sum_q X[i][q + kx] * dY[i - ky][q].
// For one X row i and a chunk of 16 dY columns, this is one matrix product per 16 x 8 block of
// dW: D[kx][ky] += A[kx][q] * B[q][ky] with
//   A[m][k] = X[i][16 ch + 16 mt + m + k]   (a Hankel matrix: one X row, row-major 16 x 16)
//   B[k][n] = dY[i - 8 nt - n][16 ch + k]   (8 dY rows, one per column n: "col" layout, each
//                                            column a contiguous piece of a dY row)
// M = filter columns (m-tile mt: kx = 16 mt + m), N = filter rows (n-tile nt: ky = 8 nt + n),
// K = 16 dY columns; the accumulators (one per 16 x 8 block of dW) stay in registers over every
// X row of every (image, tile) item of the block. A chunk with at most 8 valid dY columns is an
// m16n8k8 (7x7 and 56x56 images: no half-empty k-step). Hankel: A's registers a1 (rows g + 8,
// k = 2t) and a2 (rows g, k = 2t + 8) are the same X pair, and m-tile mt + 1 starts 2 blocks
// later, so a lane loads the pairs X[i][16 (ch + mt0) + g + 2t + 8 b], b = 0..4, for two
// m-tiles, and the next chunk reuses b = 2..4 as its 0..2: 2 loads for A per chunk (5 for the
// first). B is shared across X rows: row i's n-tile nt reads dY rows i - 8 nt - n, which is
// row i + 8's n-tile nt + 1, so a warp takes X rows in sets {i, i + 8, i + 16, i + 24}: 7 B
// fragments (2 loads each) and 4 x 2 A loads for up to 32 mma (K <= 32), 0.69 loads per mma. The pair starts at an odd column
// when g is odd: those lanes read a second copy of the X tile shifted by one column (so every
// fragment register is one aligned 32-bit shared load).
//
// Launch (planned in src/plan/tensor_core.rs): grid (C, B), block 32 * U * G threads.
//   A warp's unit covers up to 2 m-tiles x 4 n-tiles (a 32 x 32 block of dW, 32 accumulator
//   registers): U = ceil(MT / 2) * ceil(NT / 4) units, MT = ceil(KW / 16), NT = ceil(KH / 8)
//   (KH, KW <= 64: U <= 4); G row groups (X row i goes to group i % G); warp w = unit w % U,
//   group w / U. Block (c, b) owns the work items (n, tile) [b*I/B, (b+1)*I/B) of channel c
//   (I = N * tiles, tiles of TH x TW dY elements) as lk_wgrad_partial does. Per item it stages
//   (16-bit, zero outside the image / the tile): X copy 0 [TH + KH - 1][XW], copy 1 (shifted by
//   one column) at an offset of 16 words mod 32 banks, then dY [TH][tc_ld(16 nc)],
//   nc = ceil(TW / 16), XW = 16 (nc + MT). At the end the G group sums of each unit are added in
//   group order (shared memory reused: [U * G warps][32][33] floats) and the block writes its
//   partial to workspace[(c * B + b) * KH*KW + tap].
//   aux0 = TH, aux1 = TW, aux2 = G.
#include "lk_tc.cuh"

namespace lk {
namespace tc {

// Offset (16-bit elements) of the shifted X copy: >= the first copy, 16 words mod 32 banks (the
// two copies' fragment loads never share a bank). Must match src/plan/tensor_core.rs.
__device__ __forceinline__ int wgrad_x1_offset(int xelems) { return (xelems + 31) / 64 * 64 + 32; }

// MUTANT != 0 only in the simulator's deliberately wrong test kernels (sim_testkernels.inc),
// which prove that tests/tensor_core.rs catches a wrong fragment index: 1 = A's last register
// from the wrong 8-column block, 2 = D's rows and columns exchanged within the fragment.
template <typename T, int MUTANT = 0>
__device__ __forceinline__ void wgrad_tc(const DwArgs& a) {
#ifdef LK_TC_ENABLED
    const int KH = a.kh, KW = a.kw, KK = KH * KW;
    const int H = a.h, W = a.w, OH = a.oh, OW = a.ow;
    const int pt = a.pad_top, pl = a.pad_left;
    const int TH = a.aux0, TW = a.aux1, G = a.aux2;
    const int MT = (KW + 15) / 16, NT = (KH + 7) / 8;
    const int UM = (MT + 1) / 2, U = UM * ((NT + 3) / 4);
    const int tid = threadIdx.x, nthreads = blockDim.x;
    const int warp = tid >> 5, lane = tid & 31;
    const int g = lane >> 2, t = lane & 3;
    const int unit = warp % U, gi = warp / U;
    const int mt0 = 2 * (unit % UM), nt0 = 4 * (unit / UM);
    const int mtn = min(2, MT - mt0), ntn = min(4, NT - nt0);
    const int c = blockIdx.x, b = blockIdx.y, B = gridDim.y;
    const int tiles_y = (OH + TH - 1) / TH, tiles_x = (OW + TW - 1) / TW;
    const long long tiles = (long long)tiles_y * tiles_x;
    const long long items = (long long)a.n * tiles;
    const long long it0 = items * b / B, it1 = items * (b + 1) / B;

    const int nc = (TW + 15) / 16;
    const int XW = 16 * (nc + MT);
    const int xrows = TH + KH - 1;
    const int x1off = wgrad_x1_offset(xrows * XW);
    const int ldy = tc_ld(16 * nc);
    const int dyoff = x1off + xrows * XW;
    LK_DYNAMIC_SMEM(smem_f);
    uint16_t* s_x0 = reinterpret_cast<uint16_t*>(smem_f);
    uint16_t* s_x1 = s_x0 + x1off;
    uint16_t* s_dy = s_x0 + dyoff;

    const uint16_t* __restrict__ xg = reinterpret_cast<const uint16_t*>(a.in0);
    const uint16_t* __restrict__ dyg = reinterpret_cast<const uint16_t*>(a.in1);

    float acc[2][4][4];
#pragma unroll
    for (int m = 0; m < 2; ++m)
#pragma unroll
        for (int n = 0; n < 4; ++n)
#pragma unroll
            for (int e = 0; e < 4; ++e) acc[m][n][e] = 0.f;

    // a lane's A pairs start at column g + 2t (+ 8 b) of copy 0, or at g - 1 + 2t of the copy
    // shifted by one when g is odd
    const uint16_t* xcopy = (g & 1) ? s_x1 + (g - 1) + 2 * t : s_x0 + g + 2 * t;
    const int kyl = 8 * nt0, kyh = min(KH, 8 * nt0 + 32);  // the unit's filter rows

    for (long long it = it0; it < it1; ++it) {
        const int n = (int)(it / tiles);
        const long long rem = it - (long long)n * tiles;
        const int ty = (int)(rem / tiles_x);
        const int tx = (int)(rem - (long long)ty * tiles_x);
        const int oy0 = ty * TH, ox0 = tx * TW;
        const int sy0 = oy0 - pt, sx0 = ox0 - pl;  // source row / column of X tile (0, 0)
        const long long plane = (long long)n * a.c + c;
        __syncthreads();  // the previous item is consumed
        {
            const uint16_t* xp = xg + plane * H * W;
            for (int idx = tid; idx < xrows * XW; idx += nthreads) {
                const int r = idx / XW, j = idx - r * XW;
                const int gy = sy0 + r, gx = sx0 + j;
                const bool row_in = gy >= 0 && gy < H;
                s_x0[idx] = (row_in && gx >= 0 && gx < W) ? xp[(long long)gy * W + gx] : (uint16_t)0;
                s_x1[idx] = (row_in && gx + 1 >= 0 && gx + 1 < W) ? xp[(long long)gy * W + gx + 1] : (uint16_t)0;
            }
            const uint16_t* dp = dyg + plane * OH * OW;
            for (int idx = tid; idx < TH * ldy; idx += nthreads) {
                const int r = idx / ldy, q = idx - r * ldy;
                const int gy = oy0 + r, gx = ox0 + q;
                s_dy[idx] = (q < TW && gy < OH && gx < OW) ? dp[(long long)gy * OW + gx] : (uint16_t)0;
            }
        }
        __syncthreads();

        const int rows_valid = min(TH, OH - oy0), cols_valid = min(TW, OW - ox0);
        const int nc_valid = (cols_valid + 15) / 16;
        // X rows inside the image that meet a dY row of the tile for one of the unit's ky
        const int i_lo = max(kyl, -sy0);
        const int i_hi = min(min(rows_valid - 1 + kyh - 1, H - 1 - sy0), xrows - 1);
        // Row sets s = 8 m + rho: X rows base + 8 j, j = 0..3, base = i_lo + 32 m + rho; set s
        // goes to group s % G. Row j's n-tile nl needs the B fragment of dY rows
        // base + 8 (j - nl) - 8 nt0 - g, so the 4 rows share 7 B fragments (d = j - nl + 3) for up
        // to 32 mma, where one row at a time needs 4 for 8.
        for (int s = gi;; s += G) {
            const int base = i_lo + 32 * (s / 8) + s % 8;
            if (base > i_hi) break;
            bool row_ok[4];
#pragma unroll
            for (int j = 0; j < 4; ++j) row_ok[j] = base + 8 * j <= i_hi;
            // A blocks of each row for the chunk (relative to column 16 (ch + mt0)); chunk ch + 1
            // starts 2 blocks later, so blocks 2.. of a chunk are blocks 0.. of the next
            uint32_t blk[4][5];
#pragma unroll
            for (int j = 0; j < 4; ++j)
#pragma unroll
                for (int q = 0; q < 5; ++q) blk[j][q] = 0u;
            int carried = 0;
#pragma unroll 1
            for (int ch = 0; ch < nc_valid; ++ch) {
                const bool k8 = cols_valid - 16 * ch <= 8;
                const int nb = 2 * mtn + (k8 ? 0 : 1);
#pragma unroll
                for (int j = 0; j < 4; ++j) {
                    if (row_ok[j]) {
                        const uint16_t* xr = xcopy + (base + 8 * j) * XW + 16 * (ch + mt0);
#pragma unroll
                        for (int q = 0; q < 5; ++q)
                            if (q >= carried && q < nb) blk[j][q] = lds32(xr + 8 * q);
                    }
                }
                // B fragment d: dY rows r_top - g, r_top = base - 8 nt0 + 8 (d - 3), for row j's
                // n-tile nl = j - d + 3 (one fragment live at a time: fewer registers)
#pragma unroll
                for (int d = 0; d < 7; ++d) {
                    const int r_top = base - 8 * nt0 + 8 * (d - 3);
                    bool used = false;
#pragma unroll
                    for (int j = 0; j < 4; ++j)
                        if (row_ok[j] && j - d + 3 >= 0 && j - d + 3 < ntn) used = true;
                    if (!used || r_top < 0 || r_top - 7 >= rows_valid) continue;  // warp-uniform
                    uint32_t b0 = 0u, b1 = 0u;
                    const int rr = r_top - g;
                    if (rr >= 0 && rr < rows_valid) {
                        const uint16_t* dr = s_dy + rr * ldy + 16 * ch + 2 * t;
                        b0 = lds32(dr);
                        if (!k8) b1 = lds32(dr + 8);
                    }
#pragma unroll
                    for (int j = 0; j < 4; ++j) {
                        const int nl = j - d + 3;
                        if (nl < 0 || nl > 3 || nl >= ntn || !row_ok[j]) continue;
#pragma unroll
                        for (int ml = 0; ml < 2; ++ml) {
                            // skip m-tiles whose X columns (k + m < 31) all lie outside the image
                            const int gx = sx0 + 16 * (ch + mt0 + ml);
                            if (ml < mtn && gx + 31 > 0 && gx < W) {
                                if (k8) {
                                    const uint32_t fa[2] = {blk[j][2 * ml], blk[j][2 * ml + 1]};
                                    const uint32_t fb[1] = {b0};
                                    mma8<T>(acc[ml][nl], fa, fb);
                                } else {
                                    const uint32_t fa[4] = {blk[j][2 * ml], blk[j][2 * ml + 1], blk[j][2 * ml + 1],
                                                            blk[j][2 * ml + (MUTANT == 1 ? 1 : 2)]};
                                    const uint32_t fb[2] = {b0, b1};
                                    mma<T>(acc[ml][nl], fa, fb);
                                }
                            }
                        }
                    }
                }
#pragma unroll
                for (int j = 0; j < 4; ++j)
#pragma unroll
                    for (int q = 0; q < 3; ++q) blk[j][q] = blk[j][q + 2];
                carried = nb - 2;
            }
        }
    }

    // ordered reduction of the G group sums of each unit, then one partial per block
    __syncthreads();  // every warp is done with the tiles: the shared memory becomes [warp][32][33]
    float* red = smem_f;
    constexpr int RED = 32 * 33;
#pragma unroll
    for (int ml = 0; ml < 2; ++ml)
#pragma unroll
        for (int nl = 0; nl < 4; ++nl)
#pragma unroll
            for (int e = 0; e < 4; ++e) {
                // D fragment: c0, c1 at row g (kx), columns 2t, 2t+1 (ky); c2, c3 at row g + 8
                const int e_row = MUTANT == 2 ? e % 2 : e / 2, e_col = MUTANT == 2 ? e / 2 : e % 2;
                const int kxl = 16 * ml + g + 8 * e_row, kyl_ = 8 * nl + 2 * t + e_col;
                red[warp * RED + kxl * 33 + kyl_] = acc[ml][nl][e];
            }
    __syncthreads();
    float* __restrict__ ws = reinterpret_cast<float*>(a.workspace) + ((long long)c * B + b) * KK;
    for (int tap = tid; tap < KK; tap += nthreads) {
        const int ky = tap / KW, kx = tap - ky * KW;
        const int u = (ky / 32) * UM + kx / 32;
        float s = 0.f;
        for (int gg = 0; gg < G; ++gg) s += red[(gg * U + u) * RED + (kx % 32) * 33 + ky % 32];
        ws[tap] = s;
    }
#endif
}

}  // namespace tc
}  // namespace lk

// at most 8 warps (src/plan/tensor_core.rs), two blocks per SM: 128 registers, no spills
#define LK_TC_WGRAD_TYPE(TN, T) LK_KERNEL_BOUNDED(lk_tc_wgrad_##TN, 256, 2, (lk::tc::wgrad_tc<T>(args)))

LK_TC_WGRAD_TYPE(f16, __half)
LK_TC_WGRAD_TYPE(bf16, __nv_bfloat16)
