// Paged attention for prefill chunks (and any mix of chunks, prefix-cache hits and decode rows),
// flash-attention-2 style on CUDA cores. CPU twin: kernels::paged_attention (reference:
// kernels::paged_attention_reference).
//
// A CTA owns one tile of kRows (token, query head) rows: up to kRows / group consecutive query
// tokens of one sequence times the `group` query heads that share one KV head (GQA), so every
// K/V row gathered from the paged cache serves all of them. It walks the sequence's keys
// 0..=last position of its tile in tiles of kKeys (the chunk's own tokens are already in the
// cache), with an online softmax in f32 and the causal mask; tiles past the diagonal are never
// loaded. The output stays in registers until the end.
//
// Threads: 128 = 16 row groups x 8 lanes. Row group rg (lanes 8rg..8rg+7, inside one warp) owns
// rows rg + 16i (i < kRows / 16). For S = QK^T its lane j8 computes keys j8 + 8j (j < kKeys / 8)
// of those rows; for O += PV it accumulates dim pairs j8 + 8c (c < D / 16). The softmax
// statistics of a row therefore live in one group of 8 lanes (reduced with shuffles) and P only
// passes through a warp-private shared tile: two block barriers per K/V tile.
//
// Head dims: any multiple of 16, instantiated for 16, 32, 64, 80, 96, 128 and 256 (the
// launcher's table). Tiles are 64 rows x 32 keys, and 32 x 16 for D = 256 (see `Tile`).
//
// Grid: x enumerates query tiles over the flattened batch, y the KV heads. Sequence s gets tiles
// query_start[s] / tokens_per_tile + s .. (exclusive) the next sequence's first, at least as many
// as it needs; a CTA finds its sequence by binary search and exits when its tile is past the end
// of that sequence's chunk (at most one such CTA per sequence and KV head).
#include "common.cuh"
#include "paged.cuh"
#include "params/attention.h"

#if defined(__CUDACC__)
#define CAD_UNROLL_4 _Pragma("unroll 4")
#else
#define CAD_UNROLL_4 _Pragma("GCC unroll 4")
#endif

