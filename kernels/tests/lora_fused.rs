//! Fused LoRA calls (q/k/v or gate/up in one pass): the same bits as one `add_lora` call per
//! projection, an adapter that skips a projection adds nothing there, and bad calls are refused
//! before anything is written.

mod lora_support;

use caduceus_kernels::lora::{
    add_lora_fused, add_lora_fused_with, add_lora_with, LoraError, LoraKernel, LoraShape,
    LoraSlots, LoraStrategy, LoraWeight, OutputRows, Segment, Q8,
};
use half::f16;
use lora_support::*;

const IN: usize = 576;
/// q, k and v of SmolLM2-135M, and one spare column after them so offsets are not just the ends
/// of the previous part.
const OUTS: [usize; 3] = [576, 192, 192];
const STRIDE: usize = 576 + 192 + 192 + 1;
const OFFSETS: [usize; 3] = [0, 576, 768];
const SLOTS: usize = 4;

/// Three projections' stores. Slot 0 and 1 hold adapters on every projection, slot 2 only on the
/// first and last (as an adapter trained on q and v), slot 3 on none.
fn stores<W: LoraWeight>(seed: u64) -> Vec<LoraSlots<W>> {
    let mut r = rng(seed);
    OUTS.iter()
        .enumerate()
        .map(|(p, &out_dim)| {
            let adapters: Vec<Option<Adapter>> = [16, 8, 4]
                .iter()
                .enumerate()
                .map(|(slot, &rank)| {
                    let targets = slot < 2 || p != 1;
                    targets.then(|| random_adapter(&mut r, IN, out_dim, rank))
                })
                .chain([None])
                .collect();
            let shape = LoraShape {
                num_slots: SLOTS,
                in_dim: IN,
                out_dim,
                max_rank: 16,
            };
            store::<W>(shape, &adapters)
        })
        .collect()
}

/// A batch of decode tokens and prefill runs over every slot, with base-only tokens between.
fn batch() -> (Vec<Segment>, usize) {
    let lens = [1, 1, 1, 1, 5, 1, 23, 1, 2, 1, 17, 1];
    let slots = [Some(0), Some(1), None, Some(2), Some(3)];
    (segments(&lens, &slots), lens.iter().sum())
}

/// What the fused call must produce: one `add_lora` call per part, with the tokens whose slot is
/// empty in that part left out (as the runtime did before it fused them).
fn per_part<W: LoraWeight>(
    parts: &[LoraSlots<W>],
    x: &[f32],
    segs: &[Segment],
    y: &mut [f32],
    kernel: LoraKernel,
) {
    for (slots, &offset) in parts.iter().zip(&OFFSETS) {
        let segs: Vec<Segment> = segs
            .iter()
            .map(|s| Segment {
                slot: s.slot.filter(|&k| slots.rank(k as usize).is_some()),
                ..*s
            })
            .collect();
        let rows = OutputRows {
            data: &mut *y,
            stride: STRIDE,
            offset,
        };
        add_lora_with(slots, x, &segs, rows, LoraStrategy::Auto, kernel).unwrap();
    }
}

fn fused_parts<W: LoraWeight>(parts: &[LoraSlots<W>]) -> Vec<FusedPartOf<'_, W>> {
    parts
        .iter()
        .zip(OFFSETS)
        .map(|(slots, offset)| FusedPartOf { slots, offset })
        .collect()
}

type FusedPartOf<'a, W> = caduceus_kernels::lora::FusedPart<'a, W>;

fn assert_fused_matches_per_part<W: LoraWeight>(seed: u64) {
    let parts = stores::<W>(seed);
    let (segs, n) = batch();
    let mut r = rng(seed + 100);
    let x = random_f32(&mut r, n * IN);
    let y0 = random_f32(&mut r, n * STRIDE);
    let kernels = [LoraKernel::Scalar, LoraKernel::Avx2, LoraKernel::Avx512];
    for kernel in kernels.into_iter().filter(|k| k.is_available()) {
        let mut want = y0.clone();
        per_part(&parts, &x, &segs, &mut want, kernel);
        let mut got = y0.clone();
        add_lora_fused_with(&fused_parts(&parts), &x, &segs, &mut got, STRIDE, kernel).unwrap();
        let mismatch = got
            .iter()
            .zip(&want)
            .position(|(g, w)| g.to_bits() != w.to_bits());
        assert_eq!(mismatch, None, "{:?} {kernel:?}", W::KIND);
        // The deltas landed: every token on a slot with an adapter changed in its columns, and
        // the spare column and base-only tokens did not.
        for s in &segs {
            for t in s.start..s.start + s.len {
                let row = |v: &[f32]| v[t * STRIDE..][..STRIDE].to_vec();
                let (g, y) = (row(&got), row(&y0));
                assert_eq!(g[STRIDE - 1], y[STRIDE - 1]);
                let changed = g.iter().zip(&y).filter(|(a, b)| a != b).count();
                match s.slot {
                    None | Some(3) => assert_eq!(changed, 0, "token {t} slot {:?}", s.slot),
                    Some(_) => assert!(changed > 500, "token {t}: {changed} values changed"),
                }
            }
        }
    }
}

