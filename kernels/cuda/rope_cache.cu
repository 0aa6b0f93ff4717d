// RoPE on q and k fused with the paged KV cache write. CPU twins: kernels::Rope::apply (on q and
// k) followed by kernels::attention::write_kv.
//
// One block per token (grid-strided). The block first computes the token's head_dim / 2
// (cos, sin) pairs once into shared memory (precise sinf/cosf of the f32 angle, as the CPU
// does), then every thread rotates units of 4 pairs (16-byte loads and stores for Interleaved,
// two 8-byte halves for Neox) over all q and k heads, and copies v in 16-byte vectors. Rotated q
// goes back into qkv or, with q_out, straight into the contiguous q the attention kernels read
// (which saves the engine a copy of every q row).
#include "common.cuh"
#include "params/rope_cache.h"

namespace {

constexpr uint32_t kPadSlot = 0xffffffffu;
/// Largest head_dim the shared (cos, sin) table holds (the launcher checks).
constexpr uint32_t kMaxHalf = 128;

template <class T, int N>
struct alignas(N * sizeof(T)) Vec {
  T v[N];
};

/// Rotates 4 pairs: (a[i], b[i]) by the angle of pair `first + i`.
__device__ __forceinline__ void rotate4(float* a, float* b, const float* cs, const float* sn, uint32_t first) {
CAD_UNROLL
  for (int i = 0; i < 4; ++i) {
    const float c = cs[first + i], s = sn[first + i];
    const float x0 = a[i], x1 = b[i];
    a[i] = x0 * c - x1 * s;
    b[i] = x0 * s + x1 * c;
  }
}

/// Rotates unit `u` (pairs 4u..4u + 3) of the head at `src`, writing the result to `dst`
/// (the same head in place or a q_out row for q, a cache row for k).
template <class T>
__device__ __forceinline__ void rotate_unit(const T* src, T* dst, uint32_t u, uint32_t half, bool neox,
                                            const float* cs, const float* sn) {
  float a[4], b[4];
  if (neox) {
    const Vec<T, 4> lo = *reinterpret_cast<const Vec<T, 4>*>(src + 4 * u);
    const Vec<T, 4> hi = *reinterpret_cast<const Vec<T, 4>*>(src + half + 4 * u);
CAD_UNROLL
    for (int i = 0; i < 4; ++i) {
      a[i] = cad::to_f32(lo.v[i]);
      b[i] = cad::to_f32(hi.v[i]);
    }
    rotate4(a, b, cs, sn, 4 * u);
    Vec<T, 4> olo, ohi;
CAD_UNROLL
    for (int i = 0; i < 4; ++i) {
      olo.v[i] = cad::from_f32<T>(a[i]);
      ohi.v[i] = cad::from_f32<T>(b[i]);
    }
    *reinterpret_cast<Vec<T, 4>*>(dst + 4 * u) = olo;
    *reinterpret_cast<Vec<T, 4>*>(dst + half + 4 * u) = ohi;
  } else {
    const Vec<T, 8> x = *reinterpret_cast<const Vec<T, 8>*>(src + 8 * u);
CAD_UNROLL
    for (int i = 0; i < 4; ++i) {
      a[i] = cad::to_f32(x.v[2 * i]);
      b[i] = cad::to_f32(x.v[2 * i + 1]);
    }
    rotate4(a, b, cs, sn, 4 * u);
    Vec<T, 8> o;
CAD_UNROLL
    for (int i = 0; i < 4; ++i) {
      o.v[2 * i] = cad::from_f32<T>(a[i]);
      o.v[2 * i + 1] = cad::from_f32<T>(b[i]);
    }
    *reinterpret_cast<Vec<T, 8>*>(dst + 8 * u) = o;
  }
}

template <class T>
__device__ void rope_cache(const CadRopeCacheParams& p) {
  __shared__ float s_cos[kMaxHalf];
  __shared__ float s_sin[kMaxHalf];
  const uint32_t hd = p.head_dim, half = hd / 2, units = hd / 8;
  const uint32_t row_len = (p.num_heads + 2 * p.num_kv_heads) * hd;
  const uint32_t kv_row = p.num_kv_heads * hd;
  const bool neox = p.neox != 0;
  T* q_out = static_cast<T*>(p.q_out);  // null: rotate q in place
  for (uint32_t t = blockIdx.x; t < p.num_tokens; t += gridDim.x) {
    const float pos = float(p.positions[t]);
    for (uint32_t i = threadIdx.x; i < half; i += blockDim.x) {
      const float angle = pos * p.inv_freq[i];
      s_cos[i] = cosf(angle);
      s_sin[i] = sinf(angle);
    }
    __syncthreads();
    T* row = static_cast<T*>(p.qkv) + size_t(t) * row_len;
    const uint32_t slot = p.slot_mapping[t];
    const bool store = slot != kPadSlot && slot < p.num_slots;
    T* k_dst = static_cast<T*>(p.k_cache) + size_t(slot) * kv_row;
    T* v_dst = static_cast<T*>(p.v_cache) + size_t(slot) * kv_row;
    // q heads then k heads, `units` units of 4 pairs each.
    const uint32_t rot_units = (p.num_heads + p.num_kv_heads) * units;
    for (uint32_t w = threadIdx.x; w < rot_units; w += blockDim.x) {
      const uint32_t head = w / units, u = w % units;
      if (head < p.num_heads) {
        T* q = row + head * hd;
        T* q_dst = q_out ? q_out + (size_t(t) * p.num_heads + head) * hd : q;
        rotate_unit(q, q_dst, u, half, neox, s_cos, s_sin);
      } else if (store) {
        const uint32_t kh = head - p.num_heads;
        rotate_unit(row + (p.num_heads + kh) * hd, k_dst + kh * hd, u, half, neox, s_cos, s_sin);
      }
    }
    if (store) {
      const T* v = row + (p.num_heads + p.num_kv_heads) * hd;
      for (uint32_t w = threadIdx.x; w < kv_row / 8; w += blockDim.x) {
        reinterpret_cast<Vec<T, 8>*>(v_dst)[w] = reinterpret_cast<const Vec<T, 8>*>(v)[w];
      }
    }
    // The next token overwrites the (cos, sin) table.
    __syncthreads();
  }
}

}  // namespace

CAD_KERNEL_BOUNDS(cad_rope_cache_bf16, CadRopeCacheParams, p, 128) { rope_cache<cad::bf16>(p); }
CAD_KERNEL_BOUNDS(cad_rope_cache_f16, CadRopeCacheParams, p, 128) { rope_cache<cad::f16>(p); }
