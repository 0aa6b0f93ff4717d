//! GPU paged attention for decode tokens (`cuda/attention_decode.cu`) against the f64 CPU
//! reference `paged_attention_reference`, on every device (see gpu_support).

mod gpu_support;

use caduceus_kernels::attention::{KvCacheShape, LayerKvCache, SeqAttention};
use caduceus_kernels::gpu::attention::{
    paged_attention_decode, paged_attention_decode_only, paged_attention_decode_tc,
    AttentionKernel, AttnShape, DecodePlan, DecodeSplit, PagedAttnArgs, PagedBatchBuffers,
    TensorCoreDecode, SUPPORTED_HEAD_DIMS,
};
use caduceus_kernels::gpu::{DType, Device, GpuError};
use caduceus_kernels::{paged_attention_reference, AttentionParams};
use gpu_support::*;
use rand::seq::SliceRandom;

const BLOCK_SIZE: usize = 16;
/// Rows of a non-decode sequence hold this before and after: the decode kernel skips them.
const UNTOUCHED: f32 = 7.0;

/// (query_len, context_len) per sequence: contexts at and around the block edges, one crossing
/// four 32-token tiles into a fifth (and the splits below), and a 3-token prefill chunk the
/// decode kernel must leave alone.
const SEQS: [(usize, usize); 6] = [
    (1, 1),
    (1, BLOCK_SIZE - 1),
    (3, 9),
    (1, BLOCK_SIZE),
    (1, BLOCK_SIZE + 1),
    (1, 130),
];

/// A random batch: K/V cache rounded to the dtype, blocks handed out in shuffled order.
struct Batch {
    /// (query_len, context_len) per sequence.
    spec: Vec<(usize, usize)>,
    cache: LayerKvCache,
    tables: Vec<Vec<u32>>,
    q: Vec<f32>,
    num_tokens: usize,
}

fn make_batch(
    dtype: DType,
    spec: &[(usize, usize)],
    (nh, nkv, hd): (usize, usize, usize),
    seed: u64,
) -> Batch {
    let mut r = rng(seed);
    let needed: Vec<usize> = spec.iter().map(|s| s.1.div_ceil(BLOCK_SIZE)).collect();
    let num_blocks = needed.iter().sum::<usize>() + 2;
    let mut ids: Vec<u32> = (0..num_blocks as u32).collect();
    ids.shuffle(&mut r);
    let mut next = ids.into_iter();
    let tables = needed
        .iter()
        .map(|&n| next.by_ref().take(n).collect())
        .collect();
    let shape = KvCacheShape {
        num_blocks,
        block_size: BLOCK_SIZE,
        num_kv_heads: nkv,
        head_dim: hd,
    };
    let mut cache = LayerKvCache::new(shape);
    cache.k = round(dtype, &random(&mut r, shape.elems(), 1.0));
    cache.v = round(dtype, &random(&mut r, shape.elems(), 1.0));
    let num_tokens = spec.iter().map(|s| s.0).sum();
    // Queries of a few units so the softmax is neither flat nor one-hot.
    let q = round(dtype, &random(&mut r, num_tokens * nh * hd, 3.0));
    Batch {
        spec: spec.to_vec(),
        cache,
        tables,
        q,
        num_tokens,
    }
}

fn seqs(b: &Batch) -> Vec<SeqAttention<'_>> {
    let mut start = 0;
    b.spec
        .iter()
        .zip(&b.tables)
        .map(|(&(query_len, context_len), table)| {
            let s = SeqAttention {
                query_start: start,
                query_len,
                context_len,
                block_table: table,
            };
            start += query_len;
            s
        })
        .collect()
}

/// Runs the decode kernel with `split`; returns the downloaded output and the plan it used.
fn run_decode(
    dev: &Device,
    dtype: DType,
    b: &Batch,
    shape: &AttnShape,
    split: DecodeSplit,
) -> (Vec<f32>, DecodePlan) {
    run_decode_on(dev, dtype, b, shape, split, Launcher::Decode)
}

/// Which launcher [`run_decode_on`] calls.
#[derive(Clone, Copy, Debug)]
enum Launcher {
    /// [`paged_attention_decode`].
    Decode,
    /// [`paged_attention_decode_only`] on these cores.
    DecodeOnly(AttentionKernel),
    /// [`paged_attention_decode_tc`] in this layout.
    TensorCores(TensorCoreDecode),
}

