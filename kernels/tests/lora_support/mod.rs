//! Shared by the LoRA tests: random adapters and batches, and the f64 reference the fast paths
//! are held to.

#![allow(dead_code)]

use caduceus_kernels::lora::{lora_scale, LoraShape, LoraSlots, LoraWeight, Segment};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

pub fn rng(seed: u64) -> ChaCha8Rng {
    ChaCha8Rng::seed_from_u64(seed)
}

pub fn random_f32(rng: &mut ChaCha8Rng, n: usize) -> Vec<f32> {
    (0..n).map(|_| rng.random_range(-1.0f32..1.0)).collect()
}

/// One adapter in PEFT layouts: `a` is `[rank, in_dim]`, `b` is `[out_dim, rank]`.
#[derive(Clone)]
pub struct Adapter {
    pub a: Vec<f32>,
    pub b: Vec<f32>,
    pub rank: usize,
    pub scale: f32,
}

pub fn random_adapter(rng: &mut ChaCha8Rng, in_dim: usize, out_dim: usize, rank: usize) -> Adapter {
    let alpha = rng.random_range(1.0f32..64.0);
    Adapter {
        a: random_f32(rng, rank * in_dim),
        b: random_f32(rng, out_dim * rank),
        rank,
        scale: lora_scale(alpha, rank, rng.random()),
    }
}

/// A batch mixing adapters: one random adapter per rank in slots `0..ranks.len()`, an empty
/// last slot, and segments of `lens` cycling through the adapters with a base-only one second.
pub struct MixedBatch {
    pub adapters: Vec<Option<Adapter>>,
    pub shape: LoraShape,
    pub segs: Vec<Segment>,
    pub num_tokens: usize,
}

pub fn mixed_batch(
    rng: &mut ChaCha8Rng,
    (in_dim, out_dim): (usize, usize),
    ranks: &[usize],
    lens: &[usize],
) -> MixedBatch {
    let mut adapters: Vec<_> = ranks
        .iter()
        .map(|&rank| Some(random_adapter(rng, in_dim, out_dim, rank)))
        .collect();
    adapters.push(None);
    let shape = LoraShape {
        num_slots: adapters.len(),
        in_dim,
        out_dim,
        max_rank: ranks.iter().copied().max().unwrap(),
    };
    let mut cycle: Vec<Option<u32>> = (0..ranks.len() as u32).map(Some).collect();
    cycle.insert(1, None);
    MixedBatch {
        adapters,
        shape,
        segs: segments(lens, &cycle),
        num_tokens: lens.iter().sum(),
    }
}

/// The adapter as a `W` store holds it (weights rounded to `W`), for the reference.
pub fn rounded<W: LoraWeight>(ad: &Adapter) -> Adapter {
    let round = |v: &[f32]| v.iter().map(|&x| W::from_f32(x).to_f32()).collect();
    Adapter {
        a: round(&ad.a),
        b: round(&ad.b),
        ..ad.clone()
    }
}

/// A slot store holding `adapters[s]` in slot `s` (`None`: left empty).
pub fn store<W: LoraWeight>(shape: LoraShape, adapters: &[Option<Adapter>]) -> LoraSlots<W> {
    let mut slots = LoraSlots::new(shape).unwrap();
    for (s, ad) in adapters.iter().enumerate() {
        if let Some(ad) = ad {
            slots.load_slot(s, &ad.a, &ad.b, ad.rank, ad.scale).unwrap();
        }
    }
    slots
}

/// Per-token slots of a batch described by `segments`.
pub fn token_slots(segments: &[Segment], num_tokens: usize) -> Vec<Option<u32>> {
    let mut slots = vec![None; num_tokens];
    for s in segments {
        slots[s.start..s.start + s.len].fill(s.slot);
    }
    slots
}

/// Back-to-back segments with the given lengths, slots taken in turn from `slots`.
pub fn segments(lens: &[usize], slots: &[Option<u32>]) -> Vec<Segment> {
    let mut start = 0;
    lens.iter()
        .zip(slots.iter().cycle())
        .map(|(&len, &slot)| {
            let s = Segment { start, len, slot };
            start += len;
            s
        })
        .collect()
}

