//! Fast CPU paged attention: rayon over (sequence, KV head, query chunk) work items, blocked
//! online softmax, no score matrix over the whole context and no allocation per key.
//!
//! Each work item owns the query rows of one GQA group (all query heads sharing a KV head) for
//! up to [`QUERY_CHUNK`] consecutive query tokens of one sequence. It walks the sequence's
//! blocks once: every K/V row loaded from the pool is reused by all of the item's query rows,
//! which is what makes GQA and prefill cheap in memory traffic. Decode batches parallelise over
//! sequences and KV heads; one long prefill parallelises over its query chunks.

use rayon::prelude::*;

use super::{check_attention_shapes, AttentionParams, LayerKvCache, SeqAttention};

/// Query tokens per work item: large enough to amortise K/V loads over many rows, small enough
/// that a long prefill splits into many items for load balancing (causal items differ in cost).
const QUERY_CHUNK: usize = 16;

/// One unit of parallel work: a GQA group of one query chunk of one sequence.
struct WorkItem<'o> {
    seq: usize,
    kv_head: usize,
    /// Index of the chunk's first token within the sequence's query tokens.
    first: usize,
    /// One output slice per token of the chunk: the `group * head_dim` values of the group's heads.
    outs: Vec<&'o mut [f32]>,
}

/// Per-thread scratch buffers, reused across work items.
#[derive(Default)]
struct Scratch {
    q: Vec<f32>,
    acc: Vec<f32>,
    max: Vec<f32>,
    sum: Vec<f32>,
    scores: Vec<f32>,
}

/// Attention of a flattened batch of query tokens over the paged KV cache.
///
/// `q`: `[num_tokens, num_heads * head_dim]`; `out`: same shape. Query head `h` reads KV head
/// `h / (num_heads / num_kv_heads)`. Uses all threads of the current rayon pool. Output rows not
/// covered by any sequence are left unchanged. Panics on inconsistent shapes or block ids.
pub fn paged_attention(
    q: &[f32],
    cache: &LayerKvCache,
    seqs: &[SeqAttention<'_>],
    params: &AttentionParams,
    out: &mut [f32],
) {
    check_attention_shapes(q, cache, seqs, params, out);
    let items = split_work(seqs, params, out);
    items
        .into_par_iter()
        .for_each_init(Scratch::default, |scratch, mut item| {
            attend(q, cache, &seqs[item.seq], params, &mut item, scratch);
        });
}

/// Partitions `out` into disjoint per-item slices (safe parallel writes without copying).
fn split_work<'o>(
    seqs: &[SeqAttention<'_>],
    params: &AttentionParams,
    out: &'o mut [f32],
) -> Vec<WorkItem<'o>> {
    let nkv = params.num_kv_heads;
    let group_len = params.group_size() * params.head_dim;
    let num_tokens = out.len() / (params.num_heads * params.head_dim);
    // For each token, the index of its chunk's first item (items of a chunk are consecutive by KV head).
    let mut token_item = vec![usize::MAX; num_tokens];
    let mut items = Vec::new();
    for (s, seq) in seqs.iter().enumerate() {
        for first in (0..seq.query_len).step_by(QUERY_CHUNK) {
            let n = QUERY_CHUNK.min(seq.query_len - first);
            let base = items.len();
            token_item[seq.query_start + first..seq.query_start + first + n].fill(base);
            items.extend((0..nkv).map(|kv_head| WorkItem {
                seq: s,
                kv_head,
                first,
                outs: Vec::with_capacity(n),
            }));
        }
    }
    for (idx, slice) in out.chunks_exact_mut(group_len).enumerate() {
        let base = token_item[idx / nkv];
        if base != usize::MAX {
            items[base + idx % nkv].outs.push(slice);
        }
    }
    items
}

fn attend(
    q: &[f32],
    cache: &LayerKvCache,
    seq: &SeqAttention<'_>,
    params: &AttentionParams,
    item: &mut WorkItem<'_>,
    scratch: &mut Scratch,
) {
    #[cfg(target_arch = "x86_64")]
    if std::arch::is_x86_feature_detected!("avx2") && std::arch::is_x86_feature_detected!("fma") {
        // SAFETY: the CPU supports AVX2 and FMA (checked just above).
        unsafe { attend_avx2(q, cache, seq, params, item, scratch) };
        return;
    }
    // SAFETY: `Portable` has no CPU requirements.
    unsafe { attend_generic::<Portable>(q, cache, seq, params, item, scratch) };
}

/// [`attend_generic`] with AVX2/FMA dot products, compiled with those features enabled.
///
/// # Safety
/// The CPU must support AVX2 and FMA.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn attend_avx2(
    q: &[f32],
    cache: &LayerKvCache,
    seq: &SeqAttention<'_>,
    params: &AttentionParams,
    item: &mut WorkItem<'_>,
    scratch: &mut Scratch,
) {
    // SAFETY: the caller guarantees AVX2 and FMA.
    unsafe { attend_generic::<simd::Avx2Fma>(q, cache, seq, params, item, scratch) };
}

