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

/// Elements each thread of `rms_norm` has in flight per round.
constexpr uint32_t kNormBatch = 8;

/// One block per row. Pass 1 forms h (written to residual_out) and its sum of squares; pass 2
/// re-reads h (from residual_out, or recomputes it) to scale. Each thread takes elements
/// i, i + blockDim.x, ... in rounds of kNormBatch: all of a round's loads first, then its math
/// and stores. (Element by element, a load could not pass the previous element's store, which
/// may alias it, so a batch-1 row of 4096 on 512 threads waited for 16 loads one after another.)
/// The sum adds the same terms in the same order as element by element, so the bits are too.
template <class T>
__device__ void rms_norm(const RmsNormParams& p) {
  __shared__ float scratch[32];
  const uint32_t r = blockIdx.x;
  if (r >= p.rows) return;
  const size_t base = size_t(r) * p.dim;
  const T* x = static_cast<const T*>(p.x) + base;
  const T* res = p.residual ? static_cast<const T*>(p.residual) + base : nullptr;
  T* res_out = p.residual_out ? static_cast<T*>(p.residual_out) + base : nullptr;
  const uint32_t step = blockDim.x;
  float ss = 0.0f;
  for (uint32_t i0 = threadIdx.x; i0 < p.dim; i0 += kNormBatch * step) {
    float h[kNormBatch], add[kNormBatch];
CAD_UNROLL
    for (uint32_t k = 0; k < kNormBatch; ++k) {
      const uint32_t i = i0 + k * step;
      h[k] = i < p.dim ? cad::to_f32(x[i]) : 0.0f;
      add[k] = res && i < p.dim ? cad::to_f32(res[i]) : 0.0f;
    }
CAD_UNROLL
    for (uint32_t k = 0; k < kNormBatch; ++k) {
      const uint32_t i = i0 + k * step;
      if (i >= p.dim) break;
      float v = h[k];
      if (res) v += add[k];
      if (res_out) {
        // The stored residual is rounded to T; normalise what was stored, as the next layer
        // sees it.
        const T vs = cad::from_f32<T>(v);
        res_out[i] = vs;
        v = cad::to_f32(vs);
      }
      ss += v * v;
    }
  }
  const float total = cad::block_sum(ss, scratch);
  const float inv = rsqrtf(total / float(p.dim) + p.eps);
  const T* w = static_cast<const T*>(p.weight);
  T* out = static_cast<T*>(p.out) + base;
  // Each thread re-reads only the elements it wrote itself, so no barrier is needed here.
  for (uint32_t i0 = threadIdx.x; i0 < p.dim; i0 += kNormBatch * step) {
    float h[kNormBatch], wk[kNormBatch];
CAD_UNROLL
    for (uint32_t k = 0; k < kNormBatch; ++k) {
      const uint32_t i = i0 + k * step;
      if (i < p.dim) {
        h[k] = res_out ? cad::to_f32(res_out[i])
                       : cad::to_f32(x[i]) + (res ? cad::to_f32(res[i]) : 0.0f);
        wk[k] = cad::to_f32(w[i]);
      } else {
        h[k] = wk[k] = 0.0f;
      }
    }
CAD_UNROLL
    for (uint32_t k = 0; k < kNormBatch; ++k) {
      const uint32_t i = i0 + k * step;
      if (i < p.dim) out[i] = cad::from_f32<T>(h[k] * inv * wk[k]);
    }
  }
}

/// silu(gate) * up, rounded to T.
template <class T>
__device__ __forceinline__ T silu_times(T gate, T up) {
  const float g = cad::to_f32(gate), u = cad::to_f32(up);
  return cad::from_f32<T>(g / (1.0f + __expf(-g)) * u);
}

/// Grid (column blocks, rows), both strided past the grid: no per-element division (a 64-bit
/// one per element when the index was flat). Each thread takes kSiluVec columns
/// at a time with 16-byte loads and stores when the rows allow it (`ffn` a multiple of 8,
/// 16-byte aligned buffers), one column at a time otherwise; the same arithmetic either way.
/// (One 2-byte access per thread left prefill's 2k x 14k at ~1.9 TB/s on the H200.)
constexpr uint32_t kSiluVec = 8;

template <class T>
__device__ void silu_mul(const SiluMulParams& p) {
  const bool vec = p.ffn % kSiluVec == 0 && reinterpret_cast<uintptr_t>(p.gate_up) % 16 == 0 &&
                   reinterpret_cast<uintptr_t>(p.out) % 16 == 0;
  const uint32_t per = vec ? kSiluVec : 1;
  for (uint32_t r = blockIdx.y; r < p.rows; r += gridDim.y) {
    const T* row = static_cast<const T*>(p.gate_up) + size_t(r) * 2 * p.ffn;
    T* out = static_cast<T*>(p.out) + size_t(r) * p.ffn;
    for (uint32_t c = (blockIdx.x * blockDim.x + threadIdx.x) * per; c < p.ffn;
         c += gridDim.x * blockDim.x * per) {
      if (vec) {
        const cad::Vec16 gv = cad::pun_load<cad::Vec16>(row + c);
        const cad::Vec16 uv = cad::pun_load<cad::Vec16>(row + p.ffn + c);
        T g[kSiluVec], u[kSiluVec], o[kSiluVec];
        memcpy(g, &gv, sizeof(g));
        memcpy(u, &uv, sizeof(u));
        CAD_UNROLL
        for (uint32_t j = 0; j < kSiluVec; ++j) o[j] = silu_times(g[j], u[j]);
        cad::Vec16 ov;
        memcpy(&ov, o, sizeof(o));
        cad::pun_store(out + c, ov);
      } else {
        out[c] = silu_times(row[c], row[p.ffn + c]);
      }
    }
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

__device__ void add_at(const AddAtParams& p) {
  for (uint32_t i = blockIdx.x * blockDim.x + threadIdx.x; i < p.n; i += gridDim.x * blockDim.x) {
    const AddAtEntry e = p.entries[i];
    if (e.index < p.len) p.x[e.index] += e.value;
  }
}

}  // namespace

CAD_KERNEL(cad_add_at_f32, AddAtParams, p) { add_at(p); }
CAD_KERNEL(cad_copy_rows_bf16, CopyRowsParams, p) { copy_rows<cad::bf16>(p); }
CAD_KERNEL(cad_copy_rows_f16, CopyRowsParams, p) { copy_rows<cad::f16>(p); }
CAD_KERNEL(cad_embedding_bf16, EmbeddingParams, p) { embedding<cad::bf16>(p); }
CAD_KERNEL(cad_embedding_f16, EmbeddingParams, p) { embedding<cad::f16>(p); }
CAD_KERNEL(cad_rms_norm_bf16, RmsNormParams, p) { rms_norm<cad::bf16>(p); }
CAD_KERNEL(cad_rms_norm_f16, RmsNormParams, p) { rms_norm<cad::f16>(p); }
CAD_KERNEL(cad_silu_mul_bf16, SiluMulParams, p) { silu_mul<cad::bf16>(p); }
CAD_KERNEL(cad_silu_mul_f16, SiluMulParams, p) { silu_mul<cad::f16>(p); }
CAD_KERNEL(cad_to_f32_bf16, ToF32Params, p) { to_f32<cad::bf16>(p); }
CAD_KERNEL(cad_to_f32_f16, ToF32Params, p) { to_f32<cad::f16>(p); }
