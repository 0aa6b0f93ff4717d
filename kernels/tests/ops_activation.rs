//! SwiGLU and residual add against their formulas.

use caduceus_kernels::ops::{add_inplace, silu_mul, silu_mul_fused};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

fn silu_f64(x: f64) -> f64 {
    x / (1.0 + (-x).exp())
}

#[test]
fn silu_mul_matches_formula_and_fused_layout() {
    let mut rng = ChaCha8Rng::seed_from_u64(5);
    for (rows, ffn) in [(2, 13), (40, 1536)] {
        let n = rows * ffn;
        let gate: Vec<f32> = (0..n).map(|_| rng.random_range(-10.0..10.0)).collect();
        let up: Vec<f32> = (0..n).map(|_| rng.random_range(-2.0..2.0)).collect();
        let mut out = vec![0.0; n];
        silu_mul(&gate, &up, &mut out);
        for i in 0..n {
            let want = (silu_f64(gate[i] as f64) * up[i] as f64) as f32;
            assert!(
                (out[i] - want).abs() <= 1e-5 * (1.0 + want.abs()),
                "{i}: {} vs {want}",
                out[i]
            );
        }
        let gate_up: Vec<f32> = (0..rows)
            .flat_map(|r| {
                gate[r * ffn..(r + 1) * ffn]
                    .iter()
                    .chain(&up[r * ffn..(r + 1) * ffn])
                    .copied()
            })
            .collect();
        let mut fused = vec![0.0; n];
        silu_mul_fused(&gate_up, ffn, &mut fused);
        assert_eq!(fused, out);
    }
}

#[test]
fn silu_known_values() {
    let mut out = [0.0f32; 3];
    silu_mul(&[0.0, 1.0, -1.0], &[5.0, 1.0, 2.0], &mut out);
    assert_eq!(out[0], 0.0);
    assert!((out[1] - 0.731_058_6).abs() < 1e-6);
    assert!((out[2] - 2.0 * -0.268_941_43).abs() < 1e-6);
}

#[test]
fn add_inplace_adds() {
    let mut x = vec![1.0, 2.0, 3.0];
    add_inplace(&mut x, &[0.5, -2.0, 10.0]);
    assert_eq!(x, vec![1.5, 0.0, 13.0]);
}

#[test]
#[should_panic(expected = "not [rows, ffn]")]
fn fused_shape_mismatch_panics() {
    let mut out = vec![0.0; 3];
    silu_mul_fused(&[0.0; 8], 2, &mut out);
}
