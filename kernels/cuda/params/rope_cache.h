// Parameters of rope_cache.cu, mirrored by kernels/src/gpu/rope_cache.rs (`#[repr(C)]`).
#pragma once
#include <stdint.h>

/// RoPE on the q and k parts of the fused QKV projection output, fused with the KV cache write.
/// qkv: [num_tokens, (num_heads + 2 * num_kv_heads) * head_dim] of the dtype, rows q | k | v;
/// the q part is rotated in place, or into q_out ([num_tokens, num_heads * head_dim], contiguous,
/// for the attention kernels) when q_out is not null, leaving qkv unchanged; k (rotated) and v
/// are stored in k_cache/v_cache
/// ([num_slots, num_kv_heads, head_dim]) at slot_mapping[t]; a slot of UINT32_MAX (PAD_SLOT) or
/// past num_slots is not written. Token t is at position positions[t]; the angle of pair i is
/// positions[t] * inv_freq[i] (head_dim / 2 f32 entries, Llama-3 scaling already applied).
struct CadRopeCacheParams {
  void* qkv;
  void* q_out;
  const uint32_t* positions;
  const uint32_t* slot_mapping;
  const float* inv_freq;
  void* k_cache;
  void* v_cache;
  uint32_t num_tokens;
  uint32_t num_heads;
  uint32_t num_kv_heads;
  uint32_t head_dim;
  uint32_t num_slots;
  /// 0: pairs (2i, 2i + 1) (GGUF, RopeStyle::Interleaved); 1: pairs (i, i + head_dim / 2) (Neox).
  uint32_t neox;
};
