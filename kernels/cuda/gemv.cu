// Skinny projections for decode: y (+)= x . W^T (+ bias) for m <= 8 rows of x, bandwidth-bound
// on W. Candidates next to cuBLASLt's algorithms: the GEMM tuner (kernels/src/gpu/gemm_tune.rs)
// times them on the shape and keeps the fastest, so each is used only where it wins.
// CPU twin: the emulated host GEMM (kernels/src/gpu/gemm.rs), f32 accumulation, one rounding.
//
// Two kernels, one arithmetic. Each warp owns R consecutive rows of W (outputs) and lane l reads
// the 16-byte vectors l, l + 32, ... of each row, so a warp's loads of one row are 512
// contiguous bytes, and each lane sums its vectors' products in increasing order: both kernels
// give the same bits. The M rows of x (at most 8, templated so the accumulators stay in
// registers) are read through the read-only cache; every x vector loaded serves R rows of W. The
// lanes' partial sums meet through warp shuffles; lane 0 adds the old y and the bias and rounds
// once.
// - `gemv` (direct): loads kUnroll vectors of each row into registers, then uses them: 2 to 4 KB
//   of W in flight per warp, and one memory round trip per kUnroll * 32 vectors.
// - `gemv_ring`: copies W into a per-lane ring of shared memory with cp.async, kStages - 1
//   stages ahead of the one it multiplies, so a warp keeps 4 to 5 KB in flight without holding
//   them in registers and never waits a whole round trip between stages.
// Both start before the previous kernel ends when launched as programmatic dependents: their
// prelude asks L2 for the first bytes of each of the warp's rows (W is a weight no kernel
// writes; an L2 prefetch is only a hint).
#include "mma.cuh"
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

