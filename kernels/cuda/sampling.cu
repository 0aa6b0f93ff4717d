// Sampling on the device: an optional allowed-token mask (structured outputs), penalties, greedy
// argmax, temperature, top-k, top-p, min-p, the inverse-CDF draw with the request's uniform `u`,
// and raw top-N logprobs. One CTA per row (request), any vocabulary up to 2^23; only the sampled
// ids and requested logprobs are written.
// CPU twin: kernels/src/sampling/ (the one definition of the math; read its docs first).
//
// Design: the row stays in global memory (a 256k vocabulary does not fit in shared memory) and
// is streamed a few times, coalesced (thread i reads ids i, i + blockDim, ...):
// - selections (the k-th value of top-k, the nucleus boundary of top-p, the N-th raw logit)
//   are exact radix selects: four passes over 8-bit digits of an order-preserving u32 key,
//   histograms of integer weights in shared memory (counts, or fixed-point masses), so the
//   result is deterministic whatever order the atomics land in;
// - ties at a selected key keep the lowest ids, found by an ordered select: each warp owns a
//   contiguous id range, warp totals are scanned, and one warp walks its range 32 ids a step;
// - the draw is the same ordered select over the survivors' fixed-point weights in ascending id
//   order: integer prefix sums, so it is exact and equal to the CPU's for the same weights.
// Floating-point operations whose rounding decides a token (penalties, temperature, the weights'
// exp, a polynomial of the CPU twin's rather than expf) are written unfused (__fmul_rn...) as in
// the CPU twin, so a row's weights, and with them the token, are the same bits on both.
#include "common.cuh"
#include "params/sampling.h"

