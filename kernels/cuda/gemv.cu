// Skinny projections for decode: y (+)= x . W^T (+ bias) for m <= 8 rows of x, bandwidth-bound
// on W. A candidate next to cuBLASLt's algorithms: the GEMM tuner (kernels/src/gpu/gemm_tune.rs)
// times both on the shape and keeps the faster, so this kernel is used only where it wins.
// CPU twin: the emulated host GEMM (kernels/src/gpu/gemm.rs), f32 accumulation, one rounding.
//
// Design (the usual split-free GEMV): each warp owns R consecutive rows of W (outputs) and walks
// k with 16-byte loads, lane l reading vectors l, l + 32, ... of each row, so a warp's loads of
// one row are 512 contiguous bytes. The M rows of x (at most 8, templated so the accumulators
// stay in registers) are read through the read-only cache; every x vector loaded serves R rows
// of W, which keeps x's L1 traffic at most twice W's. Loads are issued kUnroll vectors ahead of
// their use so each warp keeps 2 to 4 KB of W in flight. The lanes' partial sums meet through warp
// shuffles; lane 0 adds the old y and the bias and rounds once.
#include "common.cuh"
#include "params/gemv.h"

namespace {

constexpr uint32_t kThreads = 128;
constexpr uint32_t kWarps = kThreads / 32;
constexpr uint32_t kVec = 8;  // elements per 16-byte vector

struct alignas(16) V8 {
  uint16_t h[kVec];
};

__device__ __forceinline__ V8 load_v8(const void* p) {
  V8 r;
#if defined(__CUDA_ARCH__)
  const uint4 v = __ldg(static_cast<const uint4*>(p));
  memcpy(&r, &v, sizeof(r));
#else
  cad_emu::require_aligned(p, 16, "gemv vector load");
  memcpy(&r, p, sizeof(r));
#endif
  return r;
}

template <class T>
__device__ __forceinline__ float elem(const V8& v, uint32_t i) {
  T e;
  memcpy(&e, &v.h[i], sizeof(T));
  return cad::to_f32(e);
}

template <class T>
__device__ __forceinline__ float dot8(const V8& a, const V8& b) {
  float s = 0.0f;
CAD_UNROLL
  for (uint32_t i = 0; i < kVec; ++i) s = fmaf(elem<T>(a, i), elem<T>(b, i), s);
  return s;
}

/// R rows of W per warp; M rows of x at most (`p.m` of them real).
template <class T, uint32_t M, uint32_t R>
__device__ void gemv(const GemvParams& p) {
  // Vectors of each W row a lane loads ahead: 4, or 2 where M x R accumulators already hold many
  // registers (m 4 and 8: ~210 registers at 4, which would leave two blocks per SM).
  constexpr uint32_t kUnroll = M * R >= 16 ? 2 : 4;
  const uint32_t warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const uint32_t o0 = (blockIdx.x * kWarps + warp) * R;
  if (o0 >= p.n) return;  // whole warps leave together: the shuffles below see full warps
  const uint32_t vecs = p.k / kVec;
  const T* w = static_cast<const T*>(p.w);
  const T* x = static_cast<const T*>(p.x);
  // Rows past n read row n - 1 (in bounds) and are not stored.
  const T* wrow[R];
CAD_UNROLL
  for (uint32_t r = 0; r < R; ++r) wrow[r] = w + size_t(min(o0 + r, p.n - 1)) * p.k;
  float acc[M][R];
CAD_UNROLL
  for (uint32_t i = 0; i < M; ++i)
CAD_UNROLL
    for (uint32_t r = 0; r < R; ++r) acc[i][r] = 0.0f;

  for (uint32_t v0 = lane; v0 < vecs; v0 += 32 * kUnroll) {
    V8 wv[kUnroll][R];
CAD_UNROLL
    for (uint32_t u = 0; u < kUnroll; ++u) {
      const uint32_t v = v0 + u * 32;
CAD_UNROLL
      for (uint32_t r = 0; r < R; ++r) {
        if (v < vecs) wv[u][r] = load_v8(wrow[r] + size_t(v) * kVec);
      }
    }
CAD_UNROLL
    for (uint32_t u = 0; u < kUnroll; ++u) {
      const uint32_t v = v0 + u * 32;
      if (v >= vecs) break;
CAD_UNROLL
      for (uint32_t i = 0; i < M; ++i) {
        if (i >= p.m) break;
        const V8 xv = load_v8(x + size_t(i) * p.k + size_t(v) * kVec);
CAD_UNROLL
        for (uint32_t r = 0; r < R; ++r) acc[i][r] += dot8<T>(wv[u][r], xv);
      }
    }
  }
CAD_UNROLL
  for (uint32_t i = 0; i < M; ++i)
CAD_UNROLL
    for (uint32_t r = 0; r < R; ++r) acc[i][r] = cad::warp_sum(acc[i][r]);
  if (lane != 0) return;
  T* y = static_cast<T*>(p.y);
  const T* bias = static_cast<const T*>(p.bias);
CAD_UNROLL
  for (uint32_t r = 0; r < R; ++r) {
    const uint32_t o = o0 + r;
    if (o >= p.n) break;
    const float b = bias ? cad::to_f32(bias[o]) : 0.0f;
CAD_UNROLL
    for (uint32_t i = 0; i < M; ++i) {
      if (i >= p.m) break;
      T* out = y + size_t(i) * p.n + o;
      const float prev = p.accumulate ? cad::to_f32(*out) : 0.0f;
      *out = cad::from_f32<T>(prev + acc[i][r] + b);
    }
  }
}

}  // namespace

// One kernel per (rows of x, dtype): M = 1, 2, 4, 8 with R = min(M, 4) rows of W per warp
// (the launcher's table in kernels/src/gpu/gemv.rs, which also says how many outputs a block
// covers).
#define CAD_GEMV(M, R)                                                                              \
  CAD_KERNEL_BOUNDS(cad_gemv_m##M##_bf16, GemvParams, p, 128) { gemv<cad::bf16, M, R>(p); }       \
  CAD_KERNEL_BOUNDS(cad_gemv_m##M##_f16, GemvParams, p, 128) { gemv<cad::f16, M, R>(p); }
CAD_GEMV(1, 1)
CAD_GEMV(2, 2)
CAD_GEMV(4, 4)
CAD_GEMV(8, 4)
