// Shared by every kernel file: the element types, conversions and reductions, and the
// CAD_KERNEL entry-point macro. Compiled by nvcc for the GPU and by g++ against emu/emu.hpp for
// the host emulation the tests run (kernels/build.rs).
#pragma once

#if defined(__CUDACC__)
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <stdint.h>
#define CAD_DYNAMIC_SMEM(T, name)                                  \
  extern __shared__ __align__(16) unsigned char cad_dyn_smem_[];   \
  T* name = reinterpret_cast<T*>(cad_dyn_smem_)
/// CAD_DYNAMIC_SMEM for a kernel that needs `bytes` of it: a launch that gave fewer (the Rust
/// launcher's size out of step with the kernel's) traps here, and aborts in the emulation.
#define CAD_DYNAMIC_SMEM_AT_LEAST(T, name, bytes)                          \
  CAD_DYNAMIC_SMEM(T, name);                                               \
  do {                                                                     \
    uint32_t cad_dyn_bytes_;                                               \
    asm("mov.u32 %0, %%dynamic_smem_size;" : "=r"(cad_dyn_bytes_));        \
    if (cad_dyn_bytes_ < (bytes)) __trap();                                \
  } while (0)
/// Waits until the kernel launched before this one on the stream has completed and its writes
/// are visible. A no-op unless this kernel was launched as a programmatic dependent (sm_90+,
/// `Device::set_programmatic_launch`), whose launch may then overlap the previous kernel's end.
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
#define CAD_WAIT_FOR_PREVIOUS_GRID() asm volatile("griddepcontrol.wait;\n" ::: "memory")
#else
#define CAD_WAIT_FOR_PREVIOUS_GRID() \
  do {                                \
  } while (0)
#endif
/// Lets the kernel launched after this one on the stream, when it is a programmatic dependent,
/// start its blocks as soon as every block of this grid has passed here (they then wait at their
/// own CAD_WAIT_FOR_PREVIOUS_GRID, which still waits for this grid's completion and its writes).
/// A no-op without programmatic dependents.
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
#define CAD_LAUNCH_DEPENDENTS() asm volatile("griddepcontrol.launch_dependents;\n" ::: "memory")
#else
#define CAD_LAUNCH_DEPENDENTS() \
  do {                           \
  } while (0)
#endif
/// An `extern "C"` kernel taking its parameter struct by value (one argument, so the Rust side
/// launches every kernel the same way). The body (the braces after the macro) runs once the
/// previous kernel has completed (CAD_WAIT_FOR_PREVIOUS_GRID at entry), so every kernel may be
/// launched as a programmatic dependent: none reads or writes memory before that wait. It then
/// lets its own dependent launch early (CAD_LAUNCH_DEPENDENTS), whose blocks take the SMs this
/// grid's last blocks leave and wait there.
#define CAD_KERNEL(name, Params, p)                                    \
  __device__ __forceinline__ void name##_body(const Params& p);        \
  extern "C" __global__ void name(const Params p) {                    \
    CAD_WAIT_FOR_PREVIOUS_GRID();                                      \
    CAD_LAUNCH_DEPENDENTS();                                           \
    name##_body(p);                                                    \
  }                                                                    \
  __device__ __forceinline__ void name##_body(const Params& p)
/// CAD_KERNEL with `__launch_bounds__(threads)` and a `prelude(p)` that runs before the wait,
/// while the previous kernel may still be running: it may only hint the caches
/// (cad::prefetch_l2) or read memory that no kernel writes (the model's weights).
#define CAD_KERNEL_BOUNDS_PRELUDE(name, Params, p, threads, prelude)           \
  __device__ __forceinline__ void name##_body(const Params& p);                \
  extern "C" __global__ void __launch_bounds__(threads) name(const Params p) { \
    prelude(p);                                                                \
    CAD_WAIT_FOR_PREVIOUS_GRID();                                              \
    CAD_LAUNCH_DEPENDENTS();                                                   \
    name##_body(p);                                                            \
  }                                                                            \
  __device__ __forceinline__ void name##_body(const Params& p)
#define CAD_KERNEL_BOUNDS(name, Params, p, threads) \
  CAD_KERNEL_BOUNDS_PRELUDE(name, Params, p, threads, cad::no_prelude)
#else
#include "emu/emu.hpp"
#define CAD_DYNAMIC_SMEM(T, name) CAD_EMU_DYNAMIC_SMEM(T, name)
#define CAD_DYNAMIC_SMEM_AT_LEAST(T, name, bytes) \
  T* name = reinterpret_cast<T*>(cad_emu::dynamic_smem_at_least(bytes))
#define CAD_KERNEL_BOUNDS(name, Params, p, threads) CAD_EMU_KERNEL(name, Params, p, threads)
#define CAD_KERNEL_BOUNDS_PRELUDE(name, Params, p, threads, prelude) \
  static void name##_main(const Params& p);                          \
  CAD_EMU_KERNEL(name, Params, p, threads) {                         \
    prelude(p);                                                      \
    name##_main(p);                                                  \
  }                                                                  \
  static void name##_main(const Params& p)
#endif

namespace cad {
/// The prelude of a kernel that has none (CAD_KERNEL_BOUNDS).
template <class Params>
__device__ __forceinline__ void no_prelude(const Params&) {}
}  // namespace cad

/// Full unrolling of a constant-trip loop, for nvcc and g++ alike.
#if defined(__CUDACC__)
#define CAD_UNROLL _Pragma("unroll")
#else
#define CAD_UNROLL _Pragma("GCC unroll 16")
#endif

