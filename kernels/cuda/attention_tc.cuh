// What the tensor-core attention kernels share (attention_prefill_tc.cu, attention_decode_tc.cu):
// the shared-memory layout of a K/V tile and the gather that fills it from the paged cache, a
// warp's Q fragments and its online-softmax step, in the mma.m16n8k16 accumulator layout of
// mma.cuh (lane (g, t4) holds rows g and g + 8).
#pragma once
#include "common.cuh"
#include "mma.cuh"
#include "params/attention.h"

namespace cad {

/// A K or V tile of KEYS rows of D 16-bit elements in shared memory, laid out so the 8 rows an
/// ldmatrix phase reads (16 bytes each, at one column) fall in distinct banks: rows padded by 8
/// elements, or with kSwizzle (rows of a multiple of 8 16-byte chunks) unpadded, chunk c of row
/// r stored at chunk c ^ (r % 8).
template <int D, int KEYS, bool kSwizzle>
struct KvTile {
  static constexpr int kRowVecs = D / 8;  // 16-byte vectors per row
  static_assert(!kSwizzle || kRowVecs % 8 == 0, "a swizzled row is a multiple of 8 vectors");
  static constexpr int kKeys = KEYS;
  static constexpr int kStride = kSwizzle ? D : D + 8;
  static constexpr int kElems = KEYS * kStride;
  /// Element offset of dims `dim`..`dim + 7` (dim a multiple of 8) of key `key`.
  __device__ __forceinline__ static int at(uint32_t key, uint32_t dim) {
    const uint32_t chunk = dim / 8;
    return int(key * kStride + (kSwizzle ? (chunk ^ (key % 8)) : chunk) * 8);
  }
};

/// One KV head's keys and values of one sequence in the paged pools: its block table, and the
/// end of the keys this CTA may see (keys at or past it, or in a block outside the cache, are
/// copied as zeros).
template <class T>
struct KvGather {
  const T* k_head;  // the pools at this KV head's first dim
  const T* v_head;
  const uint32_t* table;
  size_t slot_stride;  // elements per cache slot (num_kv_heads x head_dim)
  uint32_t block_size;
  uint32_t num_blocks;
  uint32_t end;

  /// KV head `kvh` of sequence `seq` in `p`'s pools at head dim D, keys before `end`.
  template <int D>
  __device__ __forceinline__ static KvGather of(const CadPagedAttnParams& p, uint32_t kvh,
                                                uint32_t seq, uint32_t end) {
    const CadPagedBatch& b = p.batch;
    return KvGather{static_cast<const T*>(p.k_cache) + size_t(kvh) * D,
                    static_cast<const T*>(p.v_cache) + size_t(kvh) * D,
                    b.block_tables + size_t(seq) * b.max_blocks_per_seq,
                    size_t(p.shape.num_kv_heads) * D,
                    p.shape.block_size,
                    p.shape.num_blocks,
                    end};
  }
};

/// Starts the cp.async copies of keys k0..k0 + L::kKeys into the tile pair at `stage` (K, then V
/// L::kElems later) by the CTA's THREADS threads, and commits them as one group.
template <class L, int THREADS, class T>
__device__ __forceinline__ void issue_kv_tile(T* stage, const KvGather<T>& src, uint32_t k0) {
  constexpr int kTileVecs = L::kKeys * L::kRowVecs;
  constexpr int kCopies = (kTileVecs + THREADS - 1) / THREADS;  // per thread, of K and of V
CAD_UNROLL
  for (int n = 0; n < kCopies; ++n) {
    const uint32_t i = threadIdx.x + n * THREADS;
    if (kTileVecs % THREADS != 0 && i >= kTileVecs) break;
    const uint32_t key = i / L::kRowVecs, dim = (i % L::kRowVecs) * 8;
    const uint32_t pos = k0 + key;
    bool valid = pos < src.end;
    size_t off = 0;
    if (valid) {
      const uint32_t block = src.table[pos / src.block_size];
      valid = block < src.num_blocks;
      off = (size_t(block) * src.block_size + pos % src.block_size) * src.slot_stride + dim;
    }
    const int at = L::at(key, dim);
    cp_async16(&stage[at], src.k_head + (valid ? off : 0), valid);
    cp_async16(&stage[L::kElems + at], src.v_head + (valid ? off : 0), valid);
  }
  cp_async_commit();
}

/// A ring of STAGES K/V tile pairs (layout L) in shared memory that the CTA's THREADS threads
/// fill by cp.async, STAGES - 1 tiles ahead of the one being computed: tile i of the walk
/// (keys begin + i L::kKeys ..) goes to stage i % STAGES in commit group i, and groups past the
/// last tile are committed empty to keep the count, so waiting for all but STAGES - 2 groups
/// always means the tile asked for has landed.
template <class L, int STAGES, int THREADS, class T>
struct KvRing {
  static_assert(STAGES >= 2, "a ring has a tile in flight while one is computed");
  T* ring;
  KvGather<T> src;
  uint32_t begin;  // the walk's first key
  uint32_t tiles;  // tiles of the walk

  /// Starts the copies of the first STAGES - 1 tiles.
  __device__ __forceinline__ void start() const {
CAD_UNROLL
    for (int st = 0; st < STAGES - 1; ++st) issue(uint32_t(st));
  }

  /// Waits until tile `it` has landed and every warp is done with tile it - 1, whose stage it
  /// then refills with tile it + STAGES - 1; returns tile it's K (its V follows L::kElems
  /// later). Every thread of the CTA calls it for each tile in turn (it has a barrier).
  __device__ __forceinline__ const T* wait(uint32_t it) const {
    cp_async_wait<STAGES - 2>();
    __syncthreads();
    issue(it + STAGES - 1);
    return ring + 2 * (it % STAGES) * L::kElems;
  }

 private:
  /// Tile `i`'s copies, or an empty group past the last tile.
  __device__ __forceinline__ void issue(uint32_t i) const {
    if (i < tiles) {
      issue_kv_tile<L, THREADS>(ring + 2 * (i % STAGES) * L::kElems, src, begin + i * L::kKeys);
    } else {
      cp_async_commit();
    }
  }
};

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
