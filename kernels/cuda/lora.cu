// Multi-LoRA deltas for a batch mixing adapters (CPU twin: kernels::lora::add_lora_fused), in two
// launches per fused call, each covering every projection that reads the same input (q/k/v, gate/up):
//   shrink  v[z, t, part, k] = x_t[cols of z] . A_part,slot[k][cols of z]   (f32, a workspace)
//   expand  y[t, off_part + o] += scale * sum_k (sum_z v[z, t, part, k]) B_part,slot[o, k]
// The shrink splits the input columns into kSplitCols-wide splits z (grid.z), each block
// reducing one: a decode tile is a few tokens against rank rows of up to 14k columns, and one
// block walking a whole row left a few dozen blocks on the GPU, each a chain of dependent loads.
// The expand adds the splits' partial sums in order.
// Two ways to map tokens to blocks, sharing the bodies below:
//   BGMV (decode): one block per token, its slot from a per-token list (0xffffffff: base only);
//   SGMV: one block per tile of up to kTileTokens tokens on one slot, so each A and B value read
//   serves the whole tile: a prefill run's consecutive tokens, or a decode batch's tokens grouped
//   by adapter (built on the host, kernels/src/gpu/lora/batch.rs; a tile names its rows, which
//   need not be adjacent).
// Every output value is the same sequence of f32 operations whichever way it is mapped (each
// lane's fused multiply-adds over its columns in order, the 32 lanes summed in order through
// shared memory, the rank terms in order), so a token's delta is bit-identical alone, in a BGMV
// batch, or inside any SGMV tile.
#include "common.cuh"
#include "params/lora.h"

#include <type_traits>

#if defined(__CUDACC__)
#define LORA_UNROLL _Pragma("unroll")
#define LORA_UNROLL4 _Pragma("unroll 4")
#else
#define LORA_UNROLL
#define LORA_UNROLL4
#endif

namespace {

constexpr uint32_t kNoSlot = 0xffffffffu;
/// Tokens per SGMV tile (kernels/src/gpu/lora.rs cuts segments into tiles of this many).
constexpr int kTileTokens = 16;
/// Shrink: 8 warps, each owning up to ROWS rank rows (BGMV 4, SGMV 2 next to its 16 tokens), so
/// a block covers 32 or 16 rows of A (`shrink_rows` in kernels/src/gpu/lora.rs), over one split
/// of kSplitCols input columns (`SPLIT_COLS` there), staged in shared memory.
constexpr int kShrinkThreads = 256;
constexpr uint32_t kSplitCols = 1024;
constexpr int kShrinkWarps = kShrinkThreads / 32;
/// Expand: each block covers 512 consecutive outputs of one part.
constexpr uint32_t kOutTile = 512;
constexpr int kBgmvExpandThreads = 64;    // x 8 outputs (one 16-byte load of B per rank row)
constexpr int kSgmvExpandThreads = 128;   // x 4 outputs (8 bytes), leaving registers for 16 tokens

/// `N` consecutive 16-bit values, read or written as one aligned vector (ld.global.v4 for 8).
template <int N>
struct alignas(2 * N) Pack {
  uint16_t h[N];
};

/// Reads N values from global memory the kernel does not write (A, B, x), through the read-only
/// data path where there is one.
template <int N>
__device__ __forceinline__ Pack<N> load_global(const void* p) {
  Pack<N> r;
#if defined(__CUDA_ARCH__)
  static_assert(N == 4 || N == 8, "8- or 16-byte vectors");
  if constexpr (N == 8) {
    const uint4 v = __ldg(static_cast<const uint4*>(p));
    memcpy(&r, &v, sizeof(r));
  } else {
    const uint2 v = __ldg(static_cast<const uint2*>(p));
    memcpy(&r, &v, sizeof(r));
  }
#else
  r = *static_cast<const Pack<N>*>(p);
#endif
  return r;
}

template <class T, int N>
__device__ __forceinline__ void unpack(const Pack<N>& raw, float (&out)[N]) {
  LORA_UNROLL
  for (int j = 0; j < N; ++j) {
    T e;
    memcpy(&e, &raw.h[j], sizeof(T));
    out[j] = cad::to_f32(e);
  }
}

/// `N` values of a global row as f32.
template <class T, int N>
__device__ __forceinline__ void load_vec(const T* p, float (&out)[N]) {
  unpack<T, N>(load_global<N>(p), out);
}

/// `N` values of a shared-memory row as f32.
template <class T, int N>
__device__ __forceinline__ void load_shared_vec(const T* p, float (&out)[N]) {
  const Pack<N> raw = *reinterpret_cast<const Pack<N>*>(p);
  unpack<T, N>(raw, out);
}

/// The tokens one block works on, all on adapter `slot` (len 0: none): BGMV's token `first`;
/// an SGMV tile's `len` tokens rows[first], rows[first + 1], ... (consecutive tokens from
/// `first` when `rows` is null: BGMV, and a prefill run's tiles).
struct Unit {
  uint32_t first, len, slot;
  const uint32_t* rows;

