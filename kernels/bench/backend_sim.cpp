// lkbench's simulator backend: the kernels compiled for the host against kernels/sim/ (linked
// from the umbrella that kernels/bench/build.sh generates), host memory, a host GEMM and
// wall-clock timing. It exists so that CI tests the harness without a GPU.
#include <chrono>
#include <cstdlib>
#include <cstring>
#include <stdexcept>
#include <string>
#include <vector>

#include "backend.h"
#include "sim/sim_runtime.h"

extern "C" int lksim_launch(const char* name, unsigned gx, unsigned gy, unsigned gz, unsigned bx,
                            unsigned by, unsigned bz, unsigned shared_bytes, const DwArgs* args,
                            char* err, size_t err_len);

namespace lkbench {
namespace {

class SimBackend : public Backend {
   public:
    std::string describe() override { return "the kernel simulator (host)"; }
    uint64_t alloc(size_t bytes) override {
        void* p = std::aligned_alloc(256, (bytes + 255) / 256 * 256);
        if (!p) throw std::runtime_error("out of host memory");
        return (uint64_t)(uintptr_t)p;
    }
    void release(uint64_t addr) override { std::free((void*)(uintptr_t)addr); }
    void upload(uint64_t dst, const void* src, size_t bytes) override {
        std::memcpy((void*)(uintptr_t)dst, src, bytes);
    }
    void download(void* dst, uint64_t src, size_t bytes) override {
        std::memcpy(dst, (const void*)(uintptr_t)src, bytes);
    }
    void fill(uint64_t dst, unsigned char byte, size_t bytes) override {
        std::memset((void*)(uintptr_t)dst, byte, bytes);
    }
    void launch(const Launch& l) override {
        char err[512] = {0};
        if (lksim_launch(l.kernel.c_str(), l.grid[0], l.grid[1], l.grid[2], l.block[0], l.block[1],
                         l.block[2], l.shared_bytes, &l.args, err, sizeof err) != 0)
            throw std::runtime_error(l.kernel + ": " + err);
    }
    // Row-major C_b = op(A_b) op(B_b) in the workspace (as src/kernels.rs GemmStep::run_host).
    bool gemm(const Gemm& g, uint64_t ws_addr) override {
        float* ws = (float*)(uintptr_t)ws_addr;
        std::vector<float> row(g.n);
        for (long long b = 0; b < g.batch; ++b) {
            const float* a = ws + g.a_offset + b * g.stride_a;
            const float* bm = ws + g.b_offset + b * g.stride_b;
            float* c = ws + g.c_offset + b * g.stride_c;
            for (long long i = 0; i < g.m; ++i) {
                for (long long j = 0; j < g.n; ++j) {
                    float acc = 0.f;
                    for (long long p = 0; p < g.k; ++p) {
                        float av = g.a_trans ? a[p * g.lda + i] : a[i * g.lda + p];
                        float bv = g.b_trans ? bm[j * g.ldb + p] : bm[p * g.ldb + j];
                        acc += av * bv;
                    }
                    row[j] = acc;
                }
                std::memcpy(c + i * g.ldc, row.data(), sizeof(float) * g.n);
            }
        }
        return true;
    }
    void sync() override {}
    double time_ms(const std::function<void()>& body, int reps) override {
        auto t0 = std::chrono::steady_clock::now();
        for (int i = 0; i < reps; ++i) body();
        return std::chrono::duration<double, std::milli>(std::chrono::steady_clock::now() - t0).count() / reps;
    }
};

}  // namespace

std::unique_ptr<Backend> make_backend(const std::string&) { return std::make_unique<SimBackend>(); }

uint16_t half_bits_of(float v, bool bf16) { return bf16 ? __float2bfloat16_rn(v).x : __float2half_rn(v).x; }
float float_of_half_bits(uint16_t bits, bool bf16) {
    return bf16 ? __bfloat162float(__nv_bfloat16{bits}) : __half2float(__half{bits});
}

}  // namespace lkbench
