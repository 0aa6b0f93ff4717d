//! Paged attention (fast and reference) against attention computed in this file over contiguous
//! K/V built independently, plus batch-independence and chunked-prefill invariants.

use caduceus_kernels::attention::{
    paged_attention, paged_attention_reference, write_kv, AttentionParams, KvCacheShape,
    LayerKvCache, SeqAttention,
};
use proptest::prelude::*;
use rand::seq::SliceRandom;
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

/// One sequence's data in plain contiguous form.
struct SeqData {
    /// `[context_len, num_kv_heads * head_dim]`
    k: Vec<f32>,
    v: Vec<f32>,
    /// `[query_len, num_heads * head_dim]`: queries for the last `query_len` positions.
    q: Vec<f32>,
    context_len: usize,
    query_len: usize,
}

fn params(num_kv_heads: usize, group: usize, head_dim: usize) -> AttentionParams {
    AttentionParams {
        num_heads: num_kv_heads * group,
        num_kv_heads,
        head_dim,
        scale: 1.0 / (head_dim as f32).sqrt(),
    }
}

fn random_vec(rng: &mut ChaCha8Rng, n: usize, amp: f32) -> Vec<f32> {
    (0..n).map(|_| rng.random_range(-amp..amp)).collect()
}

fn random_seq(
    rng: &mut ChaCha8Rng,
    p: &AttentionParams,
    context_len: usize,
    query_len: usize,
) -> SeqData {
    let kv_row = p.num_kv_heads * p.head_dim;
    SeqData {
        k: random_vec(rng, context_len * kv_row, 1.0),
        v: random_vec(rng, context_len * kv_row, 1.0),
        // Larger queries give peaked softmaxes, exercising the running-max rescaling.
        q: random_vec(rng, query_len * p.num_heads * p.head_dim, 3.0),
        context_len,
        query_len,
    }
}

/// Plain causal attention over contiguous K/V in f64: `[query_len, num_heads * head_dim]`.
fn contiguous_attention(s: &SeqData, p: &AttentionParams) -> Vec<f32> {
    let (hd, nh) = (p.head_dim, p.num_heads);
    let kv_row = p.num_kv_heads * hd;
    let group = nh / p.num_kv_heads;
    let mut out = vec![0.0f32; s.query_len * nh * hd];
    for i in 0..s.query_len {
        let pos = s.context_len - s.query_len + i;
        for h in 0..nh {
            let kvh = h / group;
            let q = &s.q[(i * nh + h) * hd..(i * nh + h + 1) * hd];
            let scores: Vec<f64> = (0..=pos)
                .map(|j| {
                    let k = &s.k[j * kv_row + kvh * hd..j * kv_row + (kvh + 1) * hd];
                    q.iter()
                        .zip(k)
                        .map(|(&a, &b)| a as f64 * b as f64)
                        .sum::<f64>()
                        * p.scale as f64
                })
                .collect();
            let m = scores.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
            let w: Vec<f64> = scores.iter().map(|s| (s - m).exp()).collect();
            let z: f64 = w.iter().sum();
            for d in 0..hd {
                let acc: f64 = (0..=pos)
                    .map(|j| w[j] * s.v[j * kv_row + kvh * hd + d] as f64)
                    .sum();
                out[(i * nh + h) * hd + d] = (acc / z) as f32;
            }
        }
    }
    out
}

/// A cache whose blocks are handed out in shuffled order (plus unused spare blocks), with every
/// sequence's K/V written through `write_kv`; returns the cache and the block tables.
fn scatter_into_cache(
    rng: &mut ChaCha8Rng,
    seqs: &[SeqData],
    p: &AttentionParams,
    block_size: usize,
) -> (LayerKvCache, Vec<Vec<u32>>) {
    let needed: usize = seqs
        .iter()
        .map(|s| s.context_len.div_ceil(block_size))
        .sum();
    let num_blocks = needed + 3;
    let mut ids: Vec<u32> = (0..num_blocks as u32).collect();
    ids.shuffle(rng);
    let mut cache = LayerKvCache::new(KvCacheShape {
        num_blocks,
        block_size,
        num_kv_heads: p.num_kv_heads,
        head_dim: p.head_dim,
    });
    // Garbage in unused slots must never be read.
    cache.k.fill(f32::NAN);
    cache.v.fill(f32::NAN);
    let mut next = 0;
    let mut tables = Vec::new();
    for s in seqs {
        let nb = s.context_len.div_ceil(block_size);
        let table = ids[next..next + nb].to_vec();
        next += nb;
        let slots: Vec<u32> = (0..s.context_len)
            .map(|pos| table[pos / block_size] * block_size as u32 + (pos % block_size) as u32)
            .collect();
        write_kv(&mut cache, &s.k, &s.v, &slots);
        tables.push(table);
    }
    (cache, tables)
}

