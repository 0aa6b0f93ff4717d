//! The int8 store (`LoraSlots<Q8>`): within the propagated bound of its roundings of the f64
//! reference on every path, bit-identical per token whatever the batch around it, and the same
//! bits from the portable and the AVX-512 VNNI kernels.

mod lora_support;

use caduceus_kernels::lora::{
    add_lora, add_lora_with, lora_expand, lora_shrink, segments_from_token_slots, LoraKernel,
    LoraShape, LoraSlots, LoraStrategy, OutputRows, Segment, Q8,
};
use lora_support::*;

const STRATEGIES: [LoraStrategy; 3] = [LoraStrategy::Auto, LoraStrategy::Bgmv, LoraStrategy::Sgmv];

fn kernels() -> Vec<LoraKernel> {
    [LoraKernel::Scalar, LoraKernel::Avx2, LoraKernel::Avx512]
        .into_iter()
        .filter(|k| k.is_available())
        .collect()
}

/// A Q8 store with `ranks[s]` in slot `s` plus an empty slot, a batch of `lens` segments cycling
/// over them with base-model tokens, and the adapters, inputs and per-token slots.
struct Case {
    slots: LoraSlots<Q8>,
    adapters: Vec<Option<Adapter>>,
    segs: Vec<Segment>,
    x: Vec<f32>,
    y0: Vec<f32>,
    dims: (usize, usize),
}

fn case(seed: u64, (in_dim, out_dim): (usize, usize), ranks: &[usize], lens: &[usize]) -> Case {
    let mut r = rng(seed);
    let MixedBatch {
        adapters,
        shape,
        segs,
        num_tokens,
    } = mixed_batch(&mut r, (in_dim, out_dim), ranks, lens);
    Case {
        slots: store::<Q8>(shape, &adapters),
        adapters,
        segs,
        x: random_f32(&mut r, num_tokens * in_dim),
        y0: random_f32(&mut r, num_tokens * out_dim),
        dims: (in_dim, out_dim),
    }
}

fn run(c: &Case, segs: &[Segment], strategy: LoraStrategy, kernel: LoraKernel) -> Vec<f32> {
    let mut y = c.y0.clone();
    let rows = OutputRows::dense(&mut y, c.dims.1);
    add_lora_with(&c.slots, &c.x, segs, rows, strategy, kernel).unwrap();
    y
}

fn check_reference(c: &Case) {
    let num_tokens = c.x.len() / c.dims.0;
    let per_token = token_slots(&c.segs, num_tokens);
    let (_, want, bound) = reference(&c.adapters, &c.x, &per_token, &c.y0, c.dims);
    let tol = q8_tolerance(&c.adapters, &c.x, &per_token, &bound, c.dims);
    for kernel in kernels() {
        for strategy in STRATEGIES {
            let y = run(c, &c.segs, strategy, kernel);
            let what = format!("{:?} ranks {kernel:?} {strategy:?}", c.dims);
            assert_within(&y, &want, &tol, &what);
        }
    }
    // The bound is not vacuous: the error is a small fraction of the deltas.
    let y = run(c, &c.segs, LoraStrategy::Auto, LoraKernel::best());
    let (mut err, mut delta) = (0f64, 0f64);
    for ((&g, &w), &y0) in y.iter().zip(&want).zip(&c.y0) {
        err += (g as f64 - w).powi(2);
        delta += (w - y0 as f64).powi(2);
    }
    assert!(
        err.sqrt() < 0.02 * delta.sqrt(),
        "{:?}: RMS error {} of a delta of {}",
        c.dims,
        err.sqrt(),
        delta.sqrt()
    );
}

#[test]
fn lora_q8_smollm_shapes_stay_within_their_rounding_bound() {
    let lens = [1, 40, 1, 1, 7, 16, 17, 3, 2, 1, 5];
    for (i, dims) in [(576, 576), (576, 192), (576, 1536), (1536, 576)]
        .into_iter()
        .enumerate()
    {
        check_reference(&case(40 + i as u64, dims, &[8, 16, 64, 128], &lens));
    }
}

#[test]
fn lora_q8_dims_off_the_vector_width_use_the_padding() {
    // in_dim % 64 != 0 and % 16 != 0, out_dim % 16 != 0, ranks not a multiple of 4.
    let lens = [3, 1, 6, 1, 2, 9];
    check_reference(&case(50, (100, 70), &[5, 13, 1], &lens));
    check_reference(&case(51, (7, 3), &[2, 3], &lens));
    check_reference(&case(52, (64, 16), &[8, 4], &lens));
}