/// [`run_decode`] through `launcher`.
fn run_decode_on(
    dev: &Device,
    dtype: DType,
    b: &Batch,
    shape: &AttnShape,
    split: DecodeSplit,
    launcher: Launcher,
) -> (Vec<f32>, DecodePlan) {
    try_decode_on(dev, dtype, b, shape, split, launcher).unwrap()
}

/// [`run_decode_on`], with the launcher's error.
fn try_decode_on(
    dev: &Device,
    dtype: DType,
    b: &Batch,
    shape: &AttnShape,
    split: DecodeSplit,
    launcher: Launcher,
) -> Result<(Vec<f32>, DecodePlan), GpuError> {
    let batch = PagedBatchBuffers::upload(dev, &seqs(b)).unwrap();
    let (q, k, v) = (
        upload(dev, dtype, &b.q),
        upload(dev, dtype, &b.cache.k),
        upload(dev, dtype, &b.cache.v),
    );
    let out = upload(dev, dtype, &vec![UNTOUCHED; b.q.len()]);
    let args = PagedAttnArgs {
        q: &q,
        k_cache: &k,
        v_cache: &v,
        out: &out,
        batch: batch.batch(),
        shape: *shape,
    };
    let plan = DecodePlan::new(&args.batch, shape, split);
    let ws = dev
        .alloc_zeroed(plan.workspace_bytes(b.num_tokens, shape))
        .unwrap();
    match launcher {
        Launcher::Decode => paged_attention_decode(dev, dtype, &args, &plan, Some(&ws)),
        Launcher::DecodeOnly(k) => {
            paged_attention_decode_only(dev, dtype, &args, &plan, Some(&ws), k)
        }
        Launcher::TensorCores(l) => {
            paged_attention_decode_tc(dev, dtype, &args, &plan, Some(&ws), l)
        }
    }?;
    Ok((download(dev, dtype, &out), plan))
}

/// (num_heads, num_kv_heads, head_dim): GQA groups 1, 3, 4, 8, and 32 (wider than one CTA's 16
/// rows, so two CTAs share a KV head).
const HEADS: [(usize, usize, usize); 5] = [
    (2, 2, 64),
    (6, 2, 128),
    (4, 1, 64),
    (8, 1, 128),
    (32, 1, 64),
];

#[test]
fn decode_matches_the_f64_reference_with_and_without_splits() {
    for dev in devices() {
        for (i, &(nh, nkv, hd)) in HEADS.iter().enumerate() {
            for dtype in DTYPES {
                let what = format!("{} {dtype:?} heads {nh}/{nkv} hd {hd}", dev.describe());
                let b = make_batch(dtype, &SEQS, (nh, nkv, hd), 200 + i as u64);
                let scale = 1.0 / (hd as f32).sqrt();
                let (shape, params) = shapes((nh, nkv, hd), b.cache.shape.num_blocks, scale);
                let mut want = vec![UNTOUCHED; b.q.len()];
                paged_attention_reference(&b.q, &b.cache, &seqs(&b), &params, &mut want);
                let row = nh * hd;
                // Off: one CTA per context; 32: every tile its own split (5 for 130 tokens, the
                // last partial); 64: splits of two tiles.
                let splits = [
                    DecodeSplit::Off,
                    DecodeSplit::Tokens(32),
                    DecodeSplit::Tokens(64),
                ];
                let runs: Vec<_> = splits
                    .into_iter()
                    .map(|split| (split, run_decode(&dev, dtype, &b, &shape, split).0))
                    .collect();
                for (split, got) in &runs {
                    assert_decode_rows(&format!("{what} {split:?}"), &SEQS, row, dtype, got, &want);
                }
                // Split and unsplit agree to within one ulp of the dtype.
                assert_close(
                    &format!("{what}: split vs not"),
                    &runs[1].1,
                    &runs[0].1,
                    2e-5,
                    2.0 * eps(dtype) * 1.01,
                );
            }
        }
    }
}