/// Flattens the sequences' queries into one batch and returns (q, seq descriptors).
fn batch<'a>(seqs: &[SeqData], tables: &'a [Vec<u32>]) -> (Vec<f32>, Vec<SeqAttention<'a>>) {
    let mut q = Vec::new();
    let mut descs = Vec::new();
    let mut start = 0;
    for (s, t) in seqs.iter().zip(tables) {
        q.extend_from_slice(&s.q);
        descs.push(SeqAttention {
            query_start: start,
            query_len: s.query_len,
            context_len: s.context_len,
            block_table: t,
        });
        start += s.query_len;
    }
    (q, descs)
}

fn assert_close(got: &[f32], want: &[f32], tol: f32, what: &str) {
    assert_eq!(got.len(), want.len(), "{what}: length");
    for (i, (&g, &w)) in got.iter().zip(want).enumerate() {
        assert!(
            (g - w).abs() <= tol * (1.0 + w.abs()),
            "{what}: element {i}: got {g}, want {w}"
        );
    }
}

/// Runs fast and reference paged attention on the batch and checks both against the
/// contiguous computation.
fn check_against_contiguous(
    rng: &mut ChaCha8Rng,
    seqs: &[SeqData],
    p: &AttentionParams,
    block_size: usize,
) {
    let (cache, tables) = scatter_into_cache(rng, seqs, p, block_size);
    let (q, descs) = batch(seqs, &tables);
    let want: Vec<f32> = seqs
        .iter()
        .flat_map(|s| contiguous_attention(s, p))
        .collect();
    let mut fast = vec![0.0; q.len()];
    paged_attention(&q, &cache, &descs, p, &mut fast);
    let mut reference = vec![0.0; q.len()];
    paged_attention_reference(&q, &cache, &descs, p, &mut reference);
    let ctx = format!("{p:?} block_size {block_size}");
    assert_close(&fast, &want, 2e-5, &format!("fast {ctx}"));
    assert_close(&reference, &want, 1e-6, &format!("reference {ctx}"));
}

#[test]
fn scattered_blocks_match_contiguous_attention() {
    let mut rng = ChaCha8Rng::seed_from_u64(42);
    for &group in &[1usize, 3, 4] {
        for &head_dim in &[16usize, 64] {
            for &block_size in &[1usize, 4, 16] {
                let p = params(2, group, head_dim);
                // (context_len, query_len): decodes, a full prefill, a prefill chunk on top of
                // cached context; lengths deliberately not multiples of the block size.
                let shapes = [(1, 1), (23, 1), (37, 37), (50, 19), (70, 1)];
                let seqs: Vec<SeqData> = shapes
                    .iter()
                    .map(|&(c, ql)| random_seq(&mut rng, &p, c, ql))
                    .collect();
                check_against_contiguous(&mut rng, &seqs, &p, block_size);
            }
        }
    }
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 48, ..ProptestConfig::default() })]

    #[test]
    fn random_shapes_match_contiguous_attention(
        seed in any::<u64>(),
        num_kv_heads in 1usize..=3,
        group in prop::sample::select(vec![1usize, 2, 3, 4]),
        // 12 and 20 exercise the non-multiple-of-8 tail of the dot product.
        head_dim in prop::sample::select(vec![8usize, 12, 16, 20, 64]),
        block_size in prop::sample::select(vec![1usize, 2, 4, 16]),
        lens in prop::collection::vec((1usize..60, 1usize..40), 1..5),
    ) {
        let mut rng = ChaCha8Rng::seed_from_u64(seed);
        let p = params(num_kv_heads, group, head_dim);
        let seqs: Vec<SeqData> = lens
            .iter()
            .map(|&(c, ql)| random_seq(&mut rng, &p, c, ql.min(c)))
            .collect();
        check_against_contiguous(&mut rng, &seqs, &p, block_size);
    }
}

