// Helpers shared by the prefill attention kernels (attention_prefill.cu on CUDA cores,
// attention_prefill_tc.cu on tensor cores): typed vector access through pointers of another type,
// pair stores, and the query tile of their common grid.
#pragma once
#include "common.cuh"
#include "params/attention.h"

namespace cad {

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

/// The sequence whose tiles include `tile`: the last s with query_start[s] / tile_tokens + s <=
/// tile (that start is increasing in s).
__device__ __forceinline__ uint32_t find_seq(const CadPagedBatch& b, uint32_t tile,
                                             uint32_t tile_tokens) {
  uint32_t lo = 0, hi = b.num_seqs - 1;
  while (lo < hi) {
    const uint32_t mid = (lo + hi + 1) / 2;
    if (b.query_start[mid] / tile_tokens + mid <= tile) {
      lo = mid;
    } else {
      hi = mid - 1;
    }
  }
  return lo;
}

/// The query tile a prefill CTA owns: `tile_tokens` consecutive query tokens of one sequence
/// (times the query heads of one KV head, which the kernels handle).
struct QueryTile {
  uint32_t seq;
  uint32_t q_first;    // the sequence's first query row in the batch
  uint32_t tok0;       // the tile's first token within the chunk
  uint32_t ntok;       // tokens in the tile
  uint32_t first_pos;  // absolute position of the tile's first token
  uint32_t num_keys;   // keys 0..=the tile's last position
};

/// The tile of grid x index blockIdx.x, highest tiles first (the last tile of a sequence walks
/// the most keys). False past its sequence's chunk, or for an inconsistent entry (the runtime
/// validates these; the kernels only refuse to read outside the block table).
__device__ __forceinline__ bool query_tile(const CadPagedBatch& b, uint32_t block_size,
                                           uint32_t tile_tokens, QueryTile& t) {
  const uint32_t tile = gridDim.x - 1 - blockIdx.x;
  t.seq = find_seq(b, tile, tile_tokens);
  t.q_first = b.query_start[t.seq];
  const uint32_t q_len = b.query_start[t.seq + 1] - t.q_first;
  t.tok0 = (tile - (t.q_first / tile_tokens + t.seq)) * tile_tokens;
  const uint32_t ctx = b.context_len[t.seq];
  if (t.tok0 >= q_len || ctx < q_len || ctx > b.max_blocks_per_seq * block_size) return false;
  t.ntok = min(tile_tokens, q_len - t.tok0);
  t.first_pos = ctx - q_len + t.tok0;
  t.num_keys = t.first_pos + t.ntok;
  return true;
}

}  // namespace cad
