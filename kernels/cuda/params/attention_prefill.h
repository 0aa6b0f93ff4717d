// Parameter struct of attention_prefill.cu, mirrored field for field by
// kernels/src/gpu/attention_prefill.rs (`#[repr(C)]`). Pointers are device addresses.
#pragma once
#include <stdint.h>

/// Paged attention over a flattened batch of query tokens (prefill chunks, prefix hits, decodes).
/// `q`/`out`: [num_tokens, num_heads, head_dim]; `k_cache`/`v_cache`:
/// [num_blocks, block_size, num_kv_heads, head_dim]; `query_start`: num_seqs + 1 cumulative token
/// offsets; `context_len[s]`: cached tokens of s including this step's (already written);
/// `block_tables`: [num_seqs, max_blocks_per_seq] block ids.
struct PagedPrefillParams {
  const void* q;
  const void* k_cache;
  const void* v_cache;
  void* out;
  const uint32_t* query_start;
  const uint32_t* context_len;
  const uint32_t* block_tables;
  uint32_t num_seqs;
  uint32_t num_tokens;
  uint32_t max_blocks_per_seq;
  uint32_t num_heads;
  uint32_t num_kv_heads;
  uint32_t block_size;
  uint32_t num_blocks;
  float scale;
};
