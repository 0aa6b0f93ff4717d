// Element-wise and row-wise layer ops: embedding gather, RMSNorm with fused residual add,
// SiLU-and-mul. CPU twins: runtime's embedding lookup, kernels::ops::{rms_norm, add_inplace,
// silu_mul_fused}.
#include "common.cuh"
#include "params/ops.h"

namespace {

template <class T>
__device__ void embedding(const EmbeddingParams& p) {
  const uint32_t t = blockIdx.x;
  if (t >= p.num_tokens) return;
  const uint32_t id = p.ids[t];
  T* out = static_cast<T*>(p.out) + size_t(t) * p.hidden;
  const T* row = static_cast<const T*>(p.table) + size_t(id) * p.hidden;
  for (uint32_t i = threadIdx.x; i < p.hidden; i += blockDim.x) {
    out[i] = id < p.vocab ? row[i] : cad::from_f32<T>(0.0f);
  }
}

/// One block per row. Pass 1 forms h (written to residual_out) and its sum of squares; pass 2
/// re-reads h (from residual_out, or recomputes it) to scale.
template <class T>
__device__ void rms_norm(const RmsNormParams& p) {
  __shared__ float scratch[32];
  const uint32_t r = blockIdx.x;
  if (r >= p.rows) return;
  const size_t base = size_t(r) * p.dim;
  const T* x = static_cast<const T*>(p.x) + base;
  const T* res = p.residual ? static_cast<const T*>(p.residual) + base : nullptr;
  T* res_out = p.residual_out ? static_cast<T*>(p.residual_out) + base : nullptr;
  float ss = 0.0f;
  for (uint32_t i = threadIdx.x; i < p.dim; i += blockDim.x) {
    float h = cad::to_f32(x[i]);
    if (res) h += cad::to_f32(res[i]);
    if (res_out) {
      // The stored residual is rounded to T; normalise what was stored, as the next layer sees it.
      T hs = cad::from_f32<T>(h);
      res_out[i] = hs;
      h = cad::to_f32(hs);
    }
    ss += h * h;
  }
  const float total = cad::block_sum(ss, scratch);
  const float inv = rsqrtf(total / float(p.dim) + p.eps);
  const T* w = static_cast<const T*>(p.weight);
  T* out = static_cast<T*>(p.out) + base;
  for (uint32_t i = threadIdx.x; i < p.dim; i += blockDim.x) {
    // Each thread re-reads only the elements it wrote itself, so no barrier is needed here.
    float h = res_out ? cad::to_f32(res_out[i]) : cad::to_f32(x[i]) + (res ? cad::to_f32(res[i]) : 0.0f);
    out[i] = cad::from_f32<T>(h * inv * cad::to_f32(w[i]));
  }
}

/// 16-byte vectors of 8 elements, read or written through memcpy (no aliasing assumptions).
struct alignas(16) Vec8 {
  uint16_t h[8];
};

template <class T>
__device__ __forceinline__ void load8(const T* p, float (&out)[8]) {
  Vec8 v;
#if !defined(__CUDA_ARCH__)
  cad_emu::require_aligned(p, 16, "rms_norm vector load");
#endif
  memcpy(&v, p, sizeof(v));
CAD_UNROLL
  for (int j = 0; j < 8; ++j) {
    T e;
    memcpy(&e, &v.h[j], sizeof(T));
    out[j] = cad::to_f32(e);
  }
}

template <class T>
__device__ __forceinline__ void store8(T* p, const float (&in)[8]) {
  Vec8 v;
CAD_UNROLL
  for (int j = 0; j < 8; ++j) {
    const T e = cad::from_f32<T>(in[j]);
    memcpy(&v.h[j], &e, sizeof(T));
  }
#if !defined(__CUDA_ARCH__)
  cad_emu::require_aligned(p, 16, "rms_norm vector store");
#endif
  memcpy(p, &v, sizeof(v));
}

/// `rms_norm` for rows of whole 16-byte vectors (dim a multiple of 8, every row aligned), at most
/// kRmsVecs vectors per thread: the row stays in registers between the sum of squares and the
/// scaling, and each thread issues all its loads before any store, so a row costs two rounds of
/// memory latency instead of one per element a thread owns (a warp issues in order).
constexpr uint32_t kRmsVecs = 2;

template <class T>
__device__ void rms_norm_vec(const RmsNormParams& p) {
  __shared__ float scratch[32];
  const uint32_t r = blockIdx.x;
  if (r >= p.rows) return;
  const uint32_t nv = p.dim / 8;
  const size_t base = size_t(r) * p.dim;
  const T* x = static_cast<const T*>(p.x) + base;
  const T* res = p.residual ? static_cast<const T*>(p.residual) + base : nullptr;
  T* res_out = p.residual_out ? static_cast<T*>(p.residual_out) + base : nullptr;
  float h[kRmsVecs][8] = {};
  float rv[kRmsVecs][8] = {};
CAD_UNROLL
  for (uint32_t i = 0; i < kRmsVecs; ++i) {
    const uint32_t v = threadIdx.x + i * blockDim.x;
    if (v < nv) {
      load8(x + v * 8, h[i]);
      if (res) load8(res + v * 8, rv[i]);
    }
  }
  float ss = 0.0f;
CAD_UNROLL
  for (uint32_t i = 0; i < kRmsVecs; ++i) {
    const uint32_t v = threadIdx.x + i * blockDim.x;
    if (v >= nv) continue;
CAD_UNROLL
    for (int j = 0; j < 8; ++j) {
      if (res) h[i][j] += rv[i][j];
      // The stored residual is rounded to T; normalise what was stored, as the next layer
      // sees it (as `rms_norm` does).
      if (res_out) h[i][j] = cad::to_f32(cad::from_f32<T>(h[i][j]));
      ss += h[i][j] * h[i][j];
    }
    if (res_out) store8(res_out + v * 8, h[i]);
  }
  const float total = cad::block_sum(ss, scratch);
  const float inv = rsqrtf(total / float(p.dim) + p.eps);
  const T* w = static_cast<const T*>(p.weight);
  T* out = static_cast<T*>(p.out) + base;
CAD_UNROLL
  for (uint32_t i = 0; i < kRmsVecs; ++i) {
    const uint32_t v = threadIdx.x + i * blockDim.x;
    if (v < nv) load8(w + v * 8, rv[i]);
  }
CAD_UNROLL
  for (uint32_t i = 0; i < kRmsVecs; ++i) {
    const uint32_t v = threadIdx.x + i * blockDim.x;
    if (v >= nv) continue;
    float o[8];
CAD_UNROLL
    for (int j = 0; j < 8; ++j) o[j] = h[i][j] * inv * rv[i][j];
    store8(out + v * 8, o);
  }
}

template <class T>
__device__ void silu_mul(const SiluMulParams& p) {
  const size_t n = size_t(p.rows) * p.ffn;
  for (size_t i = size_t(blockIdx.x) * blockDim.x + threadIdx.x; i < n; i += size_t(gridDim.x) * blockDim.x) {
    const size_t r = i / p.ffn, c = i % p.ffn;
    const T* row = static_cast<const T*>(p.gate_up) + r * 2 * p.ffn;
    const float g = cad::to_f32(row[c]);
    const float u = cad::to_f32(row[p.ffn + c]);
    static_cast<T*>(p.out)[i] = cad::from_f32<T>(g / (1.0f + __expf(-g)) * u);
  }
}

template <class T>
__device__ void copy_rows(const CopyRowsParams& p) {
  const T* src = static_cast<const T*>(p.src) + size_t(blockIdx.x) * p.src_stride;
  T* dst = static_cast<T*>(p.dst) + size_t(blockIdx.x) * p.dst_stride;
  if (blockIdx.x >= p.rows) return;
  for (uint32_t c = threadIdx.x; c < p.cols; c += blockDim.x) dst[c] = src[c];
}

template <class T>
__device__ void to_f32(const ToF32Params& p) {
  for (size_t i = size_t(blockIdx.x) * blockDim.x + threadIdx.x; i < p.n; i += size_t(gridDim.x) * blockDim.x) {
    p.out[i] = cad::to_f32(static_cast<const T*>(p.x)[i]);
  }
}

}  // namespace

