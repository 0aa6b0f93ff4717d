// Helpers shared by the prefill attention kernels (attention_prefill.cu on CUDA cores,
// attention_prefill_tc.cu on tensor cores): the query tile of their common grid.
#pragma once
#include "common.cuh"
#include "params/attention.h"

namespace cad {

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
