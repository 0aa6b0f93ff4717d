// Paged attention for decode tokens on tensor cores (mma.sync m16n8k16, f32 accumulators), with
// the keys of each shared-memory tile split across the CTA's warps. The decode-only twin of
// attention_prefill_tc.cu: same parameters (CadDecodeParams, grid z = split), same rounding of
// P, same partial outputs for cad_paged_decode_merge_*. CPU twin: kernels::paged_attention
// (reference: kernels::paged_attention_reference).
//
// Why a kernel of its own: in the prefill kernel a decode token's query tile is its `group`
// heads, 16 rows at most, so one warp computes while three only copy, and that warp's MMAs and
// softmax bound how fast the CTA streams the cache. Here (as FlashInfer's decode configuration
// does with one warp of queries and four of keys) every warp holds the same 16-row Q fragment
// and computes its own 16 keys of each 64-key tile, keeping its own online-softmax state (max,
// sum, output); the four states meet through shared memory at the end.
//
// One CTA per (KV head, sequence, split): grid (num_kv_heads, num_seqs, num_splits), as the
// CUDA-core decode kernel. Rows are the `group` query heads of the sequence's one token (at most
// 16; the launcher sends wider groups to the prefill kernel). The tiles go through a ring of
// kStages buffers filled by cp.async, kStages - 1 tiles in flight while one is computed. Rows of
// 128-dim heads are 256 bytes, so the 8 rows an ldmatrix phase reads would start in the same
// banks: head dims whose rows are a multiple of 8 vectors (64, 128) swizzle each row's 16-byte
// chunks (chunk c of row r at c ^ (r % 8)) instead of padding, which keeps a 128-dim ring of 3
// tiles at 96 KB (two CTAs per SM); the other head dims pad rows by 8 elements.
//
// Sequences whose query length is not 1 are left alone (the batch is decode-only: the caller's
// guarantee), as are contexts longer than their block table.
#include "attention_tc.cuh"
#include "common.cuh"
#include "mma.cuh"
#include "params/attention.h"

