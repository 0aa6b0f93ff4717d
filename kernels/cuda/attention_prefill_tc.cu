// Paged attention for prefill chunks on tensor cores (mma.sync m16n8k16, f32 accumulators),
// flash-attention-2 style: the twin of attention_prefill.cu (CUDA cores) with the same grid, the
// same query tiles and the same results up to the rounding of P (below). CPU twin:
// kernels::paged_attention (reference: kernels::paged_attention_reference).
//
// A CTA owns one tile of 64 (token, query head) rows of one sequence: 64 / group consecutive
// query tokens times the `group` query heads of one KV head (GQA), so each K/V row gathered from
// the paged cache serves all of them. Warp w owns rows 16w..16w+15: their Q fragments stay in
// registers for the whole kernel, and so do the warp's scores S (16 rows x 32 keys) and output
// O (16 rows x head_dim) in the mma accumulator layout (mma.cuh): lane (g, t) holds rows g and
// g + 8. The CTA walks keys 0..=the tile's last position in tiles of 32, in a ring of kStages
// buffers in (dynamic) shared memory filled by cp.async: the next kStages - 1 tiles' copies are
// in flight while one is computed, so a decode tile (one warp computing, the CTA copying) keeps
// enough bytes in flight to stream the cache near the memory's bandwidth. Per tile: S = Q K^T
// (K fragments by ldmatrix), causal mask and online softmax in base 2 (row max over the 4
// lanes of a quad; the row sum stays per lane until the end), then
// O += P V with P rounded to the dtype in registers as the A fragment and V fragments by
// ldmatrix.trans. A warp skips the compute of a key tile past all its rows' positions (whole
// warps of padding rows when the tile is a single token's heads: the decode batches this kernel
// also serves, see attention/decode.rs).
//
// Parameters are the decode kernel's (CadDecodeParams): grid z splits the keys into partitions
// of tokens_per_split (a multiple of the 32-key tile) and, with more than one, each CTA writes
// its rows' (output, log-sum-exp) to the workspace for cad_paged_decode_merge_*, as
// attention_decode.cu does (decode-only batches; prefill runs unsplit).
//
// Rounding: P is rounded to bf16/f16 before the product with V (as in FlashAttention), while
// the softmax sum adds the unrounded values, so an output differs from the exact one by at most
// the dtype's unit roundoff times max |v| beyond the CUDA-core kernel's error.
//
// Head dims: any multiple of 16 up to 128, instantiated for 16, 32, 64, 80, 96 and 128 (the
// launcher's table); head_dim 256 has only the CUDA-core kernel (its accumulators would not fit
// in registers with 16 rows per warp).
#include "attention_tc.cuh"
#include "common.cuh"
#include "mma.cuh"
#include "paged.cuh"
#include "params/attention.h"

