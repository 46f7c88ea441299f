// A small header-only SIMT runtime: lets the unchanged kernels/*.cu compile as C++20 with g++
// and run on the CPU (the kernel simulator, `lkconv::sim`).
//
// Model: the threads of a block run as fibers (ucontext) on one OS thread; __syncthreads()
// switches back to the block scheduler, which resumes the next fiber, so a barrier completes
// when every fiber of the block has reached it. A fiber that exits while others wait at a
// barrier, or threads waiting at different __syncthreads() call sites, is reported as an error
// (never a hang). threadIdx/blockIdx/blockDim/gridDim are thread_local values that the scheduler
// sets before it resumes a fiber. Blocks of a grid run in parallel on a few OS worker threads,
// each with its own fibers and its own dynamic shared memory (poisoned with NaN bytes before
// every block so that a read of unstaged shared memory shows up as NaN in the result).
// Kernels here use dynamic shared memory only (LK_DYNAMIC_SMEM in lk_common.cuh); `__shared__`
// maps to `static thread_local` for completeness.
// Sanitizer: the order the fibers of each barrier interval (and the blocks of a grid) run in is
// a per-launch schedule (forward, reverse, seeded random: a race shows as a different result);
// global buffers from src/sim/sanitize.rs have guard pages (sim_memcheck.h); shared memory
// declared with LK_CHECKED_SMEM has a shadow map of written bytes (sim_initcheck.h).
#pragma once
#ifndef LK_SIM
#define LK_SIM 1
#endif

#include <ucontext.h>
#include <sys/mman.h>

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstring>
#include <mutex>
#include <string>
#include <thread>
#include <vector>

#include "../lk_args.cuh"
#include "sim_memcheck.h"
#include "sim_initcheck.h"

#define __global__
#define __device__
#define __host__
#define __forceinline__ inline
#define __noinline__ __attribute__((noinline))
#define __restrict__ __restrict
#define __shared__ static thread_local
#define __align__(n) alignas(n)
#define __launch_bounds__(...)

struct uint3 {
    unsigned x, y, z;
};
struct dim3 {
    unsigned x = 1, y = 1, z = 1;
    dim3() = default;
    dim3(unsigned a, unsigned b = 1, unsigned c = 1) : x(a), y(b), z(c) {}
};
struct alignas(16) float4 {
    float x, y, z, w;
};
struct alignas(8) float2 {
    float x, y;
};

namespace lksim {

inline thread_local uint3 t_thread_idx{0, 0, 0};
inline thread_local uint3 t_block_idx{0, 0, 0};
inline thread_local uint3 t_block_dim{1, 1, 1};
inline thread_local uint3 t_grid_dim{1, 1, 1};
inline thread_local unsigned char* t_dyn_smem = nullptr;

struct BlockRun;
inline thread_local BlockRun* t_block = nullptr;

void fault(const char* msg);
void syncthreads_impl();

inline unsigned char* dyn_smem() { return t_dyn_smem; }

}  // namespace lksim

#define threadIdx (::lksim::t_thread_idx)
#define blockIdx (::lksim::t_block_idx)
#define blockDim (::lksim::t_block_dim)
#define gridDim (::lksim::t_grid_dim)
#define __syncthreads() ::lksim::syncthreads_impl()

// ---- math and memory intrinsics -------------------------------------------------------------
inline float __fmaf_rn(float a, float b, float c) { return std::fma(a, b, c); }
using std::fmaf;
using std::max;
using std::min;
template <typename T>
inline T __ldg(const T* p) {
    return *p;
}
template <typename T>
inline T atomicAdd(T* p, T v) {
    return std::atomic_ref<T>(*p).fetch_add(v);
}

// ---- half and bfloat16 (bit-exact round to nearest even) ------------------------------------
struct __half {
    uint16_t x;
};
struct __nv_bfloat16 {
    uint16_t x;
};

inline float lksim_bits_f32(uint32_t u) {
    float f;
    std::memcpy(&f, &u, 4);
    return f;
}
inline uint32_t lksim_f32_bits(float f) {
    uint32_t u;
    std::memcpy(&u, &f, 4);
    return u;
}

inline float __half2float(__half h) {
    uint32_t sign = (uint32_t)(h.x & 0x8000u) << 16;
    uint32_t exp = (h.x >> 10) & 0x1f;
    uint32_t man = h.x & 0x3ffu;
    if (exp == 0x1f) return lksim_bits_f32(sign | 0x7f800000u | (man << 13) | (man ? 0x400000u : 0));
    if (exp == 0) {
        if (man == 0) return lksim_bits_f32(sign);
        float v = std::ldexp((float)man, -24);  // subnormal: exact
        return sign ? -v : v;
    }
    return lksim_bits_f32(sign | ((exp + 112u) << 23) | (man << 13));
}

