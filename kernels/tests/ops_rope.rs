//! Rotary embeddings: style permutation relation, norm preservation, identity at position 0,
//! hand-computed values, and Llama-3 frequency factors from transformers' formula.

use caduceus_kernels::ops::{Rope, RopeStyle};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

/// Maps a Neox-ordered head to Interleaved order: pair (i, i + d/2) -> (2i, 2i + 1).
fn neox_to_interleaved(head: &[f32]) -> Vec<f32> {
    let half = head.len() / 2;
    (0..half).flat_map(|i| [head[i], head[i + half]]).collect()
}

fn random(rng: &mut ChaCha8Rng, n: usize) -> Vec<f32> {
    (0..n).map(|_| rng.random_range(-2.0..2.0)).collect()
}

#[test]
fn interleaved_of_permuted_equals_permuted_neox() {
    let mut rng = ChaCha8Rng::seed_from_u64(9);
    let (hd, heads) = (64, 3);
    let positions = [0u32, 1, 17, 4095, 100_000];
    let x = random(&mut rng, positions.len() * heads * hd);
    for factors in [
        None,
        Some(Rope::llama3_freq_factors(hd, 500000.0, 8.0, 1.0, 4.0, 8192)),
    ] {
        let neox = Rope::new(RopeStyle::Neox, hd, 10000.0, factors.as_deref());
        let inter = Rope::new(RopeStyle::Interleaved, hd, 10000.0, factors.as_deref());
        let mut a = x.clone();
        neox.apply(&mut a, heads, &positions);
        let a: Vec<f32> = a.chunks(hd).flat_map(neox_to_interleaved).collect();
        let mut b: Vec<f32> = x.chunks(hd).flat_map(neox_to_interleaved).collect();
        inter.apply(&mut b, heads, &positions);
        assert_eq!(a, b);
    }
}

#[test]
fn rotation_preserves_pair_norms_and_position_zero_is_identity() {
    let mut rng = ChaCha8Rng::seed_from_u64(10);
    let (hd, heads) = (16, 2);
    for style in [RopeStyle::Neox, RopeStyle::Interleaved] {
        let rope = Rope::new(style, hd, 10000.0, None);
        let positions = [0u32, 3, 250, 9999];
        let x = random(&mut rng, positions.len() * heads * hd);
        let mut y = x.clone();
        rope.apply(&mut y, heads, &positions);
        assert_eq!(
            &y[..heads * hd],
            &x[..heads * hd],
            "{style:?}: position 0 must be identity"
        );
        let pairs = |h: &[f32]| -> Vec<(f32, f32)> {
            match style {
                RopeStyle::Interleaved => h.chunks(2).map(|p| (p[0], p[1])).collect(),
                RopeStyle::Neox => (0..hd / 2).map(|i| (h[i], h[i + hd / 2])).collect(),
            }
        };
        for (hx, hy) in x.chunks(hd).zip(y.chunks(hd)) {
            for ((a, b), (c, d)) in pairs(hx).into_iter().zip(pairs(hy)) {
                let (n0, n1) = (a.hypot(b), c.hypot(d));
                assert!(
                    (n0 - n1).abs() <= 1e-5 * (1.0 + n0),
                    "{style:?}: {n0} vs {n1}"
                );
            }
        }
    }
}

#[test]
fn hand_computed_rotation() {
    // head_dim 4, theta 100: inv_freq = [1, 100^(-1/2)] = [1, 0.1]. Position 2:
    // pair 0 rotates by 2 rad, pair 1 by 0.2 rad.
    let x = [1.0f32, 0.0, 0.5, 2.0];
    let (c0, s0) = (2.0f64.cos(), 2.0f64.sin());
    let (c1, s1) = (0.2f64.cos(), 0.2f64.sin());
    let mut y = x;
    Rope::new(RopeStyle::Interleaved, 4, 100.0, None).apply(&mut y, 1, &[2]);
    let want = [c0, s0, 0.5 * c1 - 2.0 * s1, 0.5 * s1 + 2.0 * c1];
    for i in 0..4 {
        assert!(
            (y[i] as f64 - want[i]).abs() < 1e-6,
            "interleaved {i}: {} vs {}",
            y[i],
            want[i]
        );
    }
    // Neox pairs (0, 2) and (1, 3).
    let mut z = x;
    Rope::new(RopeStyle::Neox, 4, 100.0, None).apply(&mut z, 1, &[2]);
    let want = [
        1.0 * c0 - 0.5 * s0,
        0.0 * c1 - 2.0 * s1,
        1.0 * s0 + 0.5 * c0,
        0.0 * s1 + 2.0 * c1,
    ];
    for i in 0..4 {
        assert!(
            (z[i] as f64 - want[i]).abs() < 1e-6,
            "neox {i}: {} vs {}",
            z[i],
            want[i]
        );
    }
    // A freq factor of 2 on pair 1 halves its angle to 0.1 rad.
    let mut w = x;
    Rope::new(RopeStyle::Interleaved, 4, 100.0, Some(&[1.0, 2.0])).apply(&mut w, 1, &[2]);
    let (c2, s2) = (0.1f64.cos(), 0.1f64.sin());
    assert!((w[2] as f64 - (0.5 * c2 - 2.0 * s2)).abs() < 1e-6);
    assert!((w[3] as f64 - (0.5 * s2 + 2.0 * c2)).abs() < 1e-6);
}

/// transformers `_compute_llama3_parameters`, written out in f64 for factor 8, low 1, high 4,
/// original context 8192, theta 500000, head_dim 128.
#[test]
fn llama3_freq_factors_match_transformers_formula() {
    let (hd, theta, factor, low_ff, high_ff, orig) =
        (128usize, 500000.0f64, 8.0f64, 1.0f64, 4.0f64, 8192.0f64);
    let got = Rope::llama3_freq_factors(
        hd,
        theta as f32,
        factor as f32,
        low_ff as f32,
        high_ff as f32,
        8192,
    );
    assert_eq!(got.len(), hd / 2);
    let (mut n_high, mut n_low, mut n_mid) = (0, 0, 0);
    for (i, &g) in got.iter().enumerate() {
        let inv_freq = 1.0 / theta.powf((2 * i) as f64 / hd as f64);
        let wavelen = 2.0 * std::f64::consts::PI / inv_freq;
        let scaled = if wavelen < orig / high_ff {
            n_high += 1;
            inv_freq
        } else if wavelen > orig / low_ff {
            n_low += 1;
            inv_freq / factor
        } else {
            n_mid += 1;
            let smooth = (orig / wavelen - low_ff) / (high_ff - low_ff);
            (1.0 - smooth) * inv_freq / factor + smooth * inv_freq
        };
        let want = inv_freq / scaled;
        assert!(
            (g as f64 - want).abs() < 1e-5 * want,
            "pair {i}: {g} vs {want}"
        );
    }
    // All three bands are exercised by these parameters.
    assert!(
        n_high > 0 && n_low > 0 && n_mid > 0,
        "{n_high} {n_low} {n_mid}"
    );
    assert_eq!(got[0], 1.0);
    assert_eq!(got[hd / 2 - 1], 8.0);
}
