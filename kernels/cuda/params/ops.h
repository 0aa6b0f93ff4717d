// Parameter structs of ops.cu, passed by value to each kernel. Mirrored field for field by
// kernels/src/gpu/ops.rs (`#[repr(C)]`); the emulated entry points report their size so the
// Rust side checks the two agree. Pointers are device addresses of the kernel's element type.
#pragma once
#include <stdint.h>

/// out[t] = table[ids[t]] (rows of `hidden`); an id >= vocab gives a zero row.
struct EmbeddingParams {
  const void* table;
  const uint32_t* ids;
  void* out;
  uint32_t num_tokens;
  uint32_t hidden;
  uint32_t vocab;
  uint32_t _pad;
};

/// h = x (+ residual); residual_out = h when non-null; out = h / rms(h) * weight.
/// `residual` and `residual_out` may be null (plain RMSNorm) and may alias each other.
struct RmsNormParams {
  const void* x;
  const void* residual;
  void* residual_out;
  const void* weight;
  void* out;
  uint32_t rows;
  uint32_t dim;
  float eps;
  uint32_t _pad;
};

/// out[r, i] = silu(gate_up[r, i]) * gate_up[r, ffn + i].
struct SiluMulParams {
  const void* gate_up;
  void* out;
  uint32_t rows;
  uint32_t ffn;
};

/// dst[r * dst_stride + c] = src[r * src_stride + c] for r < rows, c < cols (element strides):
/// copies a column range out of a fused output (q out of q|k|v) or into one.
struct CopyRowsParams {
  const void* src;
  void* dst;
  uint32_t rows;
  uint32_t cols;
  uint32_t src_stride;
  uint32_t dst_stride;
};

/// out[i] = float(x[i]) for i < n: the LM head's logits widened for sampling.
struct ToF32Params {
  const void* x;
  float* out;
  uint64_t n;
};

/// One addend of AddAtParams: x[index] += value.
struct AddAtEntry {
  uint32_t index;
  float value;
};

/// x[e.index] += e.value for each of the `n` entries whose index is below `len` (indices
/// distinct): requests' logit_bias on a step's f32 logits.
struct AddAtParams {
  float* x;
  const AddAtEntry* entries;
  uint32_t n;
  uint32_t len;
};
