//! SwiGLU activation and residual add.

use rayon::prelude::*;

use super::PARALLEL_MIN_ELEMS;

#[inline(always)]
fn silu(x: f32) -> f32 {
    x / (1.0 + (-x).exp())
}

/// `out[i] = silu(gate[i]) * up[i]` (the SwiGLU of Llama MLPs).
pub fn silu_mul(gate: &[f32], up: &[f32], out: &mut [f32]) {
    assert_eq!(
        gate.len(),
        up.len(),
        "silu_mul: gate and up differ in length"
    );
    assert_eq!(
        out.len(),
        gate.len(),
        "silu_mul: out differs in length from gate"
    );
    let f = |((o, &g), &u): ((&mut f32, &f32), &f32)| *o = silu(g) * u;
    if out.len() >= PARALLEL_MIN_ELEMS {
        out.par_iter_mut().zip(gate).zip(up).for_each(f);
    } else {
        out.iter_mut().zip(gate).zip(up).for_each(f);
    }
}

/// [`silu_mul`] over a fused gate|up projection: `gate_up` rows are `[gate(ffn) | up(ffn)]`,
/// `out` is `[rows, ffn]`. Saves a split copy when gate and up come from one matmul.
pub fn silu_mul_fused(gate_up: &[f32], ffn: usize, out: &mut [f32]) {
    assert!(ffn > 0, "silu_mul_fused: ffn must be positive");
    assert_eq!(
        gate_up.len() % (2 * ffn),
        0,
        "silu_mul_fused: gate_up is not [rows, 2*ffn]"
    );
    assert_eq!(
        out.len() * 2,
        gate_up.len(),
        "silu_mul_fused: out is not [rows, ffn]"
    );
    let row = |(gu, o): (&[f32], &mut [f32])| {
        let (g, u) = gu.split_at(ffn);
        o.iter_mut()
            .zip(g)
            .zip(u)
            .for_each(|((o, &g), &u)| *o = silu(g) * u);
    };
    if out.len() >= PARALLEL_MIN_ELEMS {
        gate_up
            .par_chunks_exact(2 * ffn)
            .zip(out.par_chunks_exact_mut(ffn))
            .for_each(row);
    } else {
        gate_up
            .chunks_exact(2 * ffn)
            .zip(out.chunks_exact_mut(ffn))
            .for_each(row);
    }
}

/// `x += y` (residual connection).
pub fn add_inplace(x: &mut [f32], y: &[f32]) {
    assert_eq!(x.len(), y.len(), "add_inplace: x and y differ in length");
    x.iter_mut().zip(y).for_each(|(a, &b)| *a += b);
}
