// Shared by the tensor-core kernels (kernels/lk_tc.cu, kernels/lk_tc_wgrad.cu): the mma.sync
// wrappers (inline PTX under nvcc; the simulator defines the same names in
// kernels/sim/sim_warp.h), LK_TC_ENABLED (sm_80+ or the simulator), and 32-bit fragment helpers.
#pragma once

#include "lk_common.cuh"

#ifndef LK_SIM
#include <cstdint>
// mma.sync.aligned.m16n8k16.row.col.f32.{f16,bf16}.{f16,bf16}.f32 (the simulator defines the same
// names in kernels/sim/sim_warp.h). Fragments as in the PTX ISA: a = 4 x .f16x2/.bf16x2,
// b = 2 x .f16x2/.bf16x2, c, d = 4 x f32.
__device__ __forceinline__ void lk_mma_m16n8k16_f16(float (&d)[4], const uint32_t (&a)[4],
                                                    const uint32_t (&b)[2], const float (&c)[4]) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
    asm volatile(
        "mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, "
        "{%10,%11,%12,%13};\n"
        : "=f"(d[0]), "=f"(d[1]), "=f"(d[2]), "=f"(d[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]), "f"(c[0]), "f"(c[1]),
          "f"(c[2]), "f"(c[3]));
#endif
}
__device__ __forceinline__ void lk_mma_m16n8k16_bf16(float (&d)[4], const uint32_t (&a)[4],
                                                     const uint32_t (&b)[2], const float (&c)[4]) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
    asm volatile(
        "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, "
        "{%10,%11,%12,%13};\n"
        : "=f"(d[0]), "=f"(d[1]), "=f"(d[2]), "=f"(d[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]), "f"(c[0]), "f"(c[1]),
          "f"(c[2]), "f"(c[3]));
#endif
}
// mma.sync.aligned.m16n8k8.row.col.f32.{f16,bf16}.{f16,bf16}.f32: a = 2 registers, b = 1.
__device__ __forceinline__ void lk_mma_m16n8k8_f16(float (&d)[4], const uint32_t (&a)[2],
                                                   const uint32_t (&b)[1], const float (&c)[4]) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
    asm volatile(
        "mma.sync.aligned.m16n8k8.row.col.f32.f16.f16.f32 {%0,%1,%2,%3}, {%4,%5}, {%6}, "
        "{%7,%8,%9,%10};\n"
        : "=f"(d[0]), "=f"(d[1]), "=f"(d[2]), "=f"(d[3])
        : "r"(a[0]), "r"(a[1]), "r"(b[0]), "f"(c[0]), "f"(c[1]), "f"(c[2]), "f"(c[3]));
#endif
}
__device__ __forceinline__ void lk_mma_m16n8k8_bf16(float (&d)[4], const uint32_t (&a)[2],
                                                    const uint32_t (&b)[1], const float (&c)[4]) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
    asm volatile(
        "mma.sync.aligned.m16n8k8.row.col.f32.bf16.bf16.f32 {%0,%1,%2,%3}, {%4,%5}, {%6}, "
        "{%7,%8,%9,%10};\n"
        : "=f"(d[0]), "=f"(d[1]), "=f"(d[2]), "=f"(d[3])
        : "r"(a[0]), "r"(a[1]), "r"(b[0]), "f"(c[0]), "f"(c[1]), "f"(c[2]), "f"(c[3]));
#endif
}
#endif

#if defined(LK_SIM) || (defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800)
#define LK_TC_ENABLED 1
#endif

namespace lk {
namespace tc {

// Row stride (16-bit elements) of the staged input tile: a multiple of 8 whose word count is 4
// mod 8. Must match `tc_ld` in src/tensor_core.rs.
__device__ __forceinline__ int tc_ld(int twi) {
    const int ld = (twi + 7) & ~7;
    return ((ld / 2) % 8 == 0) ? ld + 8 : ld;
}

template <typename T>
__device__ __forceinline__ void mma(float (&acc)[4], const uint32_t (&a)[4], const uint32_t (&b)[2]);
template <>
__device__ __forceinline__ void mma<__half>(float (&acc)[4], const uint32_t (&a)[4], const uint32_t (&b)[2]) {
    lk_mma_m16n8k16_f16(acc, a, b, acc);
}
template <>
__device__ __forceinline__ void mma<__nv_bfloat16>(float (&acc)[4], const uint32_t (&a)[4],
                                                   const uint32_t (&b)[2]) {
    lk_mma_m16n8k16_bf16(acc, a, b, acc);
}

template <typename T>
__device__ __forceinline__ void mma8(float (&acc)[4], const uint32_t (&a)[2], const uint32_t (&b)[1]);
template <>
__device__ __forceinline__ void mma8<__half>(float (&acc)[4], const uint32_t (&a)[2], const uint32_t (&b)[1]) {
    lk_mma_m16n8k8_f16(acc, a, b, acc);
}
template <>
__device__ __forceinline__ void mma8<__nv_bfloat16>(float (&acc)[4], const uint32_t (&a)[2],
                                                    const uint32_t (&b)[1]) {
    lk_mma_m16n8k8_bf16(acc, a, b, acc);
}

__device__ __forceinline__ uint32_t pack2(uint16_t lo, uint16_t hi) { return (uint32_t)lo | ((uint32_t)hi << 16); }
__device__ __forceinline__ uint32_t lds32(const uint16_t* p) { return *reinterpret_cast<const uint32_t*>(p); }

}  // namespace tc
}  // namespace lk