#[test]
fn lora_fused_f32_matches_one_call_per_projection() {
    assert_fused_matches_per_part::<f32>(1);
}

#[test]
fn lora_fused_f16_matches_one_call_per_projection() {
    assert_fused_matches_per_part::<f16>(2);
}

#[test]
fn lora_fused_q8_matches_one_call_per_projection() {
    assert_fused_matches_per_part::<Q8>(3);
}

#[test]
fn lora_fused_skips_projections_an_adapter_does_not_target() {
    let parts = stores::<f32>(4);
    let (n, mut r) = (3, rng(5));
    let x = random_f32(&mut r, n * IN);
    let y0 = random_f32(&mut r, n * STRIDE);
    let segs = [Segment {
        start: 0,
        len: n,
        slot: Some(2),
    }];
    let mut y = y0.clone();
    add_lora_fused(&fused_parts(&parts), &x, &segs, &mut y, STRIDE).unwrap();
    for t in 0..n {
        let cols = |v: &[f32], p: usize| v[t * STRIDE + OFFSETS[p]..][..OUTS[p]].to_vec();
        assert_ne!(cols(&y, 0), cols(&y0, 0));
        assert_eq!(cols(&y, 1), cols(&y0, 1), "k has no adapter in slot 2");
        assert_ne!(cols(&y, 2), cols(&y0, 2));
    }
}

#[test]
fn lora_fused_refuses_bad_calls_without_writing() {
    let parts = stores::<f32>(6);
    let fused = fused_parts(&parts);
    let n = 4;
    let x = vec![0.5f32; n * IN];
    let seg = |start, len, slot| Segment {
        start,
        len,
        slot: Some(slot),
    };
    let y0 = vec![1.0f32; n * STRIDE];
    let call = |parts: &[FusedPartOf<'_, f32>], x: &[f32], segs: &[Segment], len: usize| {
        let mut y = y0[..len.min(y0.len())].to_vec();
        y.resize(len, 1.0);
        let r = add_lora_fused(parts, x, segs, &mut y, STRIDE);
        assert!(y.iter().all(|&v| v == 1.0), "nothing written on error");
        r
    };
    let full = n * STRIDE;
    assert!(matches!(
        call(&fused, &x, &[seg(0, 1, 4)], full),
        Err(LoraError::SlotOutOfRange { slot: 4, .. })
    ));
    assert!(matches!(
        call(&fused, &x, &[seg(2, 1, 0), seg(1, 1, 0)], full),
        Err(LoraError::BadSegment { index: 1, .. })
    ));
    assert!(matches!(
        call(&fused, &x, &[seg(3, 2, 0)], full),
        Err(LoraError::BadSegment { index: 0, .. })
    ));
    assert!(matches!(
        call(&fused, &x, &[seg(0, 1, 0)], full - 1),
        Err(LoraError::LengthMismatch { what: "y", .. })
    ));
    assert!(matches!(
        call(&fused, &x[1..], &[seg(0, 1, 0)], full),
        Err(LoraError::LengthMismatch { what: "x", .. })
    ));
    // A part whose columns pass the end of the rows.
    let past = [FusedPartOf {
        slots: &parts[0],
        offset: STRIDE - 575,
    }];
    assert!(matches!(
        call(&past, &x, &[seg(0, 1, 0)], full),
        Err(LoraError::BadOutputRows { .. })
    ));
    // Parts that do not read the same input.
    let wide = LoraSlots::<f32>::new(LoraShape {
        num_slots: 1,
        in_dim: 1536,
        out_dim: 8,
        max_rank: 4,
    })
    .unwrap();
    let mixed = [
        fused[0],
        FusedPartOf {
            slots: &wide,
            offset: 0,
        },
    ];
    assert!(matches!(
        call(&mixed, &x, &[seg(0, 1, 0)], full),
        Err(LoraError::LengthMismatch {
            what: "fused part in_dim",
            ..
        })
    ));
    // No parts, or a slot empty everywhere: nothing to add.
    assert!(call(&[], &x, &[seg(0, 1, 0)], full).is_ok());
    assert!(call(&fused, &x, &[seg(0, n, 3)], full).is_ok());
}
