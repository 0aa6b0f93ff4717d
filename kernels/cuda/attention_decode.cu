// Paged attention for decode tokens (one query token per sequence), grouped-query aware, with
// split-K over the context and a log-sum-exp merge. CPU twins: kernels::paged_attention and
// kernels::paged_attention_reference (f64).
//
// Design (after FlashInfer's decode kernel): one CTA of 128 threads per (KV head, sequence,
// split) handles every query head sharing that KV head, so each K/V row is read from global
// memory once per CTA. The CTA walks its part of the context in tiles of 32 tokens: the tile's
// K and V rows are gathered through the block table with 16-byte loads into registers one tile
// ahead (so the loads of the next tile overlap the scoring of this one) and stored to shared
// memory, then
// a "row" of 8 lanes (each holding head_dim / 8 dims of one query head in registers, as 8-dim
// chunks `lane` and `lane + 8` so a row's 16-byte shared loads are contiguous) scores one token
// at a time (partial dot products summed by 3 warp shuffles within the row) and updates its
// online-softmax state (max, sum, its output dims). The CTA's 16 rows are (head, z) pairs:
// Z = 16 / heads rows per head take every Z-th token of a tile, and their states are merged
// through shared memory at the end. With one split the CTA writes the output; with several it
// writes (output, log-sum-exp) to a workspace that cad_paged_decode_merge_* combines.
//
// Head dims: instantiated for 16, 32, 64, 80, 96, 128 and 256 (the launcher's table in
// kernels/src/gpu/attention/head_dims.rs). 64 and 128 fill a row's 8 lanes with 1 or 2 chunks
// each; the others leave lanes with a chunk fewer (hd 16 and 32 leave 6 and 4 lanes idle, hd 80
// and 96 give 2 and 4 lanes a second chunk), skipped by compile-time masks that vanish for
// 64/128. hd 256 walks 16-token tiles to keep the static shared memory under 48 KB.
#include "common.cuh"
#include "params/attention.h"

