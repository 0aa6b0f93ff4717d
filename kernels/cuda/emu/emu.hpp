// Host emulation of the CUDA execution model, so the kernels in ../*.cu run unchanged on a CPU
// (g++ -std=c++20, see kernels/build.rs). A block's CUDA threads run as fibers on the launching
// OS thread (one OS thread each under ThreadSanitizer, see emu.cpp); the blocks of a grid run one
// after another (every other launch last to first, threads too). `__syncthreads` is a barrier over
// the block, warp shuffles/votes exchange values through a per-warp buffer between two warp
// barriers, and `__shared__` variables are function statics (launches are serialised, blocks run
// in turn).
//
// What it cannot show: timing, the GPU memory model, inline PTX / wgmma (keep a plain path for
// those under `#ifndef __CUDA_ARCH__`). The warp-level matrix instructions the kernels use
// (mma.sync, ldmatrix, cp.async) have host twins in ../mma.cuh built on `warp_all_gather`: they
// run the PTX ISA's fragment layouts as written down there, so they check a kernel's use of those
// layouts, not the layouts themselves. A warp-level primitive must be reached by every lane of
// the warp that has not returned (true of full-mask code); with partial masks the launch aborts
// (fibers: a deadlock, reported) or hangs (OS threads).
#pragma once

#include <algorithm>
#include <atomic>
#include <bit>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <functional>

struct dim3 {
  unsigned x, y, z;
  constexpr dim3(unsigned x_ = 1, unsigned y_ = 1, unsigned z_ = 1) : x(x_), y(y_), z(z_) {}
};

/// The launch geometry the Rust side passes to an emulated kernel entry point.
struct CadEmuLaunch {
  unsigned grid[3];
  unsigned block[3];
  unsigned shared_bytes;
};

namespace cad_emu {

struct Block;

/// Per-OS-thread view of "which CUDA thread am I".
struct ThreadState {
  dim3 thread_idx, block_idx, block_dim, grid_dim;
  unsigned linear = 0;
  Block* block = nullptr;
};
extern thread_local ThreadState t;

void sync_block();
void sync_warp();
/// Exchanges 8 bytes with the other lanes of the warp: writes `mine`, returns lane `src`'s value.
uint64_t warp_exchange(uint64_t mine, unsigned src);
/// Gathers one bit per lane (bit i = lane i's `pred`); exited lanes count as 0.
unsigned warp_ballot(bool pred);
/// Every lane contributes `bytes` (at most 32) at `mine`; `all` receives the 32 lanes'
/// contributions in lane order (32 * `bytes`; exited lanes' slots are unspecified).
void warp_all_gather(const void* mine, unsigned bytes, void* all);
unsigned lane_id();
unsigned char* dynamic_smem();
/// dynamic_smem() for a kernel that needs `bytes` of it; aborts, naming both sizes, when the
/// launch gave fewer.
unsigned char* dynamic_smem_at_least(std::size_t bytes);

/// Runs `body` for every thread of every block of the launch; blocks in turn. Serialised
/// process-wide (statics stand in for shared memory).
void launch(const CadEmuLaunch& l, const std::function<void()>& body);

/// Aborts, naming the access, when `p` is not `align`-byte aligned: a GPU faults on such a
/// vector access (misaligned address) where the host's loads would quietly succeed. For accesses
/// the emulation makes through memcpy; typed ones are checked by `scripts/cuda-emu-sanitize
/// undefined`.
void require_aligned(const void* p, std::size_t align, const char* what);
/// Aborts, naming `what`, unless `ok`: a condition the GPU's instruction would fault on.
void require(bool ok, const char* what);

}  // namespace cad_emu

#define threadIdx (cad_emu::t.thread_idx)
#define blockIdx (cad_emu::t.block_idx)
#define blockDim (cad_emu::t.block_dim)
#define gridDim (cad_emu::t.grid_dim)
#define warpSize 32

#define __global__
#define __device__
#define __host__
#define __forceinline__ inline
#define __noinline__
#define __shared__ static
#define __constant__ static const
#define __restrict__ __restrict
#define __launch_bounds__(...)
#define __align__(n) alignas(n)

