// Warp-level tensor-core building blocks (sm_80+): the m16n8k16 MMA with f32 accumulators,
// ldmatrix and cp.async (cad::pack2 in common.cuh packs a register's two values). On the GPU
// each is one PTX instruction; in the emulation (emu/emu.hpp) each has a host twin that gathers
// the warp's operands and applies the PTX ISA's fragment layout as written below, so a kernel's
// index arithmetic runs in the tests while the layouts themselves are only checked on a GPU
// (scripts/gpu-check).
//
// Fragment layout of mma.m16n8k16 (.row.col, 16-bit inputs), with g = lane / 4, t = lane % 4
// and each 32-bit register holding two consecutive elements, the lower index in the low half:
//   A (16 x 16, row major): a[0] = A[g][2t..2t+1],     a[1] = A[g+8][2t..2t+1],
//                           a[2] = A[g][2t+8..2t+9],   a[3] = A[g+8][2t+8..2t+9]
//   B (16 x 8, k x n):      b[0] = B[2t..2t+1][g],     b[1] = B[2t+8..2t+9][g]
//   C (16 x 8, f32):        c[0], c[1] = C[g][2t], C[g][2t+1];  c[2], c[3] = C[g+8][2t], C[g+8][2t+1]
// ldmatrix.m8n8.x4: lanes 8i..8i+7 give the row addresses (16 bytes each) of matrix i; register
// i of lane l receives that matrix's row l / 4, elements 2(l % 4) and 2(l % 4) + 1, or with
// .trans its elements (2(l % 4), l / 4) and (2(l % 4) + 1, l / 4), i.e. column l / 4.
#pragma once
#include "common.cuh"

#include <type_traits>

namespace cad {

#if defined(__CUDACC__)

/// The PTX of mma.m16n8k16 with f32 accumulators for 16-bit inputs of type `TYPE` ("bf16", "f16").
#define CAD_MMA_16816(TYPE)                                                                     \
  asm volatile("mma.sync.aligned.m16n8k16.row.col.f32." TYPE "." TYPE                           \
               ".f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, {%0,%1,%2,%3};\n"                    \
               : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])                                 \
               : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]))

/// c += A B for one m16n8k16 tile (layout above); T = bf16 or f16.
template <class T>
__device__ __forceinline__ void mma_16816(float c[4], const uint32_t a[4], const uint32_t b[2]) {
  static_assert(sizeof(T) == 2, "16-bit inputs");
  if constexpr (std::is_same_v<T, bf16>) {
    CAD_MMA_16816("bf16");
  } else {
    CAD_MMA_16816("f16");
  }
}

/// Four 8x8 matrices of 16-bit elements from shared memory (layout above); `row` is this lane's
/// row address (16-byte aligned).
template <bool kTrans>
__device__ __forceinline__ void ldmatrix_x4(uint32_t r[4], const void* row) {
  const uint32_t addr = static_cast<uint32_t>(__cvta_generic_to_shared(row));
  if constexpr (kTrans) {
    asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0,%1,%2,%3}, [%4];\n"
                 : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
                 : "r"(addr));
  } else {
    asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0,%1,%2,%3}, [%4];\n"
                 : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
                 : "r"(addr));
  }
}

/// Starts an asynchronous 16-byte copy global -> shared; with `valid` false the destination is
/// zero-filled and `src` is not read.
__device__ __forceinline__ void cp_async16(void* dst, const void* src, bool valid) {
  const uint32_t addr = static_cast<uint32_t>(__cvta_generic_to_shared(dst));
  const uint32_t bytes = valid ? 16 : 0;
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(addr), "l"(src), "r"(bytes));
}
/// Closes the group of this thread's copies started since the last commit.
__device__ __forceinline__ void cp_async_commit() { asm volatile("cp.async.commit_group;\n" ::); }
/// Waits until at most `N` of this thread's committed groups are still in flight.
template <int N>
__device__ __forceinline__ void cp_async_wait() {
  asm volatile("cp.async.wait_group %0;\n" ::"n"(N));
}

#else  // host emulation

template <class T>
inline float half_of(uint32_t w, int hi) {
  const uint16_t bits = uint16_t(hi ? w >> 16 : w & 0xffffu);
  T v;
  memcpy(&v, &bits, 2);
  return to_f32(v);
}

template <class T>
inline void mma_16816(float c[4], const uint32_t a[4], const uint32_t b[2]) {
  struct Frag {
    uint32_t a[4], b[2];
  };
  Frag mine{{a[0], a[1], a[2], a[3]}, {b[0], b[1]}}, all[32];
  cad_emu::warp_all_gather(&mine, sizeof(Frag), all);
  // This lane's rows of A (g and g + 8) and columns of B (2t and 2t + 1), unpacked from the
  // lanes that hold them: lane 4g + q holds A[g][2q + h] in a[0] (a[2]: 8 columns on; a[1],
  // a[3]: row g + 8), lane 4n + q holds B[2q + h][n] in b[0] (b[1]: 8 rows on).
  const unsigned lane = cad_emu::lane_id(), g = lane / 4, t = lane % 4;
  float A[2][16], B[2][16];
  for (unsigned q = 0; q < 4; ++q) {
    const Frag& fa = all[4 * g + q];
    for (int h = 0; h < 2; ++h) {
      A[0][2 * q + h] = half_of<T>(fa.a[0], h);
      A[1][2 * q + h] = half_of<T>(fa.a[1], h);
      A[0][2 * q + 8 + h] = half_of<T>(fa.a[2], h);
      A[1][2 * q + 8 + h] = half_of<T>(fa.a[3], h);
      for (unsigned j = 0; j < 2; ++j) {
        const Frag& fb = all[4 * (2 * t + j) + q];
        B[j][2 * q + h] = half_of<T>(fb.b[0], h);
        B[j][2 * q + 8 + h] = half_of<T>(fb.b[1], h);
      }
    }
  }
  for (int i = 0; i < 4; ++i) {
    const float* row = A[i >= 2 ? 1 : 0];
    const float* col = B[i & 1];
    float acc = c[i];
    for (int k = 0; k < 16; ++k) acc += row[k] * col[k];
    c[i] = acc;
  }
}

template <bool kTrans>
inline void ldmatrix_x4(uint32_t r[4], const void* row) {
  cad_emu::require_aligned(row, 16, "ldmatrix row");
  const void* rows[32];
  cad_emu::warp_all_gather(&row, sizeof(row), rows);
  const unsigned lane = cad_emu::lane_id();
  for (unsigned i = 0; i < 4; ++i) {
    uint16_t e[2];
    for (unsigned h = 0; h < 2; ++h) {
      // Element (row, col) of matrix i is 16-bit element col of row address 8i + row.
      const unsigned mrow = kTrans ? 2 * (lane % 4) + h : lane / 4;
      const unsigned mcol = kTrans ? lane / 4 : 2 * (lane % 4) + h;
      memcpy(&e[h], static_cast<const unsigned char*>(rows[8 * i + mrow]) + 2 * mcol, 2);
    }
    r[i] = uint32_t(e[0]) | (uint32_t(e[1]) << 16);
  }
}

// The emulated copy is synchronous: commit and wait have nothing left to do.
inline void cp_async16(void* dst, const void* src, bool valid) {
  cad_emu::require_aligned(dst, 16, "cp.async destination");
  if (valid) {
    cad_emu::require_aligned(src, 16, "cp.async source");
    memcpy(dst, src, 16);
  } else {
    memset(dst, 0, 16);
  }
}
inline void cp_async_commit() {}
template <int N>
inline void cp_async_wait() {}

#endif

}  // namespace cad