namespace {

constexpr uint32_t kThreads = 128;
constexpr uint32_t kTile = 32;
constexpr uint32_t kVec = 8;     // elements per 16-byte vector
constexpr uint32_t kLanes = 8;   // threads per row
constexpr uint32_t kRows = kThreads / kLanes;

template <class T, int N>
struct alignas(N * sizeof(T)) Vec {
  T v[N];
};

template <class T, uint32_t HD>
__device__ void paged_decode(const CadDecodeParams& p) {
  constexpr uint32_t VECS = HD / kVec;                       // 16-byte vectors per K/V row
  constexpr uint32_t CHUNKS = (VECS + kLanes - 1) / kLanes;  // 16-byte chunks per lane: 1, 2 or 4
  // Whether some lanes hold a chunk fewer: chunk c of lane l is vector l + 8c, which exists
  // only below VECS (always true for hd 64 and 128, so their code has no mask).
  constexpr bool kRagged = VECS % kLanes != 0;
  constexpr uint32_t ROWS = kRows;
  constexpr uint32_t PER = CHUNKS * kVec;            // dims per lane
  constexpr uint32_t TILE = HD > 128 ? kTile / 2 : kTile;  // tokens per shared K/V tile
  static_assert(HD % kVec == 0, "head_dim must be a multiple of 8");
  static_assert(kTile % TILE == 0, "splits are multiples of kTile");
  using V8 = Vec<T, kVec>;
  __align__(16) __shared__ T s_k[TILE * HD];
  __align__(16) __shared__ T s_v[TILE * HD];
  __shared__ float s_m[ROWS];
  __shared__ float s_l[ROWS];
  __align__(16) __shared__ float s_o[ROWS * HD];

  const CadPagedAttnParams& a = p.attn;
  const uint32_t nh = a.shape.num_heads, nkv = a.shape.num_kv_heads, bs = a.shape.block_size;
  const uint32_t group = nh / nkv;
  const uint32_t per_cta = group < ROWS ? group : ROWS;  // query heads of this CTA
  const uint32_t chunks = (group + per_cta - 1) / per_cta;
  const uint32_t kvh = blockIdx.x / chunks, h0 = (blockIdx.x % chunks) * per_cta;
  const uint32_t heads = min(per_cta, group - h0);
  const uint32_t seq = blockIdx.y, split = blockIdx.z;
  if (seq >= a.batch.num_seqs || kvh >= nkv) return;
  const uint32_t t = a.batch.query_start[seq];
  if (a.batch.query_start[seq + 1] - t != 1) return;  // not a decode sequence
  const uint32_t ctx = a.batch.context_len[seq];
  const uint32_t begin = split * p.tokens_per_split;
  // An empty split has nothing to write (the merge skips it); split 0 always writes, so an
  // empty context still yields zeros.
  if (begin >= ctx && split > 0) return;
  const uint32_t end = min(ctx, begin + p.tokens_per_split);

  const uint32_t tid = threadIdx.x, lane = tid % kLanes, row = tid / kLanes;
  const uint32_t z_count = ROWS / per_cta;
  const uint32_t g = row % per_cta, z = row / per_cta;
  const bool active = z < z_count && g < heads;
  const uint32_t head = kvh * group + h0 + min(g, heads - 1);

  float q[PER], o[PER];
  {
    const V8* qrow = reinterpret_cast<const V8*>(static_cast<const T*>(a.q) + (size_t(t) * nh + head) * HD);
CAD_UNROLL
    for (uint32_t c = 0; c < CHUNKS; ++c) {
      const bool has = !kRagged || lane + c * kLanes < VECS;
      V8 qv{};
      if (has) qv = qrow[lane + c * kLanes];
CAD_UNROLL
      for (uint32_t i = 0; i < kVec; ++i) {
        q[c * kVec + i] = has ? cad::to_f32(qv.v[i]) * a.shape.scale : 0.0f;
        o[c * kVec + i] = 0.0f;
      }
    }
  }
  float m = -INFINITY, l = 0.0f;
  const uint32_t* table = a.batch.block_tables + size_t(seq) * a.batch.max_blocks_per_seq;
  const T* k_cache = static_cast<const T*>(a.k_cache);
  const T* v_cache = static_cast<const T*>(a.v_cache);

  // The next tile's K and V rows travel in registers while this tile is scored: each thread
  // issues all its loads of a tile at once (LOADS 16-byte vectors of K and of V, every address
  // computed from the block table first), so a CTA keeps a whole tile in flight instead of one
  // load pair per thread (a warp issues in order and stalls at the first store of a loaded
  // value), and the loads of tile t + 1 overlap the scoring of tile t.
  constexpr uint32_t LOADS = (TILE * VECS + kThreads - 1) / kThreads;
  V8 rk[LOADS], rv[LOADS];
  auto fetch = [&](uint32_t start, uint32_t n) {
    size_t off[LOADS];
CAD_UNROLL
    for (uint32_t i = 0; i < LOADS; ++i) {
      const uint32_t w = tid + i * kThreads, j = w / VECS, c = w % VECS;
      const uint32_t pos = start + (j < n ? j : 0);
      const uint32_t slot = table[pos / bs] * bs + pos % bs;
      off[i] = (size_t(slot) * nkv + kvh) * HD + c * kVec;
    }
CAD_UNROLL
    for (uint32_t i = 0; i < LOADS; ++i) {
      if (tid + i * kThreads < n * VECS) {
        rk[i] = *reinterpret_cast<const V8*>(k_cache + off[i]);
        rv[i] = *reinterpret_cast<const V8*>(v_cache + off[i]);
      }
    }
  };
  if (begin < end) fetch(begin, min(TILE, end - begin));

  for (uint32_t start = begin; start < end; start += TILE) {
    const uint32_t n = min(TILE, end - start);
    // Every thread is done scoring the previous tile before its rows are overwritten.
    __syncthreads();
CAD_UNROLL
    for (uint32_t i = 0; i < LOADS; ++i) {
      const uint32_t w = tid + i * kThreads;
      if (w < n * VECS) {
        reinterpret_cast<V8*>(s_k)[w] = rk[i];
        reinterpret_cast<V8*>(s_v)[w] = rv[i];
      }
    }
    __syncthreads();
    if (start + TILE < end) fetch(start + TILE, min(TILE, end - start - TILE));
    // `n` is the same for the whole CTA, so every lane runs the same iterations and reaches
    // the row's shuffles (idle rows compute on token 0 and discard the result).
    for (uint32_t j0 = 0; j0 < n; j0 += z_count) {
      const uint32_t j = j0 + z;
      const bool valid = active && j < n;
      const uint32_t jj = valid ? j : 0;
      const V8* krow = reinterpret_cast<const V8*>(s_k) + jj * VECS;
      float dot = 0.0f;
CAD_UNROLL
      for (uint32_t c = 0; c < CHUNKS; ++c) {
        if (kRagged && lane + c * kLanes >= VECS) continue;
        const V8 kv = krow[lane + c * kLanes];
CAD_UNROLL
        for (uint32_t i = 0; i < kVec; ++i) dot += q[c * kVec + i] * cad::to_f32(kv.v[i]);
      }
CAD_UNROLL
      for (uint32_t off = kLanes / 2; off > 0; off >>= 1) dot += __shfl_xor_sync(0xffffffffu, dot, off);
      if (valid) {
        const float m_new = fmaxf(m, dot);
        const float corr = __expf(m - m_new);
        const float w = __expf(dot - m_new);
        l = l * corr + w;
        m = m_new;
        const V8* vrow = reinterpret_cast<const V8*>(s_v) + jj * VECS;
CAD_UNROLL
        for (uint32_t c = 0; c < CHUNKS; ++c) {
          if (kRagged && lane + c * kLanes >= VECS) continue;
          const V8 vv = vrow[lane + c * kLanes];
CAD_UNROLL
          for (uint32_t i = 0; i < kVec; ++i) o[c * kVec + i] = o[c * kVec + i] * corr + w * cad::to_f32(vv.v[i]);
        }
      }
    }
  }
  // The merge below writes s_o, not s_k/s_v, so no barrier is needed before it beyond its own.

  // Merge the Z rows of each head.
  if (lane == 0) {
    s_m[row] = m;
    s_l[row] = l;
  }
CAD_UNROLL
  for (uint32_t c = 0; c < CHUNKS; ++c) {
    if (kRagged && lane + c * kLanes >= VECS) continue;
CAD_UNROLL
    for (uint32_t i = 0; i < kVec; ++i) s_o[row * HD + (lane + c * kLanes) * kVec + i] = o[c * kVec + i];
  }
  __syncthreads();
  const bool split_out = p.num_splits > 1;
  for (uint32_t w = tid; w < heads * HD; w += kThreads) {
    const uint32_t gg = w / HD, d = w % HD;
    float mx = -INFINITY;
    for (uint32_t zz = 0; zz < z_count; ++zz) mx = fmaxf(mx, s_m[zz * per_cta + gg]);
    float sum = 0.0f, acc = 0.0f;
    if (mx != -INFINITY) {
      for (uint32_t zz = 0; zz < z_count; ++zz) {
        const uint32_t r = zz * per_cta + gg;
        const float c = __expf(s_m[r] - mx);
        sum += s_l[r] * c;
        acc += s_o[r * HD + d] * c;
      }
    }
    const float val = sum > 0.0f ? acc / sum : 0.0f;
    const size_t th = size_t(t) * nh + kvh * group + h0 + gg;  // (token, head)
    if (split_out) {
      const size_t ps = th * p.num_splits + split;
      p.partial_out[ps * HD + d] = val;
      if (d == 0) p.partial_lse[ps] = sum > 0.0f ? mx + __logf(sum) : -INFINITY;
    } else {
      static_cast<T*>(a.out)[th * HD + d] = cad::from_f32<T>(val);
    }
  }
}

/// One block of min(head_dim, 128) threads per (sequence, head), each thread taking dims
/// d, d + blockDim.x, ...: out = sum_i w_i o_i / sum_i w_i with w_i = exp(lse_i - max lse) over
/// the sequence's non-empty splits.
template <class T>
__device__ void paged_decode_merge(const CadDecodeParams& p) {
  const CadPagedAttnParams& a = p.attn;
  const uint32_t seq = blockIdx.x, head = blockIdx.y;
  const uint32_t nh = a.shape.num_heads, hd = a.shape.head_dim;
  if (seq >= a.batch.num_seqs || head >= nh) return;
  const uint32_t t = a.batch.query_start[seq];
  if (a.batch.query_start[seq + 1] - t != 1) return;
  const uint32_t ctx = a.batch.context_len[seq];
  const uint32_t used = max(1u, min(p.num_splits, (ctx + p.tokens_per_split - 1) / p.tokens_per_split));
  const size_t base = (size_t(t) * nh + head) * p.num_splits;
  float mx = -INFINITY;
  for (uint32_t i = 0; i < used; ++i) mx = fmaxf(mx, p.partial_lse[base + i]);
  for (uint32_t d = threadIdx.x; d < hd; d += blockDim.x) {
    float sum = 0.0f, acc = 0.0f;
    if (mx != -INFINITY) {
      for (uint32_t i = 0; i < used; ++i) {
        const float w = __expf(p.partial_lse[base + i] - mx);
        sum += w;
        acc += w * p.partial_out[(base + i) * hd + d];
      }
    }
    static_cast<T*>(a.out)[(size_t(t) * nh + head) * hd + d] = cad::from_f32<T>(sum > 0.0f ? acc / sum : 0.0f);
  }
}

}  // namespace

// One kernel per (head_dim, dtype); the launcher's table (attention/head_dims.rs) names them.
#define CAD_DECODE(HD)                                                                          \
  CAD_KERNEL_BOUNDS(cad_paged_decode_hd##HD##_bf16, CadDecodeParams, p, 128) {                  \
    paged_decode<cad::bf16, HD>(p);                                                             \
  }                                                                                             \
  CAD_KERNEL_BOUNDS(cad_paged_decode_hd##HD##_f16, CadDecodeParams, p, 128) { paged_decode<cad::f16, HD>(p); }
CAD_DECODE(16)
CAD_DECODE(32)
CAD_DECODE(64)
CAD_DECODE(80)
CAD_DECODE(96)
CAD_DECODE(128)
CAD_DECODE(256)
CAD_KERNEL_BOUNDS(cad_paged_decode_merge_bf16, CadDecodeParams, p, 128) { paged_decode_merge<cad::bf16>(p); }
CAD_KERNEL_BOUNDS(cad_paged_decode_merge_f16, CadDecodeParams, p, 128) { paged_decode_merge<cad::f16>(p); }