namespace {

using cad::store2;

constexpr int kThreads = 128;
constexpr int kWarps = kThreads / 32;
constexpr int kWarpKeys = 16;                // keys per warp per tile
constexpr int kKeys = kWarps * kWarpKeys;    // keys per tile
constexpr int kRows = 16;                    // query heads per CTA (one m16 tile)
// Tiles in the ring; launchers size the dynamic shared memory as decode_tc_shared_bytes
// (kernels/src/gpu/attention/head_dims.rs).
constexpr int kStages = 3;
constexpr float kLog2e = 1.4426950408889634f;
constexpr float kLn2 = 0.6931471805599453f;

template <class T, int D>
__device__ void paged_decode_tc(const CadDecodeParams& dp) {
  // Rows of a multiple of 64 dims swizzle, others pad (the header's comment).
  using L = cad::KvTile<D, kKeys, (D / 8) % 8 == 0>;
  static_assert(D % 16 == 0 && D <= 128, "head_dim must be a multiple of 16, at most 128");
  constexpr int kKSteps = D / 16;   // k-steps of S = Q K^T
  constexpr int kDimTiles = D / 8;  // n-tiles of O
  // The warps' states after the loop, in the ring: max and sum per row, then the rows' outputs.
  constexpr int kRingBytes = int(sizeof(T)) * kStages * 2 * L::kElems;
  static_assert(kWarps * kRows * (D + 2) * 4 <= kRingBytes, "the states fit in the ring");
  CAD_DYNAMIC_SMEM_AT_LEAST(T, ring, kRingBytes);

  const CadPagedAttnParams& p = dp.attn;
  const CadPagedBatch& b = p.batch;
  const uint32_t num_heads = p.shape.num_heads, num_kv = p.shape.num_kv_heads;
  const uint32_t block_size = p.shape.block_size;
  const uint32_t group = num_heads / num_kv;
  const uint32_t kvh = blockIdx.x, seq = blockIdx.y, split = blockIdx.z;
  if (seq >= b.num_seqs || kvh >= num_kv || group > uint32_t(kRows)) return;
  const uint32_t tok = b.query_start[seq];
  if (b.query_start[seq + 1] - tok != 1) return;  // not a decode sequence
  const uint32_t ctx = b.context_len[seq];
  if (ctx > b.max_blocks_per_seq * block_size) return;
  // This CTA's keys: split blockIdx.z of tokens_per_split (one split: all). An empty split has
  // nothing to write (the merge skips it); split 0 always writes, so an empty context yields 0.
  const uint32_t begin = split * dp.tokens_per_split;
  if (begin >= ctx && split > 0) return;
  const uint32_t end = dp.tokens_per_split >= ctx - begin ? ctx : begin + dp.tokens_per_split;
  const uint32_t tid = threadIdx.x, warp = tid / 32, lane = tid % 32;
  const uint32_t g = lane / 4, t4 = lane % 4;

  // A fragments of Q, the same in every warp: rows g and g + 8 are those heads of the group
  // (zeros past it).
  const T* q_rows[2];
CAD_UNROLL
  for (int h = 0; h < 2; ++h) {
    const uint32_t r = g + 8 * h;
    const size_t head = size_t(kvh) * group + r;
    q_rows[h] = r < group ? static_cast<const T*>(p.q) + (size_t(tok) * num_heads + head) * D
                          : nullptr;
  }
  uint32_t qa[kKSteps][4];
  cad::load_q_fragments<T, D>(qa, q_rows, t4);

  const float scale_log2 = p.shape.scale * kLog2e;
  const auto src = cad::KvGather<T>::template of<D>(p, kvh, seq, end);
  float o[kDimTiles][4];
CAD_UNROLL
  for (int dt = 0; dt < kDimTiles; ++dt)
CAD_UNROLL
    for (int e = 0; e < 4; ++e) o[dt][e] = 0.0f;
  // Rows g and g + 8 of this lane (base 2, scaled); the sum stays per lane until the end.
  float m[2] = {-INFINITY, -INFINITY}, l[2] = {0.0f, 0.0f};

  const uint32_t tiles = (end - begin + kKeys - 1) / kKeys;
  const cad::KvRing<L, kStages, kThreads, T> kv{ring, src, begin, tiles};
  kv.start();
  for (uint32_t it = 0; it < tiles; ++it) {
    const T* ks_tile = kv.wait(it);
    const T* vs_tile = ks_tile + L::kElems;
    // This warp's keys of the tile: k0..k0 + 15 (none left: the warp's state stays as it is).
    const uint32_t key0 = kWarpKeys * warp, k0 = begin + it * kKeys + key0;
    if (k0 >= end) continue;

    // S = Q K^T over the warp's 16 keys. One ldmatrix.x4 gives the B fragments of both key
    // n-tiles for one k-step: matrix i = lane / 8 holds keys 8 (i / 2) .. + 7 at dims
    // 16 ks + 8 (i % 2) .. + 7.
    float sc[2][4];
CAD_UNROLL
    for (int nt = 0; nt < 2; ++nt)
CAD_UNROLL
      for (int e = 0; e < 4; ++e) sc[nt][e] = 0.0f;
CAD_UNROLL
    for (int ks = 0; ks < kKSteps; ++ks) {
      const uint32_t i = lane / 8;
      const uint32_t key = key0 + 8 * (i / 2) + lane % 8, dim = 16 * ks + 8 * (i % 2);
      uint32_t kb[4];
      cad::ldmatrix_x4<false>(kb, &ks_tile[L::at(key, dim)]);
      cad::mma_16816<T>(sc[0], qa[ks], kb);
      cad::mma_16816<T>(sc[1], qa[ks], kb + 2);
    }

    // Every key before `end` is visible to the decode token; then the online softmax in base 2
    // (element e of n-tile nt is row g + 8 (e / 2), key k0 + 8 nt + 2 t4 + e % 2).
CAD_UNROLL
    for (int nt = 0; nt < 2; ++nt)
CAD_UNROLL
      for (int e = 0; e < 4; ++e) {
        const uint32_t pos = k0 + 8 * nt + 2 * t4 + e % 2;
        sc[nt][e] = pos < end ? sc[nt][e] * scale_log2 : -INFINITY;
      }
    cad::online_softmax(sc, m, l, o);

    // O += P V: P's accumulators of the two key n-tiles are exactly the A fragment of one
    // k-step; one ldmatrix.x4.trans gives the B fragments of two dim n-tiles: matrix i holds
    // keys 8 (i % 2) .. + 7 at dims 8 (2 dtp + i / 2) .. + 7.
    const uint32_t pa[4] = {cad::pack2<T>(sc[0][0], sc[0][1]), cad::pack2<T>(sc[0][2], sc[0][3]),
                            cad::pack2<T>(sc[1][0], sc[1][1]), cad::pack2<T>(sc[1][2], sc[1][3])};
CAD_UNROLL
    for (int dtp = 0; dtp < kDimTiles / 2; ++dtp) {
      const uint32_t i = lane / 8;
      const uint32_t key = key0 + 8 * (i % 2) + lane % 8, dim = 8 * (2 * dtp + i / 2);
      uint32_t vb[4];
      cad::ldmatrix_x4<true>(vb, &vs_tile[L::at(key, dim)]);
      cad::mma_16816<T>(o[2 * dtp], pa, vb);
      cad::mma_16816<T>(o[2 * dtp + 1], pa, vb + 2);
    }
  }

  // The warps' states meet in the ring, once no copy is in flight and no warp reads it.
  cad::cp_async_wait<0>();
  __syncthreads();
  float* s_m = reinterpret_cast<float*>(ring);  // [warp][row]
  float* s_l = s_m + kWarps * kRows;            // [warp][row]
  float* s_o = s_l + kWarps * kRows;            // [warp][row][D]
CAD_UNROLL
  for (int h = 0; h < 2; ++h) {
    l[h] = cad::quad_sum(l[h]);
    const uint32_t r = g + 8 * h;
    if (t4 == 0) {
      s_m[warp * kRows + r] = m[h];
      s_l[warp * kRows + r] = l[h];
    }
    float* out = s_o + (warp * kRows + r) * D;
CAD_UNROLL
    for (int dt = 0; dt < kDimTiles; ++dt) {
      out[8 * dt + 2 * t4] = o[dt][2 * h];
      out[8 * dt + 2 * t4 + 1] = o[dt][2 * h + 1];
    }
  }
  __syncthreads();

  // Each thread combines pairs of dims of the group's rows: the warps' outputs and sums weighted
  // by 2^(their max - the overall max).
  for (uint32_t i = tid; i < group * (D / 2); i += kThreads) {
    const uint32_t r = i / (D / 2), d = 2 * (i % (D / 2));
    float mw = -INFINITY;
CAD_UNROLL
    for (int w = 0; w < kWarps; ++w) mw = fmaxf(mw, s_m[w * kRows + r]);
    float sum = 0.0f, o0 = 0.0f, o1 = 0.0f;
CAD_UNROLL
    for (int w = 0; w < kWarps; ++w) {
      const float mi = s_m[w * kRows + r];
      if (mi == -INFINITY) continue;  // a warp that saw no key
      const float f = exp2f(mi - mw);
      sum += s_l[w * kRows + r] * f;
      o0 += s_o[(w * kRows + r) * D + d] * f;
      o1 += s_o[(w * kRows + r) * D + d + 1] * f;
    }
    const float inv = sum > 0.0f ? 1.0f / sum : 0.0f;
    const size_t th = size_t(tok) * num_heads + size_t(kvh) * group + r;  // (token, head)
    if (dp.num_splits > 1) {
      // The split's output normalised by its own sum, and its log-sum-exp in natural units (as
      // the decode kernel writes them for cad_paged_decode_merge_*).
      const size_t ps = th * dp.num_splits + split;
      float* out = dp.partial_out + ps * D;
      out[d] = o0 * inv;
      out[d + 1] = o1 * inv;
      if (d == 0) dp.partial_lse[ps] = sum > 0.0f ? (mw + log2f(sum)) * kLn2 : -INFINITY;
    } else {
      store2(static_cast<T*>(p.out) + th * D + d, o0 * inv, o1 * inv);
    }
  }
}

}  // namespace

// One kernel per (head_dim, dtype); the launcher's table (attention/head_dims.rs) names them.
#define CAD_DECODE_TC(D)                                                                         \
  CAD_KERNEL_BOUNDS(cad_paged_decode_tc_d##D##_bf16, CadDecodeParams, p, kThreads) {             \
    paged_decode_tc<cad::bf16, D>(p);                                                            \
  }                                                                                              \
  CAD_KERNEL_BOUNDS(cad_paged_decode_tc_d##D##_f16, CadDecodeParams, p, kThreads) {              \
    paged_decode_tc<cad::f16, D>(p);                                                             \
  }
CAD_DECODE_TC(16)
CAD_DECODE_TC(32)
CAD_DECODE_TC(64)
CAD_DECODE_TC(80)
CAD_DECODE_TC(96)
CAD_DECODE_TC(128)