/// Blocked online softmax for one work item.
///
/// Rows are `(token, head-in-group)` pairs, row `r = token * group + g`. For each block: scores
/// of all unmasked (row, key) pairs, then per row one rescale of the running accumulator and an
/// exp-weighted sum of the block's V rows.
///
/// # Safety
/// The CPU must support the features `V` needs (see [`VecOps`]).
#[inline(always)]
unsafe fn attend_generic<V: VecOps>(
    q: &[f32],
    cache: &LayerKvCache,
    seq: &SeqAttention<'_>,
    params: &AttentionParams,
    item: &mut WorkItem<'_>,
    scratch: &mut Scratch,
) {
    let hd = params.head_dim;
    let group = params.group_size();
    let q_row = params.num_heads * hd;
    let kv_row = params.num_kv_heads * hd;
    let kv_off = item.kv_head * hd;
    let bs = cache.shape.block_size;
    let n_tok = item.outs.len();
    let rows = n_tok * group;
    // Absolute position of the chunk's first query token; token `ti` sees positions `0..=first_pos + ti`.
    let first_pos = seq.context_len - seq.query_len + item.first;
    let ctx_end = first_pos + n_tok;

    let Scratch {
        q: qbuf,
        acc,
        max,
        sum,
        scores,
    } = scratch;
    qbuf.clear();
    for ti in 0..n_tok {
        let t = seq.query_start + item.first + ti;
        let start = t * q_row + item.kv_head * group * hd;
        qbuf.extend(
            q[start..start + group * hd]
                .iter()
                .map(|&x| x * params.scale),
        );
    }
    acc.clear();
    acc.resize(rows * hd, 0.0);
    max.clear();
    max.resize(rows, f32::NEG_INFINITY);
    sum.clear();
    sum.resize(rows, 0.0);
    scores.clear();
    scores.resize(rows * bs, 0.0);

    let table = &seq.block_table[..ctx_end.div_ceil(bs)];
    for (j, &block) in table.iter().enumerate() {
        if let Some(&next) = table.get(j + 1) {
            // Blocks are scattered, so hardware prefetchers cannot guess the next one.
            for off in 0..bs.min(ctx_end - (j + 1) * bs) {
                let start = (next as usize * bs + off) * kv_row + kv_off;
                // SAFETY: the caller guarantees `V`'s CPU features.
                unsafe {
                    V::prefetch(&cache.k[start..start + hd]);
                    V::prefetch(&cache.v[start..start + hd]);
                }
            }
        }
        let p0 = j * bs;
        let nk = bs.min(ctx_end - p0);
        let slot0 = block as usize * bs;
        // Scores for this block; masked (row, key) pairs are skipped and never read.
        for off in 0..nk {
            let k_start = (slot0 + off) * kv_row + kv_off;
            let k = &cache.k[k_start..k_start + hd];
            // Tokens from `ti0` on are at positions >= p0 + off.
            let ti0 = (p0 + off).saturating_sub(first_pos);
            for r in ti0 * group..rows {
                // SAFETY: the caller guarantees `V`'s CPU features.
                scores[r * bs + off] = unsafe { V::dot(&qbuf[r * hd..(r + 1) * hd], k) };
            }
        }
        for r in 0..rows {
            let pos = first_pos + r / group;
            if pos < p0 {
                continue;
            }
            let valid = nk.min(pos + 1 - p0);
            let s = &mut scores[r * bs..r * bs + valid];
            let block_max = s.iter().fold(f32::NEG_INFINITY, |a, &b| a.max(b));
            let new_max = max[r].max(block_max);
            let a = &mut acc[r * hd..(r + 1) * hd];
            if new_max > max[r] {
                let corr = (max[r] - new_max).exp();
                sum[r] *= corr;
                a.iter_mut().for_each(|x| *x *= corr);
                max[r] = new_max;
            }
            let mut block_sum = 0.0;
            for score in s.iter_mut() {
                *score = (*score - new_max).exp();
                block_sum += *score;
            }
            // SAFETY: the caller guarantees `V`'s CPU features; `V` only reads rows
            // `slot0..slot0 + valid` of the block through bounds-checked slices.
            unsafe { V::add_weighted_rows(a, s, &cache.v, slot0 * kv_row + kv_off, kv_row) };
            sum[r] += block_sum;
        }
    }

    for (ti, out) in item.outs.iter_mut().enumerate() {
        for g in 0..group {
            let r = ti * group + g;
            let inv = 1.0 / sum[r];
            out[g * hd..(g + 1) * hd]
                .iter_mut()
                .zip(&acc[r * hd..(r + 1) * hd])
                .for_each(|(o, &a)| *o = a * inv);
        }
    }
}