CAD_KERNEL(cad_copy_rows_bf16, CopyRowsParams, p) { copy_rows<cad::bf16>(p); }
CAD_KERNEL(cad_copy_rows_f16, CopyRowsParams, p) { copy_rows<cad::f16>(p); }
CAD_KERNEL(cad_embedding_bf16, EmbeddingParams, p) { embedding<cad::bf16>(p); }
CAD_KERNEL(cad_embedding_f16, EmbeddingParams, p) { embedding<cad::f16>(p); }
CAD_KERNEL(cad_rms_norm_bf16, RmsNormParams, p) { rms_norm<cad::bf16>(p); }
CAD_KERNEL(cad_rms_norm_f16, RmsNormParams, p) { rms_norm<cad::f16>(p); }
CAD_KERNEL_BOUNDS(cad_rms_norm_vec_bf16, RmsNormParams, p, 1024) { rms_norm_vec<cad::bf16>(p); }
CAD_KERNEL_BOUNDS(cad_rms_norm_vec_f16, RmsNormParams, p, 1024) { rms_norm_vec<cad::f16>(p); }
CAD_KERNEL(cad_silu_mul_bf16, SiluMulParams, p) { silu_mul<cad::bf16>(p); }
CAD_KERNEL(cad_silu_mul_f16, SiluMulParams, p) { silu_mul<cad::f16>(p); }
CAD_KERNEL(cad_to_f32_bf16, ToF32Params, p) { to_f32<cad::bf16>(p); }
CAD_KERNEL(cad_to_f32_f16, ToF32Params, p) { to_f32<cad::f16>(p); }
