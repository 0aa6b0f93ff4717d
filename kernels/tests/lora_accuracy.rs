//! LoRA kernels against the f64 reference: every strategy and kernel, SmolLM2-135M projection
//! shapes, ranks 8 to 128 mixed in one store, base-model tokens in between, segments of 1 to 40
//! tokens; plus odd dimensions (tails), strided outputs and the two halves called separately.

mod lora_support;

use caduceus_kernels::lora::{
    add_lora_with, lora_expand, lora_shrink, LoraKernel, LoraShape, LoraStrategy, LoraWeight,
    OutputRows,
};
use half::{bf16, f16};
use lora_support::*;

const STRATEGIES: [LoraStrategy; 3] = [LoraStrategy::Auto, LoraStrategy::Bgmv, LoraStrategy::Sgmv];

fn kernels() -> Vec<LoraKernel> {
    [LoraKernel::Scalar, LoraKernel::Avx2, LoraKernel::Avx512]
        .into_iter()
        .filter(|k| k.is_available())
        .collect()
}

/// Checks every strategy and kernel on one batch of `lens` segments over `ranks` (slot `s` holds
/// rank `ranks[s]`; one more slot stays empty and `None` segments mark base-model tokens).
fn check_shape<W: LoraWeight>(
    seed: u64,
    in_dim: usize,
    out_dim: usize,
    ranks: &[usize],
    lens: &[usize],
) {
    let mut r = rng(seed);
    let MixedBatch {
        adapters,
        shape,
        segs,
        num_tokens,
    } = mixed_batch(&mut r, (in_dim, out_dim), ranks, lens);
    let slots = store::<W>(shape, &adapters);
    let adapters: Vec<_> = adapters
        .iter()
        .map(|a| a.as_ref().map(rounded::<W>))
        .collect();
    let x = random_f32(&mut r, num_tokens * in_dim);
    let y0 = random_f32(&mut r, num_tokens * out_dim);
    let per_token = token_slots(&segs, num_tokens);
    let (_, want, bound) = reference(&adapters, &x, &per_token, &y0, (in_dim, out_dim));
    for kernel in kernels() {
        for strategy in STRATEGIES {
            let mut y = y0.clone();
            add_lora_with(
                &slots,
                &x,
                &segs,
                OutputRows::dense(&mut y, out_dim),
                strategy,
                kernel,
            )
            .unwrap();
            let what = format!(
                "{in_dim}->{out_dim} ranks {ranks:?} {:?} {kernel:?} {strategy:?}",
                W::KIND
            );
            assert_close(&y, &want, &bound, &what);
        }
    }
}

#[test]
fn lora_smollm_shapes_match_the_reference_on_every_path() {
    let lens = [1, 40, 1, 1, 7, 16, 17, 3, 33, 2, 1, 5];
    for (i, (in_dim, out_dim)) in [(576, 576), (576, 192), (576, 1536), (1536, 576)]
        .into_iter()
        .enumerate()
    {
        check_shape::<f32>(i as u64, in_dim, out_dim, &[8, 16, 64, 128], &lens);
    }
}

#[test]
fn lora_dims_off_the_vector_width_use_the_tails() {
    // in_dim % 8 != 0 (shrink tail), out_dim % 64 and % 8 != 0 (partial panel and vector), odd ranks.
    let lens = [3, 1, 6, 1, 2, 9];
    check_shape::<f32>(10, 100, 70, &[5, 13, 1], &lens);
    check_shape::<f32>(11, 7, 3, &[2, 3], &lens);
    check_shape::<f32>(12, 64, 8, &[8, 4], &lens);
    check_shape::<f16>(13, 100, 70, &[5, 13, 1], &lens);
    check_shape::<bf16>(14, 100, 70, &[5, 13, 1], &lens);
}

#[test]
fn lora_half_precision_stores_match_the_reference_on_their_weights() {
    let lens = [1, 40, 1, 1, 7, 16, 3];
    check_shape::<f16>(15, 576, 192, &[8, 16, 64, 128], &lens);
    check_shape::<bf16>(16, 1536, 576, &[8, 16, 64, 128], &lens);
}

