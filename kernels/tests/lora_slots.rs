//! The LoRA slot store and the checks on a batch: shape errors, empty and replaced slots, bad
//! segments and outputs (leaving `y` untouched), scales and segment grouping.

mod lora_support;

use caduceus_kernels::lora::{
    add_lora, lora_scale, segments_from_token_slots, LoraError, LoraShape, LoraSlots, OutputRows,
    Segment,
};
use lora_support::*;

const SHAPE: LoraShape = LoraShape {
    num_slots: 3,
    in_dim: 64,
    out_dim: 32,
    max_rank: 16,
};

fn seg(start: usize, len: usize, slot: Option<u32>) -> Segment {
    Segment { start, len, slot }
}

#[test]
fn lora_bad_shapes_and_loads_are_rejected() {
    for bad in [
        LoraShape {
            num_slots: 0,
            ..SHAPE
        },
        LoraShape { in_dim: 0, ..SHAPE },
        LoraShape {
            max_rank: 0,
            ..SHAPE
        },
        LoraShape {
            max_rank: 513,
            ..SHAPE
        },
    ] {
        assert_eq!(
            LoraSlots::<f32>::new(bad).unwrap_err(),
            LoraError::BadShape(bad)
        );
    }
    let mut slots = LoraSlots::<f32>::new(SHAPE).unwrap();
    let (a, b) = (vec![0.5; 8 * 64], vec![0.5; 32 * 8]);
    assert_eq!(
        slots.load_slot(3, &a, &b, 8, 1.0),
        Err(LoraError::SlotOutOfRange {
            slot: 3,
            num_slots: 3
        })
    );
    assert_eq!(
        slots.load_slot(0, &a, &b, 17, 1.0),
        Err(LoraError::BadRank {
            rank: 17,
            max_rank: 16
        })
    );
    assert_eq!(
        slots.load_slot(0, &a[1..], &b, 8, 1.0),
        Err(LoraError::LengthMismatch {
            what: "lora_A",
            expected: 512,
            actual: 511
        })
    );
    assert_eq!(
        slots.load_slot(0, &a, &b, 4, 1.0),
        Err(LoraError::LengthMismatch {
            what: "lora_A",
            expected: 256,
            actual: 512
        })
    );
    assert_eq!(
        slots.load_slot(0, &a, &b[..255], 8, 1.0),
        Err(LoraError::LengthMismatch {
            what: "lora_B",
            expected: 256,
            actual: 255
        })
    );
    assert_eq!(slots.rank(0), None);
    slots.load_slot(0, &a, &b, 8, 2.0).unwrap();
    assert_eq!((slots.rank(0), slots.scale(0)), (Some(8), Some(2.0)));
}

#[test]
fn lora_bad_batches_are_rejected_and_leave_y_untouched() {
    let mut r = rng(1);
    let ad = random_adapter(&mut r, 64, 32, 8);
    let mut slots = store::<f32>(SHAPE, &[Some(ad.clone()), Some(ad)]);
    let x = random_f32(&mut r, 4 * 64);
    let y0 = random_f32(&mut r, 4 * 32);
    let mut y = y0.clone();
    let mut apply = |segs: &[Segment], x: &[f32], stride: usize, offset: usize| {
        let rows = OutputRows {
            data: &mut y,
            stride,
            offset,
        };
        let res = add_lora(&slots, x, segs, rows);
        assert_eq!(y[..], y0[..], "y changed by a rejected batch");
        res.unwrap_err()
    };
    let bad_segment = |index, start, end| LoraError::BadSegment {
        index,
        start,
        end,
        num_tokens: 4,
    };
    assert_eq!(
        apply(&[seg(0, 2, Some(0)), seg(1, 1, Some(1))], &x, 32, 0),
        bad_segment(1, 1, 2)
    );
    assert_eq!(
        apply(&[seg(2, 1, Some(0)), seg(0, 1, None)], &x, 32, 0),
        bad_segment(1, 0, 1)
    );
    assert_eq!(
        apply(&[seg(3, 2, Some(0))], &x, 32, 0),
        bad_segment(0, 3, 5)
    );
    assert_eq!(
        apply(&[seg(0, 1, Some(7))], &x, 32, 0),
        LoraError::SlotOutOfRange {
            slot: 7,
            num_slots: 3
        }
    );
    assert_eq!(
        apply(&[seg(0, 1, Some(2))], &x, 32, 0),
        LoraError::EmptySlot { slot: 2 }
    );
    assert_eq!(
        apply(&[], &x[1..], 32, 0),
        LoraError::LengthMismatch {
            what: "x",
            expected: 256,
            actual: 255
        }
    );
    assert_eq!(
        apply(&[], &x, 40, 9),
        LoraError::BadOutputRows {
            stride: 40,
            offset: 9,
            out_dim: 32
        }
    );
    slots.clear_slot(1).unwrap();
    let rows = OutputRows::dense(&mut y[..4 * 32], 32);
    assert_eq!(
        add_lora(&slots, &x, &[seg(0, 4, Some(1))], rows),
        Err(LoraError::EmptySlot { slot: 1 })
    );
}

