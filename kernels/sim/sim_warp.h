// Warp-level primitives for the kernel simulator: __syncwarp, the __shfl_*_sync family,
// __ballot_sync / __any_sync / __all_sync, and the warp-level matrix operations
// mma.sync.aligned.{m16n8k16,m16n8k8}.row.col.f32.{f16,bf16}.{f16,bf16}.f32
// (lk_mma_m16n8k16_f16/_bf16, lk_mma_m16n8k8_f16/_bf16).
//
// Model: a rendezvous of the lanes named by the member mask. A lane that arrives records its
// inputs in its warp's slot and, unless it is the last member to arrive, yields to the block
// scheduler (sim_runtime.h), which in the next pass resumes only the fibers waiting at warp
// points (fibers at a __syncthreads() stay there until no warp point is pending). The last
// member computes every member's result (the whole 16x8x16 product for mma, from the fragments
// each lane holds as the PTX ISA documents them) and continues.
// As on the GPU, every member lane must reach the same warp-synchronous point with the same mask:
// a member that exited, waits at __syncthreads() or at another warp point, a mask that does not
// name the calling lane or names a lane past the block, or a shuffle that reads a lane outside the
// mask, is an error reported with the kernel's name (stricter than sm_70+ for shuffles and votes
// reached from different call sites, which our kernels never do).
#pragma once

