//! Naive paged attention used as the ground truth in tests.
//!
//! Deliberately simple: gather each sequence's keys and values into contiguous arrays, then
//! compute full-softmax attention in f64. No blocking, no online softmax, no threads.

use super::{check_attention_shapes, AttentionParams, LayerKvCache, SeqAttention};

/// Reference version of [`super::paged_attention`] (same contract, slow and exact-ish).
///
/// Output rows not covered by any sequence are left unchanged.
pub fn paged_attention_reference(
    q: &[f32],
    cache: &LayerKvCache,
    seqs: &[SeqAttention<'_>],
    params: &AttentionParams,
    out: &mut [f32],
) {
    check_attention_shapes(q, cache, seqs, params, out);
    let hd = params.head_dim;
    let row = params.num_heads * hd;
    let kv_row = params.num_kv_heads * hd;
    let group = params.group_size();
    for seq in seqs {
        let (keys, values) = gather(cache, seq);
        let first_pos = seq.context_len - seq.query_len;
        for i in 0..seq.query_len {
            let t = seq.query_start + i;
            let pos = first_pos + i;
            for h in 0..params.num_heads {
                let kvh = h / group;
                let qv = &q[t * row + h * hd..t * row + (h + 1) * hd];
                let scores: Vec<f64> = (0..=pos)
                    .map(|p| {
                        let kv = &keys[p * kv_row + kvh * hd..p * kv_row + (kvh + 1) * hd];
                        let dot: f64 = qv.iter().zip(kv).map(|(&a, &b)| a as f64 * b as f64).sum();
                        dot * params.scale as f64
                    })
                    .collect();
                let max = scores.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
                let weights: Vec<f64> = scores.iter().map(|s| (s - max).exp()).collect();
                let total: f64 = weights.iter().sum();
                for d in 0..hd {
                    let acc: f64 = weights
                        .iter()
                        .enumerate()
                        .map(|(p, w)| w * values[p * kv_row + kvh * hd + d] as f64)
                        .sum();
                    out[t * row + h * hd + d] = (acc / total) as f32;
                }
            }
        }
    }
}

/// Copies a sequence's `context_len` K and V rows out of the block pool, in position order.
fn gather(cache: &LayerKvCache, seq: &SeqAttention<'_>) -> (Vec<f32>, Vec<f32>) {
    let bs = cache.shape.block_size;
    let kv_row = cache.shape.row_len();
    let mut keys = Vec::with_capacity(seq.context_len * kv_row);
    let mut values = Vec::with_capacity(seq.context_len * kv_row);
    for p in 0..seq.context_len {
        let slot = seq.block_table[p / bs] as usize * bs + p % bs;
        keys.extend_from_slice(&cache.k[slot * kv_row..(slot + 1) * kv_row]);
        values.extend_from_slice(&cache.v[slot * kv_row..(slot + 1) * kv_row]);
    }
    (keys, values)
}
