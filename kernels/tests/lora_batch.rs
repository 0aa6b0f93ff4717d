//! Batch independence of the LoRA kernels: a token's output is bit-identical whether it is computed
//! alone, per token in a BGMV batch, inside an SGMV segment of any length and position, serially
//! or across threads, and (where AVX2 exists) by the scalar or the AVX2 kernel.

mod lora_support;

use caduceus_kernels::lora::{
    add_lora, add_lora_with, LoraKernel, LoraShape, LoraSlots, LoraStrategy, LoraWeight,
    OutputRows, Segment,
};
use half::{bf16, f16};
use lora_support::*;

const IN: usize = 576;
const OUT: usize = 1536;

/// Two adapters of ranks 64 and 8 (large enough that batches run on several threads).
fn setup(seed: u64) -> (LoraSlots, Vec<f32>, Vec<f32>) {
    let mut r = rng(seed);
    let adapters = vec![
        Some(random_adapter(&mut r, IN, OUT, 64)),
        Some(random_adapter(&mut r, IN, OUT, 8)),
    ];
    let shape = LoraShape {
        num_slots: 2,
        in_dim: IN,
        out_dim: OUT,
        max_rank: 64,
    };
    let x = random_f32(&mut r, 40 * IN);
    let y0 = random_f32(&mut r, 40 * OUT);
    (store::<f32>(shape, &adapters), x, y0)
}

/// Token `t` of `x` (with its own base output) computed on its own.
fn alone(slots: &LoraSlots, x: &[f32], y0: &[f32], t: usize, slot: u32) -> Vec<f32> {
    let mut y = y0[t * OUT..][..OUT].to_vec();
    let seg = [Segment {
        start: 0,
        len: 1,
        slot: Some(slot),
    }];
    add_lora(
        slots,
        &x[t * IN..][..IN],
        &seg,
        OutputRows::dense(&mut y, OUT),
    )
    .unwrap();
    y
}

#[test]
fn lora_segment_tokens_match_the_token_alone_for_every_length() {
    let (slots, x, y0) = setup(1);
    for slot in [0u32, 1] {
        let want: Vec<Vec<f32>> = (0..40).map(|t| alone(&slots, &x, &y0, t, slot)).collect();
        for len in 1..=40 {
            for strategy in [LoraStrategy::Auto, LoraStrategy::Sgmv, LoraStrategy::Bgmv] {
                let mut y = y0[..len * OUT].to_vec();
                let seg = [Segment {
                    start: 0,
                    len,
                    slot: Some(slot),
                }];
                let rows = OutputRows::dense(&mut y, OUT);
                add_lora_with(
                    &slots,
                    &x[..len * IN],
                    &seg,
                    rows,
                    strategy,
                    LoraKernel::best(),
                )
                .unwrap();
                for (t, row) in y.chunks(OUT).enumerate() {
                    assert!(
                        row == want[t].as_slice(),
                        "slot {slot}, segment of {len}, {strategy:?}: token {t} differs from alone"
                    );
                }
            }
        }
    }
}

#[test]
fn lora_mixed_batches_match_the_token_alone() {
    let (slots, x, y0) = setup(2);
    // The same 40 tokens cut into different segmentations; token t's slot is fixed by t.
    let slot_of = |t: usize| [Some(0), Some(1), None][(t / 6) % 3];
    let per_token: Vec<Option<u32>> = (0..40).map(slot_of).collect();
    let want: Vec<Vec<f32>> = (0..40)
        .map(|t| match per_token[t] {
            Some(s) => alone(&slots, &x, &y0, t, s),
            None => y0[t * OUT..][..OUT].to_vec(),
        })
        .collect();
    let mut cuts: Vec<Vec<Segment>> = vec![caduceus_kernels::lora::segments_from_token_slots(
        &per_token,
    )];
    // Every token its own segment (pure BGMV), and runs split at odd places.
    cuts.push(
        (0..40)
            .map(|t| Segment {
                start: t,
                len: 1,
                slot: per_token[t],
            })
            .collect(),
    );
    cuts.push(
        cuts[0]
            .iter()
            .flat_map(|s| {
                let first = s.len.min(2);
                [
                    Segment { len: first, ..*s },
                    Segment {
                        start: s.start + first,
                        len: s.len - first,
                        slot: s.slot,
                    },
                ]
            })
            .filter(|s| s.len > 0)
            .collect(),
    );
    for segs in &cuts {
        for strategy in [LoraStrategy::Auto, LoraStrategy::Sgmv, LoraStrategy::Bgmv] {
            let mut y = y0.clone();
            let rows = OutputRows::dense(&mut y, OUT);
            add_lora_with(&slots, &x, segs, rows, strategy, LoraKernel::best()).unwrap();
            for (t, row) in y.chunks(OUT).enumerate() {
                assert!(row == want[t].as_slice(), "{strategy:?}: token {t} differs");
            }
        }
    }
}

#[test]
fn lora_scalar_and_avx2_kernels_agree_bit_for_bit() {
    if !LoraKernel::Avx2.is_available() {
        eprintln!("skipped: this CPU has no AVX2/FMA");
        return;
    }
    let (slots, x, y0) = setup(3);
    let segs = segments(&[1, 13, 1, 1, 7, 2], &[Some(0), Some(1)]);
    let n = 25;
    let mut results = Vec::new();
    for kernel in [LoraKernel::Scalar, LoraKernel::Avx2] {
        let mut y = y0[..n * OUT].to_vec();
        let rows = OutputRows::dense(&mut y, OUT);
        add_lora_with(
            &slots,
            &x[..n * IN],
            &segs,
            rows,
            LoraStrategy::Auto,
            kernel,
        )
        .unwrap();
        results.push(y);
    }
    assert!(results[0] == results[1], "scalar and AVX2 differ");
    assert!(results[0] != y0[..n * OUT], "the adapters changed nothing");
    // The half-precision loads (F16C, bf16 shifts) widen exactly, like the scalar conversions.
    let mut r = rng(4);
    let adapters = vec![Some(random_adapter(&mut r, IN, OUT, 16)), None];
    let shape = LoraShape {
        num_slots: 2,
        in_dim: IN,
        out_dim: OUT,
        max_rank: 16,
    };
    let segs = segments(&[1, 6, 2], &[Some(0), None]);
    let (x, y0) = (&x[..9 * IN], &y0[..9 * OUT]);
    assert_kernels_agree(&store::<f16>(shape, &adapters), x, y0, &segs);
    assert_kernels_agree(&store::<bf16>(shape, &adapters), x, y0, &segs);
}

fn assert_kernels_agree<W: LoraWeight>(
    slots: &LoraSlots<W>,
    x: &[f32],
    y0: &[f32],
    segs: &[Segment],
) {
    let run = |kernel| {
        let mut y = y0.to_vec();
        let rows = OutputRows::dense(&mut y, OUT);
        add_lora_with(slots, x, segs, rows, LoraStrategy::Auto, kernel).unwrap();
        y
    };
    assert!(
        run(LoraKernel::Scalar) == run(LoraKernel::Avx2),
        "{:?}: scalar and AVX2 differ",
        W::KIND
    );
}