namespace lksim {

constexpr unsigned kWarpSize = 32;

enum class WarpOp : int { Sync, ShflIdx, ShflUp, ShflDown, ShflXor, Ballot, Any, All, MmaF16, MmaBf16, MmaK8F16, MmaK8Bf16 };

inline const char* warp_op_name(WarpOp op) {
    switch (op) {
        case WarpOp::Sync: return "__syncwarp";
        case WarpOp::ShflIdx: return "__shfl_sync";
        case WarpOp::ShflUp: return "__shfl_up_sync";
        case WarpOp::ShflDown: return "__shfl_down_sync";
        case WarpOp::ShflXor: return "__shfl_xor_sync";
        case WarpOp::Ballot: return "__ballot_sync";
        case WarpOp::Any: return "__any_sync";
        case WarpOp::All: return "__all_sync";
        case WarpOp::MmaF16: return "mma.sync.m16n8k16.f16";
        case WarpOp::MmaBf16: return "mma.sync.m16n8k16.bf16";
        case WarpOp::MmaK8F16: return "mma.sync.m16n8k8.f16";
        case WarpOp::MmaK8Bf16: return "mma.sync.m16n8k8.bf16";
    }
    return "?";
}

// One lane's inputs and (after the rendezvous) outputs.
struct WarpLane {
    uint64_t value = 0;  // shuffled value or vote predicate
    int arg = 0;         // source lane, delta or lane mask
    int width = 32;
    uint32_t a[4] = {}, b[2] = {};
    float c[4] = {};
    uint64_t out = 0;
    float d[4] = {};
};

struct WarpSlot {
    unsigned arrived = 0;  // members arrived at the pending point (0: none pending)
    unsigned mask = 0;
    uint64_t completed = 0;  // rendezvous completed so far (a waiting lane's is done once it moves)
    WarpOp op = WarpOp::Sync;
    void* site = nullptr;
    WarpLane lanes[kWarpSize];
};

// Per worker thread: the warps of the block it runs.
struct WarpBlock {
    std::vector<WarpSlot> warps;
    std::vector<unsigned char> waiting;  // per fiber: suspended at a warp point
    size_t waiting_count = 0;
    size_t nthreads = 0;
};
inline thread_local WarpBlock t_warps;

// ---- hooks for the block scheduler (run_block) -------------------------------------------------
inline void warp_block_begin(size_t nthreads) {
    t_warps.nthreads = nthreads;
    t_warps.warps.assign((nthreads + kWarpSize - 1) / kWarpSize, WarpSlot{});
    t_warps.waiting.assign(nthreads, 0);
    t_warps.waiting_count = 0;
}
inline bool warp_any_waiting() { return t_warps.waiting_count > 0; }
inline bool warp_waiting(size_t fiber) { return t_warps.waiting[fiber] != 0; }

inline std::string lane_list(unsigned bits) {
    std::string s;
    for (unsigned l = 0; l < kWarpSize; ++l)
        if (bits >> l & 1u) s += (s.empty() ? "" : ",") + std::to_string(l);
    return s;
}

// After a scheduler pass in which some fiber stopped at a warp point: every member lane missing
// from a pending rendezvous must itself be suspended at a (completed, earlier) warp point, from
// which it runs on in the next pass; a member that exited or waits at __syncthreads() never
// arrives.
inline std::string warp_end_of_pass() {
    for (size_t w = 0; w < t_warps.warps.size(); ++w) {
        const WarpSlot& s = t_warps.warps[w];
        unsigned lost = 0;
        for (unsigned l = 0; l < kWarpSize; ++l)
            if ((s.mask & ~s.arrived) >> l & 1u && !t_warps.waiting[w * kWarpSize + l]) lost |= 1u << l;
        if (s.arrived != 0 && lost != 0) {
            return std::string("warp divergence at ") + warp_op_name(s.op) + ": warp " +
                   std::to_string(w) + " lanes " + lane_list(s.arrived) + " wait, member lanes " +
                   lane_list(lost) + " exited or wait at __syncthreads()";
        }
    }
    return {};
}

// ---- the rendezvous ------------------------------------------------------------------------------
inline unsigned warp_existing_lanes(size_t warp) {
    const size_t n = std::min<size_t>(kWarpSize, t_warps.nthreads - warp * kWarpSize);
    return n == kWarpSize ? 0xffffffffu : ((1u << n) - 1u);
}

inline std::string warp_hex(unsigned v) {
    char buf[16];
    std::snprintf(buf, sizeof buf, "0x%08x", v);
    return buf;
}

inline void warp_fault(WarpSlot& s, size_t warp, unsigned lane, WarpOp op, const std::string& what) {
    std::string msg = std::string("warp divergence at ") + warp_op_name(op) + ": warp " +
                      std::to_string(warp) + " lane " + std::to_string(lane) + ": " + what;
    if (t_block && t_block->fault.empty()) t_block->fault = msg;
    (void)s;
}

// f16/bf16 bits of a packed pair (lower-indexed element in the low half, as the ISA specifies).
inline float warp_elem(uint32_t reg, int hi, bool bf16) {
    const uint16_t bits = (uint16_t)(hi ? reg >> 16 : reg & 0xffffu);
    return bf16 ? __bfloat162float(__nv_bfloat16{bits}) : __half2float(__half{bits});
}

// D = A * B + C for mma.m16n8k16.row.col with f32 accumulation, from the fragments of the 32
// lanes (PTX ISA, "Matrix Fragments for mma.m16n8k16 with floating point type"):
//   groupID = lane >> 2, tig = lane % 4
//   A (16x16, .f16x2 regs a0..a3 = elements a0..a7): element ai at
//     row = groupID + 8 * ((i / 2) % 2), col = 2 * tig + (i % 2) + 8 * (i / 4)
//   B (16x8, regs b0,b1 = elements b0..b3): element bi at row = 2 * tig + (i % 2) + 8 * (i / 2),
//     col = groupID
//   C, D (16x8 f32, c0..c3): ci at row = groupID + 8 * (i / 2), col = 2 * tig + (i % 2)
// mma.m16n8k8 (f16/bf16, "Matrix Fragments for mma.m16n8k8"): A (16x8, regs a0,a1 = elements
// a0..a3): ai at row = groupID + 8 * (i / 2), col = 2 * tig + (i % 2); B (8x8, reg b0 =
// elements b0, b1): bi at row = 2 * tig + i, col = groupID; C, D as for m16n8k16.
// Products of f16/bf16 values are exact in f32; the sum runs over k in order with f32 rounding.
inline void warp_mma_m16n8(WarpSlot& s, bool bf16, int kdim) {
    float A[16][16], B[16][8], C[16][8];
    for (unsigned lane = 0; lane < kWarpSize; ++lane) {
        const WarpLane& L = s.lanes[lane];
        const int g = (int)lane >> 2, t = (int)lane & 3;
        if (kdim == 16) {
            for (int i = 0; i < 8; ++i)
                A[g + 8 * ((i / 2) % 2)][2 * t + (i % 2) + 8 * (i / 4)] = warp_elem(L.a[i / 2], i % 2, bf16);
            for (int i = 0; i < 4; ++i) B[2 * t + (i % 2) + 8 * (i / 2)][g] = warp_elem(L.b[i / 2], i % 2, bf16);
        } else {
            for (int i = 0; i < 4; ++i) A[g + 8 * (i / 2)][2 * t + (i % 2)] = warp_elem(L.a[i / 2], i % 2, bf16);
            for (int i = 0; i < 2; ++i) B[2 * t + i][g] = warp_elem(L.b[0], i, bf16);
        }
        for (int i = 0; i < 4; ++i) C[g + 8 * (i / 2)][2 * t + (i % 2)] = L.c[i];
    }
    for (unsigned lane = 0; lane < kWarpSize; ++lane) {
        WarpLane& L = s.lanes[lane];
        const int g = (int)lane >> 2, t = (int)lane & 3;
        for (int i = 0; i < 4; ++i) {
            const int r = g + 8 * (i / 2), col = 2 * t + (i % 2);
            float acc = C[r][col];
            for (int k = 0; k < kdim; ++k) acc += A[r][k] * B[k][col];
            L.d[i] = acc;
        }
    }
}

// Computes every member's result once all members have arrived. Returns false on a fault.
inline bool warp_complete(WarpSlot& s, size_t warp) {
    const unsigned mask = s.mask;
    switch (s.op) {
        case WarpOp::Sync: break;
        case WarpOp::ShflIdx:
        case WarpOp::ShflUp:
        case WarpOp::ShflDown:
        case WarpOp::ShflXor:
            for (unsigned l = 0; l < kWarpSize; ++l) {
                if (!(mask >> l & 1u)) continue;
                const WarpLane& L = s.lanes[l];
                const int width = L.width;
                if (width < 1 || width > 32 || (width & (width - 1)) != 0) {
                    warp_fault(s, warp, l, s.op, "width " + std::to_string(width) + " is not a power of two <= 32");
                    return false;
                }
                const int seg = (int)l & ~(width - 1);
                int src = (int)l;
                switch (s.op) {
                    case WarpOp::ShflIdx: src = seg + (L.arg & (width - 1)); break;
                    case WarpOp::ShflUp: src = (int)l - L.arg >= seg ? (int)l - L.arg : (int)l; break;
                    case WarpOp::ShflDown: src = (int)l + L.arg < seg + width ? (int)l + L.arg : (int)l; break;
                    default: {  // xor: a lane of a later group returns the caller's own value
                        const int x = (int)l ^ (L.arg & 31);
                        src = x < seg + width ? x : (int)l;
                    }
                }
                if (!(mask >> src & 1u)) {
                    warp_fault(s, warp, l, s.op, "reads lane " + std::to_string(src) + " outside the mask");
                    return false;
                }
                s.lanes[l].out = s.lanes[src].value;
            }
            break;
        case WarpOp::Ballot:
        case WarpOp::Any:
        case WarpOp::All: {
            unsigned ballot = 0;
            for (unsigned l = 0; l < kWarpSize; ++l)
                if ((mask >> l & 1u) && s.lanes[l].value != 0) ballot |= 1u << l;
            const uint64_t r = s.op == WarpOp::Ballot ? ballot
                               : s.op == WarpOp::Any  ? (uint64_t)(ballot != 0)
                                                      : (uint64_t)(ballot == mask);
            for (unsigned l = 0; l < kWarpSize; ++l)
                if (mask >> l & 1u) s.lanes[l].out = r;  // a non-member may hold an earlier result
            break;
        }
        case WarpOp::MmaF16:
        case WarpOp::MmaBf16:
        case WarpOp::MmaK8F16:
        case WarpOp::MmaK8Bf16:
            if (mask != 0xffffffffu) {
                warp_fault(s, warp, 0, s.op, "mma.sync.aligned needs all 32 lanes (mask " + lane_list(mask) + ")");
                return false;
            }
            warp_mma_m16n8(s, s.op == WarpOp::MmaBf16 || s.op == WarpOp::MmaK8Bf16,
                           s.op == WarpOp::MmaF16 || s.op == WarpOp::MmaBf16 ? 16 : 8);
            break;
    }
    return true;
}

// The calling lane's part of a rendezvous; returns its lane record with the outputs filled in.
inline WarpLane warp_arrive(WarpOp op, unsigned mask, void* site, const WarpLane& in) {
    BlockRun* b = t_block;
    const size_t fiber = b->current;
    const size_t warp = fiber / kWarpSize;
    const unsigned lane = (unsigned)(fiber % kWarpSize);
    WarpSlot& s = t_warps.warps[warp];
    bool ok = true;
    if (!(mask >> lane & 1u)) {
        warp_fault(s, warp, lane, op, "mask " + warp_hex(mask) + " does not name the calling lane");
        ok = false;
    } else if (mask & ~warp_existing_lanes(warp)) {
        warp_fault(s, warp, lane, op, "mask names lanes " + lane_list(mask & ~warp_existing_lanes(warp)) +
                                          " past the end of the block");
        ok = false;
    } else if (s.arrived != 0 && (s.op != op || s.site != site || s.mask != mask)) {
        warp_fault(s, warp, lane, op,
                   std::string("lanes ") + lane_list(s.arrived) + " wait at " + warp_op_name(s.op) +
                       (s.site != site ? " at another call site" : "") +
                       (s.mask != mask ? " with another mask" : ""));
        ok = false;
    }
    if (ok) {
        if (s.arrived == 0) {
            s.op = op;
            s.site = site;
            s.mask = mask;
        }
        s.lanes[lane] = in;
        s.arrived |= 1u << lane;
        if (s.arrived == mask) {  // the last member: everyone's result, and go on
            s.arrived = 0;
            ++s.completed;
            if (warp_complete(s, warp)) return s.lanes[lane];
        }
    }
    // wait (or, after a fault, stop here: the scheduler reports the fault after this pass).
    // A warp round resumes every fiber waiting at a warp point, including one whose rendezvous
    // is still pending (its last member has not arrived yet): such a fiber yields again, so that
    // no lane leaves a rendezvous before all members have arrived, whatever the visiting order.
    const uint64_t ticket = s.completed;
    t_warps.waiting[fiber] = 1;
    ++t_warps.waiting_count;
    Fiber& f = b->fibers[fiber];
    do {
        swapcontext(&f.ctx, &b->sched);
    } while (ok && s.completed == ticket && (!t_block || t_block->fault.empty()));
    t_warps.waiting[fiber] = 0;
    --t_warps.waiting_count;
    return s.lanes[lane];
}

template <typename T>
inline uint64_t warp_bits(T v) {
    static_assert(sizeof(T) <= 8, "warp shuffles move at most 8 bytes");
    uint64_t u = 0;
    std::memcpy(&u, &v, sizeof(T));
    return u;
}
template <typename T>
inline T warp_from_bits(uint64_t u) {
    T v;
    std::memcpy(&v, &u, sizeof(T));
    return v;
}

template <typename T>
inline T warp_shfl(WarpOp op, unsigned mask, T var, int arg, int width, void* site) {
    WarpLane in;
    in.value = warp_bits(var);
    in.arg = arg;
    in.width = width;
    return warp_from_bits<T>(warp_arrive(op, mask, site, in).out);
}

inline uint64_t warp_vote(WarpOp op, unsigned mask, int pred, void* site) {
    WarpLane in;
    in.value = pred != 0;
    return warp_arrive(op, mask, site, in).out;
}

template <int NA, int NB>
inline void warp_mma(WarpOp op, float (&d)[4], const uint32_t (&a)[NA], const uint32_t (&b)[NB],
                     const float (&c)[4], void* site) {
    WarpLane in;
    for (int i = 0; i < NA; ++i) in.a[i] = a[i];
    for (int i = 0; i < NB; ++i) in.b[i] = b[i];
    for (int i = 0; i < 4; ++i) in.c[i] = c[i];
    const WarpLane r = warp_arrive(op, 0xffffffffu, site, in);
    for (int i = 0; i < 4; ++i) d[i] = r.d[i];
}

}  // namespace lksim

