//! RMSNorm against the formula evaluated directly in f64.

use caduceus_kernels::ops::{rms_norm, rms_norm_inplace};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

fn direct(x: &[f32], w: &[f32], eps: f32) -> Vec<f32> {
    let dim = w.len();
    x.chunks(dim)
        .flat_map(|row| {
            let ms = row.iter().map(|&v| (v as f64).powi(2)).sum::<f64>() / dim as f64;
            let denom = (ms + eps as f64).sqrt();
            row.iter()
                .zip(w)
                .map(move |(&v, &wi)| (v as f64 / denom * wi as f64) as f32)
                .collect::<Vec<_>>()
        })
        .collect()
}

#[test]
fn rms_norm_matches_formula() {
    let mut rng = ChaCha8Rng::seed_from_u64(1);
    // Small (serial) and large (parallel) inputs.
    for (rows, dim) in [(3, 576), (1, 7), (200, 576)] {
        let x: Vec<f32> = (0..rows * dim)
            .map(|_| rng.random_range(-4.0..4.0))
            .collect();
        let w: Vec<f32> = (0..dim).map(|_| rng.random_range(0.5..1.5)).collect();
        let want = direct(&x, &w, 1e-5);
        let mut out = vec![0.0; x.len()];
        rms_norm(&x, &w, 1e-5, &mut out);
        let mut inplace = x.clone();
        rms_norm_inplace(&mut inplace, &w, 1e-5);
        for i in 0..x.len() {
            assert!(
                (out[i] - want[i]).abs() <= 1e-5 * (1.0 + want[i].abs()),
                "{i}: {} vs {}",
                out[i],
                want[i]
            );
        }
        assert_eq!(out, inplace);
    }
}

#[test]
fn rms_norm_eps_dominates_zero_row() {
    let mut out = vec![1.0; 4];
    rms_norm(&[0.0; 4], &[1.0; 4], 1e-6, &mut out);
    assert_eq!(out, vec![0.0; 4]);
    // Constant row c with weight 1: c / sqrt(c^2 + eps).
    rms_norm(&[2.0; 4], &[1.0; 4], 0.0, &mut out);
    assert_eq!(out, vec![1.0; 4]);
}

#[test]
#[should_panic(expected = "not a multiple")]
fn rms_norm_shape_mismatch_panics() {
    let mut out = vec![0.0; 5];
    rms_norm(&[0.0; 5], &[1.0; 2], 1e-6, &mut out);
}
