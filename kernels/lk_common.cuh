// Shared helpers for every lkconv kernel: the argument block, storage-type conversions, dynamic
// shared memory, vector shared loads, and the macro that defines an extern "C" kernel (and
// registers it with the simulator when compiled with LK_SIM).
#pragma once

#include "lk_args.cuh"

#ifndef LK_SIM
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#endif

namespace lk {

// Outputs per thread along x in the tiled kernels (register tile 1 x RX).
constexpr int RX = 8;

__device__ __forceinline__ int round_up4(int v) { return (v + 3) & ~3; }
__device__ __forceinline__ int ceil_div(int a, int b) { return (a + b - 1) / b; }

// Tile geometry. The planner computes the same in src/plan/geometry.rs; the simulator exports
// these functions (kernels/sim/sim_entry.inc) and tests/sim.rs checks both agree over a sweep.
//
// Row stride (floats) of the tiled kernel's input tile: a multiple of 4 (16-byte loads), 4 more
// than a multiple of 8 so that the rows of a warp start on different banks.
__device__ __forceinline__ int tile_ld(int tw, int kcw) {
    const int ld = tw + round_up4(kcw);
    return (ld % 8 == 0) ? ld + 4 : ld;
}
// Shared floats of one plane of the tiled fwd/dgrad kernel: the filter chunk (kch rows of
// round_up4(kcw)), then the input tile (th + kch - 1 rows of tile_ld).
__device__ __forceinline__ int tiled_smem_floats(int th, int tw, int kch, int kcw) {
    return kch * round_up4(kcw) + (th + kch - 1) * tile_ld(tw, kcw);
}
// Weight-gradient partial kernel: dy tile row stride, x tile row stride (room for the 16-wide
// window), and its shared floats (x tile, dy tile, one RX-wide reduction slot per thread).
__device__ __forceinline__ int wgrad_dy_ld(int tw) { return ceil_div(tw, RX) * RX; }
__device__ __forceinline__ int wgrad_x_ld(int kw, int tw) {
    return ceil_div(kw, RX) * RX + wgrad_dy_ld(tw) + RX;
}
__device__ __forceinline__ int wgrad_smem_floats(int th, int tw, int kh, int kw, int threads) {
    return (th + kh - 1) * wgrad_x_ld(kw, tw) + th * wgrad_dy_ld(tw) + threads * RX;
}

// Planes and padding of the fwd/dgrad kernels: the data gradient is the forward pass over dy
// (the source, OH x OW) producing dx (H x W), filter rotated 180 degrees, padding K-1-p.
struct PassGeometry {
    int SH, SW, OH, OW, pt, pl;  // source plane, produced plane, top/left padding
};
template <bool DGRAD>
__device__ __forceinline__ PassGeometry pass_geometry(const DwArgs& a, int KH, int KW) {
    if (DGRAD) return PassGeometry{a.oh, a.ow, a.h, a.w, KH - 1 - a.pad_top, KW - 1 - a.pad_left};
    return PassGeometry{a.h, a.w, a.oh, a.ow, a.pad_top, a.pad_left};
}

__device__ __forceinline__ float to_f32(float v) { return v; }
__device__ __forceinline__ float to_f32(__half v) { return __half2float(v); }
__device__ __forceinline__ float to_f32(__nv_bfloat16 v) { return __bfloat162float(v); }

template <typename T>
struct Store;
template <>
struct Store<float> {
    static __device__ __forceinline__ float from(float v) { return v; }
};
template <>
struct Store<__half> {
    static __device__ __forceinline__ __half from(float v) { return __float2half_rn(v); }
};
template <>
struct Store<__nv_bfloat16> {
    static __device__ __forceinline__ __nv_bfloat16 from(float v) { return __float2bfloat16_rn(v); }
};
template <typename T>
__device__ __forceinline__ T from_f32(float v) {
    return Store<T>::from(v);
}

// Fused multiply-add: one FFMA on the GPU; a plain multiply-add in the simulator (speed).
__device__ __forceinline__ float madd(float a, float b, float c) {
#ifdef LK_SIM
    return a * b + c;
#else
    return __fmaf_rn(a, b, c);
#endif
}

// A 16-byte shared-memory load (LDS.128). The simulator checks the alignment the GPU needs.
__device__ __forceinline__ float4 lds4(const float* p) {
#ifdef LK_SIM
    if (reinterpret_cast<uintptr_t>(p) & 15u) ::lksim::fault("misaligned 16-byte shared load");
    float4 r;
    r.x = p[0];
    r.y = p[1];
    r.z = p[2];
    r.w = p[3];
    return r;
#else
    return *reinterpret_cast<const float4*>(p);
#endif
}

#ifdef LK_SIM
// A checked 16-byte shared-memory load (initcheck, kernels/sim/sim_initcheck.h).
__device__ __forceinline__ float4 lds4(::lksim::SmemPtr<const float> p) {
    if (reinterpret_cast<uintptr_t>(p.raw()) & 15u) ::lksim::fault("misaligned 16-byte shared load");
    ::lksim::smem_check(p.raw(), 16);
    const float* q = p.raw();
    return float4{q[0], q[1], q[2], q[3]};
}
// A pointer into dynamic shared memory declared with LK_CHECKED_SMEM: checked in the simulator
// (a read of never-written shared memory is an error), a plain `T*` under nvcc.
template <typename T>
using smem_ptr = ::lksim::SmemPtr<T>;
#else
template <typename T>
using smem_ptr = T*;
#endif

}  // namespace lk