/// A vector of the ring (shared memory), read as one 16-byte access.
__device__ __forceinline__ V8 load_v8_shared(const V8* p) {
  const cad::Vec16 v = cad::pun_load<cad::Vec16>(p);
  V8 r;
  memcpy(&r, &v, sizeof(r));
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

/// The first row of W the calling warp owns (R per warp, kWarps warps per block: the launcher's
/// grid).
template <uint32_t R>
__device__ __forceinline__ uint32_t first_row() {
  return (blockIdx.x * kWarps + threadIdx.x / 32) * R;
}

/// Prelude (before the wait for the previous kernel): lanes 0..R-1 of each warp ask L2 for the
/// first `kBytes` of one of the warp's rows each (at most the row).
template <uint32_t R, uint32_t kBytes>
__device__ __forceinline__ void prefetch_rows(const GemvParams& p) {
  const uint32_t lane = threadIdx.x % 32, o = first_row<R>() + lane;
  if (lane >= R || o >= p.n) return;
  const uint32_t row_bytes = p.k * 2;  // 16-bit elements; k a multiple of 8: 16-byte rows
  cad::prefetch_l2(static_cast<const char*>(p.w) + size_t(o) * row_bytes, min(row_bytes, kBytes));
}

/// Sums each lane's partial sums over the warp; lane 0 adds the old y and the bias and stores
/// the rows of y it owns (rows o0.. of W, those below n).
template <class T, uint32_t M, uint32_t R>
__device__ __forceinline__ void finish(const GemvParams& p, uint32_t o0, float (&acc)[M][R]) {
  const uint32_t lane = threadIdx.x % 32;
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

/// Vectors of each W row the direct kernel loads ahead: 4, or 2 where M x R accumulators already
/// hold many registers (m 4 and 8: ~210 registers at 4, which would leave two blocks per SM).
template <uint32_t M, uint32_t R>
constexpr uint32_t kDirectUnroll = M * R >= 16 ? 2 : 4;

/// The direct kernel: R rows of W per warp; M rows of x at most (`p.m` of them real).
template <class T, uint32_t M, uint32_t R>
__device__ void gemv(const GemvParams& p) {
  constexpr uint32_t kUnroll = kDirectUnroll<M, R>;
  const uint32_t lane = threadIdx.x % 32, o0 = first_row<R>();
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
  finish<T, M, R>(p, o0, acc);
}

/// The ring kernel's shape: R rows of W per warp, U vectors of each row per lane and stage,
/// kStages stages in each lane's ring (kStages - 1 in flight while one is multiplied). Every
/// variant's ring is 24 KB a block (S * R * U = 12), so 9 blocks fit an SM's shared memory.
template <uint32_t R, uint32_t U, uint32_t S>
struct Ring {
  static constexpr uint32_t kR = R, kU = U, kStages = S;
  /// Vectors of one stage of one lane (its slot).
  static constexpr uint32_t kSlot = R * U;
  /// Vectors of one stage of the warp: how far the walk along a row moves per stage (per lane: U).
  static constexpr uint32_t kStride = 32 * U;
  /// Bytes of each row in flight after the prologue: what the prelude prefetches.
  static constexpr uint32_t kAheadBytes = (S - 1) * kStride * 16;
  static_assert(S >= 2 && S * R * U == 12, "a ring of 24 KB a block");
};

/// Keeps the compiler from moving this lane's ring reads across the cp.async instructions
/// (whose asm statements declare no memory effects): no barrier orders them here, since each lane
/// reads only its own copies.
__device__ __forceinline__ void ring_order() {
#if defined(__CUDA_ARCH__)
  asm volatile("" ::: "memory");
#else
  std::atomic_signal_fence(std::memory_order_seq_cst);
#endif
}

/// The ring kernel: each lane copies its vectors of stage s (vectors s * 32U + 32u + lane of each
/// of its rows) into its slot s % S with cp.async, S - 1 stages ahead, and multiplies the stage
/// once its own copies have landed (cp.async.wait_group: a lane reads only what it copied, so no
/// barrier is needed). The slot refilled after stage s is the one stage s - 1 read, whose values
/// the previous iteration has already consumed.
template <class T, uint32_t M, class G>
__device__ void gemv_ring(const GemvParams& p) {
  constexpr uint32_t R = G::kR, U = G::kU, S = G::kStages;
  __align__(16) __shared__ V8 ring[kWarps * S * G::kSlot * 32];
  const uint32_t warp = threadIdx.x / 32, lane = threadIdx.x % 32, o0 = first_row<R>();
  if (o0 >= p.n) return;  // whole warps leave together: the shuffles below see full warps
  const uint32_t vecs = p.k / kVec, stages = (vecs + G::kStride - 1) / G::kStride;
  const T* w = static_cast<const T*>(p.w);
  const T* x = static_cast<const T*>(p.x);
  const T* wrow[R];
CAD_UNROLL
  for (uint32_t r = 0; r < R; ++r) wrow[r] = w + size_t(min(o0 + r, p.n - 1)) * p.k;
  // Vector j of this lane's slot `slot`: lanes interleaved, so a warp's 16-byte accesses of one
  // j are 512 contiguous bytes.
  V8* mine = ring + size_t(warp) * S * G::kSlot * 32 + lane;
  const auto at = [&](uint32_t slot, uint32_t r, uint32_t u) -> V8* {
    return mine + size_t((slot * R + r) * U + u) * 32;
  };
  const auto issue = [&](uint32_t s) {
    if (s < stages) {
CAD_UNROLL
      for (uint32_t u = 0; u < U; ++u) {
        const uint32_t v = s * G::kStride + u * 32 + lane;
        if (v >= vecs) break;
CAD_UNROLL
        for (uint32_t r = 0; r < R; ++r) {
          cad::cp_async16(at(s % S, r, u), wrow[r] + size_t(v) * kVec, true);
        }
      }
    }
    cad::cp_async_commit();  // every stage commits a group, empty or not: the wait counts them
  };
  float acc[M][R];
CAD_UNROLL
  for (uint32_t i = 0; i < M; ++i)
CAD_UNROLL
    for (uint32_t r = 0; r < R; ++r) acc[i][r] = 0.0f;

CAD_UNROLL
  for (uint32_t s = 0; s + 1 < S; ++s) issue(s);
  for (uint32_t s = 0; s < stages; ++s) {
    cad::cp_async_wait<S - 2>();  // this lane's groups 0..s have landed
    ring_order();                 // and no read of stage s moves above that wait
CAD_UNROLL
    for (uint32_t u = 0; u < U; ++u) {
      const uint32_t v = s * G::kStride + u * 32 + lane;
      if (v >= vecs) break;
      V8 wv[R];
CAD_UNROLL
      for (uint32_t r = 0; r < R; ++r) wv[r] = load_v8_shared(at(s % S, r, u));
CAD_UNROLL
      for (uint32_t i = 0; i < M; ++i) {
        if (i >= p.m) break;
        const V8 xv = load_v8(x + size_t(i) * p.k + size_t(v) * kVec);
CAD_UNROLL
        for (uint32_t r = 0; r < R; ++r) acc[i][r] += dot8<T>(wv[r], xv);
      }
    }
    ring_order();  // every read of the slot issue() refills (stage s - 1's) stays before it
    issue(s + S - 1);
  }
  cad::cp_async_wait<0>();  // no copy outlives the block (the last groups are empty)
  finish<T, M, R>(p, o0, acc);
}

// The ring shapes by M: 5 stages of 2 vectors of one row in flight at m 1, of 1 vector of 2 rows
// at m 2, 2 stages of 1 vector of 4 rows at m 4 and 8 (whose M x 4 accumulators hold the
// registers).
using Ring1 = Ring<1, 2, 6>;
using Ring2 = Ring<2, 1, 6>;
using Ring4 = Ring<4, 1, 3>;

}  // namespace

// One kernel per (kernel, rows of x, dtype): M = 1, 2, 4, 8 with R = min(M, 4) rows of W per
// warp in both kernels (the launcher's table in kernels/src/gpu/gemv.rs, which also says how many
// outputs a block covers).
#define CAD_GEMV_DTYPE(M, R, DT, T)                                                                \
  CAD_KERNEL_BOUNDS_PRELUDE(cad_gemv_m##M##_##DT, GemvParams, p, 128,                              \
                            (prefetch_rows<R, kDirectUnroll<M, R> * 32 * 16>)) {                  \
    gemv<T, M, R>(p);                                                                             \
  }
#define CAD_GEMV_RING_DTYPE(M, G, DT, T)                                                           \
  CAD_KERNEL_BOUNDS_PRELUDE(cad_gemv_ring_m##M##_##DT, GemvParams, p, 128,                         \
                            (prefetch_rows<G::kR, G::kAheadBytes>)) {                             \
    gemv_ring<T, M, G>(p);                                                                        \
  }
#define CAD_GEMV(M, R, G)            \
  CAD_GEMV_DTYPE(M, R, bf16, cad::bf16) \
  CAD_GEMV_DTYPE(M, R, f16, cad::f16)   \
  CAD_GEMV_RING_DTYPE(M, G, bf16, cad::bf16) \
  CAD_GEMV_RING_DTYPE(M, G, f16, cad::f16)
CAD_GEMV(1, 1, Ring1)
CAD_GEMV(2, 2, Ring2)
CAD_GEMV(4, 4, Ring4)
CAD_GEMV(8, 4, Ring4)