namespace {

using cad::store2;

constexpr int kThreads = 128;
constexpr int kRows = 64;  // (token, head) rows per CTA: 16 per warp
constexpr int kKeys = 32;  // keys per K/V tile
// K/V tiles in the ring: 4 x 17 KB at head_dim 128, 3 CTAs per SM as the registers allow.
// Launchers size the dynamic shared memory as prefill_tc_shared_bytes (attention/head_dims.rs).
constexpr int kStages = 4;
constexpr float kLog2e = 1.4426950408889634f;
constexpr float kLn2 = 0.6931471805599453f;

template <class T, int D>
__device__ void paged_prefill_tc(const CadDecodeParams& dp) {
  const CadPagedAttnParams& p = dp.attn;
  static_assert(D % 16 == 0 && D <= 128, "head_dim must be a multiple of 16, at most 128");
  // Shared rows padded by 8 elements: the 8 rows an ldmatrix phase reads start 4 banks apart.
  using L = cad::KvTile<D, kKeys, false>;
  constexpr int kKSteps = D / 16;        // k-steps of S = Q K^T
  constexpr int kDimTiles = D / 8;       // n-tiles of O
  constexpr int kKeyTiles = kKeys / 8;   // n-tiles of S
  // Stage i: K at ring + 2i * L::kElems, V after it.
  CAD_DYNAMIC_SMEM_AT_LEAST(T, ring, sizeof(T) * kStages * 2 * L::kElems);

  const CadPagedBatch& b = p.batch;
  const uint32_t num_heads = p.shape.num_heads, block_size = p.shape.block_size;
  const uint32_t group = num_heads / p.shape.num_kv_heads;
  const uint32_t kvh = blockIdx.y;
  cad::QueryTile qt;
  if (!cad::query_tile(b, block_size, kRows / group, qt)) return;
  const uint32_t s = qt.seq, q_first = qt.q_first, tok0 = qt.tok0;
  const uint32_t nrows = qt.ntok * group, first_pos = qt.first_pos, num_keys = qt.num_keys;
  // This CTA's part of keys 0..=the tile's last position: split blockIdx.z of tokens_per_split
  // keys (one split: all). An empty split has nothing to write (the merge skips it); split 0
  // always writes.
  const uint32_t split = blockIdx.z, begin = split * dp.tokens_per_split;
  if (begin >= num_keys && split > 0) return;
  const uint32_t end =
      dp.tokens_per_split >= num_keys - begin ? num_keys : begin + dp.tokens_per_split;
  const uint32_t tid = threadIdx.x, warp = tid / 32, lane = tid % 32;
  const uint32_t g = lane / 4, t4 = lane % 4;

  // This lane's rows: 16 warp + g (h = 0) and 16 warp + g + 8 (h = 1); -1 marks a padding row,
  // masked everywhere and never written.
  int row_pos[2];
  const T* q_rows[2];
CAD_UNROLL
  for (int h = 0; h < 2; ++h) {
    const uint32_t r = 16 * warp + g + 8 * h;
    const bool ok = r < nrows;
    row_pos[h] = ok ? int(first_pos + r / group) : -1;
    const size_t head = size_t(kvh) * group + r % group;
    const size_t tok = q_first + tok0 + r / group;
    q_rows[h] = ok ? static_cast<const T*>(p.q) + (tok * num_heads + head) * D : nullptr;
  }
  uint32_t qa[kKSteps][4];
  cad::load_q_fragments<T, D>(qa, q_rows, t4);

  const float scale_log2 = p.shape.scale * kLog2e;
  const auto src = cad::KvGather<T>::template of<D>(p, kvh, s, end);
  float o[kDimTiles][4];
CAD_UNROLL
  for (int dt = 0; dt < kDimTiles; ++dt)
CAD_UNROLL
    for (int e = 0; e < 4; ++e) o[dt][e] = 0.0f;
  float m[2] = {-INFINITY, -INFINITY}, l[2] = {0.0f, 0.0f};
  // The last position of this warp's rows (-1: only padding rows, as for 3 of 4 warps when a
  // tile is one decode token's heads). A key tile past it would be masked whole, which leaves
  // the warp's state as it is, so the warp skips its compute (not the CTA's copies and barriers).
  const uint32_t warp_rows_end = min(16 * (warp + 1), nrows);
  const int warp_last = 16 * warp < nrows ? int(first_pos + (warp_rows_end - 1) / group) : -1;

  const uint32_t tiles = (end - begin + kKeys - 1) / kKeys;
  const cad::KvRing<L, kStages, kThreads, T> kv{ring, src, begin, tiles};
  kv.start();
  for (uint32_t it = 0; it < tiles; ++it) {
    const uint32_t k0 = begin + it * kKeys;
    const T* ks_tile = kv.wait(it);
    if (int(k0) <= warp_last) {
      const T* vs_tile = ks_tile + L::kElems;

      // S = Q K^T. One ldmatrix.x4 gives the B fragments of two key n-tiles for one k-step:
      // matrix i = lane / 8 holds keys 8 (2 ntp + i / 2) .. + 7 at dims 16 ks + 8 (i % 2) .. + 7.
      float sc[kKeyTiles][4];
CAD_UNROLL
      for (int nt = 0; nt < kKeyTiles; ++nt)
CAD_UNROLL
        for (int e = 0; e < 4; ++e) sc[nt][e] = 0.0f;
CAD_UNROLL
      for (int ks = 0; ks < kKSteps; ++ks) {
CAD_UNROLL
        for (int ntp = 0; ntp < kKeyTiles / 2; ++ntp) {
          const uint32_t i = lane / 8;
          const uint32_t key = 8 * (2 * ntp + i / 2) + lane % 8, dim = 16 * ks + 8 * (i % 2);
          uint32_t kb[4];
          cad::ldmatrix_x4<false>(kb, &ks_tile[L::at(key, dim)]);
          cad::mma_16816<T>(sc[2 * ntp], qa[ks], kb);
          cad::mma_16816<T>(sc[2 * ntp + 1], qa[ks], kb + 2);
        }
      }

      // Causal mask, then the online softmax in base 2; element e of n-tile nt is row h = e / 2,
      // key 8 nt + 2 t4 + e % 2.
CAD_UNROLL
      for (int nt = 0; nt < kKeyTiles; ++nt)
CAD_UNROLL
        for (int e = 0; e < 4; ++e) {
          const int pos = int(k0 + 8 * nt + 2 * t4 + e % 2);
          sc[nt][e] = pos <= row_pos[e / 2] ? sc[nt][e] * scale_log2 : -INFINITY;
        }
      cad::online_softmax(sc, m, l, o);

      // O += P V. P's accumulator fragments of key n-tiles 2 kk and 2 kk + 1 are exactly the A
      // fragment of k-step kk; one ldmatrix.x4.trans gives the B fragments of two dim n-tiles:
      // matrix i holds keys 16 kk + 8 (i % 2) .. + 7 at dims 8 (2 dtp + i / 2) .. + 7.
CAD_UNROLL
      for (int kk = 0; kk < kKeys / 16; ++kk) {
        const uint32_t pa[4] = {cad::pack2<T>(sc[2 * kk][0], sc[2 * kk][1]),
                                cad::pack2<T>(sc[2 * kk][2], sc[2 * kk][3]),
                                cad::pack2<T>(sc[2 * kk + 1][0], sc[2 * kk + 1][1]),
                                cad::pack2<T>(sc[2 * kk + 1][2], sc[2 * kk + 1][3])};
CAD_UNROLL
        for (int dtp = 0; dtp < kDimTiles / 2; ++dtp) {
          const uint32_t i = lane / 8;
          const uint32_t key = 16 * kk + 8 * (i % 2) + lane % 8, dim = 8 * (2 * dtp + i / 2);
          uint32_t vb[4];
          cad::ldmatrix_x4<true>(vb, &vs_tile[L::at(key, dim)]);
          cad::mma_16816<T>(o[2 * dtp], pa, vb);
          cad::mma_16816<T>(o[2 * dtp + 1], pa, vb + 2);
        }
      }
    }
  }

CAD_UNROLL
  for (int h = 0; h < 2; ++h) l[h] = cad::quad_sum(l[h]);
CAD_UNROLL
  for (int h = 0; h < 2; ++h) {
    const uint32_t r = 16 * warp + g + 8 * h;
    if (r >= nrows) continue;
    const float inv = l[h] > 0.0f ? 1.0f / l[h] : 0.0f;
    const size_t head = size_t(kvh) * group + r % group;
    const size_t th = (q_first + tok0 + r / group) * num_heads + head;  // (token, head)
    if (dp.num_splits > 1) {
      // The split's output normalised by its own sum, and its log-sum-exp in natural units
      // (m is in base 2), as the decode kernel writes them for cad_paged_decode_merge_*.
      const size_t ps = th * dp.num_splits + split;
      float* out = dp.partial_out + ps * D;
CAD_UNROLL
      for (int dt = 0; dt < kDimTiles; ++dt) {
        out[8 * dt + 2 * t4] = o[dt][2 * h] * inv;
        out[8 * dt + 2 * t4 + 1] = o[dt][2 * h + 1] * inv;
      }
      if (t4 == 0) dp.partial_lse[ps] = l[h] > 0.0f ? (m[h] + log2f(l[h])) * kLn2 : -INFINITY;
    } else {
      T* out = static_cast<T*>(p.out) + th * D;
CAD_UNROLL
      for (int dt = 0; dt < kDimTiles; ++dt) {
        store2(out + 8 * dt + 2 * t4, o[dt][2 * h] * inv, o[dt][2 * h + 1] * inv);
      }
    }
  }
}

}  // namespace

// One kernel per (head_dim, dtype); the launcher's table (attention/head_dims.rs) names them.
#define CAD_PREFILL_TC(D)                                                                          \
  CAD_KERNEL_BOUNDS(cad_paged_attention_prefill_tc_d##D##_bf16, CadDecodeParams, p, kThreads) {    \
    paged_prefill_tc<cad::bf16, D>(p);                                                             \
  }                                                                                                \
  CAD_KERNEL_BOUNDS(cad_paged_attention_prefill_tc_d##D##_f16, CadDecodeParams, p, kThreads) {     \
    paged_prefill_tc<cad::f16, D>(p);                                                              \
  }
CAD_PREFILL_TC(16)
CAD_PREFILL_TC(32)
CAD_PREFILL_TC(64)
CAD_PREFILL_TC(80)
CAD_PREFILL_TC(96)
CAD_PREFILL_TC(128)
