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
