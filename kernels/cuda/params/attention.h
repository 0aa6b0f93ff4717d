// The paged batch description shared by the attention kernels (attention_decode.cu,
// attention_prefill.cu), and the decode kernels' own parameters. Mirrored field for field by
// kernels/src/gpu/attention.rs (`#[repr(C)]`); the emulated entry points check the sizes agree.
//
// KV cache of one layer: k_cache, v_cache each [num_blocks, block_size, num_kv_heads, head_dim]
// of the kernel's dtype; slot = block_id * block_size + offset (as kernels::attention).
#pragma once
#include <stdint.h>

/// Which query rows belong to which sequence, and where its KV blocks are (all u32).
/// Sequence s owns query rows query_start[s]..query_start[s + 1] (num_seqs + 1 entries),
/// has context_len[s] tokens in its cache INCLUDING this step's (already written), and its
/// block j is block_tables[s * max_blocks_per_seq + j].
struct CadPagedBatch {
  const uint32_t* query_start;
  const uint32_t* context_len;
  const uint32_t* block_tables;
  uint32_t num_seqs;
  uint32_t num_tokens;
  uint32_t max_blocks_per_seq;
  uint32_t max_context_len;
};

/// Head layout of the layer, the cache geometry and the softmax scale.
struct CadAttnShape {
  uint32_t num_heads;
  uint32_t num_kv_heads;
  uint32_t head_dim;
  uint32_t block_size;
  uint32_t num_blocks;
  float scale;
};

/// One paged attention call: q and out are [num_tokens, num_heads, head_dim].
struct CadPagedAttnParams {
  const void* q;
  const void* k_cache;
  const void* v_cache;
  void* out;
  CadPagedBatch batch;
  CadAttnShape shape;
};

// ---- decode (attention_decode.cu), and splits of the tensor-core kernel ----

/// Decode (sequences with exactly one query token; others are left alone) with each context cut
/// into partitions of `tokens_per_split` tokens (a multiple of the kernel's 32-token tile),
/// grid z = split. With num_splits > 1 each (token, head, split) writes its partial output
/// (normalised by its own softmax sum) to partial_out [num_tokens, num_heads, num_splits,
/// head_dim] f32 and its log-sum-exp to partial_lse [num_tokens, num_heads, num_splits] f32,
/// and the merge kernel combines a sequence's non-empty splits into out. With num_splits == 1
/// the decode kernel writes out directly and the workspace pointers are unused. The tensor-core
/// kernel (attention_prefill_tc.cu) takes the same parameters, with the same meaning per row.
struct CadDecodeParams {
  CadPagedAttnParams attn;
  float* partial_out;
  float* partial_lse;
  uint32_t num_splits;
  uint32_t tokens_per_split;
};