namespace {

constexpr uint32_t kNone = 0xffffffffu;
constexpr unsigned kFull = 0xffffffffu;
/// Fixed-point scale of weights (kernels::sampling::WEIGHT_ONE).
constexpr float kWeightOne = 1099511627776.0f;  // 2^40
/// FLT_MAX: `!(|x| <= kMaxFinite)` holds exactly for NaN and +-inf.
constexpr float kMaxFinite = 3.402823466e+38f;
using u64 = unsigned long long;

struct Shared {
  u64 hist[256];
  u64 warp_u64[32];
  float warp_f32[32];
  // radix select state
  uint32_t prefix;
  int found;
  u64 above, need, at;
  // ordered select state
  uint32_t sel_warp, sel_id;
  u64 sel_before, sel_target;
  // top-N collection
  uint32_t top_count;
  uint32_t top_id[CAD_SAMPLE_MAX_LOGPROBS];
};

__device__ __forceinline__ float sanitize(float l) { return l != l ? -INFINITY : l; }

/// Monotone map of floats to u32 (total order: -0 below +0).
__device__ __forceinline__ uint32_t order_key(float v) {
  const uint32_t b = __float_as_uint(v);
  return (b & 0x80000000u) ? ~b : (b | 0x80000000u);
}

__device__ __forceinline__ u64 fixed_weight(float w) { return (u64)(w * kWeightOne); }

/// kernels::sampling::weights::NEGLIGIBLE: below it, `s - max` weighs 0.
constexpr float kNegligible = -30.0f;

/// e^x for kNegligible <= x <= 0, 0 below it and for NaN: the CPU twin's polynomial
/// (kernels::sampling::weights::exp_near_zero) by the same unfused f32 operations, so the same
/// bits. e^x = 2^n e^r, n = round(x / ln 2) by adding and subtracting 1.5 * 2^23, r = x - n ln 2
/// (ln 2 in two parts), e^r by its Taylor series to the 7th power.
__device__ __forceinline__ float weight_below(float x) {
  const float rounder = 12582912.0f;  // 0x4B400000
  const float shifted = __fadd_rn(__fmul_rn(x, __uint_as_float(0x3FB8AA3Bu)), rounder);  // log2(e)
  const float n = __fsub_rn(shifted, rounder);
  const float r = __fsub_rn(__fsub_rn(x, __fmul_rn(n, 0.693359375f)), __fmul_rn(n, -2.1219444e-4f));
  const float coef[7] = {1.0f / 720.0f, 1.0f / 120.0f, 1.0f / 24.0f, 1.0f / 6.0f, 0.5f, 1.0f, 1.0f};
  float p = 1.0f / 5040.0f;
CAD_UNROLL
  for (int i = 0; i < 7; ++i) p = __fadd_rn(__fmul_rn(p, r), coef[i]);
  const uint32_t exponent = __float_as_uint(shifted) - 0x4B400000u + 127u;
  const float e = __fmul_rn(p, __uint_as_float(exponent << 23));
  return x >= kNegligible ? e : 0.0f;
}

__device__ __forceinline__ u64 warp_sum_u64(u64 v) {
  for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(kFull, v, o);
  return v;
}

__device__ __forceinline__ u64 warp_max_u64(u64 v) {
  for (int o = 16; o > 0; o >>= 1) {
    const u64 x = __shfl_xor_sync(kFull, v, o);
    v = x > v ? x : v;
  }
  return v;
}

/// Block-wide u64 sum or max (every thread gets it), as cad::block_sum.
template <bool kMax>
__device__ u64 block_reduce_u64(u64 v, Shared& sh) {
  const unsigned lane = threadIdx.x % 32, warp = threadIdx.x / 32, warps = blockDim.x / 32;
  v = kMax ? warp_max_u64(v) : warp_sum_u64(v);
  __syncthreads();
  if (lane == 0) sh.warp_u64[warp] = v;
  __syncthreads();
  v = lane < warps ? sh.warp_u64[lane] : 0;
  return kMax ? warp_max_u64(v) : warp_sum_u64(v);
}

/// Argmax of a row (NaN as -inf, -0 equal to +0), ties to the lowest id; kNone if all -inf.
__device__ uint32_t block_argmax(const float* row, uint32_t n, Shared& sh) {
  u64 best = 0;
  for (uint32_t id = threadIdx.x; id < n; id += blockDim.x) {
    float v = sanitize(row[id]);
    if (v == 0.0f) v = 0.0f;
    const u64 packed = (u64(order_key(v)) << 32) | u64(kNone - id);
    best = packed > best ? packed : best;
  }
  best = block_reduce_u64<true>(best, sh);
  return uint32_t(best >> 32) <= order_key(-INFINITY) ? kNone : kNone - uint32_t(best);
}

struct Selected {
  bool found;
  uint32_t key;
  u64 above;  // weight with a larger key
  u64 at;     // weight with exactly `key`
};

/// Warp 0: the bin of this digit where the weight, accumulated from the top bin down, first
/// reaches `sh.need`; narrows the prefix to it.
__device__ void pick_bin(Shared& sh, int shift) {
  const unsigned lane = threadIdx.x;
  u64 s = 0;
  for (int j = 0; j < 8; ++j) s += sh.hist[255 - 8 * lane - j];
  u64 incl = s;
  for (int o = 1; o < 32; o <<= 1) {
    const u64 t = __shfl_up_sync(kFull, incl, o);
    if (lane >= unsigned(o)) incl += t;
  }
  const u64 need = sh.need;
  const unsigned hit = __ballot_sync(kFull, incl - s < need && incl >= need);
  if (hit == 0) {
    if (lane == 0) sh.found = 0;
  } else if (lane == unsigned(__ffs(hit) - 1)) {
    u64 acc = incl - s;
    for (int j = 0; j < 8; ++j) {
      const uint32_t b = 255 - 8 * lane - j;
      const u64 h = sh.hist[b];
      if (acc + h >= need) {
        sh.prefix |= b << shift;
        sh.above += acc;
        sh.need = need - acc;
        sh.at = h;
        break;
      }
      acc += h;
    }
  }
}

/// Exact radix select over ids [0, n): `item(id, key, weight)` gives each id a u32 key and a
/// weight (0 = not a candidate). Finds the key at which the weight accumulated in descending
/// key order first reaches `target` (>= 1); not found when the total is smaller.
template <class Item>
__device__ Selected radix_select(uint32_t n, u64 target, Item item, Shared& sh) {
  if (threadIdx.x == 0) {
    sh.prefix = 0;
    sh.found = 1;
    sh.above = 0;
    sh.need = target;
    sh.at = 0;
  }
  for (int shift = 24; shift >= 0; shift -= 8) {
    for (uint32_t i = threadIdx.x; i < 256; i += blockDim.x) sh.hist[i] = 0;
    __syncthreads();
    if (!sh.found) break;
    const uint32_t prefix = sh.prefix;
    const uint32_t hi = shift == 24 ? 0u : (0xffffffffu << (shift + 8));
    for (uint32_t id = threadIdx.x; id < n; id += blockDim.x) {
      uint32_t key;
      u64 w;
      item(id, key, w);
      if (w != 0 && (key & hi) == prefix) atomicAdd(&sh.hist[(key >> shift) & 255u], w);
    }
    __syncthreads();
    if (threadIdx.x < 32) pick_bin(sh, shift);
    __syncthreads();  // warp 0 has read the histogram before the next pass clears it
  }
  const Selected r{sh.found != 0, sh.prefix, sh.above, sh.at};
  __syncthreads();
  return r;
}

/// The first id (ascending) at which the running sum of `weight(id)` exceeds
/// `target_of(total)`; kNone when the target is not below the total. The range narrows to one
/// warp's contiguous share per level (every warp sums its share, coalesced; thread 0 finds the
/// share holding the target) until one warp walks what is left, 32 ids and a warp scan a step:
/// a 256k row takes three levels and a walk of 2 steps at 16 warps.
template <class Weight, class Target>
__device__ uint32_t ordered_select(uint32_t n, Weight weight, Target target_of, Shared& sh) {
  const unsigned lane = threadIdx.x % 32, warp = threadIdx.x / 32, warps = blockDim.x / 32;
  uint32_t lo = 0, hi = n;
  for (bool first = true;; first = false) {
    const uint32_t chunk = ((hi - lo + warps - 1) / warps + 31) / 32 * 32;
    const uint32_t begin = min(hi, lo + warp * chunk), end = min(hi, begin + chunk);
    u64 s = 0;
    for (uint32_t id = begin + lane; id < end; id += 32) s += weight(id);
    s = warp_sum_u64(s);
    __syncthreads();
    if (lane == 0) sh.warp_u64[warp] = s;
    __syncthreads();
    if (threadIdx.x == 0) {
      u64 before = first ? 0 : sh.sel_before;
      if (first) {
        u64 total = 0;
        for (unsigned w = 0; w < warps; ++w) total += sh.warp_u64[w];
        sh.sel_target = target_of(total);
        sh.sel_id = kNone;
      }
      const u64 target = sh.sel_target;
      sh.sel_warp = kNone;
      for (unsigned w = 0; w < warps; ++w) {
        if (before + sh.warp_u64[w] > target) {
          sh.sel_warp = w;
          sh.sel_before = before;
          break;
        }
        before += sh.warp_u64[w];
      }
    }
    __syncthreads();
    const uint32_t picked = sh.sel_warp;
    if (picked == kNone) break;
    if (chunk > 256 && warps > 1) {
      lo = min(hi, lo + picked * chunk);
      hi = min(hi, lo + chunk);
      continue;
    }
    if (warp == picked) {
      u64 run = sh.sel_before;
      const u64 target = sh.sel_target;
      for (uint32_t base = begin; base < end; base += 32) {
        const uint32_t id = base + lane;
        const u64 x = id < end ? weight(id) : 0;
        u64 incl = x;
        for (int o = 1; o < 32; o <<= 1) {
          const u64 t = __shfl_up_sync(kFull, incl, o);
          if (lane >= unsigned(o)) incl += t;
        }
        const unsigned hit = __ballot_sync(kFull, run + incl > target && run + incl - x <= target);
        if (hit != 0) {
          if (lane == unsigned(__ffs(hit) - 1)) sh.sel_id = id;
          break;
        }
        run += __shfl_sync(kFull, incl, 31);
      }
    }
    break;
  }
  __syncthreads();
  const uint32_t r = sh.sel_id;
  __syncthreads();
  return r;
}

/// The last id kept among the ties at `sel.key` when `keep` of them stay (lowest ids first).
template <class IsTie>
__device__ uint32_t tie_cutoff(uint32_t n, u64 keep, u64 ties, IsTie is_tie, Shared& sh) {
  if (keep >= ties) return kNone;
  return ordered_select(
      n, [&](uint32_t id) -> u64 { return is_tie(id) ? 1 : 0; }, [&](u64) { return keep - 1; }, sh);
}

/// Penalised logit (kernels::sampling::Penalties::apply, unfused as there).
__device__ __forceinline__ float penalise(float l, uint32_t count, const SampleRow& row) {
  if (row.repetition_penalty != 1.0f) {
    l = l > 0.0f ? __fdiv_rn(l, row.repetition_penalty) : __fmul_rn(l, row.repetition_penalty);
  }
  if (count > 0 && (row.frequency_penalty != 0.0f || row.presence_penalty != 0.0f)) {
    l = __fsub_rn(l, __fadd_rn(__fmul_rn(float(count), row.frequency_penalty), row.presence_penalty));
  }
  return l;
}

/// Temperature -> top-k -> top-p -> min-p -> draw (kernels::sampling::truncation and draw);
/// kNone when nothing survives.
__device__ uint32_t draw_row(const float* src, uint32_t n, const SampleRow& row, Shared& sh) {
  const float inv_t = 1.0f / row.temperature;
  auto scaled = [&](uint32_t id) { return __fmul_rn(sanitize(src[id]), inv_t); };
  float smax = -INFINITY;
  u64 count = 0;
  for (uint32_t id = threadIdx.x; id < n; id += blockDim.x) {
    const float s = scaled(id);
    if (s > -INFINITY) {
      smax = fmaxf(smax, s);
      ++count;
    }
  }
  smax = cad::block_max(smax, sh.warp_f32);
  count = block_reduce_u64<false>(count, sh);
  if (count == 0) return kNone;

  // top-k: the k-th largest scaled logit, ties to the lowest ids.
  const bool topk = row.top_k > 0 && u64(row.top_k) < count;
  uint32_t tk_key = 0, tk_cut = kNone;
  if (topk) {
    const Selected s = radix_select(
        n, row.top_k,
        [&](uint32_t id, uint32_t& key, u64& w) {
          const float v = scaled(id);
          key = order_key(v);
          w = v > -INFINITY ? 1 : 0;
        },
        sh);
    tk_key = s.key;
    tk_cut = tie_cutoff(n, row.top_k - s.above, s.at, [&](uint32_t id) { return order_key(scaled(id)) == tk_key; }, sh);
  }
  auto in_topk = [&](uint32_t id, float s) {
    if (!(s > -INFINITY)) return false;
    const uint32_t k = order_key(s);
    return !topk || k > tk_key || (k == tk_key && id <= tk_cut);
  };
  const bool inf_max = smax == INFINITY;
  auto weight = [&](float s) {
    return inf_max ? (s == INFINITY ? 1.0f : 0.0f) : weight_below(__fsub_rn(s, smax));
  };

  // top-p: ranked by weight (ties to the lowest ids), keep while the mass above is < limit.
  bool topp = row.top_p < 1.0f;
  uint32_t tp_key = 0, tp_cut = kNone;
  if (topp) {
    u64 total = 0;
    for (uint32_t id = threadIdx.x; id < n; id += blockDim.x) {
      const float s = scaled(id);
      if (in_topk(id, s)) total += fixed_weight(weight(s));
    }
    total = block_reduce_u64<false>(total, sh);
    const u64 limit = (u64)ceil((double)row.top_p * (double)total);
    if (limit == 0) {
      tp_key = kNone;  // nothing survives (an invalid top_p)
      tp_cut = 0;
    } else {
      const Selected s = radix_select(
          n, limit,
          [&](uint32_t id, uint32_t& key, u64& w) {
            const float sv = scaled(id);
            const bool in = in_topk(id, sv);
            const float wt = in ? weight(sv) : 0.0f;
            key = __float_as_uint(wt);
            w = in ? fixed_weight(wt) : 0;
          },
          sh);
      topp = s.found;  // not found: rounding left the limit unreached, keep everything
      if (topp) {
        tp_key = s.key;
        const u64 q = fixed_weight(__uint_as_float(s.key));
        const u64 keep = (limit - s.above + q - 1) / q;
        tp_cut = tie_cutoff(
            n, keep, s.at / q,
            [&](uint32_t id) {
              const float sv = scaled(id);
              return in_topk(id, sv) && __float_as_uint(weight(sv)) == tp_key;
            },
            sh);
      }
    }
  }
  const bool minp = row.min_p > 0.0f;
  const float min_w = fminf(row.min_p, 1.0f);
  auto drawn = [&](uint32_t id) -> u64 {
    const float s = scaled(id);
    if (!in_topk(id, s)) return 0;
    const float w = weight(s);
    const uint32_t wk = __float_as_uint(w);
    if (topp && !(wk > tp_key || (wk == tp_key && id <= tp_cut))) return 0;
    if (minp && !(w >= min_w)) return 0;
    return fixed_weight(w);
  };
  const double u = row.u;
  return ordered_select(
      n, drawn,
      [&](u64 total) -> u64 {
        if (total == 0) return ~0ull;
        const u64 t = (u64)(u * (double)total);
        return t < total - 1 ? t : total - 1;
      },
      sh);
}

/// Raw log-softmax normaliser (kernels::sampling::LogSoftmax, in f32) and the top-N.
__device__ void write_logprobs(const float* raw, uint32_t n, uint32_t token, const SampleRow& row,
                               const SampleParams& p, uint32_t r, Shared& sh) {
  float m = -INFINITY;
  for (uint32_t id = threadIdx.x; id < n; id += blockDim.x) m = fmaxf(m, sanitize(raw[id]));
  m = cad::block_max(m, sh.warp_f32);
  auto rel = [&](float l) { return m == INFINITY ? (l == INFINITY ? 1.0f : 0.0f) : m == -INFINITY ? 1.0f : expf(l - m); };
  float sum = 0.0f;
  for (uint32_t id = threadIdx.x; id < n; id += blockDim.x) sum += rel(sanitize(raw[id]));
  const float log_sum = logf(cad::block_sum(sum, sh.warp_f32));
  auto logprob = [&](float l) {
    l = sanitize(l);
    if (m == INFINITY || m == -INFINITY) return logf(rel(l)) - log_sum;
    return (l - m) - log_sum;
  };
  if (threadIdx.x == 0) p.out_logprobs[r] = logprob(raw[token]);

  const uint32_t want = min(min(row.num_top_logprobs, CAD_SAMPLE_MAX_LOGPROBS), n);
  if (want == 0) return;
  auto key_of = [&](uint32_t id) { return order_key(sanitize(raw[id])); };
  const Selected s = radix_select(
      n, want,
      [&](uint32_t id, uint32_t& key, u64& w) {
        key = key_of(id);
        w = 1;
      },
      sh);
  const uint32_t cut = tie_cutoff(n, want - s.above, s.at, [&](uint32_t id) { return key_of(id) == s.key; }, sh);
  if (threadIdx.x == 0) sh.top_count = 0;
  __syncthreads();
  for (uint32_t id = threadIdx.x; id < n; id += blockDim.x) {
    const uint32_t k = key_of(id);
    if (k > s.key || (k == s.key && id <= cut)) sh.top_id[atomicAdd(&sh.top_count, 1u)] = id;
  }
  __syncthreads();
  if (threadIdx.x == 0) {
    // `want` (<= 20) entries in arbitrary order: insertion sort, value descending, id ascending.
    for (uint32_t i = 1; i < want; ++i) {
      const uint32_t id = sh.top_id[i];
      const uint32_t k = key_of(id);
      uint32_t j = i;
      for (; j > 0; --j) {
        const uint32_t pid = sh.top_id[j - 1], pk = key_of(pid);
        if (pk > k || (pk == k && pid < id)) break;
        sh.top_id[j] = pid;
      }
      sh.top_id[j] = id;
    }
    for (uint32_t i = 0; i < want; ++i) {
      const uint32_t id = sh.top_id[i];
      p.out_top_ids[size_t(r) * CAD_SAMPLE_MAX_LOGPROBS + i] = id;
      p.out_top_logprobs[size_t(r) * CAD_SAMPLE_MAX_LOGPROBS + i] = logprob(raw[id]);
    }
  }
}

__device__ void sample(const SampleParams& p) {
  __shared__ Shared sh;
  const uint32_t r = blockIdx.x, n = p.vocab;
  if (r >= p.num_rows) return;
  const SampleRow row = p.rows[r];
  const float* raw = p.logits + size_t(r) * n;
  if (p.out_nonfinite) {
    // NaN or +-inf anywhere in the model's row (before any mask): the request fails alone.
    u64 bad = 0;
    for (uint32_t id = threadIdx.x; id < n; id += blockDim.x) bad |= !(fabsf(raw[id]) <= kMaxFinite);
    bad = block_reduce_u64<true>(bad, sh);
    if (threadIdx.x == 0) p.out_nonfinite[r] = uint32_t(bad);
  }
  if (row.flags & CAD_SAMPLE_ALLOWED) {
    // Structured outputs: disallowed tokens become -inf before anything reads the row.
    float* masked = p.masked + size_t(r) * n;
    const uint32_t* bits = p.allowed + size_t(r) * p.allowed_words;
    for (uint32_t id = threadIdx.x; id < n; id += blockDim.x) {
      masked[id] = (bits[id >> 5] >> (id & 31u)) & 1u ? raw[id] : -INFINITY;
    }
    __syncthreads();
    raw = masked;
  }
  const float* src = raw;
  if (row.penalty_count > 0) {
    float* work = p.work + size_t(r) * n;
    for (uint32_t id = threadIdx.x; id < n; id += blockDim.x) work[id] = sanitize(raw[id]);
    __syncthreads();
    // Entries are distinct tokens: no two threads touch the same logit.
    for (uint32_t e = threadIdx.x; e < row.penalty_count; e += blockDim.x) {
      const PenaltyEntry pe = p.penalties[row.penalty_start + e];
      if (pe.token < n) work[pe.token] = penalise(work[pe.token], pe.output_count, row);
    }
    __syncthreads();
    src = work;
  }
  uint32_t token = (row.flags & CAD_SAMPLE_GREEDY) ? block_argmax(src, n, sh) : draw_row(src, n, row, sh);
  if (token == kNone) token = block_argmax(raw, n, sh);
  if (token == kNone) token = 0;
  if (threadIdx.x == 0) p.out_ids[r] = token;
  if (row.flags & CAD_SAMPLE_LOGPROBS) write_logprobs(raw, n, token, row, p, r, sh);
}

}  // namespace

CAD_KERNEL_BOUNDS(cad_sample_f32, SampleParams, p, 512) { sample(p); }
