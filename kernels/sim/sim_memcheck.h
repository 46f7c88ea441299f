// memcheck for global memory: every buffer the simulator hands a kernel lives in its own mapping
// with an inaccessible guard page on each side, its end placed 16 bytes or less before the back
// guard page (the gap, and the rest of the front page, filled with a canary checked after every
// launch). A kernel access that reaches a guard page raises SIGSEGV; the handler below recognises
// the address, records "N bytes past the end of `out`" (or before its start) for the faulting
// worker thread, makes that page accessible so the access completes, and returns; the block
// scheduler then reports the error with the kernel's name. Faults outside our guard pages go to
// the previous handler (Rust's stack-overflow handler, or the default action).
#pragma once

#include <signal.h>
#include <sys/mman.h>
#include <unistd.h>

#include <atomic>
#include <cstdint>
#include <cstring>
#include <mutex>

namespace lksim {

constexpr size_t kPage = 4096;
constexpr unsigned char kCanary = 0xa5;
constexpr size_t kMaxGuarded = 4096;

struct Guarded {
    std::atomic<uintptr_t> map_lo{0};  // 0: free slot
    uintptr_t map_hi = 0, buf_lo = 0, buf_hi = 0;
    char name[24] = {};
};

inline Guarded g_guarded[kMaxGuarded];
inline std::mutex g_guard_mu;  // registration only (never taken in the handler)
inline struct sigaction g_prev_segv;

// The first out-of-bounds access seen by this thread since the last clear (signal-safe storage).
inline thread_local __attribute__((tls_model("initial-exec"))) char t_oob_msg[200];
inline thread_local __attribute__((tls_model("initial-exec"))) int t_oob = 0;

// Signal-safe formatting helpers.
inline size_t put_str(char* dst, size_t at, size_t cap, const char* s) {
    while (*s && at + 1 < cap) dst[at++] = *s++;
    dst[at] = 0;
    return at;
}
inline size_t put_num(char* dst, size_t at, size_t cap, uint64_t v) {
    char tmp[24];
    int n = 0;
    do {
        tmp[n++] = (char)('0' + v % 10);
        v /= 10;
    } while (v && n < 24);
    while (n && at + 1 < cap) dst[at++] = tmp[--n];
    dst[at] = 0;
    return at;
}

inline void on_segv(int sig, siginfo_t* info, void* uctx) {
    const uintptr_t addr = reinterpret_cast<uintptr_t>(info->si_addr);
    for (size_t i = 0; i < kMaxGuarded; ++i) {
        Guarded& g = g_guarded[i];
        const uintptr_t lo = g.map_lo.load(std::memory_order_acquire);
        if (lo == 0 || addr < lo || addr >= g.map_hi) continue;
        if (!t_oob) {
            bool write = false;
#if defined(__x86_64__)
            write = (static_cast<ucontext_t*>(uctx)->uc_mcontext.gregs[REG_ERR] & 2) != 0;
#endif
            size_t at = put_str(t_oob_msg, 0, sizeof t_oob_msg,
                                write ? "out-of-bounds global write " : "out-of-bounds global access ");
            if (addr >= g.buf_hi) {
                at = put_num(t_oob_msg, at, sizeof t_oob_msg, addr - g.buf_hi);
                at = put_str(t_oob_msg, at, sizeof t_oob_msg, " bytes past the end of `");
            } else {
                at = put_num(t_oob_msg, at, sizeof t_oob_msg, g.buf_lo - addr);
                at = put_str(t_oob_msg, at, sizeof t_oob_msg, " bytes before the start of `");
            }
            at = put_str(t_oob_msg, at, sizeof t_oob_msg, g.name);
            at = put_str(t_oob_msg, at, sizeof t_oob_msg, "` (");
            at = put_num(t_oob_msg, at, sizeof t_oob_msg, g.buf_hi - g.buf_lo);
            put_str(t_oob_msg, at, sizeof t_oob_msg, " bytes)");
            t_oob = 1;
        }
        // Let the access complete (it reads zeros); the launch fails after the block.
        mprotect(reinterpret_cast<void*>(addr & ~(kPage - 1)), kPage, PROT_READ | PROT_WRITE);
        return;
    }
    // Not ours: hand over to the previous handler, or restore the default action and return,
    // which re-executes the access and takes the default action (a core dump).
    if ((g_prev_segv.sa_flags & SA_SIGINFO) && g_prev_segv.sa_sigaction) {
        g_prev_segv.sa_sigaction(sig, info, uctx);
        return;
    }
    if (g_prev_segv.sa_handler != SIG_DFL && g_prev_segv.sa_handler != SIG_IGN) {
        g_prev_segv.sa_handler(sig);
        return;
    }
    signal(sig, SIG_DFL);
}

inline void install_segv_handler() {
    static std::once_flag once;
    std::call_once(once, [] {
        struct sigaction sa;
        std::memset(&sa, 0, sizeof sa);
        sa.sa_sigaction = on_segv;
        sa.sa_flags = SA_SIGINFO | SA_ONSTACK;
        sigemptyset(&sa.sa_mask);
        sigaction(SIGSEGV, &sa, &g_prev_segv);
    });
}

// Takes (and clears) this thread's out-of-bounds report; empty if none.
inline std::string take_oob() {
    if (!t_oob) return {};
    t_oob = 0;
    return std::string(t_oob_msg);
}

inline Guarded* find_guarded(const void* p) {
    const uintptr_t a = reinterpret_cast<uintptr_t>(p);
    for (auto& g : g_guarded) {
        const uintptr_t lo = g.map_lo.load(std::memory_order_acquire);
        if (lo && g.buf_lo == a) return &g;
    }
    return nullptr;
}

// The canary around a buffer (the slack in its first and last data pages) is intact.
inline bool canary_intact(const Guarded& g) {
    const unsigned char* front = reinterpret_cast<const unsigned char*>(g.map_lo + kPage);
    for (const unsigned char* p = front; p < reinterpret_cast<const unsigned char*>(g.buf_lo); ++p)
        if (*p != kCanary) return false;
    const unsigned char* back_end = reinterpret_cast<const unsigned char*>(g.map_hi - kPage);
    for (const unsigned char* p = reinterpret_cast<const unsigned char*>(g.buf_hi); p < back_end; ++p)
        if (*p != kCanary) return false;
    return true;
}

}  // namespace lksim