/// Output of a batch row depends only on its own sequence: a mixed batch (two prefill chunks with
/// earlier cached context, three decodes, interleaved) equals each sequence run alone, bit for
/// bit, on 1 and 2 threads.
#[test]
fn mixed_batch_equals_sequences_alone() {
    let mut rng = ChaCha8Rng::seed_from_u64(3);
    let p = params(3, 3, 64);
    let block_size = 16;
    let shapes = [(40, 1), (53, 21), (1, 1), (90, 35), (129, 1)];
    let seqs: Vec<SeqData> = shapes
        .iter()
        .map(|&(c, ql)| random_seq(&mut rng, &p, c, ql))
        .collect();
    let (cache, tables) = scatter_into_cache(&mut rng, &seqs, &p, block_size);
    let (q, descs) = batch(&seqs, &tables);

    for threads in [1, 2] {
        let pool = rayon::ThreadPoolBuilder::new()
            .num_threads(threads)
            .build()
            .unwrap();
        let mut out = vec![f32::NAN; q.len()];
        pool.install(|| paged_attention(&q, &cache, &descs, &p, &mut out));
        let row = p.num_heads * p.head_dim;
        for (s, d) in seqs.iter().zip(&descs) {
            let alone_desc = SeqAttention {
                query_start: 0,
                ..*d
            };
            let mut alone = vec![f32::NAN; s.q.len()];
            pool.install(|| paged_attention(&s.q, &cache, &[alone_desc], &p, &mut alone));
            let rows = &out[d.query_start * row..(d.query_start + d.query_len) * row];
            assert_eq!(
                rows,
                &alone[..],
                "{threads} threads: seq at row {}",
                d.query_start
            );
        }
        assert_close(
            &out,
            &seqs
                .iter()
                .flat_map(|s| contiguous_attention(s, &p))
                .collect::<Vec<_>>(),
            2e-5,
            "mixed batch vs contiguous",
        );
    }
}

/// Prefill split into three chunks (each written to the cache just before its step) gives the
/// same outputs as one-shot prefill.
#[test]
fn chunked_prefill_equals_one_shot() {
    let mut rng = ChaCha8Rng::seed_from_u64(11);
    let p = params(2, 4, 16);
    let block_size = 4;
    let total = 45;
    let s = random_seq(&mut rng, &p, total, total);
    let kv_row = p.num_kv_heads * p.head_dim;
    let q_row = p.num_heads * p.head_dim;
    let table: Vec<u32> = {
        let mut ids: Vec<u32> = (0..16).collect();
        ids.shuffle(&mut rng);
        ids[..total.div_ceil(block_size)].to_vec()
    };
    let shape = KvCacheShape {
        num_blocks: 16,
        block_size,
        num_kv_heads: p.num_kv_heads,
        head_dim: p.head_dim,
    };
    let slot = |pos: usize| table[pos / block_size] * block_size as u32 + (pos % block_size) as u32;

    let mut one_shot_cache = LayerKvCache::new(shape);
    let slots: Vec<u32> = (0..total).map(slot).collect();
    write_kv(&mut one_shot_cache, &s.k, &s.v, &slots);
    let mut one_shot = vec![0.0; total * q_row];
    let desc = SeqAttention {
        query_start: 0,
        query_len: total,
        context_len: total,
        block_table: &table,
    };
    paged_attention(&s.q, &one_shot_cache, &[desc], &p, &mut one_shot);

    let mut cache = LayerKvCache::new(shape);
    let mut chunked = Vec::new();
    let mut done = 0;
    for len in [13, 20, 12] {
        let r = done..done + len;
        let slots: Vec<u32> = r.clone().map(slot).collect();
        write_kv(
            &mut cache,
            &s.k[r.start * kv_row..r.end * kv_row],
            &s.v[r.start * kv_row..r.end * kv_row],
            &slots,
        );
        let desc = SeqAttention {
            query_start: 0,
            query_len: len,
            context_len: done + len,
            block_table: &table,
        };
        let mut out = vec![0.0; len * q_row];
        paged_attention(
            &s.q[r.start * q_row..r.end * q_row],
            &cache,
            &[desc],
            &p,
            &mut out,
        );
        chunked.extend(out);
        done += len;
    }
    assert_close(&chunked, &one_shot, 1e-6, "chunked vs one-shot");
    assert_close(
        &one_shot,
        &contiguous_attention(&s, &p),
        2e-5,
        "one-shot vs contiguous",
    );
}

#[test]
#[should_panic(expected = "block table")]
fn short_block_table_panics() {
    let p = params(1, 1, 8);
    let cache = LayerKvCache::new(KvCacheShape {
        num_blocks: 4,
        block_size: 4,
        num_kv_heads: 1,
        head_dim: 8,
    });
    let q = vec![0.0; 8];
    let mut out = vec![0.0; 8];
    let desc = SeqAttention {
        query_start: 0,
        query_len: 1,
        context_len: 5,
        block_table: &[0],
    };
    paged_attention(&q, &cache, &[desc], &p, &mut out);
}