#[test]
fn decode_only_batches_on_tensor_cores_match_the_reference() {
    // All sequences decode, on tensor cores in both layouts: the prefill kernel with a query tile
    // of one token's GQA heads (up to 32 here; warps of padding rows skip their compute), and
    // the decode kernel with the keys of each tile across warps (groups up to 16). Split plans
    // (every 32-token tile its own split, so half a 64-key tile; two tiles, the last partial) go
    // through the decode kernel's merge. `paged_attention_decode_only` takes the layout
    // `TensorCoreDecode::for_shape` names.
    let spec: Vec<(usize, usize)> = SEQS.iter().copied().filter(|s| s.0 == 1).collect();
    for dev in devices() {
        for (i, &(nh, nkv, hd)) in HEADS.iter().enumerate() {
            for dtype in DTYPES {
                let (b, shape, want) = decode_case(dtype, &spec, (nh, nkv, hd), 300 + i as u64);
                let chosen = TensorCoreDecode::for_shape(&shape);
                assert_eq!(
                    chosen == TensorCoreDecode::KeysAcrossWarps,
                    nh / nkv <= 16,
                    "heads {nh}/{nkv}"
                );
                let mut launchers = vec![
                    Launcher::DecodeOnly(AttentionKernel::TensorCores),
                    Launcher::TensorCores(TensorCoreDecode::QueryTile),
                ];
                if chosen == TensorCoreDecode::KeysAcrossWarps {
                    launchers.push(Launcher::TensorCores(TensorCoreDecode::KeysAcrossWarps));
                }
                let splits = [
                    (DecodeSplit::Off, 1),
                    (DecodeSplit::Tokens(32), 5),
                    (DecodeSplit::Tokens(64), 3),
                ];
                let case = (&b, &shape, &want[..]);
                let what = format!("{} {dtype:?} heads {nh}/{nkv} hd {hd}", dev.describe());
                for launcher in launchers {
                    check_tc_splits(&dev, dtype, case, launcher, &splits, &what);
                }
            }
        }
    }
}

/// The keys-across-warps kernel over contexts of many 64-key tiles (the 3-tile ring wraps
/// around twice at 513), at the head dims whose rows it swizzles (64, 128) and pads (80), for
/// GQA groups up to its 16 rows, unsplit and split into partitions that end mid-tile (32, 96)
/// or on a tile (192).
#[test]
fn keys_across_warps_over_long_contexts_match_the_reference() {
    let spec: [(usize, usize); 6] = [(1, 1), (1, 63), (1, 64), (1, 65), (1, 200), (1, 513)];
    let shapes_to_run: [(usize, usize, usize); 3] = [(16, 1, 128), (8, 2, 80), (4, 4, 64)];
    for dev in devices() {
        for (i, &(nh, nkv, hd)) in shapes_to_run.iter().enumerate() {
            for dtype in DTYPES {
                let (b, shape, want) = decode_case(dtype, &spec, (nh, nkv, hd), 500 + i as u64);
                let layout = Launcher::TensorCores(TensorCoreDecode::KeysAcrossWarps);
                let splits = [
                    (DecodeSplit::Off, 1),
                    (DecodeSplit::Tokens(32), 17),
                    (DecodeSplit::Tokens(96), 6),
                    (DecodeSplit::Tokens(192), 3),
                ];
                let case = (&b, &shape, &want[..]);
                let what = format!("{} {dtype:?} heads {nh}/{nkv} hd {hd}", dev.describe());
                check_tc_splits(&dev, dtype, case, layout, &splits, &what);
            }
        }
    }
}

/// Keys across warps refuses a GQA group wider than its 16 rows and a head dim without
/// tensor-core kernels, naming the limit; `paged_attention_decode_only` runs both anyway (on the
/// query tile and on CUDA cores).
#[test]
fn keys_across_warps_refuses_what_it_cannot_run() {
    let dev = Device::emulated();
    let dtype = DType::Bf16;
    for (nh, hd, want) in [(32, 64, "at most 16"), (2, 256, "head_dim 256")] {
        let (b, shape, reference) = decode_case(dtype, &[(1, 20)], (nh, 1, hd), 600);
        let layout = Launcher::TensorCores(TensorCoreDecode::KeysAcrossWarps);
        let err = try_decode_on(&dev, dtype, &b, &shape, DecodeSplit::Off, layout)
            .unwrap_err()
            .to_string();
        assert!(err.contains(want), "{err}");
        let tc = Launcher::DecodeOnly(AttentionKernel::TensorCores);
        let (got, _) = run_decode_on(&dev, dtype, &b, &shape, DecodeSplit::Off, tc);
        let what = format!("heads {nh} hd {hd}");
        assert_close(
            &what,
            &got,
            &reference,
            2e-5 + eps(dtype),
            eps(dtype) * 1.01,
        );
    }
}