namespace cad {

using bf16 = __nv_bfloat16;
using f16 = __half;

__device__ __forceinline__ float to_f32(float v) { return v; }
__device__ __forceinline__ float to_f32(bf16 v) { return __bfloat162float(v); }
__device__ __forceinline__ float to_f32(f16 v) { return __half2float(v); }

template <class T>
__device__ __forceinline__ T from_f32(float v);
template <>
__device__ __forceinline__ float from_f32<float>(float v) {
  return v;
}
template <>
__device__ __forceinline__ bf16 from_f32<bf16>(float v) {
  return __float2bfloat16(v);
}
template <>
__device__ __forceinline__ f16 from_f32<f16>(float v) {
  return __float2half(v);
}

/// Two values rounded to T, packed as one 32-bit register (`lo` in the low half).
template <class T>
__device__ __forceinline__ uint32_t pack2(float lo, float hi) {
  const T a = from_f32<T>(lo), b = from_f32<T>(hi);
  uint16_t l, h;
  memcpy(&l, &a, 2);
  memcpy(&h, &b, 2);
  return uint32_t(l) | (uint32_t(h) << 16);
}

/// Asks L2 for `bytes` (a multiple of 16) at `p` (16-byte aligned), without waiting: a hint
/// that is always safe, L2 being where every SM's writes meet. The emulation checks the
/// alignment and reads the range (so a range outside any buffer faults there too).
__device__ __forceinline__ void prefetch_l2(const void* p, uint32_t bytes) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  const size_t g = __cvta_generic_to_global(p);
  asm volatile("cp.async.bulk.prefetch.L2.global [%0], %1;\n" ::"l"(g), "r"(bytes) : "memory");
#elif defined(__CUDA_ARCH__)
  const size_t g = __cvta_generic_to_global(p);
  for (uint32_t at = 0; at < bytes; at += 128) {
    asm volatile("prefetch.global.L2 [%0];\n" ::"l"(g + at));
  }
#else
  cad_emu::require_aligned(p, 16, "L2 prefetch");
  cad_emu::require(bytes % 16 == 0, "L2 prefetch of a size not a multiple of 16 bytes");
  const unsigned char* b = static_cast<const unsigned char*>(p);
  unsigned char sum = 0;
  for (uint32_t i = 0; i < bytes; ++i) sum ^= reinterpret_cast<const volatile unsigned char*>(b)[i];
  (void)sum;
#endif
}

__device__ __forceinline__ float warp_sum(float v) {
  for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
  return v;
}

__device__ __forceinline__ float warp_max(float v) {
  for (int o = 16; o > 0; o >>= 1) v = fmaxf(v, __shfl_xor_sync(0xffffffffu, v, o));
  return v;
}

/// Sum over a block of `blockDim.x` threads (a multiple of 32, at most 1024); every thread gets
/// the total. `scratch` holds 32 floats of shared memory; the call ends with the block synced.
__device__ __forceinline__ float block_sum(float v, float* scratch) {
  const unsigned lane = threadIdx.x % 32, warp = threadIdx.x / 32, warps = blockDim.x / 32;
  v = warp_sum(v);
  __syncthreads();
  if (lane == 0) scratch[warp] = v;
  __syncthreads();
  v = lane < warps ? scratch[lane] : 0.0f;
  return warp_sum(v);
}

/// Maximum over a block, as [`block_sum`].
__device__ __forceinline__ float block_max(float v, float* scratch) {
  const unsigned lane = threadIdx.x % 32, warp = threadIdx.x / 32, warps = blockDim.x / 32;
  v = warp_max(v);
  __syncthreads();
  if (lane == 0) scratch[warp] = v;
  __syncthreads();
  v = lane < warps ? scratch[lane] : -INFINITY;
  return warp_max(v);
}

// Typed vector access through pointers of another type, and pairs of 16-bit values.
#if defined(__CUDACC__)
using Vec16 = uint4;
#else
struct alignas(16) Vec16 {
  unsigned x, y, z, w;
};
#endif

struct F2 {
  float x, y;
};

/// Reads/writes a `V` through a pointer to another type: the usual cast on the GPU, memcpy on
/// the host (where g++ -O2 would otherwise apply strict aliasing to the type pun).
template <class V, class P>
__device__ __forceinline__ V pun_load(const P* p) {
#if defined(__CUDA_ARCH__)
  return *reinterpret_cast<const V*>(p);
#else
  cad_emu::require_aligned(p, alignof(V), "vector load");
  V v;
  memcpy(&v, p, sizeof(V));
  return v;
#endif
}
template <class V, class P>
__device__ __forceinline__ void pun_store(P* p, const V& v) {
#if defined(__CUDA_ARCH__)
  *reinterpret_cast<V*>(p) = v;
#else
  cad_emu::require_aligned(p, alignof(V), "vector store");
  memcpy(p, &v, sizeof(V));
#endif
}

/// Two adjacent elements (4-byte aligned) as floats.
__device__ __forceinline__ F2 load2(const cad::bf16* p) {
  const uint32_t w = pun_load<uint32_t>(p);
  return F2{__uint_as_float(w << 16), __uint_as_float(w & 0xffff0000u)};
}
__device__ __forceinline__ F2 load2(const cad::f16* p) {
  // One code path for the GPU and the emulation: a 32-bit load split into its two halves.
  const uint32_t w = pun_load<uint32_t>(p);
  const uint16_t lo = uint16_t(w & 0xffffu), hi = uint16_t(w >> 16);
  cad::f16 a, b;
  memcpy(&a, &lo, 2);
  memcpy(&b, &hi, 2);
  return F2{cad::to_f32(a), cad::to_f32(b)};
}

/// Stores two floats rounded to T at `p` (4-byte aligned) with one 32-bit store.
template <class T>
__device__ __forceinline__ void store2(T* p, float a, float b) {
  pun_store(p, pack2<T>(a, b));
}

}  // namespace cad
