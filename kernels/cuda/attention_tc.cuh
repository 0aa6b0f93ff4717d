// What the tensor-core attention kernels share (attention_prefill_tc.cu, attention_decode_tc.cu):
// a warp's Q fragments and its online-softmax step, in the mma.m16n8k16 accumulator layout of
// mma.cuh (lane (g, t4) holds rows g and g + 8).
#pragma once
#include "common.cuh"
#include "mma.cuh"

namespace cad {

/// The A fragments of a warp's 16 query rows at head dim D: qa[ks][h + 2 half] holds row
/// g + 8h at dims 16 ks + 2 t4 + 8 half, read from `q_rows[h]` (null: a padding row, zeros).
template <class T, int D>
__device__ __forceinline__ void load_q_fragments(uint32_t (&qa)[D / 16][4],
                                                 const T* const (&q_rows)[2], uint32_t t4) {
CAD_UNROLL
  for (int h = 0; h < 2; ++h)
CAD_UNROLL
    for (int ks = 0; ks < D / 16; ++ks)
CAD_UNROLL
      for (int half = 0; half < 2; ++half)
        qa[ks][h + 2 * half] = q_rows[h] != nullptr
                                   ? pun_load<uint32_t>(q_rows[h] + 16 * ks + 2 * t4 + 8 * half)
                                   : 0u;
}

/// One online-softmax step of a warp's rows over NT key n-tiles of scores `sc`, already scaled
/// to base 2 and -inf where masked (element e of n-tile nt is row g + 8 (e / 2)): raises the row
/// maxima `m` (the max of a row over the 4 lanes of its quad), rescales the per-lane sums `l`
/// and the output accumulators `o` (DT n-tiles) to them, and turns `sc` into the unnormalised
/// weights 2^(s - m), adding them to `l`. A row with nothing visible yet keeps m = -inf and
/// weights 0.
template <int NT, int DT>
__device__ __forceinline__ void online_softmax(float (&sc)[NT][4], float (&m)[2], float (&l)[2],
                                               float (&o)[DT][4]) {
  float mx[2] = {-INFINITY, -INFINITY};
CAD_UNROLL
  for (int nt = 0; nt < NT; ++nt)
CAD_UNROLL
    for (int e = 0; e < 4; ++e) mx[e / 2] = fmaxf(mx[e / 2], sc[nt][e]);
  float base[2], alpha[2];
CAD_UNROLL
  for (int h = 0; h < 2; ++h) {
    mx[h] = fmaxf(mx[h], __shfl_xor_sync(0xffffffffu, mx[h], 1));
    mx[h] = fmaxf(mx[h], __shfl_xor_sync(0xffffffffu, mx[h], 2));
    const float m_new = fmaxf(m[h], mx[h]);
    base[h] = m_new == -INFINITY ? 0.0f : m_new;  // a row with nothing visible yet
    alpha[h] = exp2f(m[h] - base[h]);
    m[h] = m_new;
    l[h] *= alpha[h];
  }
CAD_UNROLL
  for (int nt = 0; nt < NT; ++nt)
CAD_UNROLL
    for (int e = 0; e < 4; ++e) {
      sc[nt][e] = exp2f(sc[nt][e] - base[e / 2]);
      l[e / 2] += sc[nt][e];
    }
CAD_UNROLL
  for (int dt = 0; dt < DT; ++dt)
CAD_UNROLL
    for (int e = 0; e < 4; ++e) o[dt][e] *= alpha[e / 2];
}

/// A row's sum over the 4 lanes of its quad (the per-lane sums `l` at the end of the walk).
__device__ __forceinline__ float quad_sum(float v) {
  v += __shfl_xor_sync(0xffffffffu, v, 1);
  return v + __shfl_xor_sync(0xffffffffu, v, 2);
}

}  // namespace cad
