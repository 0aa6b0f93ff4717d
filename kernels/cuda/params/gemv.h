// Parameter struct of gemv.cu, mirrored by kernels/src/gpu/gemv.rs (`#[repr(C)]`).
#pragma once
#include <stdint.h>

/// y[r, o] = (accumulate ? y[r, o] : 0) + x[r] . w[o] (+ bias[o]) for r < m, o < n; x is
/// `[m, k]`, w `[n, k]`, y `[m, n]`, bias `[n]` or null; k a multiple of 8 and every pointer
/// 16-byte aligned (the launcher checks both).
struct GemvParams {
  const void* x;
  const void* w;
  const void* bias;
  void* y;
  uint32_t m;
  uint32_t n;
  uint32_t k;
  uint32_t accumulate;
};
