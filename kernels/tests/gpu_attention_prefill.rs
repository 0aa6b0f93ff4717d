//! GPU paged prefill attention, both kernels (`cuda/attention_prefill.cu` on CUDA cores,
//! `cuda/attention_prefill_tc.cu` on tensor cores), against the CPU reference
//! (`paged_attention_reference`, f64), on every device (see gpu_support).
//!
//! The kernels' tiles: 64 (token, head) rows per CTA, so 64 / group query tokens (64, 21, 16, 8
//! for GQA 1, 3, 4, 8), and 32 keys per K/V tile. The cases put chunk lengths and contexts on
//! both sides of those edges, in ragged batches with shuffled block tables.

mod gpu_support;

use caduceus_kernels::gpu::attention::AttentionKernel;
use caduceus_kernels::gpu::attention::{
    AttnShape, PagedAttnArgs, PagedBatchBuffers, SUPPORTED_HEAD_DIMS,
};
use caduceus_kernels::gpu::attention_prefill::paged_attention_prefill;
use caduceus_kernels::gpu::{DType, Device};
use caduceus_kernels::{
    paged_attention_reference, AttentionParams, KvCacheShape, LayerKvCache, SeqAttention,
};
use gpu_support::*;
use rand::seq::SliceRandom;

/// One batch: its head layout and, per sequence, (tokens cached before the chunk, chunk length).
struct Case {
    group: usize,
    num_kv_heads: usize,
    head_dim: usize,
    block_size: usize,
    seqs: &'static [(usize, usize)],
}

/// Runs `case` on every device in both dtypes and compares every output element with the
/// reference.
fn check(name: &str, case: &Case, seed: u64) {
    let num_heads = case.group * case.num_kv_heads;
    let hd = case.head_dim;
    let bs = case.block_size;
    let mut r = rng(seed);
    // Block ids handed out from a shuffled pool (with spare blocks nobody owns).
    let blocks_needed: usize = case.seqs.iter().map(|&(c, n)| (c + n).div_ceil(bs)).sum();
    let num_blocks = blocks_needed + 3;
    let mut pool: Vec<u32> = (0..num_blocks as u32).collect();
    pool.shuffle(&mut r);
    let mut tables = Vec::new();
    let mut next = 0;
    for &(c, n) in case.seqs {
        let k = (c + n).div_ceil(bs);
        tables.push(pool[next..next + k].to_vec());
        next += k;
    }
    let mut query_start = 0;
    let seqs: Vec<SeqAttention<'_>> = case
        .seqs
        .iter()
        .zip(&tables)
        .map(|(&(cached, n), table)| {
            let s = SeqAttention {
                query_start,
                query_len: n,
                context_len: cached + n,
                block_table: table,
            };
            query_start += n;
            s
        })
        .collect();
    let num_tokens = query_start;
    let shape = KvCacheShape {
        num_blocks,
        block_size: bs,
        num_kv_heads: case.num_kv_heads,
        head_dim: hd,
    };
    let params = AttentionParams {
        num_heads,
        num_kv_heads: case.num_kv_heads,
        head_dim: hd,
        scale: 1.0 / (hd as f32).sqrt(),
    };
    let gpu_shape = AttnShape {
        num_heads,
        num_kv_heads: case.num_kv_heads,
        head_dim: hd,
        block_size: bs,
        num_blocks,
        scale: params.scale,
    };
    let q_raw = random(&mut r, num_tokens * num_heads * hd, 2.0);
    let k_raw = random(&mut r, shape.elems(), 2.0);
    let v_raw = random(&mut r, shape.elems(), 1.0);
    for dev in devices() {
        for dtype in DTYPES {
            let mut cache = LayerKvCache::new(shape);
            cache.k = round(dtype, &k_raw);
            cache.v = round(dtype, &v_raw);
            let q = round(dtype, &q_raw);
            let mut want = vec![0.0; q.len()];
            paged_attention_reference(&q, &cache, &seqs, &params, &mut want);
            for kernel in AttentionKernel::ALL {
                let what = format!("{name}: {} {dtype:?} {}", dev.describe(), kernel.name());
                let got = run_gpu(&dev, dtype, kernel, &q, &cache, &seqs, &gpu_shape);
                // f32 scores, softmax and accumulation over at most a few hundred keys (vs f64)
                // on outputs of magnitude <= 1, then one rounding of the output to the dtype.
                // The tensor-core kernel also rounds each softmax weight p to the dtype before
                // p v: sum |p~ - p| |v| / sum p <= u max |v|, with u the unit roundoff (`eps`)
                // and max |v| = 1 here.
                let atol = match kernel {
                    AttentionKernel::CudaCores => 2e-5,
                    AttentionKernel::TensorCores => 2e-5 + eps(dtype),
                };
                assert_close(&what, &got, &want, atol, eps(dtype));
            }
        }
    }
}