// Allocates `bytes` (> 0) of guarded memory named `name` (for reports), filled with `fill`.
// Returns null when out of memory or out of registry slots.
extern "C" void* lksim_guarded_alloc(size_t bytes, const char* name, unsigned char fill) {
    using namespace lksim;
    if (bytes == 0) bytes = 1;
    install_segv_handler();
    const size_t data = (bytes + 16 + kPage - 1) / kPage * kPage;
    const size_t total = data + 2 * kPage;
    void* m = mmap(nullptr, total, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    if (m == MAP_FAILED) return nullptr;
    unsigned char* base = static_cast<unsigned char*>(m);
    unsigned char* data_lo = base + kPage;
    unsigned char* data_hi = data_lo + data;
    // 16-byte aligned start (vector loads), the end at most 15 bytes before the back guard page
    unsigned char* buf = reinterpret_cast<unsigned char*>(
        reinterpret_cast<uintptr_t>(data_hi - bytes) & ~uintptr_t(15));
    std::memset(data_lo, kCanary, data);
    std::memset(buf, fill, bytes);
    mprotect(base, kPage, PROT_NONE);
    mprotect(data_hi, kPage, PROT_NONE);
    std::lock_guard<std::mutex> lock(g_guard_mu);
    for (auto& g : g_guarded) {
        if (g.map_lo.load(std::memory_order_relaxed) != 0) continue;
        g.map_hi = reinterpret_cast<uintptr_t>(base + total);
        g.buf_lo = reinterpret_cast<uintptr_t>(buf);
        g.buf_hi = g.buf_lo + bytes;
        std::memset(g.name, 0, sizeof g.name);
        std::strncpy(g.name, name ? name : "?", sizeof g.name - 1);
        g.map_lo.store(reinterpret_cast<uintptr_t>(base), std::memory_order_release);
        return buf;
    }
    munmap(m, total);
    return nullptr;
}

// Frees memory from lksim_guarded_alloc (null is ignored).
extern "C" void lksim_guarded_free(void* p) {
    using namespace lksim;
    if (!p) return;
    std::lock_guard<std::mutex> lock(g_guard_mu);
    Guarded* g = find_guarded(p);
    if (!g) return;
    const uintptr_t lo = g->map_lo.load(std::memory_order_relaxed);
    const size_t total = g->map_hi - lo;
    g->map_lo.store(0, std::memory_order_release);
    munmap(reinterpret_cast<void*>(lo), total);
}

// 0 when the canary around a guarded buffer is intact, 1 (with a message) when a kernel wrote
// into the slack next to it.
extern "C" int lksim_guarded_check(const void* p, char* err, size_t err_len) {
    using namespace lksim;
    Guarded* g = find_guarded(p);
    if (!g || canary_intact(*g)) return 0;
    std::string msg = std::string("out-of-bounds global write next to `") + g->name + "`";
    if (err && err_len) {
        size_t n = std::min(msg.size(), err_len - 1);
        std::memcpy(err, msg.data(), n);
        err[n] = 0;
    }
    return 1;
}