inline void __syncthreads() { cad_emu::sync_block(); }
inline void __syncwarp(unsigned = 0xffffffffu) { cad_emu::sync_warp(); }
inline void __threadfence() { std::atomic_thread_fence(std::memory_order_seq_cst); }
inline void __threadfence_block() { std::atomic_thread_fence(std::memory_order_seq_cst); }

template <class T>
inline T cad_emu_shfl_from(T v, unsigned src) {
  static_assert(sizeof(T) <= 8, "emulated shuffles move at most 8 bytes");
  uint64_t bits = 0;
  std::memcpy(&bits, &v, sizeof(T));
  uint64_t got = cad_emu::warp_exchange(bits, src);
  T out;
  std::memcpy(&out, &got, sizeof(T));
  return out;
}
template <class T>
inline T __shfl_sync(unsigned, T v, int src, int width = 32) {
  unsigned lane = cad_emu::lane_id();
  unsigned base = lane & ~unsigned(width - 1);
  return cad_emu_shfl_from(v, base + (unsigned(src) % unsigned(width)));
}
template <class T>
inline T __shfl_xor_sync(unsigned, T v, int mask, int width = 32) {
  unsigned lane = cad_emu::lane_id();
  unsigned src = lane ^ unsigned(mask);
  unsigned base = lane & ~unsigned(width - 1);
  if (src < base || src >= base + unsigned(width)) src = lane;
  return cad_emu_shfl_from(v, src);
}
template <class T>
inline T __shfl_down_sync(unsigned, T v, unsigned delta, int width = 32) {
  unsigned lane = cad_emu::lane_id();
  unsigned base = lane & ~unsigned(width - 1);
  unsigned src = lane + delta;
  if (src >= base + unsigned(width)) src = lane;
  return cad_emu_shfl_from(v, src);
}
template <class T>
inline T __shfl_up_sync(unsigned, T v, unsigned delta, int width = 32) {
  unsigned lane = cad_emu::lane_id();
  unsigned base = lane & ~unsigned(width - 1);
  unsigned src = (lane >= base + delta) ? lane - delta : lane;
  return cad_emu_shfl_from(v, src);
}
inline unsigned __ballot_sync(unsigned, int pred) { return cad_emu::warp_ballot(pred != 0); }
inline int __any_sync(unsigned m, int pred) { return __ballot_sync(m, pred) != 0; }
inline int __all_sync(unsigned, int pred) {
  // Every live lane must agree; exited lanes do not vote against.
  return cad_emu::warp_ballot(pred == 0) == 0;
}

template <class T>
inline T atomicAdd(T* addr, T v) {
  return std::atomic_ref<T>(*addr).fetch_add(v);
}
template <class T>
inline T atomicMax(T* addr, T v) {
  std::atomic_ref<T> a(*addr);
  T old = a.load();
  while (old < v && !a.compare_exchange_weak(old, v)) {
  }
  return old;
}
template <class T>
inline T atomicMin(T* addr, T v) {
  std::atomic_ref<T> a(*addr);
  T old = a.load();
  while (old > v && !a.compare_exchange_weak(old, v)) {
  }
  return old;
}
template <class T>
inline T atomicCAS(T* addr, T expected, T desired) {
  std::atomic_ref<T>(*addr).compare_exchange_strong(expected, desired);
  return expected;
}
template <class T>
inline T atomicExch(T* addr, T v) {
  return std::atomic_ref<T>(*addr).exchange(v);
}

using std::max;
using std::min;
inline float __expf(float x) { return std::exp(x); }
inline float __logf(float x) { return std::log(x); }
inline float __fdividef(float a, float b) { return a / b; }
inline float rsqrtf(float x) { return 1.0f / std::sqrt(x); }
inline float __saturatef(float x) { return std::min(1.0f, std::max(0.0f, x)); }
inline int __float_as_int(float f) { return std::bit_cast<int>(f); }
inline unsigned __float_as_uint(float f) { return std::bit_cast<unsigned>(f); }
inline float __int_as_float(int i) { return std::bit_cast<float>(i); }
inline float __uint_as_float(unsigned i) { return std::bit_cast<float>(i); }
inline int __popc(unsigned v) { return __builtin_popcount(v); }
inline int __ffs(unsigned v) { return __builtin_ffs(int(v)); }
inline int __clz(unsigned v) { return v == 0 ? 32 : __builtin_clz(v); }
template <class T>
inline T __ldg(const T* p) {
  return *p;
}