namespace {

using cad::F2;
using cad::load2;
using cad::pun_load;
using cad::pun_store;
using cad::store2;
using cad::Vec16;

constexpr int kThreads = 128;
constexpr int kLanes = 8;     // lanes sharing one row group
constexpr int kRowGroups = kThreads / kLanes;
// Shared rows are padded by 8 elements: still 16-byte aligned for vector stores, and the
// 8 keys (or 4 query rows) a warp reads at one dim fall in distinct banks.
constexpr int kPad = 8;

/// Tile shape for head dim D: 64 (token, head) rows per CTA and 32 keys per K/V tile, halved
/// for D > 128 so the static shared memory stays under 48 KB and the accumulators in registers
/// (the launcher's table in kernels/src/gpu/attention/head_dims.rs repeats `kRows`).
template <int D>
struct Tile {
  static constexpr int kRows = D > 128 ? 32 : 64;
  static constexpr int kKeys = D > 128 ? 16 : 32;
  static constexpr int kRowsPerThread = kRows / kRowGroups;
  static constexpr int kKeysPerLane = kKeys / kLanes;
  static constexpr int kPStride = kKeys + 8;  // floats; the 4 row groups of a warp hit distinct banks
};
constexpr float kLog2e = 1.4426950408889634f;

/// Reduces two floats at once over the 8 lanes of a row group (`max` or sum). The 64-bit shuffle
/// is two 32-bit ones on the GPU but one exchange in the emulation, which halves its barriers.
template <bool kMax>
__device__ __forceinline__ void group_reduce2(float& a, float& b) {
  for (int o = kLanes / 2; o > 0; o >>= 1) {
    unsigned long long w = (uint64_t(__float_as_uint(b)) << 32) | __float_as_uint(a);
    w = __shfl_xor_sync(0xffffffffu, w, o);
    const float oa = __uint_as_float(uint32_t(w)), ob = __uint_as_float(uint32_t(w >> 32));
    a = kMax ? fmaxf(a, oa) : a + oa;
    b = kMax ? fmaxf(b, ob) : b + ob;
  }
}

template <class T, int D>
__device__ void paged_prefill(const CadPagedAttnParams& p) {
  constexpr int kRows = Tile<D>::kRows, kKeys = Tile<D>::kKeys;
  constexpr int kRowsPerThread = Tile<D>::kRowsPerThread, kKeysPerLane = Tile<D>::kKeysPerLane;
  constexpr int kPStride = Tile<D>::kPStride;
  static_assert(D % (2 * kLanes) == 0, "head_dim must be a multiple of 16");
  constexpr int kVec = 16 / sizeof(T);  // elements per 16-byte vector
  constexpr int kRowVecs = D / kVec;
  constexpr int kStride = D + kPad;
  constexpr int kPairs = D / (2 * kLanes);  // output dim pairs per lane
  __align__(16) __shared__ T q_s[kRows * kStride];
  __align__(16) __shared__ T k_s[kKeys * kStride];
  __align__(16) __shared__ T v_s[kKeys * kStride];
  __shared__ float p_s[kRows * kPStride];

  const CadPagedBatch& b = p.batch;
  const uint32_t num_heads = p.shape.num_heads, block_size = p.shape.block_size;
  const uint32_t group = num_heads / p.shape.num_kv_heads;
  const uint32_t kvh = blockIdx.y;
  cad::QueryTile qt;
  if (!cad::query_tile(b, block_size, kRows / group, qt)) return;
  const uint32_t s = qt.seq, q_first = qt.q_first, tok0 = qt.tok0;
  const uint32_t nrows = qt.ntok * group, first_pos = qt.first_pos, num_keys = qt.num_keys;
  const uint32_t tid = threadIdx.x;

  for (uint32_t i = tid; i < kRows * kRowVecs; i += kThreads) {
    const uint32_t r = i / kRowVecs, c = (i % kRowVecs) * kVec;
    Vec16 v = {0, 0, 0, 0};
    if (r < nrows) {
      const size_t head = size_t(kvh) * group + r % group;
      const size_t tok = q_first + tok0 + r / group;
      v = pun_load<Vec16>(static_cast<const T*>(p.q) + (tok * num_heads + head) * D + c);
    }
    pun_store(&q_s[r * kStride + c], v);
  }

  const uint32_t rg = tid / kLanes, j8 = tid % kLanes;
  int row_pos[kRowsPerThread];  // -1: a padding row, masked everywhere and never written
  float m[kRowsPerThread], l[kRowsPerThread], acc[kRowsPerThread][2 * kPairs];
CAD_UNROLL
  for (int i = 0; i < kRowsPerThread; ++i) {
    const uint32_t r = rg + kRowGroups * i;
    row_pos[i] = r < nrows ? int(first_pos + r / group) : -1;
    m[i] = -INFINITY;
    l[i] = 0.0f;
CAD_UNROLL
    for (int c = 0; c < 2 * kPairs; ++c) acc[i][c] = 0.0f;
  }
  const float scale_log2 = p.shape.scale * kLog2e;
  const uint32_t* table = b.block_tables + size_t(s) * b.max_blocks_per_seq;
  const size_t slot_stride = size_t(p.shape.num_kv_heads) * D;
  const T* k_head = static_cast<const T*>(p.k_cache) + size_t(kvh) * D;
  const T* v_head = static_cast<const T*>(p.v_cache) + size_t(kvh) * D;

  for (uint32_t k0 = 0; k0 < num_keys; k0 += kKeys) {
    // The thread's loads of the tile all go out before any store (a warp issues in order and
    // would stall at the first store of a loaded value, one load pair in flight per thread).
    constexpr uint32_t kLoads = (kKeys * kRowVecs + kThreads - 1) / kThreads;
    Vec16 kv[kLoads], vv[kLoads];
CAD_UNROLL
    for (uint32_t n = 0; n < kLoads; ++n) {
      const uint32_t i = tid + n * kThreads, key = i / kRowVecs, c = (i % kRowVecs) * kVec;
      const uint32_t pos = k0 + key;
      kv[n] = Vec16{0, 0, 0, 0};
      vv[n] = Vec16{0, 0, 0, 0};
      if (i < kKeys * kRowVecs && pos < num_keys) {
        const uint32_t block = table[pos / block_size];
        if (block < p.shape.num_blocks) {
          const size_t off = (size_t(block) * block_size + pos % block_size) * slot_stride + c;
          kv[n] = pun_load<Vec16>(k_head + off);
          vv[n] = pun_load<Vec16>(v_head + off);
        }
      }
    }
    __syncthreads();  // the previous tile's K/V and P are consumed (and the Q tile is complete)
CAD_UNROLL
    for (uint32_t n = 0; n < kLoads; ++n) {
      const uint32_t i = tid + n * kThreads, key = i / kRowVecs, c = (i % kRowVecs) * kVec;
      if (i < kKeys * kRowVecs) {
        pun_store(&k_s[key * kStride + c], kv[n]);
        pun_store(&v_s[key * kStride + c], vv[n]);
      }
    }
    __syncthreads();

    float sc[kRowsPerThread][kKeysPerLane];
CAD_UNROLL
    for (int i = 0; i < kRowsPerThread; ++i)
CAD_UNROLL
      for (int j = 0; j < kKeysPerLane; ++j) sc[i][j] = 0.0f;
CAD_UNROLL_4
    for (int d = 0; d < D; d += 2) {
      F2 qf[kRowsPerThread], kf[kKeysPerLane];
CAD_UNROLL
      for (int i = 0; i < kRowsPerThread; ++i) qf[i] = load2(&q_s[(rg + kRowGroups * i) * kStride + d]);
CAD_UNROLL
      for (int j = 0; j < kKeysPerLane; ++j) kf[j] = load2(&k_s[(j8 + kLanes * j) * kStride + d]);
CAD_UNROLL
      for (int i = 0; i < kRowsPerThread; ++i)
CAD_UNROLL
        for (int j = 0; j < kKeysPerLane; ++j) {
          sc[i][j] = fmaf(qf[i].x, kf[j].x, sc[i][j]);
          sc[i][j] = fmaf(qf[i].y, kf[j].y, sc[i][j]);
        }
    }

    // Online softmax in base 2: scores scaled by scale * log2(e), masked past each row's position.
    static_assert(kRowsPerThread % 2 == 0, "rows are reduced in pairs");
    float mx[kRowsPerThread], sum[kRowsPerThread], alpha[kRowsPerThread];
CAD_UNROLL
    for (int i = 0; i < kRowsPerThread; ++i) {
      mx[i] = -INFINITY;
CAD_UNROLL
      for (int j = 0; j < kKeysPerLane; ++j) {
        const int pos = int(k0 + j8 + kLanes * j);
        sc[i][j] = pos <= row_pos[i] ? sc[i][j] * scale_log2 : -INFINITY;
        mx[i] = fmaxf(mx[i], sc[i][j]);
      }
    }
CAD_UNROLL
    for (int i = 0; i < kRowsPerThread; i += 2) group_reduce2<true>(mx[i], mx[i + 1]);
CAD_UNROLL
    for (int i = 0; i < kRowsPerThread; ++i) {
      const float m_new = fmaxf(m[i], mx[i]);
      const float base = m_new == -INFINITY ? 0.0f : m_new;  // a row with nothing visible yet
      alpha[i] = exp2f(m[i] - base);
      m[i] = m_new;
      sum[i] = 0.0f;
      float* p_row = &p_s[(rg + kRowGroups * i) * kPStride];
CAD_UNROLL
      for (int j = 0; j < kKeysPerLane; ++j) {
        const float pj = exp2f(sc[i][j] - base);
        sum[i] += pj;
        p_row[j8 + kLanes * j] = pj;
      }
    }
CAD_UNROLL
    for (int i = 0; i < kRowsPerThread; i += 2) group_reduce2<false>(sum[i], sum[i + 1]);
CAD_UNROLL
    for (int i = 0; i < kRowsPerThread; ++i) {
      l[i] = l[i] * alpha[i] + sum[i];
CAD_UNROLL
      for (int c = 0; c < 2 * kPairs; ++c) acc[i][c] *= alpha[i];
    }
    __syncwarp();  // P rows are written and read by the same 8 lanes' warp

    const uint32_t tile_keys = min(uint32_t(kKeys), num_keys - k0);
    for (uint32_t key = 0; key < tile_keys; ++key) {
      float pk[kRowsPerThread];
CAD_UNROLL
      for (int i = 0; i < kRowsPerThread; ++i) pk[i] = p_s[(rg + kRowGroups * i) * kPStride + key];
CAD_UNROLL
      for (int c = 0; c < kPairs; ++c) {
        const F2 vf = load2(&v_s[key * kStride + 2 * (j8 + kLanes * c)]);
CAD_UNROLL
        for (int i = 0; i < kRowsPerThread; ++i) {
          acc[i][2 * c] = fmaf(pk[i], vf.x, acc[i][2 * c]);
          acc[i][2 * c + 1] = fmaf(pk[i], vf.y, acc[i][2 * c + 1]);
        }
      }
    }
  }

CAD_UNROLL
  for (int i = 0; i < kRowsPerThread; ++i) {
    const uint32_t r = rg + kRowGroups * i;
    if (r >= nrows) continue;
    const float inv = 1.0f / l[i];
    const size_t head = size_t(kvh) * group + r % group;
    const size_t tok = q_first + tok0 + r / group;
    T* o = static_cast<T*>(p.out) + (tok * num_heads + head) * D;
CAD_UNROLL
    for (int c = 0; c < kPairs; ++c) {
      store2(o + 2 * (j8 + kLanes * c), acc[i][2 * c] * inv, acc[i][2 * c + 1] * inv);
    }
  }
}

}  // namespace

// One kernel per (head_dim, dtype); the launcher's table (attention/head_dims.rs) names them.
#define CAD_PREFILL(D)                                                                            \
  CAD_KERNEL_BOUNDS(cad_paged_attention_prefill_d##D##_bf16, CadPagedAttnParams, p, kThreads) {   \
    paged_prefill<cad::bf16, D>(p);                                                               \
  }                                                                                               \
  CAD_KERNEL_BOUNDS(cad_paged_attention_prefill_d##D##_f16, CadPagedAttnParams, p, kThreads) {    \
    paged_prefill<cad::f16, D>(p);                                                                \
  }
CAD_PREFILL(16)
CAD_PREFILL(32)
CAD_PREFILL(64)
CAD_PREFILL(80)
CAD_PREFILL(96)
CAD_PREFILL(128)
CAD_PREFILL(256)