/// The vector primitives of the inner loops, one implementation per instruction set.
///
/// # Safety
/// Implementations may require CPU features; callers must ensure they are present.
trait VecOps {
    /// Dot product of two equal-length slices.
    unsafe fn dot(a: &[f32], b: &[f32]) -> f32;
    /// Hints that `data` will be read soon.
    unsafe fn prefetch(data: &[f32]);
    /// `acc += sum_k weights[k] * rows[start + k * stride..][..acc.len()]`: the weighted sum of
    /// a block's V rows, accumulated in registers so `acc` is stored once per block.
    unsafe fn add_weighted_rows(
        acc: &mut [f32],
        weights: &[f32],
        rows: &[f32],
        start: usize,
        stride: usize,
    );
}

/// Plain Rust that LLVM auto-vectorises for the baseline target.
struct Portable;

impl VecOps for Portable {
    #[inline(always)]
    unsafe fn dot(a: &[f32], b: &[f32]) -> f32 {
        let mut lanes = [0.0f32; 8];
        let a8 = a.chunks_exact(8);
        let b8 = b.chunks_exact(8);
        let tail: f32 = a8
            .remainder()
            .iter()
            .zip(b8.remainder())
            .map(|(x, y)| x * y)
            .sum();
        for (x, y) in a8.zip(b8) {
            for ((l, &x), &y) in lanes.iter_mut().zip(x).zip(y) {
                *l += x * y;
            }
        }
        lanes.iter().sum::<f32>() + tail
    }

    #[inline(always)]
    unsafe fn prefetch(_data: &[f32]) {}

    #[inline(always)]
    unsafe fn add_weighted_rows(
        acc: &mut [f32],
        weights: &[f32],
        rows: &[f32],
        start: usize,
        stride: usize,
    ) {
        let n = acc.len();
        for (k, &w) in weights.iter().enumerate() {
            let row = &rows[start + k * stride..start + k * stride + n];
            acc.iter_mut().zip(row).for_each(|(a, &x)| *a += w * x);
        }
    }
}

#[cfg(target_arch = "x86_64")]
mod simd {
    use std::arch::x86_64::*;

    use super::VecOps;

    /// 256-bit AVX2 with fused multiply-add.
    pub(super) struct Avx2Fma;

    impl VecOps for Avx2Fma {
        #[inline(always)]
        unsafe fn dot(a: &[f32], b: &[f32]) -> f32 {
            let n = a.len().min(b.len());
            let (pa, pb) = (a.as_ptr(), b.as_ptr());
            // SAFETY: the caller guarantees AVX2+FMA; every load reads 8 floats at `i` with
            // `i + 8 <= n`, inside both slices.
            unsafe {
                let mut acc0 = _mm256_setzero_ps();
                let mut acc1 = _mm256_setzero_ps();
                let mut i = 0;
                while i + 16 <= n {
                    acc0 = _mm256_fmadd_ps(
                        _mm256_loadu_ps(pa.add(i)),
                        _mm256_loadu_ps(pb.add(i)),
                        acc0,
                    );
                    acc1 = _mm256_fmadd_ps(
                        _mm256_loadu_ps(pa.add(i + 8)),
                        _mm256_loadu_ps(pb.add(i + 8)),
                        acc1,
                    );
                    i += 16;
                }
                if i + 8 <= n {
                    acc0 = _mm256_fmadd_ps(
                        _mm256_loadu_ps(pa.add(i)),
                        _mm256_loadu_ps(pb.add(i)),
                        acc0,
                    );
                    i += 8;
                }
                let acc = _mm256_add_ps(acc0, acc1);
                let quad = _mm_add_ps(_mm256_castps256_ps128(acc), _mm256_extractf128_ps(acc, 1));
                let pair = _mm_add_ps(quad, _mm_movehl_ps(quad, quad));
                let single = _mm_add_ss(pair, _mm_movehdup_ps(pair));
                let sum = _mm_cvtss_f32(single);
                sum + a[i..n]
                    .iter()
                    .zip(&b[i..n])
                    .map(|(x, y)| x * y)
                    .sum::<f32>()
            }
        }

        #[inline(always)]
        unsafe fn prefetch(data: &[f32]) {
            // 16 floats per 64-byte cache line.
            for line in data.chunks(16) {
                // SAFETY: prefetching is a hint with no memory effects; the pointer is in bounds.
                unsafe { _mm_prefetch::<_MM_HINT_T0>(line.as_ptr().cast()) };
            }
        }

