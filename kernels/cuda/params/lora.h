// Parameter struct of lora.cu (multi-LoRA shrink/expand), passed by value to every kernel of the
// family. Mirrored field for field by kernels/src/gpu/lora.rs (`#[repr(C)]`).
#pragma once
#include <stdint.h>

/// Most projections one fused call covers (q, k and v share the attention input).
#define CAD_LORA_MAX_PARTS 3

/// One projection's slot store, as kernels/src/gpu/lora.rs lays it out.
struct LoraPart {
  /// `[num_slots][max_rank][in_stride]` of the dtype, rows zero-padded to `in_stride`.
  const void* a;
  /// `[num_slots][max_rank][out_stride]`: B transposed (row k holds B[o, k] for every o), padded.
  const void* b;
  /// Per slot, `table_stride` apart: the slot's rank, 0 when it holds nothing for this projection.
  const uint32_t* ranks;
  /// Per slot, `table_stride` apart: alpha / rank (or rsLoRA's alpha / sqrt(rank)).
  const float* scales;
  uint32_t max_rank;
  uint32_t out_dim;
  /// `out_dim` rounded up to 8 (16-byte rows).
  uint32_t out_stride;
  /// Column of the fused output row where this projection's outputs start.
  uint32_t y_offset;
  /// Column of the workspace row `v` where this projection's ranks start.
  uint32_t v_offset;
  /// Blocks of grid.y this part spans in the shrink and in the expand (0: no token of the batch
  /// has an adapter for it). Sized by the host for the largest rank the batch uses.
  uint32_t shrink_blocks;
  uint32_t expand_blocks;
  /// Entries between one slot's rank (and scale) and the next's: 1 for a store's own arrays,
  /// the number of stores for a stack's shared table (`[slot][store]`).
  uint32_t table_stride;
};

/// A fused LoRA call: shrink `v[t, part, k] = x_t . A[k]`, expand `y[t, off + o] += scale *
/// sum_k v[t, part, k] B[o, k]`, for the tokens that `token_slots` (BGMV) or `tiles` (SGMV) give
/// an adapter.
struct LoraParams {
  LoraPart parts[CAD_LORA_MAX_PARTS];
  /// `[num_tokens][in_dim]` of the dtype.
  const void* x;
  /// `[num_splits][num_tokens][v_stride]` f32 workspace: each split's partial sums.
  float* v;
  /// Rows of `y_stride` dtype values.
  void* y;
  /// BGMV: `[num_tokens]` slot per token, 0xffffffff for base-only tokens.
  const uint32_t* token_slots;
  /// SGMV: `[num_tiles][3]` (first token, or first index into `tile_rows`; tokens <= the tile
  /// size; slot).
  const uint32_t* tiles;
  /// SGMV: the tiles' tokens, tile by tile (a decode batch's tokens grouped by slot); null when
  /// each tile's tokens are consecutive from its first (a prefill run's).
  const uint32_t* tile_rows;
  uint32_t num_parts;
  uint32_t num_slots;
  /// BGMV: tokens (grid.x); SGMV: tiles (grid.x).
  uint32_t num_units;
  uint32_t in_dim;
  /// `in_dim` rounded up to 8.
  uint32_t in_stride;
  uint32_t v_stride;
  uint32_t y_stride;
  /// Splits of the input columns the shrink reduces separately (grid.z), and the workspace
  /// values between one split's and the next's.
  uint32_t num_splits;
  uint32_t v_split_stride;
  uint32_t _pad;
};
