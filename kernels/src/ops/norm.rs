//! RMSNorm (Llama-family pre-norm).

use rayon::prelude::*;

use super::PARALLEL_MIN_ELEMS;

/// RMSNorm of each row of `x` (`[rows, dim]`, `dim = weight.len()`) into `out`:
/// `out = x / sqrt(mean(x^2) + eps) * weight`. The sum of squares is accumulated in f64 so
/// long rows do not lose precision.
pub fn rms_norm(x: &[f32], weight: &[f32], eps: f32, out: &mut [f32]) {
    let dim = check_dim(x.len(), weight);
    assert_eq!(
        out.len(),
        x.len(),
        "rms_norm: out must have the same shape as x"
    );
    let row = |(xr, or): (&[f32], &mut [f32])| {
        let s = inv_rms(xr, eps);
        or.iter_mut()
            .zip(xr)
            .zip(weight)
            .for_each(|((o, &v), &w)| *o = v * s * w);
    };
    if x.len() >= PARALLEL_MIN_ELEMS {
        x.par_chunks_exact(dim)
            .zip(out.par_chunks_exact_mut(dim))
            .for_each(row);
    } else {
        x.chunks_exact(dim)
            .zip(out.chunks_exact_mut(dim))
            .for_each(row);
    }
}

/// In-place [`rms_norm`].
pub fn rms_norm_inplace(x: &mut [f32], weight: &[f32], eps: f32) {
    let dim = check_dim(x.len(), weight);
    let row = |xr: &mut [f32]| {
        let s = inv_rms(xr, eps);
        xr.iter_mut()
            .zip(weight)
            .for_each(|(v, &w)| *v = *v * s * w);
    };
    if x.len() >= PARALLEL_MIN_ELEMS {
        x.par_chunks_exact_mut(dim).for_each(row);
    } else {
        x.chunks_exact_mut(dim).for_each(row);
    }
}

fn check_dim(len: usize, weight: &[f32]) -> usize {
    let dim = weight.len();
    assert!(dim > 0, "rms_norm: weight must be non-empty");
    assert_eq!(
        len % dim,
        0,
        "rms_norm: x length {len} is not a multiple of dim {dim}"
    );
    dim
}

fn inv_rms(row: &[f32], eps: f32) -> f32 {
    let sum_sq: f64 = row.iter().map(|&v| v as f64 * v as f64).sum();
    (1.0 / (sum_sq / row.len() as f64 + eps as f64).sqrt()) as f32
}