/// Runs `case` (a batch, its shape, the reference output) through `launcher` under each
/// (split, the split count it must give) and checks the output within the tensor-core kernels'
/// bound: P rounded to the dtype before P V moves an output by at most the unit roundoff times
/// max |v| (1 here), in every split and so in their convex combination.
fn check_tc_splits(
    dev: &Device,
    dtype: DType,
    (b, shape, want): (&Batch, &AttnShape, &[f32]),
    launcher: Launcher,
    splits: &[(DecodeSplit, usize)],
    what: &str,
) {
    for &(split, num_splits) in splits {
        let what = format!("{what} {split:?} {launcher:?}");
        let (got, plan) = run_decode_on(dev, dtype, b, shape, split, launcher);
        assert_eq!(plan.num_splits, num_splits, "{what}");
        assert_close(&what, &got, want, 2e-5 + eps(dtype), eps(dtype) * 1.01);
    }
}

/// A random decode-only batch of `spec` for `heads` (scale 1 / sqrt(head_dim)), its shape and
/// the f64 reference's output.
fn decode_case(
    dtype: DType,
    spec: &[(usize, usize)],
    (nh, nkv, hd): (usize, usize, usize),
    seed: u64,
) -> (Batch, AttnShape, Vec<f32>) {
    let b = make_batch(dtype, spec, (nh, nkv, hd), seed);
    let scale = 1.0 / (hd as f32).sqrt();
    let (shape, params) = shapes((nh, nkv, hd), b.cache.shape.num_blocks, scale);
    let mut want = vec![0.0; b.q.len()];
    paged_attention_reference(&b.q, &b.cache, &seqs(&b), &params, &mut want);
    (b, shape, want)
}

/// Decode rows of `got` within one rounding of `want`; rows of other sequences untouched.
fn assert_decode_rows(
    what: &str,
    spec: &[(usize, usize)],
    row: usize,
    dtype: DType,
    got: &[f32],
    want: &[f32],
) {
    let mut t = 0;
    for &(query_len, ctx) in spec {
        let rows = t * row..(t + query_len) * row;
        let what = format!("{what}: context {ctx}");
        if query_len == 1 {
            // One rounding of an f32 result, plus f32 accumulation and __expf.
            assert_close(
                &what,
                &got[rows.clone()],
                &want[rows],
                2e-5,
                eps(dtype) * 1.01,
            );
        } else {
            assert!(
                got[rows].iter().all(|&x| x == UNTOUCHED),
                "{what}: prefill rows written"
            );
        }
        t += query_len;
    }
}

/// Every head dim the kernels are built for (16 for the shared tiny Llama, 80/96 with lanes
/// holding a chunk fewer, 256 with 16-token tiles), GQA 2, unsplit and split into 32-token
/// partitions (which for a 40-token context exercises the merge at every head dim, including
/// its strided loop over 256 dims).
#[test]
fn every_supported_head_dim_matches_the_reference() {
    const SPEC: [(usize, usize); 3] = [(1, 1), (2, 5), (1, 40)];
    for dev in devices() {
        for (i, &hd) in SUPPORTED_HEAD_DIMS.iter().enumerate() {
            for dtype in DTYPES {
                let (nh, nkv) = (4, 2);
                let what = format!("{} {dtype:?} hd {hd}", dev.describe());
                let b = make_batch(dtype, &SPEC, (nh, nkv, hd), 400 + i as u64);
                let scale = 1.0 / (hd as f32).sqrt();
                let (shape, params) = shapes((nh, nkv, hd), b.cache.shape.num_blocks, scale);
                let mut want = vec![UNTOUCHED; b.q.len()];
                paged_attention_reference(&b.q, &b.cache, &seqs(&b), &params, &mut want);
                for split in [DecodeSplit::Off, DecodeSplit::Tokens(32)] {
                    let (got, plan) = run_decode(&dev, dtype, &b, &shape, split);
                    assert_eq!(
                        plan.num_splits,
                        if split == DecodeSplit::Off { 1 } else { 2 }
                    );
                    let what = format!("{what} {split:?}");
                    assert_decode_rows(&what, &SPEC, nh * hd, dtype, &got, &want);
                }
            }
        }
    }
}

/// The launcher's own choice for a batch that cannot fill the GPU: one long sequence on two KV
/// heads gets 24 splits of 64 tokens (the last partial), merged back to the f64 reference.
#[test]
fn auto_split_of_a_long_context_matches_the_reference() {
    for dev in devices() {
        let dtype = DType::Bf16;
        let (nh, nkv, hd) = (2, 2, 64);
        let b = make_batch(dtype, &[(1, 1500)], (nh, nkv, hd), 300);
        let scale = 0.125;
        let (shape, params) = shapes((nh, nkv, hd), b.cache.shape.num_blocks, scale);
        let mut want = vec![0.0; b.q.len()];
        paged_attention_reference(&b.q, &b.cache, &seqs(&b), &params, &mut want);
        let (got, plan) = run_decode(&dev, dtype, &b, &shape, DecodeSplit::Auto);
        assert_eq!((plan.num_splits, plan.tokens_per_split), (24, 64));
        let what = format!("{} auto split, context 1500", dev.describe());
        assert_close(&what, &got, &want, 2e-5, eps(dtype) * 1.01);
    }
}