#[test]
fn lora_q8_tokens_match_the_token_alone_in_any_batch() {
    let c = case(60, (576, 1536), &[64, 8, 16], &[1, 13, 1, 1, 7, 2, 16, 1]);
    let num_tokens = c.x.len() / 576;
    let per_token = token_slots(&c.segs, num_tokens);
    let alone = |t: usize| {
        let mut y = c.y0[t * 1536..][..1536].to_vec();
        let seg = [Segment {
            start: 0,
            len: 1,
            slot: per_token[t],
        }];
        let rows = OutputRows::dense(&mut y, 1536);
        add_lora(&c.slots, &c.x[t * 576..][..576], &seg, rows).unwrap();
        y
    };
    let want: Vec<Vec<f32>> = (0..num_tokens).map(alone).collect();
    let per_token_segs: Vec<Segment> = (0..num_tokens)
        .map(|t| Segment {
            start: t,
            len: 1,
            slot: per_token[t],
        })
        .collect();
    let cuts = [
        c.segs.clone(),
        segments_from_token_slots(&per_token),
        per_token_segs,
    ];
    for segs in &cuts {
        for kernel in kernels() {
            for strategy in STRATEGIES {
                let y = run(&c, segs, strategy, kernel);
                for (t, row) in y.chunks(1536).enumerate() {
                    assert!(
                        row == want[t].as_slice(),
                        "{kernel:?} {strategy:?}: token {t} differs from alone"
                    );
                }
            }
        }
    }
}

#[test]
fn lora_q8_scalar_and_avx512_kernels_agree_bit_for_bit() {
    if !LoraKernel::Avx512.is_available() {
        eprintln!("skipped: this CPU has no AVX-512 VNNI");
        return;
    }
    for (seed, dims) in [(70, (576, 1536)), (71, (1536, 576)), (72, (100, 70))] {
        let c = case(seed, dims, &[16, 5, 64], &[1, 9, 1, 1, 3, 17]);
        let scalar = run(&c, &c.segs, LoraStrategy::Auto, LoraKernel::Scalar);
        let vnni = run(&c, &c.segs, LoraStrategy::Auto, LoraKernel::Avx512);
        assert!(scalar == vnni, "{dims:?}: scalar and AVX-512 differ");
        assert!(scalar != c.y0, "the adapters changed nothing");
    }
}

#[test]
fn lora_q8_shrink_then_expand_equals_the_fused_call() {
    let c = case(80, (576, 192), &[16, 64], &[1, 9, 1, 4, 2]);
    let num_tokens = c.x.len() / 576;
    for kernel in kernels() {
        for strategy in STRATEGIES {
            let mut v = vec![0f32; num_tokens * 64];
            lora_shrink(&c.slots, &c.x, &c.segs, &mut v, strategy, kernel).unwrap();
            let mut split = c.y0.clone();
            let rows = OutputRows::dense(&mut split, 192);
            lora_expand(&c.slots, &v, &c.segs, rows, strategy, kernel).unwrap();
            assert_eq!(
                split,
                run(&c, &c.segs, strategy, kernel),
                "{kernel:?} {strategy:?}"
            );
        }
    }
}

#[test]
fn lora_q8_a_slot_reloaded_with_a_lower_rank_forgets_the_old_one() {
    // Rank 13 over rank 16: the padding ranks 13..16 must read as zeros again.
    let mut r = rng(90);
    let (in_dim, out_dim) = (100, 70);
    let old = random_adapter(&mut r, in_dim, out_dim, 16);
    let new = random_adapter(&mut r, in_dim, out_dim, 13);
    let shape = LoraShape {
        num_slots: 1,
        in_dim,
        out_dim,
        max_rank: 16,
    };
    let mut reloaded = store::<Q8>(shape, &[Some(old)]);
    reloaded
        .load_slot(0, &new.a, &new.b, new.rank, new.scale)
        .unwrap();
    let fresh = store::<Q8>(shape, &[Some(new)]);
    let x = random_f32(&mut r, 3 * in_dim);
    let segs = [Segment {
        start: 0,
        len: 3,
        slot: Some(0),
    }];
    for kernel in kernels() {
        let mut ys = Vec::new();
        for slots in [&reloaded, &fresh] {
            let mut y = vec![0f32; 3 * out_dim];
            let rows = OutputRows::dense(&mut y, out_dim);
            add_lora_with(slots, &x, &segs, rows, LoraStrategy::Auto, kernel).unwrap();
            ys.push(y);
        }
        assert_eq!(ys[0], ys[1], "{kernel:?}");
    }
}