/// The f64 reference: `(v, y, bound)` where `v[t][k] = x_t · A_k`, `y = y0 + scale * v B^T`, and
/// `bound` is the sum of absolute terms each `y` value is made of (the scale of its rounding error).
pub fn reference(
    adapters: &[Option<Adapter>],
    x: &[f32],
    token_slots: &[Option<u32>],
    y0: &[f32],
    dims: (usize, usize),
) -> (Vec<Vec<f64>>, Vec<f64>, Vec<f64>) {
    let (in_dim, out_dim) = dims;
    let mut vs = Vec::new();
    let mut y: Vec<f64> = y0.iter().map(|&v| v as f64).collect();
    let mut bound: Vec<f64> = y0.iter().map(|&v| v.abs() as f64).collect();
    for (t, slot) in token_slots.iter().enumerate() {
        let Some(ad) = slot.and_then(|s| adapters[s as usize].as_ref()) else {
            vs.push(Vec::new());
            continue;
        };
        let xt = &x[t * in_dim..(t + 1) * in_dim];
        let (mut v, mut v_abs) = (vec![0f64; ad.rank], vec![0f64; ad.rank]);
        for k in 0..ad.rank {
            for (c, &xc) in xt.iter().enumerate() {
                let p = xc as f64 * ad.a[k * in_dim + c] as f64;
                v[k] += p;
                v_abs[k] += p.abs();
            }
        }
        for o in 0..out_dim {
            let (mut acc, mut acc_abs) = (0f64, 0f64);
            for k in 0..ad.rank {
                let b = ad.b[o * ad.rank + k] as f64;
                acc += v[k] * b;
                acc_abs += v_abs[k] * b.abs();
            }
            y[t * out_dim + o] += ad.scale as f64 * acc;
            bound[t * out_dim + o] += (ad.scale as f64 * acc_abs).abs();
        }
        vs.push(v);
    }
    (vs, y, bound)
}

/// Every value within `1e-5` relative to the magnitude of the terms it sums.
pub fn assert_close(got: &[f32], want: &[f64], bound: &[f64], what: &str) {
    assert_eq!(got.len(), want.len(), "{what}: lengths differ");
    for (i, ((&g, &w), &b)) in got.iter().zip(want).zip(bound).enumerate() {
        let err = (g as f64 - w).abs();
        assert!(
            err <= 1e-5 * b.max(1e-30),
            "{what}: value {i} is {g}, reference {w} (error {err:e}, allowed {:e})",
            1e-5 * b
        );
    }
}

/// What a `Q8` store may be off by, per output: the f64 propagation of its four roundings (x and v
/// per token, A per row, B per column, each to half a step of `max / 127`) through
/// `y = y0 + scale · (x Aᵀ) Bᵀ` on the original f32 weights, plus `1e-5 · bound` for the float
/// arithmetic (`bound` as [`reference`] returns it).
pub fn q8_tolerance(
    adapters: &[Option<Adapter>],
    x: &[f32],
    token_slots: &[Option<u32>],
    bound: &[f64],
    dims: (usize, usize),
) -> Vec<f64> {
    let (in_dim, out_dim) = dims;
    let step = |v: &[f32]| v.iter().fold(0f64, |m, &a| m.max(a.abs() as f64)) / 127.0;
    let mut tol: Vec<f64> = bound.iter().map(|b| 1e-5 * b).collect();
    for (t, slot) in token_slots.iter().enumerate() {
        let Some(ad) = slot.and_then(|s| adapters[s as usize].as_ref()) else {
            continue;
        };
        let xt = &x[t * in_dim..(t + 1) * in_dim];
        let sx = step(xt);
        let (mut v, mut e) = (vec![0f64; ad.rank], vec![0f64; ad.rank]);
        for k in 0..ad.rank {
            let row = &ad.a[k * in_dim..(k + 1) * in_dim];
            let sa = step(row);
            for (&xc, &a) in xt.iter().zip(row) {
                v[k] += xc as f64 * a as f64;
                e[k] += (xc.abs() as f64) * sa / 2.0 + (a.abs() as f64) * sx / 2.0 + sx * sa / 4.0;
            }
        }
        // B is quantized per column `k`; its scale `sb_k` rides on `v_k` into the expand.
        let sb: Vec<f64> = (0..ad.rank)
            .map(|k| {
                let col: Vec<f32> = (0..out_dim).map(|o| ad.b[o * ad.rank + k]).collect();
                step(&col)
            })
            .collect();
        let sv = (0..ad.rank)
            .map(|k| (v[k].abs() + e[k]) * sb[k])
            .fold(0f64, f64::max)
            / 127.0;
        for o in 0..out_dim {
            let b_row = &ad.b[o * ad.rank..(o + 1) * ad.rank];
            let err: f64 = (0..ad.rank)
                .filter(|&k| sb[k] > 0.0)
                .map(|k| {
                    let b = b_row[k].abs() as f64;
                    b * e[k] + b * sv / (2.0 * sb[k]) + (v[k].abs() + e[k]) * sb[k] / 2.0 + sv / 4.0
                })
                .sum();
            tol[t * out_dim + o] += 1.01 * (ad.scale as f64) * err;
        }
    }
    tol
}

/// Every value within its tolerance of the reference.
pub fn assert_within(got: &[f32], want: &[f64], tol: &[f64], what: &str) {
    assert_eq!(got.len(), want.len(), "{what}: lengths differ");
    for (i, ((&g, &w), &tl)) in got.iter().zip(want).zip(tol).enumerate() {
        let err = (g as f64 - w).abs();
        assert!(
            err <= tl,
            "{what}: value {i} is {g}, reference {w} (error {err:e}, allowed {tl:e})"
        );
    }
}