#[test]
fn lora_a_reloaded_slot_uses_only_the_new_adapter() {
    // Rank 16 then rank 4 in the same slot: the stale rows past rank 4 must not be read.
    let mut r = rng(2);
    let old = random_adapter(&mut r, 64, 32, 16);
    let new = random_adapter(&mut r, 64, 32, 4);
    let mut slots = store::<f32>(SHAPE, &[Some(old)]);
    slots
        .load_slot(0, &new.a, &new.b, new.rank, new.scale)
        .unwrap();
    let x = random_f32(&mut r, 5 * 64);
    let y0 = random_f32(&mut r, 5 * 32);
    let mut y = y0.clone();
    let segs = [seg(0, 1, Some(0)), seg(1, 4, Some(0))];
    add_lora(&slots, &x, &segs, OutputRows::dense(&mut y, 32)).unwrap();
    let (_, want, bound) = reference(&[Some(new)], &x, &[Some(0); 5], &y0, (64, 32));
    assert_close(&y, &want, &bound, "reloaded slot");
}

#[test]
fn lora_scales_follow_peft() {
    assert_eq!(lora_scale(32.0, 16, false), 2.0);
    assert_eq!(lora_scale(32.0, 16, true), 8.0);
    assert_eq!(lora_scale(8.0, 64, true), 1.0);
}

#[test]
fn lora_token_slots_group_into_runs() {
    let per_token = [
        Some(1),
        Some(1),
        None,
        Some(0),
        Some(1),
        Some(1),
        Some(1),
        None,
        None,
    ];
    let segs = segments_from_token_slots(&per_token);
    assert_eq!(
        segs,
        [
            seg(0, 2, Some(1)),
            seg(2, 1, None),
            seg(3, 1, Some(0)),
            seg(4, 3, Some(1)),
            seg(7, 2, None)
        ]
    );
    assert_eq!(token_slots(&segs, per_token.len()), per_token);
    assert!(segments_from_token_slots(&[]).is_empty());
}