  /// The batch row (token) of the unit's token `i`.
  __device__ __forceinline__ uint32_t row(uint32_t i) const {
    return rows != nullptr ? __ldg(rows + first + i) : first + i;
  }
};

template <int TOK>
__device__ __forceinline__ Unit unit_of(const LoraParams& p, uint32_t u) {
  Unit r;
  if (TOK == 1) {
    r = Unit{u, 1, __ldg(p.token_slots + u), nullptr};
  } else {
    const uint32_t* t = p.tiles + 3 * size_t(u);
    r = Unit{__ldg(t), __ldg(t + 1), __ldg(t + 2), p.tile_rows};
  }
  if (r.slot == kNoSlot || r.slot >= p.num_slots) r.len = 0;
  return r;
}

/// Which part grid.y index `y` falls in, part i spanning its `shrink_blocks` (or
/// `expand_blocks`); `y` becomes the block's index within its part. -1 past the last part.
/// (Constant indices only, so the parameter struct stays in the constant bank.)
template <bool kShrink>
__device__ __forceinline__ int find_part(const LoraParams& p, uint32_t& y) {
  int found = -1;
  LORA_UNROLL
  for (int i = 0; i < CAD_LORA_MAX_PARTS; ++i) {
    if (found < 0 && uint32_t(i) < p.num_parts) {
      const uint32_t n = kShrink ? p.parts[i].shrink_blocks : p.parts[i].expand_blocks;
      if (y < n) {
        found = i;
      } else {
        y -= n;
      }
    }
  }
  return found;
}

__device__ __forceinline__ LoraPart part_at(const LoraParams& p, int i) {
  LoraPart r = p.parts[0];
  if (i == 1) r = p.parts[1];
  if (i == 2) r = p.parts[2];
  return r;
}

/// Copies columns `c0..c0 + cols` of the unit's input rows into `xs` (`[TOK][CHUNK]`), zeros
/// past `in_dim` and for the tile's missing tokens. 16-byte loads when rows allow. Run by the
/// shrink's kShrinkThreads threads.
template <class T, int TOK, int CHUNK>
__device__ __forceinline__ void stage_x(T* xs, const T* x_all, const Unit& u, uint32_t c0,
                                        uint32_t cols, uint32_t in_dim, bool vec) {
  const uint32_t len = u.len;
  auto x_row = [&](uint32_t tok) { return x_all + size_t(u.row(tok)) * in_dim; };
  if (vec) {
    // Every load of the thread first, then every store: a warp issues in order and would stall
    // at the first store of a loaded value, leaving one load in flight per thread.
    constexpr uint32_t kPer = (TOK * CHUNK / 8 + kShrinkThreads - 1) / kShrinkThreads;
    const uint32_t per_row = cols / 8;
    Pack<8> vals[kPer];
    LORA_UNROLL
    for (uint32_t it = 0; it < kPer; ++it) {
      const uint32_t i = threadIdx.x + it * kShrinkThreads;
      const uint32_t tok = i / per_row, c = (i % per_row) * 8;
      vals[it] = Pack<8>{};
      if (i < TOK * per_row && tok < len && c0 + c < in_dim) {
        vals[it] = load_global<8>(x_row(tok) + c0 + c);
      }
    }
    LORA_UNROLL
    for (uint32_t it = 0; it < kPer; ++it) {
      const uint32_t i = threadIdx.x + it * kShrinkThreads;
      if (i < TOK * per_row) {
        const uint32_t tok = i / per_row, c = (i % per_row) * 8;
        *reinterpret_cast<Pack<8>*>(xs + tok * CHUNK + c) = vals[it];
      }
    }
  } else {
    for (uint32_t i = threadIdx.x; i < TOK * cols; i += blockDim.x) {
      const uint32_t tok = i / cols, c = i % cols;
      const bool in = tok < len && c0 + c < in_dim;
      xs[tok * CHUNK + c] = in ? x_row(tok)[c0 + c] : cad::from_f32<T>(0.0f);
    }
  }
}

/// Columns `j..j + 8` of one warp's first `R` rank rows (`rows[r]`, pointing at this chunk)
/// against the first `USED` staged tokens.
template <class T, int TOK, int CHUNK, int ROWS, int R, int USED>
__device__ __forceinline__ void dot_cols(const T* const (&rows)[ROWS], const T* xs, uint32_t j,
                                         float (&acc)[ROWS][TOK]) {
  static_assert(USED <= TOK, "at most the staged tokens");
  float w[R][8];
  LORA_UNROLL
  for (int r = 0; r < R; ++r) load_vec<T, 8>(rows[r] + j, w[r]);
  LORA_UNROLL
  for (int tok = 0; tok < USED; ++tok) {
    float xv[8];
    load_shared_vec<T, 8>(xs + tok * CHUNK + j, xv);
    LORA_UNROLL
    for (int r = 0; r < R; ++r) {
      LORA_UNROLL
      for (int e = 0; e < 8; ++e) acc[r][tok] = fmaf(w[r][e], xv[e], acc[r][tok]);
    }
  }
}

/// One warp's first `R` rank rows against the first `USED` staged tokens: lane l takes columns
/// l*8.. of every 256, in increasing order.
template <class T, int TOK, int CHUNK, int ROWS, int R, int USED>
__device__ __forceinline__ void dot_rows(const T* const (&rows)[ROWS], const T* xs, uint32_t cols,
                                         float (&acc)[ROWS][TOK]) {
  const uint32_t lane = threadIdx.x % 32;
  if constexpr (CHUNK > 256) {
    // A whole split (1024 columns): several 16-byte loads of each row in flight.
    LORA_UNROLL4
    for (uint32_t j = lane * 8; j < cols; j += 256) {
      dot_cols<T, TOK, CHUNK, ROWS, R, USED>(rows, xs, j, acc);
    }
  } else {
    for (uint32_t j = lane * 8; j < cols; j += 256) {
      dot_cols<T, TOK, CHUNK, ROWS, R, USED>(rows, xs, j, acc);
    }
  }
}

/// `dot_rows` for the warp's `n` valid rows (warp-uniform), with `R` fixed at compile time.
template <class T, int TOK, int CHUNK, int ROWS, int USED, int R = ROWS>
__device__ __forceinline__ void dot_valid_rows(int n, const T* const (&rows)[ROWS], const T* xs,
                                               uint32_t cols, float (&acc)[ROWS][TOK]) {
  if constexpr (R >= 1) {
    if (n == R) {
      dot_rows<T, TOK, CHUNK, ROWS, R, USED>(rows, xs, cols, acc);
    } else {
      dot_valid_rows<T, TOK, CHUNK, ROWS, USED, R - 1>(n, rows, xs, cols, acc);
    }
  }
}

/// Calls `f(std::integral_constant<int, USED>{})` with USED the unit's `len` tokens rounded up
/// to a power of two, at most TOK (block-uniform), so shrink and expand multiply only those: a
/// decode batch over many adapters has tiles of a few tokens, and multiplying the staged zero
/// rows of the others made the shrink compute-bound (16 tokens' FMAs per A value for a tile of
/// 4). Each computed value is the same sequence of FMAs whatever USED is.
template <int TOK, class F>
__device__ __forceinline__ void with_used_tokens(uint32_t len, F&& f) {
  if constexpr (TOK > 1) {
    if (len <= uint32_t(TOK / 2)) {
      with_used_tokens<TOK / 2>(len, f);
      return;
    }
  }
  f(std::integral_constant<int, TOK>{});
}

/// Shrink: block (unit, part x group of 8 * ROWS rank rows, split). The split's CHUNK input
/// columns are staged in shared memory; each warp streams its rows of A with 16-byte loads.
template <class T, int TOK, int CHUNK, int ROWS>
__device__ void shrink(const LoraParams& p) {
  static_assert(CHUNK == int(kSplitCols), "a block reduces one split");
  constexpr uint32_t kRowsPerBlock = kShrinkWarps * ROWS;
  // The staged input and, after the last chunk, the lanes' partial sums share one buffer (the
  // two together would pass the 48 KB of static shared memory at SGMV's chunk).
  constexpr int V = ROWS * TOK, kLaneStride = V + 1, kWarpStride = 32 * kLaneStride + V;
  constexpr size_t kXsBytes = sizeof(T) * TOK * CHUNK;
  constexpr size_t kPartialBytes = sizeof(float) * kShrinkWarps * kWarpStride;
  __align__(16) __shared__ unsigned char smem[kXsBytes > kPartialBytes ? kXsBytes : kPartialBytes];
  T* xs = reinterpret_cast<T*>(smem);
  float* partial = reinterpret_cast<float*>(smem);
  const Unit u = unit_of<TOK>(p, blockIdx.x);
  if (u.len == 0) return;
  uint32_t group = blockIdx.y;
  const int pi = find_part<true>(p, group);
  if (pi < 0) return;
  const LoraPart part = part_at(p, pi);
  const uint32_t rank = __ldg(part.ranks + size_t(u.slot) * part.table_stride);
  const uint32_t row0 = group * kRowsPerBlock;
  if (row0 >= rank) return;  // the whole block: before any barrier

  const uint32_t warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const T* a = static_cast<const T*>(part.a) + size_t(u.slot) * part.max_rank * p.in_stride;
  const bool x_vec = p.in_dim % 8 == 0 && reinterpret_cast<uintptr_t>(p.x) % 16 == 0;
  uint32_t k[ROWS];
  int num_rows = 0;  // warp-uniform; the valid rows come first
  LORA_UNROLL
  for (int r = 0; r < ROWS; ++r) {
    k[r] = row0 + warp + r * kShrinkWarps;
    if (k[r] < rank) ++num_rows;
  }
  float acc[ROWS][TOK] = {};
  const uint32_t split = blockIdx.z, c0 = split * CHUNK;
  if (c0 >= p.in_stride) return;  // the whole block: before any barrier
  const uint32_t cols = min(uint32_t(CHUNK), p.in_stride - c0);
  stage_x<T, TOK, CHUNK>(xs, static_cast<const T*>(p.x), u, c0, cols, p.in_dim, x_vec);
  __syncthreads();
  const T* rows[ROWS];
  LORA_UNROLL
  for (int r = 0; r < ROWS; ++r) rows[r] = a + size_t(min(k[r], rank - 1)) * p.in_stride + c0;
  with_used_tokens<TOK>(u.len, [&](auto used) {
    dot_valid_rows<T, TOK, CHUNK, ROWS, decltype(used)::value>(num_rows, rows, xs, cols, acc);
  });
  // Sum each (row, token) over the 32 lanes through shared memory: one barrier, where warp
  // shuffles would take 5 rounds per value. Lanes are summed in order 0..31 whatever the mapping,
  // and the splits are the same columns under both, so BGMV and SGMV give the same bits. Rows
  // padded so writes and reads avoid bank conflicts.
  __syncthreads();  // every warp is done reading xs, which `partial` overwrites
  LORA_UNROLL
  for (int r = 0; r < ROWS; ++r) {
    LORA_UNROLL
    for (int tok = 0; tok < TOK; ++tok) {
      partial[warp * kWarpStride + lane * kLaneStride + r * TOK + tok] = acc[r][tok];
    }
  }
  __syncthreads();
  for (uint32_t i = threadIdx.x; i < kShrinkWarps * V; i += kShrinkThreads) {
    const uint32_t w = i / V, r = (i % V) / TOK, tok = i % TOK;
    const uint32_t kr = row0 + w + r * kShrinkWarps;
    if (kr >= rank || tok >= u.len) continue;
    const float* in = partial + w * kWarpStride + (i % V);
    float s = 0.0f;
    for (int l = 0; l < 32; ++l) s += in[l * kLaneStride];
    const size_t at = size_t(split) * p.v_split_stride + size_t(u.row(tok)) * p.v_stride;
    p.v[at + part.v_offset + kr] = s;
  }
}

/// acc[tok][j] += sum over the rank rows k of vs[tok][k] B[k][j], for the first `USED` tokens.
template <class T, int TOK, int VEC, int USED>
__device__ __forceinline__ void expand_tokens(const T* b, uint32_t out_stride, const float* vs,
                                              uint32_t rank, float (&acc)[TOK][VEC]) {
  static_assert(USED <= TOK, "at most the unit's tokens");
  LORA_UNROLL4
  for (uint32_t k = 0; k < rank; ++k) {
    float w[VEC];
    load_vec<T, VEC>(b + size_t(k) * out_stride, w);
    LORA_UNROLL
    for (int tok = 0; tok < USED; ++tok) {
      const float vk = vs[tok * rank + k];
      LORA_UNROLL
      for (int j = 0; j < VEC; ++j) acc[tok][j] = fmaf(vk, w[j], acc[tok][j]);
    }
  }
}

/// Expand: block (unit, part x tile of kOutTile outputs); each thread owns VEC consecutive
/// outputs of every token in the unit and streams B's rank rows (contiguous over outputs).
template <class T, int TOK, int VEC, int THREADS>
__device__ void expand(const LoraParams& p) {
  static_assert(THREADS * VEC == kOutTile, "a block covers one output tile");
  CAD_DYNAMIC_SMEM(float, vs);  // [TOK][rank]
  const Unit u = unit_of<TOK>(p, blockIdx.x);
  if (u.len == 0) return;
  uint32_t tile = blockIdx.y;
  const int pi = find_part<false>(p, tile);
  if (pi < 0) return;
  const LoraPart part = part_at(p, pi);
  const uint32_t rank = __ldg(part.ranks + size_t(u.slot) * part.table_stride);
  if (rank == 0) return;  // this projection has no adapter in the slot

  // The shrink's splits summed in order (the same bits under either mapping).
  for (uint32_t i = threadIdx.x; i < TOK * rank; i += THREADS) {
    const uint32_t tok = i / rank, k = i % rank;
    float s = 0.0f;
    if (tok < u.len) {
      const float* v = p.v + size_t(u.row(tok)) * p.v_stride + part.v_offset + k;
      for (uint32_t z = 0; z < p.num_splits; ++z) s += v[size_t(z) * p.v_split_stride];
    }
    vs[i] = s;
  }
  __syncthreads();
  const uint32_t o0 = tile * kOutTile + threadIdx.x * VEC;
  if (o0 >= part.out_dim) return;  // after the block's only barrier
  // out_stride is a multiple of 8 >= out_dim, so all VEC columns from o0 lie in the row.
  const T* b = static_cast<const T*>(part.b) + size_t(u.slot) * part.max_rank * part.out_stride + o0;
  T* y = static_cast<T*>(p.y) + part.y_offset + o0;  // plus each token's row
  float acc[TOK][VEC] = {};
  with_used_tokens<TOK>(u.len, [&](auto used) {
    expand_tokens<T, TOK, VEC, decltype(used)::value>(b, part.out_stride, vs, rank, acc);
  });
  const float scale = __ldg(part.scales + size_t(u.slot) * part.table_stride);
  // One vector load and store per token where the VEC outputs are whole and aligned (o0 is a
  // multiple of VEC), else element by element; the same arithmetic either way. (Loading every
  // token's vector before storing any took the SGMV expand from 95 to 143 registers and 5 to 3
  // blocks per SM, and made 4-token tiles slower on the H200: 5.57 -> 6.65 ms of LoRA per step
  // at 64 adapters; reverted.)
  const bool y_vec = o0 + VEC <= part.out_dim && p.y_stride % VEC == 0 &&
                     part.y_offset % VEC == 0 &&
                     reinterpret_cast<uintptr_t>(p.y) % (2 * VEC) == 0;
  LORA_UNROLL
  for (int tok = 0; tok < TOK; ++tok) {
    if (uint32_t(tok) >= u.len) break;
    T* yt = y + size_t(u.row(tok)) * p.y_stride;
    if (y_vec) {
      Pack<VEC> raw = cad::pun_load<Pack<VEC>>(yt);
      float cur[VEC];
      unpack<T, VEC>(raw, cur);
      LORA_UNROLL
      for (int j = 0; j < VEC; ++j) {
        const T e = cad::from_f32<T>(fmaf(scale, acc[tok][j], cur[j]));
        memcpy(&raw.h[j], &e, sizeof(T));
      }
      cad::pun_store(yt, raw);
    } else {
      LORA_UNROLL
      for (int j = 0; j < VEC; ++j) {
        if (o0 + j < part.out_dim) yt[j] = cad::from_f32<T>(fmaf(scale, acc[tok][j], cad::to_f32(yt[j])));
      }
    }
  }
}

}  // namespace