// ---- the CUDA names (each not inlined: its return address identifies the call site) ----------
__attribute__((noinline)) inline void __syncwarp(unsigned mask = 0xffffffffu) {
    ::lksim::WarpLane in;
    ::lksim::warp_arrive(::lksim::WarpOp::Sync, mask, __builtin_return_address(0), in);
}
template <typename T>
__attribute__((noinline)) T __shfl_sync(unsigned mask, T var, int src_lane, int width = 32) {
    return ::lksim::warp_shfl(::lksim::WarpOp::ShflIdx, mask, var, src_lane, width, __builtin_return_address(0));
}
template <typename T>
__attribute__((noinline)) T __shfl_up_sync(unsigned mask, T var, unsigned delta, int width = 32) {
    return ::lksim::warp_shfl(::lksim::WarpOp::ShflUp, mask, var, (int)delta, width, __builtin_return_address(0));
}
template <typename T>
__attribute__((noinline)) T __shfl_down_sync(unsigned mask, T var, unsigned delta, int width = 32) {
    return ::lksim::warp_shfl(::lksim::WarpOp::ShflDown, mask, var, (int)delta, width, __builtin_return_address(0));
}
template <typename T>
__attribute__((noinline)) T __shfl_xor_sync(unsigned mask, T var, int lane_mask, int width = 32) {
    return ::lksim::warp_shfl(::lksim::WarpOp::ShflXor, mask, var, lane_mask, width, __builtin_return_address(0));
}
__attribute__((noinline)) inline unsigned __ballot_sync(unsigned mask, int pred) {
    return (unsigned)::lksim::warp_vote(::lksim::WarpOp::Ballot, mask, pred, __builtin_return_address(0));
}
__attribute__((noinline)) inline int __any_sync(unsigned mask, int pred) {
    return (int)::lksim::warp_vote(::lksim::WarpOp::Any, mask, pred, __builtin_return_address(0));
}
__attribute__((noinline)) inline int __all_sync(unsigned mask, int pred) {
    return (int)::lksim::warp_vote(::lksim::WarpOp::All, mask, pred, __builtin_return_address(0));
}

// mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 d, a, b, c (kernels/lk_tc.cu defines the
// same names with inline PTX under nvcc). a: four .f16x2 registers, b: two, c and d: four f32.
__attribute__((noinline)) inline void lk_mma_m16n8k16_f16(float (&d)[4], const uint32_t (&a)[4],
                                                          const uint32_t (&b)[2], const float (&c)[4]) {
    ::lksim::warp_mma(::lksim::WarpOp::MmaF16, d, a, b, c, __builtin_return_address(0));
}
// The .bf16 variant: mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32.
__attribute__((noinline)) inline void lk_mma_m16n8k16_bf16(float (&d)[4], const uint32_t (&a)[4],
                                                           const uint32_t (&b)[2], const float (&c)[4]) {
    ::lksim::warp_mma(::lksim::WarpOp::MmaBf16, d, a, b, c, __builtin_return_address(0));
}
// mma.sync.aligned.m16n8k8.row.col.f32.f16.f16.f32: a = two .f16x2 registers, b = one.
__attribute__((noinline)) inline void lk_mma_m16n8k8_f16(float (&d)[4], const uint32_t (&a)[2],
                                                         const uint32_t (&b)[1], const float (&c)[4]) {
    ::lksim::warp_mma(::lksim::WarpOp::MmaK8F16, d, a, b, c, __builtin_return_address(0));
}
// mma.sync.aligned.m16n8k8.row.col.f32.bf16.bf16.f32.
__attribute__((noinline)) inline void lk_mma_m16n8k8_bf16(float (&d)[4], const uint32_t (&a)[2],
                                                          const uint32_t (&b)[1], const float (&c)[4]) {
    ::lksim::warp_mma(::lksim::WarpOp::MmaK8Bf16, d, a, b, c, __builtin_return_address(0));
}