// Dynamic shared memory as a checked lk::smem_ptr<float> (plain `float*` under nvcc).
#ifdef LK_SIM
#define LK_CHECKED_SMEM(name) \
    ::lk::smem_ptr<float> name(reinterpret_cast<float*>(::lksim::dyn_smem()))
#else
#define LK_CHECKED_SMEM(name) LK_DYNAMIC_SMEM(name)
#endif

// Dynamic shared memory as a float array (16-byte aligned).
#ifdef LK_SIM
#define LK_DYNAMIC_SMEM(name) float* name = reinterpret_cast<float*>(::lksim::dyn_smem())
#else
#define LK_DYNAMIC_SMEM(name)                                 \
    extern __shared__ __align__(16) unsigned char lk_smem_raw[]; \
    float* name = reinterpret_cast<float*>(lk_smem_raw)
#endif

// M(TN, T, K) for every kernel size with a templated kernel (`TEMPLATE_SIZES` in src/kernels.rs).
#define LK_FOR_TEMPLATE_SIZES(M, TN, T) \
    M(TN, T, 3) M(TN, T, 5) M(TN, T, 7) M(TN, T, 13) M(TN, T, 25) M(TN, T, 27) M(TN, T, 29) M(TN, T, 31)

// Defines `extern "C" __global__ void NAME(const DwArgs args) { CALL; }` and registers it.
#ifdef LK_SIM
#define LK_KERNEL(NAME, CALL)                                \
    extern "C" __global__ void NAME(const DwArgs args) { CALL; } \
    LK_SIM_REGISTER(NAME)
#else
#define LK_KERNEL(NAME, CALL) \
    extern "C" __global__ void NAME(const DwArgs args) { CALL; }
#endif
// LK_KERNEL with __launch_bounds__(THREADS, MIN_BLOCKS) under nvcc (the planner keeps the block
// within THREADS).
#ifdef LK_SIM
#define LK_KERNEL_BOUNDED(NAME, THREADS, MIN_BLOCKS, CALL) LK_KERNEL(NAME, CALL)
#else
#define LK_KERNEL_BOUNDED(NAME, THREADS, MIN_BLOCKS, CALL) \
    extern "C" __global__ void __launch_bounds__(THREADS, MIN_BLOCKS) NAME(const DwArgs args) { CALL; }
#endif