/// A store filled by copying prepared one-slot stores (smaller `max_rank`, over a previous
/// adapter) computes exactly what a store filled by `load_slot` computes.
fn copied_slots_equal_loaded_slots<W: caduceus_kernels::lora::LoraWeight>() {
    let mut r = rng(41);
    let adapters: Vec<Option<Adapter>> = [5, 16, 9]
        .iter()
        .map(|&rank| Some(random_adapter(&mut r, SHAPE.in_dim, SHAPE.out_dim, rank)))
        .collect();
    let loaded = store::<W>(SHAPE, &adapters);
    // Start from other adapters in every slot, so stale data would show.
    let stale: Vec<Option<Adapter>> = (0..3)
        .map(|_| Some(random_adapter(&mut r, SHAPE.in_dim, SHAPE.out_dim, 16)))
        .collect();
    let mut copied = store::<W>(SHAPE, &stale);
    for (s, ad) in adapters.iter().enumerate() {
        let ad = ad.as_ref().unwrap();
        let one = LoraShape {
            num_slots: 1,
            max_rank: ad.rank,
            ..SHAPE
        };
        let prepared = store::<W>(one, &[Some(ad.clone())]);
        copied.copy_slot_from(s, &prepared, 0).unwrap();
    }
    let n = 7;
    let x = random_f32(&mut r, n * SHAPE.in_dim);
    let segs = vec![seg(0, 2, Some(0)), seg(2, 1, Some(1)), seg(3, 4, Some(2))];
    let (mut y1, mut y2) = (vec![0f32; n * SHAPE.out_dim], vec![0f32; n * SHAPE.out_dim]);
    add_lora(
        &loaded,
        &x,
        &segs,
        OutputRows::dense(&mut y1, SHAPE.out_dim),
    )
    .unwrap();
    add_lora(
        &copied,
        &x,
        &segs,
        OutputRows::dense(&mut y2, SHAPE.out_dim),
    )
    .unwrap();
    assert_eq!(y1, y2, "{:?}", W::KIND);
    // A source with a larger rank than the store, or other dimensions, is refused.
    let big = LoraShape {
        num_slots: 1,
        max_rank: 32,
        ..SHAPE
    };
    let prepared = store::<W>(big, &[Some(random_adapter(&mut r, 64, 32, 24))]);
    assert!(copied.copy_slot_from(0, &prepared, 0).is_err());
    let empty = LoraSlots::<W>::new(LoraShape {
        num_slots: 1,
        ..SHAPE
    })
    .unwrap();
    assert!(matches!(
        copied.copy_slot_from(0, &empty, 0),
        Err(LoraError::EmptySlot { .. })
    ));
}

#[test]
fn lora_copied_slots_equal_loaded_slots_for_every_kind() {
    copied_slots_equal_loaded_slots::<f32>();
    copied_slots_equal_loaded_slots::<caduceus_kernels::lora::f16>();
    copied_slots_equal_loaded_slots::<caduceus_kernels::lora::Q8>();
}

#[test]
fn lora_a_slot_reads_back_in_peft_layout() {
    use caduceus_kernels::lora::{f16, Q8};
    // out_dim 70 crosses a 64-wide B panel; rank 5 below max_rank.
    let shape = LoraShape {
        num_slots: 2,
        in_dim: 24,
        out_dim: 70,
        max_rank: 8,
    };
    let rank = 5;
    let a: Vec<f32> = (0..rank * shape.in_dim)
        .map(|i| i as f32 * 0.37 - 9.0)
        .collect();
    let b: Vec<f32> = (0..shape.out_dim * rank)
        .map(|i| 4.0 - i as f32 * 0.11)
        .collect();
    let mut exact = LoraSlots::<f32>::new(shape).unwrap();
    exact.load_slot(1, &a, &b, rank, 0.5).unwrap();
    assert_eq!(exact.read_slot(0), None, "empty slot");
    let back = exact.read_slot(1).unwrap();
    assert_eq!(
        (back.a, back.b, back.rank, back.scale),
        (a.clone(), b.clone(), rank, 0.5)
    );
    let mut half = LoraSlots::<f16>::new(shape).unwrap();
    half.load_slot(0, &a, &b, rank, 2.0).unwrap();
    let back = half.read_slot(0).unwrap();
    let round = |v: &[f32]| -> Vec<f32> { v.iter().map(|&x| f16::from_f32(x).to_f32()).collect() };
    assert_eq!((back.a, back.b), (round(&a), round(&b)));
    let mut q8 = LoraSlots::<Q8>::new(shape).unwrap();
    q8.load_slot(0, &a, &b, rank, 1.0).unwrap();
    assert_eq!(q8.read_slot(0), None, "Q8 rounding is not read back");
}