#[test]
fn lora_shrink_then_expand_equals_the_fused_call() {
    let (in_dim, out_dim) = (576, 192);
    let mut r = rng(20);
    let adapters: Vec<_> = [16, 64]
        .iter()
        .map(|&rank| Some(random_adapter(&mut r, in_dim, out_dim, rank)))
        .collect();
    let shape = LoraShape {
        num_slots: 2,
        in_dim,
        out_dim,
        max_rank: 64,
    };
    let slots = store::<f32>(shape, &adapters);
    let segs = segments(&[1, 9, 1, 4, 2], &[Some(0), Some(1), None]);
    let num_tokens = 17;
    let x = random_f32(&mut r, num_tokens * in_dim);
    let y0 = random_f32(&mut r, num_tokens * out_dim);
    let per_token = token_slots(&segs, num_tokens);
    let (want_v, _, _) = reference(&adapters, &x, &per_token, &y0, (in_dim, out_dim));
    for kernel in kernels() {
        for strategy in STRATEGIES {
            let mut v = vec![0f32; num_tokens * 64];
            lora_shrink(&slots, &x, &segs, &mut v, strategy, kernel).unwrap();
            for (t, vt) in want_v.iter().enumerate() {
                for (k, &want) in vt.iter().enumerate() {
                    let got = v[t * 64 + k] as f64;
                    assert!(
                        (got - want).abs() <= 1e-5 * want.abs().max(1.0),
                        "v[{t}][{k}]"
                    );
                }
            }
            let mut split = y0.clone();
            let rows = OutputRows::dense(&mut split, out_dim);
            lora_expand(&slots, &v, &segs, rows, strategy, kernel).unwrap();
            let mut fused = y0.clone();
            let rows = OutputRows::dense(&mut fused, out_dim);
            add_lora_with(&slots, &x, &segs, rows, strategy, kernel).unwrap();
            assert_eq!(split, fused, "{kernel:?} {strategy:?}");
        }
    }
}

#[test]
fn lora_strided_output_adds_into_its_columns_only() {
    // The k projection's adapter adding into columns 576..768 of a fused QKV output of 960.
    let (in_dim, out_dim, stride, offset) = (576, 192, 960, 576);
    let mut r = rng(30);
    let adapters = vec![Some(random_adapter(&mut r, in_dim, out_dim, 16))];
    let shape = LoraShape {
        num_slots: 1,
        in_dim,
        out_dim,
        max_rank: 16,
    };
    let slots = store::<f32>(shape, &adapters);
    let segs = segments(&[1, 5, 1], &[Some(0), None]);
    let num_tokens = 7;
    let x = random_f32(&mut r, num_tokens * in_dim);
    let fused0 = random_f32(&mut r, num_tokens * stride);
    let mut dense: Vec<f32> = fused0
        .chunks(stride)
        .flat_map(|row| row[offset..offset + out_dim].to_vec())
        .collect();
    let mut fused = fused0.clone();
    for kernel in kernels() {
        let rows = OutputRows {
            data: &mut fused,
            stride,
            offset,
        };
        add_lora_with(&slots, &x, &segs, rows, LoraStrategy::Auto, kernel).unwrap();
        let rows = OutputRows::dense(&mut dense, out_dim);
        add_lora_with(&slots, &x, &segs, rows, LoraStrategy::Auto, kernel).unwrap();
        for (t, (row, row0)) in fused.chunks(stride).zip(fused0.chunks(stride)).enumerate() {
            assert_eq!(
                row[..offset],
                row0[..offset],
                "token {t}: q columns changed"
            );
            assert_eq!(
                &row[offset..offset + out_dim],
                &dense[t * out_dim..][..out_dim]
            );
            assert_eq!(
                row[offset + out_dim..],
                row0[offset + out_dim..],
                "token {t}: v changed"
            );
        }
        let changed = (0..num_tokens).filter(|&t| {
            fused[t * stride + offset..][..out_dim] != fused0[t * stride + offset..][..out_dim]
        });
        // Tokens 0 and 6 have the adapter; 1..6 are base-model tokens.
        assert!(changed.eq([0, 6]), "{kernel:?}: wrong tokens changed");
        fused.copy_from_slice(&fused0);
        dense = fused0
            .chunks(stride)
            .flat_map(|row| row[offset..offset + out_dim].to_vec())
            .collect();
    }
}