fn run_gpu(
    dev: &Device,
    dtype: DType,
    kernel: AttentionKernel,
    q: &[f32],
    cache: &LayerKvCache,
    seqs: &[SeqAttention<'_>],
    shape: &AttnShape,
) -> Vec<f32> {
    let batch = PagedBatchBuffers::upload(dev, seqs).unwrap();
    let (dq, dk, dv) = (
        upload(dev, dtype, q),
        upload(dev, dtype, &cache.k),
        upload(dev, dtype, &cache.v),
    );
    let out = zeros(dev, dtype, q.len());
    let args = PagedAttnArgs {
        q: &dq,
        k_cache: &dk,
        v_cache: &dv,
        out: &out,
        batch: batch.batch(),
        shape: *shape,
    };
    paged_attention_prefill(dev, dtype, &args, kernel).unwrap();
    download(dev, dtype, &out)
}

#[test]
fn fresh_chunks_crossing_the_query_tile_match_the_cpu() {
    // MHA: 64 tokens per tile; chunks of 1, 63, 64, 65 with nothing cached.
    let case = Case {
        group: 1,
        num_kv_heads: 2,
        head_dim: 64,
        block_size: 16,
        seqs: &[(0, 1), (0, 63), (0, 64), (0, 65)],
    };
    check("mha fresh chunks", &case, 1);
}

#[test]
fn prefix_hits_with_gqa4_and_head_dim_128_match_the_cpu() {
    // GQA 4: 16 tokens per tile; chunks of 15, 16, 17 after 0 to 100 cached tokens, whose
    // contexts end on both sides of the 32-key tile.
    let case = Case {
        group: 4,
        num_kv_heads: 2,
        head_dim: 128,
        block_size: 16,
        seqs: &[(100, 17), (48, 16), (0, 15), (17, 15), (31, 1)],
    };
    check("gqa4 prefix hits", &case, 2);
}

#[test]
fn gqa3_and_gqa8_chunks_match_the_cpu() {
    // GQA 3: 21 tokens (63 of the 64 rows) per tile.
    let gqa3 = Case {
        group: 3,
        num_kv_heads: 2,
        head_dim: 64,
        block_size: 8,
        seqs: &[(11, 20), (0, 21), (40, 22)],
    };
    check("gqa3", &gqa3, 3);
    // GQA 8: 8 tokens per tile.
    let gqa8 = Case {
        group: 8,
        num_kv_heads: 1,
        head_dim: 128,
        block_size: 32,
        seqs: &[(40, 7), (3, 8), (64, 9)],
    };
    check("gqa8", &gqa8, 4);
}

#[test]
fn decode_rows_in_a_mixed_batch_match_the_cpu() {
    // Query length 1 at contexts around the key tile, next to a prefill chunk and a sequence
    // with no query tokens this step.
    let case = Case {
        group: 4,
        num_kv_heads: 2,
        head_dim: 64,
        block_size: 8,
        seqs: &[(0, 1), (30, 1), (31, 1), (7, 0), (32, 1), (12, 30), (89, 1)],
    };
    check("decode rows", &case, 5);
}

#[test]
fn every_supported_head_dim_matches_the_cpu() {
    // A prefix hit crossing a key tile (32 keys, 16 for head_dim 256) and a query tile (16
    // tokens at GQA 4, 8 for head_dim 256's 32-row tiles), next to a fresh chunk and a decode
    // row.
    for (i, &head_dim) in SUPPORTED_HEAD_DIMS.iter().enumerate() {
        let case = Case {
            group: 4,
            num_kv_heads: 1,
            head_dim,
            block_size: 16,
            seqs: &[(20, 17), (0, 3), (33, 1)],
        };
        let name = format!("head_dim {head_dim}");
        check(&name, &case, 10 + i as u64);
    }
}

#[test]
fn long_prefills_over_long_prefixes_match_the_cpu() {
    // Many query tiles per sequence and up to 63 K/V tiles per CTA.
    let case = Case {
        group: 4,
        num_kv_heads: 2,
        head_dim: 128,
        block_size: 16,
        seqs: &[(700, 300), (0, 257), (1999, 1), (33, 190)],
    };
    check("long prefills", &case, 6);
}

#[test]
fn launcher_refuses_unsupported_shapes_and_small_buffers() {
    let dev = &devices()[0];
    let dtype = DTYPES[0];
    let table = [0u32];
    let seqs = [SeqAttention {
        query_start: 0,
        query_len: 2,
        context_len: 2,
        block_table: &table,
    }];
    let batch = PagedBatchBuffers::upload(dev, &seqs).unwrap();
    let small = zeros(dev, dtype, 8);
    let big = zeros(dev, dtype, 2 * 80 * 128);
    let run = |q, num_heads, head_dim| {
        let shape = AttnShape {
            num_heads,
            num_kv_heads: 1,
            head_dim,
            block_size: 16,
            num_blocks: 1,
            scale: 1.0,
        };
        let args = PagedAttnArgs {
            q,
            k_cache: &big,
            v_cache: &big,
            out: &big,
            batch: batch.batch(),
            shape,
        };
        paged_attention_prefill(dev, dtype, &args, AttentionKernel::TensorCores)
            .unwrap_err()
            .to_string()
    };
    assert!(run(&big, 2, 48).contains("head_dim 48"));
    assert!(run(&big, 80, 64).contains("at most 64"));
    // head_dim 256 tiles hold 32 rows: a GQA group of 40 cannot fit.
    assert!(run(&big, 40, 256).contains("at most 32"));
    assert!(run(&small, 2, 64).contains("attention q"));
}