// BGMV: grid (num_tokens, sum of parts' blocks, splits); SGMV: grid (num_tiles, same, splits). A
// split's 1024 input columns give each lane four 16-byte loads of each of its rows in flight
// (SGMV stages them for its 16 tokens: 32 KB).
CAD_KERNEL_BOUNDS(cad_lora_shrink_bgmv_bf16, LoraParams, p, kShrinkThreads) { shrink<cad::bf16, 1, kSplitCols, 4>(p); }
CAD_KERNEL_BOUNDS(cad_lora_shrink_bgmv_f16, LoraParams, p, kShrinkThreads) { shrink<cad::f16, 1, kSplitCols, 4>(p); }
CAD_KERNEL_BOUNDS(cad_lora_shrink_sgmv_bf16, LoraParams, p, kShrinkThreads) { shrink<cad::bf16, kTileTokens, kSplitCols, 2>(p); }
CAD_KERNEL_BOUNDS(cad_lora_shrink_sgmv_f16, LoraParams, p, kShrinkThreads) { shrink<cad::f16, kTileTokens, kSplitCols, 2>(p); }
// Expand: grid (units, sum of parts' blocks).
CAD_KERNEL_BOUNDS(cad_lora_expand_bgmv_bf16, LoraParams, p, kBgmvExpandThreads) {
  expand<cad::bf16, 1, 8, kBgmvExpandThreads>(p);
}
CAD_KERNEL_BOUNDS(cad_lora_expand_bgmv_f16, LoraParams, p, kBgmvExpandThreads) {
  expand<cad::f16, 1, 8, kBgmvExpandThreads>(p);
}
CAD_KERNEL_BOUNDS(cad_lora_expand_sgmv_bf16, LoraParams, p, kSgmvExpandThreads) {
  expand<cad::bf16, kTileTokens, 4, kSgmvExpandThreads>(p);
}
CAD_KERNEL_BOUNDS(cad_lora_expand_sgmv_f16, LoraParams, p, kSgmvExpandThreads) {
  expand<cad::f16, kTileTokens, 4, kSgmvExpandThreads>(p);
}