inline __half __float2half_rn(float f) {
    uint32_t u = lksim_f32_bits(f);
    uint16_t sign = (uint16_t)((u >> 16) & 0x8000u);
    uint32_t a = u & 0x7fffffffu;
    if (a >= 0x7f800000u) {  // inf or nan
        return __half{(uint16_t)(sign | 0x7c00u | (a > 0x7f800000u ? 0x200u : 0))};
    }
    if (a >= 0x477ff000u) return __half{(uint16_t)(sign | 0x7c00u)};  // rounds to inf
    if (a < 0x38800000u) {  // result subnormal or zero: value / 2^-24, rounded to nearest even
        float v = lksim_bits_f32(a) * 16777216.0f;  // exact scaling (power of two)
        float r = std::nearbyint(v);                // default rounding mode: nearest even
        return __half{(uint16_t)(sign | (uint16_t)r)};
    }
    uint32_t exp = (a >> 23) - 112u;
    uint32_t man = a & 0x7fffffu;
    uint32_t h = (exp << 10) | (man >> 13);
    uint32_t rest = man & 0x1fffu;
    if (rest > 0x1000u || (rest == 0x1000u && (h & 1u))) h += 1;  // may carry into exponent
    return __half{(uint16_t)(sign | h)};
}
inline __half __float2half(float f) { return __float2half_rn(f); }

inline float __bfloat162float(__nv_bfloat16 b) { return lksim_bits_f32((uint32_t)b.x << 16); }
inline __nv_bfloat16 __float2bfloat16_rn(float f) {
    uint32_t u = lksim_f32_bits(f);
    if ((u & 0x7fffffffu) > 0x7f800000u) return __nv_bfloat16{(uint16_t)((u >> 16) | 0x40u)};
    uint32_t lsb = (u >> 16) & 1u;
    u += 0x7fffu + lsb;
    return __nv_bfloat16{(uint16_t)(u >> 16)};
}
inline __nv_bfloat16 __float2bfloat16(float f) { return __float2bfloat16_rn(f); }

// ---- the block scheduler ----------------------------------------------------------------------
namespace lksim {

constexpr size_t kStackBytes = 64 * 1024;
constexpr size_t kMaxSharedBytes = 227 * 1024;
// Poisoned bytes after the dynamic shared memory: a read past its end gives NaN, a write past
// it is reported after the block.
constexpr size_t kSharedGuardBytes = 4096;

using KernelFn = void (*)(const DwArgs);

// How the fibers of a block are ordered in each barrier interval (and the blocks of a grid): a
// kernel whose result depends on the order has a race (LKCONV_SIM_SCHEDULE, src/sim/sanitize.rs).
enum Schedule : unsigned { kForward = 0, kReverse = 1, kRandom = 2 };

// Per-launch options, identical to `LaunchOptions` in src/sim/sanitize.rs.
struct LaunchOptions {
    unsigned schedule;
    unsigned reserved;
    unsigned long long seed;
};

inline uint64_t splitmix64(uint64_t x) {
    x += 0x9e3779b97f4a7c15ull;
    x = (x ^ (x >> 30)) * 0xbf58476d1ce4e5b9ull;
    x = (x ^ (x >> 27)) * 0x94d049bb133111ebull;
    return x ^ (x >> 31);
}

// Fills `order` with the visiting order of `n` items under `opts`; `salt` picks a fresh random
// permutation (block index, interval number).
inline void schedule_order(const LaunchOptions& opts, uint64_t salt, std::vector<size_t>& order,
                           size_t n) {
    order.resize(n);
    for (size_t i = 0; i < n; ++i) order[i] = opts.schedule == kReverse ? n - 1 - i : i;
    if (opts.schedule != kRandom) return;
    uint64_t state = splitmix64(opts.seed ^ splitmix64(salt));
    for (size_t i = n; i > 1; --i) {
        state = splitmix64(state);
        std::swap(order[i - 1], order[state % i]);
    }
}

struct LaunchState {
    KernelFn fn = nullptr;
    const void* args = nullptr;
    LaunchOptions opts{kForward, 0, 0};
    std::atomic<bool> failed{false};
    std::mutex mu;
    std::string error;
    void set_error(const std::string& e) {
        std::lock_guard<std::mutex> g(mu);
        if (error.empty()) error = e;
        failed.store(true);
    }
};

struct Fiber {
    ucontext_t ctx;
    bool done = false;
    bool at_barrier = false;
    void* site = nullptr;
};

struct BlockRun {
    LaunchState* launch = nullptr;
    ucontext_t sched;
    std::vector<Fiber> fibers;
    unsigned char* stacks = nullptr;
    size_t nthreads = 0;
    size_t current = 0;
    unsigned char* smem = nullptr;
    size_t smem_bytes = 0;
    std::string fault;
    std::vector<size_t> order;