// bf16 / f16 storage types with the conversions the kernels use (round to nearest even).
struct __nv_bfloat16 {
  uint16_t x;
};
struct __half {
  uint16_t x;
};
inline float __bfloat162float(__nv_bfloat16 v) {
  uint32_t u = uint32_t(v.x) << 16;
  float f;
  std::memcpy(&f, &u, 4);
  return f;
}
inline __nv_bfloat16 __float2bfloat16(float f) {
  uint32_t u;
  std::memcpy(&u, &f, 4);
  if ((u & 0x7fffffffu) > 0x7f800000u) return __nv_bfloat16{uint16_t((u >> 16) | 0x40)};
  u += 0x7fffu + ((u >> 16) & 1u);
  return __nv_bfloat16{uint16_t(u >> 16)};
}
namespace cad_emu {
/// Every f16 value widened to f32 (filled at load from the compiler's conversion): without F16C
/// each widening is a libgcc call, 35% of the emulated f16 attention tests' time.
extern float half_to_float[65536];
}  // namespace cad_emu
inline float __half2float(__half h) { return cad_emu::half_to_float[h.x]; }
inline __half __float2half(float f) {
  _Float16 v = _Float16(f);
  __half h;
  std::memcpy(&h.x, &v, 2);
  return h;
}

/// Dynamic shared memory (`extern __shared__`): see CAD_DYNAMIC_SMEM in ../common.cuh.
#define CAD_EMU_DYNAMIC_SMEM(T, name) T* name = reinterpret_cast<T*>(cad_emu::dynamic_smem())

/// Kernel definition: an `extern "C"` entry point the Rust side calls with the launch geometry
/// and a pointer to the parameter struct, and the kernel body as a static function.
/// Returns without running 1 when the caller's struct size differs from `Params`, 2 when the block
/// has more than `max_threads` threads (the kernel's `__launch_bounds__`, which a GPU enforces).
#define CAD_EMU_KERNEL(name, Params, p, max_threads)                                 \
  static void name##_body(const Params p);                                           \
  extern "C" int name(const CadEmuLaunch* l, const void* raw, unsigned size) {       \
    if (size != sizeof(Params)) return 1;                                            \
    if (l->block[0] * l->block[1] * l->block[2] > (max_threads)) return 2;           \
    Params copy;                                                                     \
    std::memcpy(&copy, raw, sizeof(Params));                                         \
    cad_emu::launch(*l, [&copy] { name##_body(copy); });                             \
    return 0;                                                                        \
  }                                                                                  \
  static void name##_body(const Params p)
#define CAD_KERNEL(name, Params, p) CAD_EMU_KERNEL(name, Params, p, 1024)

// ---- Added for sampling.cu (gpu-sample): IEEE round-to-nearest float operations that nvcc
// never contracts into an FMA, so the kernel rounds exactly as its CPU twin. Plain operators
// on the host (x86-64 g++ without -mfma does not contract).
inline float __fadd_rn(float a, float b) { return a + b; }
inline float __fsub_rn(float a, float b) { return a - b; }
inline float __fmul_rn(float a, float b) { return a * b; }
inline float __fdiv_rn(float a, float b) { return a / b; }

// fmaf rounds once, as the GPU's FFMA does. x86-64 g++ without -mfma emits a call to fmaf(),
// which a Rust test binary resolves to compiler-builtins' software version (a quarter of the
// emulated long prefill's time); the CPU's FMA instruction gives the same bits where it has one.
namespace cad_emu {
#if defined(__x86_64__)
__attribute__((target("fma"))) inline float fma_instruction(float a, float b, float c) {
  return __builtin_fmaf(a, b, c);
}
inline float fma_rn(float a, float b, float c) {
  static const bool has_fma = (__builtin_cpu_init(), __builtin_cpu_supports("fma"));
  return has_fma ? fma_instruction(a, b, c) : std::fma(a, b, c);
}
#else
inline float fma_rn(float a, float b, float c) { return std::fma(a, b, c); }
#endif
}  // namespace cad_emu
#define fmaf(a, b, c) ::cad_emu::fma_rn(a, b, c)