fn shape(nh: usize, nkv: usize, hd: usize) -> AttnShape {
    AttnShape {
        num_heads: nh,
        num_kv_heads: nkv,
        head_dim: hd,
        block_size: 16,
        num_blocks: 1,
        scale: 1.0,
    }
}

#[test]
fn auto_splits_only_when_the_batch_leaves_sms_idle() {
    let dev = Device::emulated();
    let buf = dev.alloc_zeroed(4).unwrap();
    let batch = |num_seqs, max_context_len| caduceus_kernels::gpu::attention::PagedBatch {
        query_start: &buf,
        context_len: &buf,
        block_tables: &buf,
        num_seqs,
        num_tokens: num_seqs,
        max_blocks_per_seq: max_context_len / 16,
        max_context_len,
    };
    // 256 sequences x 8 KV heads = 2048 CTAs: enough, no split.
    let big = DecodePlan::new(&batch(256, 4096), &shape(32, 8, 128), DecodeSplit::Auto);
    assert_eq!(big.num_splits, 1);
    assert_eq!(big.workspace_bytes(256, &shape(32, 8, 128)), 0);
    // One sequence x 8 KV heads: split the 32k context to reach ~528 CTAs (66 per head).
    let one = DecodePlan::new(&batch(1, 32_768), &shape(32, 8, 128), DecodeSplit::Auto);
    assert_eq!(one.tokens_per_split, 512);
    assert_eq!(one.num_splits, 64);
    // A short context is not cut below the minimum split (two 32-token tiles).
    let short = DecodePlan::new(&batch(1, 300), &shape(32, 8, 128), DecodeSplit::Auto);
    assert_eq!((short.num_splits, short.tokens_per_split), (5, 64));
    // Forced sizes round up to the 32-token tile.
    let forced = DecodePlan::new(&batch(4, 100), &shape(8, 8, 64), DecodeSplit::Tokens(40));
    assert_eq!((forced.num_splits, forced.tokens_per_split), (2, 64));
    assert_eq!(
        forced.workspace_bytes(4, &shape(8, 8, 64)),
        4 * 8 * 2 * 65 * 4
    );
}

#[test]
fn decode_rejects_a_split_plan_without_workspace_and_unsupported_head_dims() {
    let dev = Device::emulated();
    let dtype = DType::F16;
    let seqs = [SeqAttention {
        query_start: 0,
        query_len: 1,
        context_len: 40,
        block_table: &[0, 1, 2],
    }];
    let batch = PagedBatchBuffers::upload(&dev, &seqs).unwrap();
    let buf = zeros(&dev, dtype, 3 * 16 * 128);
    let mut s = shape(1, 1, 64);
    s.num_blocks = 3;
    let args = |shape| PagedAttnArgs {
        q: &buf,
        k_cache: &buf,
        v_cache: &buf,
        out: &buf,
        batch: batch.batch(),
        shape,
    };
    let split = DecodePlan::new(&batch.batch(), &s, DecodeSplit::Tokens(32));
    assert_eq!(split.num_splits, 2);
    assert!(paged_attention_decode(&dev, dtype, &args(s), &split, None).is_err());
    let whole = DecodePlan::new(&batch.batch(), &s, DecodeSplit::Off);
    assert!(paged_attention_decode(&dev, dtype, &args(s), &whole, None).is_ok());
    let err = paged_attention_decode(
        &dev,
        dtype,
        &args(AttnShape { head_dim: 48, ..s }),
        &whole,
        None,
    )
    .unwrap_err()
    .to_string();
    assert!(err.contains("head_dim 48") && err.contains("256"), "{err}");
}

/// The device kernels' and the CPU reference's description of the same layer.
fn shapes(
    (nh, nkv, hd): (usize, usize, usize),
    num_blocks: usize,
    scale: f32,
) -> (AttnShape, AttentionParams) {
    let shape = AttnShape {
        num_heads: nh,
        num_kv_heads: nkv,
        head_dim: hd,
        block_size: BLOCK_SIZE,
        num_blocks,
        scale,
    };
    let params = AttentionParams {
        num_heads: nh,
        num_kv_heads: nkv,
        head_dim: hd,
        scale,
    };
    (shape, params)
}