    explicit BlockRun(size_t n, size_t smem_alloc) : fibers(n), nthreads(n) {
        size_t bytes = n * kStackBytes;
        void* p = mmap(nullptr, bytes, PROT_READ | PROT_WRITE,
                       MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0);
        stacks = p == MAP_FAILED ? nullptr : static_cast<unsigned char*>(p);
        smem_bytes = smem_alloc;
        smem = static_cast<unsigned char*>(
            std::aligned_alloc(64, (smem_alloc + kSharedGuardBytes + 63) / 64 * 64));
    }
    ~BlockRun() {
        if (stacks) munmap(stacks, nthreads * kStackBytes);
        std::free(smem);
    }
    BlockRun(const BlockRun&) = delete;
    BlockRun& operator=(const BlockRun&) = delete;
};

inline void fiber_entry() {
    BlockRun* b = t_block;
    b->launch->fn(*static_cast<const DwArgs*>(b->launch->args));
    b->fibers[b->current].done = true;
    // returning resumes uc_link (the scheduler)
}

inline void fault(const char* msg) {
    if (t_block && t_block->fault.empty()) t_block->fault = msg;
}

// Not inlined: its return address identifies the __syncthreads() call site.
__attribute__((noinline)) inline void syncthreads_impl() {
    void* site = __builtin_return_address(0);
    BlockRun* b = t_block;
    Fiber& f = b->fibers[b->current];
    f.at_barrier = true;
    f.site = site;
    swapcontext(&f.ctx, &b->sched);
}

}  // namespace lksim

#include "sim_warp.h"  // warp rendezvous: __syncwarp, shuffles, votes, mma

namespace lksim {

// Runs one block; returns an empty string or an error message.
inline std::string run_block(BlockRun& b, uint3 bidx, uint3 bdim) {
    t_block = &b;
    t_block_idx = bidx;
    t_block_dim = bdim;
    t_dyn_smem = b.smem;
    std::memset(b.smem, 0xff, b.smem_bytes + kSharedGuardBytes);  // NaN poison
    b.fault.clear();
    take_oob();  // a report left by an earlier failed launch on this thread
    initcheck_block_begin(b.smem, b.smem_bytes);
    const uint64_t block_salt =
        ((uint64_t)bidx.z << 42) ^ ((uint64_t)bidx.y << 21) ^ (uint64_t)bidx.x;
    uint64_t interval = 0;
    warp_block_begin(b.nthreads);
    for (size_t i = 0; i < b.nthreads; ++i) {
        Fiber& f = b.fibers[i];
        f.done = false;
        f.at_barrier = false;
        getcontext(&f.ctx);
        f.ctx.uc_stack.ss_sp = b.stacks + i * kStackBytes;
        f.ctx.uc_stack.ss_size = kStackBytes;
        f.ctx.uc_link = &b.sched;
        makecontext(&f.ctx, fiber_entry, 0);
    }
    for (;;) {
        size_t waiting = 0, done = 0, at_warp = 0;
        void* site = nullptr;
        bool mixed_sites = false;
        // while a warp point is pending, only its lanes run; the others stay at their barrier
        const bool warp_round = warp_any_waiting();
        schedule_order(b.launch->opts, splitmix64(block_salt) + interval++, b.order, b.nthreads);
        for (size_t i : b.order) {
            Fiber& f = b.fibers[i];
            if (f.done) {
                ++done;
                continue;
            }
            if (!warp_round || warp_waiting(i)) {
                f.at_barrier = false;
                b.current = i;
                t_thread_idx = uint3{(unsigned)(i % bdim.x), (unsigned)((i / bdim.x) % bdim.y),
                                     (unsigned)(i / ((size_t)bdim.x * bdim.y))};
                swapcontext(&b.sched, &f.ctx);
            }
            if (f.done) {
                ++done;
            } else if (warp_waiting(i)) {
                ++at_warp;
            } else {
                ++waiting;
                if (site == nullptr) site = f.site;
                else if (site != f.site) mixed_sites = true;
            }
        }
        if (!b.fault.empty()) return b.fault;
        std::string oob = take_oob();
        if (!oob.empty()) return oob;
        if (at_warp > 0) {
            std::string e = warp_end_of_pass();
            if (!e.empty()) return e;
            continue;
        }
        if (waiting == 0) {
            for (size_t i = 0; i < kSharedGuardBytes; ++i)
                if (b.smem[b.smem_bytes + i] != 0xff)
                    return "write past the end of dynamic shared memory (" +
                           std::to_string(b.smem_bytes) + " bytes)";
            return {};
        }
        if (done > 0) {
            return "barrier divergence: " + std::to_string(done) + " thread(s) exited while " +
                   std::to_string(waiting) + " wait at __syncthreads()";
        }
        if (mixed_sites) return "barrier divergence: threads wait at different __syncthreads()";
    }
}

struct Registry {
    std::vector<std::pair<std::string, KernelFn>> items;
    static Registry& get() {
        static Registry r;
        return r;
    }
    KernelFn find(const char* name) const {
        for (auto& it : items)
            if (it.first == name) return it.second;
        return nullptr;
    }
};

struct Registrar {
    Registrar(const char* name, KernelFn fn) { Registry::get().items.emplace_back(name, fn); }
};

}  // namespace lksim

#define LK_SIM_REGISTER(name) static ::lksim::Registrar lksim_reg_##name(#name, &name);
