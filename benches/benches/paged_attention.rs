//! Paged attention throughput: decode batches (16 and 64 sequences at context 512) and one
//! 512-token prefill, SmolLM2-135M head layout (9 query heads, 3 KV heads, head_dim 64), block 16.
//! Runs in the global rayon pool: compare `RAYON_NUM_THREADS=1` with `RAYON_NUM_THREADS=2`
//! (the thread count is part of the benchmark id).

use caduceus_kernels::attention::{
    paged_attention, AttentionParams, KvCacheShape, LayerKvCache, SeqAttention,
};
use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};

const NUM_HEADS: usize = 9;
const NUM_KV_HEADS: usize = 3;
const HEAD_DIM: usize = 64;
const BLOCK: usize = 16;
const CONTEXT: usize = 512;

/// Deterministic pseudo-random fill (values in [-1, 1)) without pulling in an RNG crate.
fn fill(v: &mut [f32], mut state: u64) {
    for x in v {
        state = state
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        *x = ((state >> 40) as f32 / (1u64 << 24) as f32) * 2.0 - 1.0;
    }
}

struct Case {
    cache: LayerKvCache,
    tables: Vec<Vec<u32>>,
    query_lens: Vec<usize>,
    q: Vec<f32>,
}

/// `num_seqs` sequences of `CONTEXT` tokens each, with `query_len` new tokens, blocks strided
/// through the pool so sequences do not sit contiguously.
fn case(num_seqs: usize, query_len: usize) -> Case {
    let blocks_per_seq = CONTEXT / BLOCK;
    let num_blocks = num_seqs * blocks_per_seq;
    let mut cache = LayerKvCache::new(KvCacheShape {
        num_blocks,
        block_size: BLOCK,
        num_kv_heads: NUM_KV_HEADS,
        head_dim: HEAD_DIM,
    });
    fill(&mut cache.k, 1);
    fill(&mut cache.v, 2);
    let tables = (0..num_seqs)
        .map(|s| {
            (0..blocks_per_seq)
                .map(|j| (j * num_seqs + s) as u32)
                .collect()
        })
        .collect();
    let mut q = vec![0.0; num_seqs * query_len * NUM_HEADS * HEAD_DIM];
    fill(&mut q, 3);
    Case {
        cache,
        tables,
        query_lens: vec![query_len; num_seqs],
        q,
    }
}

/// Threads of the global rayon pool, as configured by `RAYON_NUM_THREADS` (default: all cores).
fn rayon_threads() -> usize {
    std::env::var("RAYON_NUM_THREADS")
        .ok()
        .and_then(|v| v.parse().ok())
        .filter(|&n| n > 0)
        .unwrap_or_else(|| std::thread::available_parallelism().map_or(1, |n| n.get()))
}

fn bench(c: &mut Criterion) {
    let params = AttentionParams {
        num_heads: NUM_HEADS,
        num_kv_heads: NUM_KV_HEADS,
        head_dim: HEAD_DIM,
        scale: 1.0 / (HEAD_DIM as f32).sqrt(),
    };
    let threads = rayon_threads();
    let mut group = c.benchmark_group("paged_attention");
    for (name, num_seqs, query_len) in [
        ("decode16", 16, 1),
        ("decode64", 64, 1),
        ("prefill512", 1, CONTEXT),
    ] {
        let case = case(num_seqs, query_len);
        let mut start = 0;
        let seqs: Vec<SeqAttention<'_>> = case
            .tables
            .iter()
            .zip(&case.query_lens)
            .map(|(t, &ql)| {
                let s = SeqAttention {
                    query_start: start,
                    query_len: ql,
                    context_len: CONTEXT,
                    block_table: t,
                };
                start += ql;
                s
            })
            .collect();
        let mut out = vec![0.0; case.q.len()];
        group.throughput(Throughput::Elements((num_seqs * query_len) as u64));
        group.bench_function(BenchmarkId::new(name, format!("{threads}t")), |b| {
            b.iter(|| paged_attention(&case.q, &case.cache, &seqs, &params, &mut out))
        });
    }
    group.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);
