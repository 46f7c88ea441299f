// The device behind lkbench: the CUDA driver (backend_cuda.cpp, kernels loaded from a cubin
// built by nvcc) or the kernel simulator (backend_sim.cpp, the same kernels compiled for the
// host against kernels/sim/). Addresses are 64-bit device addresses (host pointers in the
// simulator). Every failure throws std::runtime_error.
#pragma once

#include <cstddef>
#include <cstdint>
#include <functional>
#include <memory>
#include <string>

#include "../lk_args.cuh"

namespace lkbench {

struct Launch {
    std::string kernel;
    unsigned grid[3];
    unsigned block[3];
    unsigned shared_bytes;
    DwArgs args;  // buffer addresses bound by the caller
};

// A per-channel strided-batched row-major f32 GEMM in the workspace (src/kernels.rs GemmStep).
struct Gemm {
    long long after_launch, batch, m, n, k;
    long long a_offset, lda, stride_a;
    bool a_trans;
    long long b_offset, ldb, stride_b;
    bool b_trans;
    long long c_offset, ldc, stride_c;
};

class Backend {
   public:
    virtual ~Backend() = default;
    virtual std::string describe() = 0;
    virtual uint64_t alloc(size_t bytes) = 0;
    virtual void release(uint64_t addr) = 0;
    virtual void upload(uint64_t dst, const void* src, size_t bytes) = 0;
    virtual void download(void* dst, uint64_t src, size_t bytes) = 0;
    virtual void fill(uint64_t dst, unsigned char byte, size_t bytes) = 0;
    virtual void launch(const Launch& l) = 0;
    // Runs the GEMM on f32 workspace `ws`; false when this backend cannot (no cuBLAS).
    virtual bool gemm(const Gemm& g, uint64_t ws) = 0;
    virtual void sync() = 0;
    // Milliseconds per call of `reps` back-to-back calls of `body` between two events.
    virtual double time_ms(const std::function<void()>& body, int reps) = 0;
};

// module: the cubin/fatbin with the kernels (CUDA); ignored by the simulator.
std::unique_ptr<Backend> make_backend(const std::string& module);

// The storage conversions the kernels use (cuda_fp16.h / cuda_bf16.h on the host, or the
// simulator's bit-exact versions): f32 -> f16 or bf16 bits (round to nearest even) and back.
uint16_t half_bits_of(float v, bool bf16);
float float_of_half_bits(uint16_t bits, bool bf16);

}  // namespace lkbench