        #[inline(always)]
        unsafe fn add_weighted_rows(
            acc: &mut [f32],
            weights: &[f32],
            rows: &[f32],
            start: usize,
            stride: usize,
        ) {
            let n = acc.len();
            let nk = weights.len();
            if nk == 0 {
                return;
            }
            // Bounds check once for all rows; the loads below stay inside this range.
            let _ = &rows[start..start + (nk - 1) * stride + n];
            let pa = acc.as_mut_ptr();
            let pr = rows[start..].as_ptr();
            // SAFETY: the caller guarantees AVX2+FMA; accesses cover 8 floats at column `c` with
            // `c + 8 <= n` of `acc` and of row `k < nk`, whose extent was bounds-checked above.
            unsafe {
                let mut c = 0;
                while c + 32 <= n {
                    let mut a0 = _mm256_loadu_ps(pa.add(c));
                    let mut a1 = _mm256_loadu_ps(pa.add(c + 8));
                    let mut a2 = _mm256_loadu_ps(pa.add(c + 16));
                    let mut a3 = _mm256_loadu_ps(pa.add(c + 24));
                    for (k, &w) in weights.iter().enumerate() {
                        let wv = _mm256_set1_ps(w);
                        let r = pr.add(k * stride + c);
                        a0 = _mm256_fmadd_ps(wv, _mm256_loadu_ps(r), a0);
                        a1 = _mm256_fmadd_ps(wv, _mm256_loadu_ps(r.add(8)), a1);
                        a2 = _mm256_fmadd_ps(wv, _mm256_loadu_ps(r.add(16)), a2);
                        a3 = _mm256_fmadd_ps(wv, _mm256_loadu_ps(r.add(24)), a3);
                    }
                    _mm256_storeu_ps(pa.add(c), a0);
                    _mm256_storeu_ps(pa.add(c + 8), a1);
                    _mm256_storeu_ps(pa.add(c + 16), a2);
                    _mm256_storeu_ps(pa.add(c + 24), a3);
                    c += 32;
                }
                while c + 8 <= n {
                    let mut a0 = _mm256_loadu_ps(pa.add(c));
                    for (k, &w) in weights.iter().enumerate() {
                        a0 = _mm256_fmadd_ps(
                            _mm256_set1_ps(w),
                            _mm256_loadu_ps(pr.add(k * stride + c)),
                            a0,
                        );
                    }
                    _mm256_storeu_ps(pa.add(c), a0);
                    c += 8;
                }
                for (k, &w) in weights.iter().enumerate() {
                    let row = &rows[start + k * stride + c..start + k * stride + n];
                    acc[c..].iter_mut().zip(row).for_each(|(a, &x)| *a += w * x);
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn data(n: usize, seed: u32) -> Vec<f32> {
        (0..n)
            .map(|i| (((i as u32).wrapping_mul(2654435761) ^ seed) % 2000) as f32 / 1000.0 - 1.0)
            .collect()
    }

    /// Checks one `VecOps` implementation against f64 formulas, including lengths with tails.
    fn check_ops<V: VecOps>() {
        for n in [0, 1, 7, 8, 9, 16, 20, 31, 32, 40, 64, 71] {
            let (a, b) = (data(n, 1), data(n, 2));
            let want: f64 = a.iter().zip(&b).map(|(&x, &y)| x as f64 * y as f64).sum();
            // SAFETY: only called with implementations the CPU supports.
            let got = unsafe { V::dot(&a, &b) };
            assert!(
                (got as f64 - want).abs() < 1e-4,
                "dot n={n}: {got} vs {want}"
            );

            let (stride, nk) = (n + 3, 5);
            let rows = data(2 + nk * stride, 3);
            let weights = data(nk, 4);
            let mut acc = data(n, 5);
            let want: Vec<f64> = (0..n)
                .map(|c| {
                    acc[c] as f64
                        + (0..nk)
                            .map(|k| weights[k] as f64 * rows[2 + k * stride + c] as f64)
                            .sum::<f64>()
                })
                .collect();
            // SAFETY: as above.
            unsafe { V::add_weighted_rows(&mut acc, &weights, &rows, 2, stride) };
            for (c, (&g, &w)) in acc.iter().zip(&want).enumerate() {
                assert!(
                    (g as f64 - w).abs() < 1e-5,
                    "weighted rows n={n} col {c}: {g} vs {w}"
                );
            }
        }
    }

    #[test]
    fn portable_ops_match_formulas() {
        check_ops::<Portable>();
    }

    #[cfg(target_arch = "x86_64")]
    #[test]
    fn avx2_ops_match_formulas() {
        if std::arch::is_x86_feature_detected!("avx2") && std::arch::is_x86_feature_detected!("fma")
        {
            check_ops::<simd::Avx2Fma>();
        } else {
            eprintln!("skipping: CPU lacks AVX2/FMA");
        }
    }
}
