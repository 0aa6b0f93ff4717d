//! The portable kernels, which also define the one order of float operations every path follows:
//!
//! - shrink `v[t, k] = x_t · A_k`: 8 lane accumulators, lane `j` takes elements `c ≡ j (mod 8)` of
//!   the whole multiple-of-8 prefix in increasing `c` with fused multiply-adds; the lanes are summed
//!   as `((l0+l4) + (l2+l6)) + ((l1+l5) + (l3+l7))`; the leftover `in_dim % 8` elements are then
//!   fused-multiply-added in order onto that sum.
//! - expand `y[t, o] += scale · Σ_k v[t, k] B[o, k]`: one accumulator from 0, `k` in increasing
//!   order with fused multiply-adds, then `y = fma(scale, acc, y)`.
//!
//! An output depends only on its own token's inputs and this order, never on how tokens are tiled.

use super::slots::SlotWeights;
use super::weight::LoraWeight;

/// Lanes of the shrink's accumulators (one AVX2 register).
pub(super) const LANES: usize = 8;
/// Outputs per panel of the transposed B (eight AVX2 registers).
pub(super) const PANEL: usize = 64;

/// The lane sum of the shrink's accumulator order (AVX2: high half onto low half, then `movehl`,
/// then `movehdup`).
pub(super) fn lane_sum(l: [f32; LANES]) -> f32 {
    let h = [l[0] + l[4], l[1] + l[5], l[2] + l[6], l[3] + l[7]];
    (h[0] + h[2]) + (h[1] + h[3])
}

/// `x · a` in the canonical order (`x.len() == a.len()`).
pub(super) fn dot<W: LoraWeight>(x: &[f32], a: &[W]) -> f32 {
    let n8 = x.len() / LANES * LANES;
    let mut acc = [0f32; LANES];
    for (xc, ac) in x[..n8].chunks_exact(LANES).zip(a[..n8].chunks_exact(LANES)) {
        for j in 0..LANES {
            acc[j] = xc[j].mul_add(ac[j].to_f32(), acc[j]);
        }
    }
    finish_dot(lane_sum(acc), &x[n8..], &a[n8..])
}

/// Adds the leftover elements (past the last multiple of 8) onto a lane sum, in order.
pub(super) fn finish_dot<W: LoraWeight>(sum: f32, x_tail: &[f32], a_tail: &[W]) -> f32 {
    x_tail
        .iter()
        .zip(a_tail)
        .fold(sum, |s, (&x, &a)| x.mul_add(a.to_f32(), s))
}

/// `v[t * v_stride + k] = x_t · A_k` for every token of `x` (`[num_tokens, in_dim]`) and `k < rank`.
pub(super) fn shrink<W: LoraWeight>(
    w: &SlotWeights<'_, W>,
    x: &[f32],
    v: &mut [f32],
    v_stride: usize,
) {
    for (t, xt) in x.chunks_exact(w.in_dim).enumerate() {
        for (k, a_row) in w.a.chunks_exact(w.in_dim).enumerate() {
            v[t * v_stride + k] = dot(xt, a_row);
        }
    }
}

/// `y_t[o] = fma(scale, Σ_k v_t[k] B[o, k], y_t[o])` for `num_tokens` tokens, where `v_t` starts at
/// `t * v_stride` and `y_t` at `t * y_stride`.
pub(super) fn expand<W: LoraWeight>(
    w: &SlotWeights<'_, W>,
    v: &[f32],
    v_stride: usize,
    num_tokens: usize,
    y: &mut [f32],
    y_stride: usize,
) {
    for t in 0..num_tokens {
        let vt = &v[t * v_stride..][..w.rank];
        let yt = &mut y[t * y_stride..][..w.out_dim];
        for (o, yo) in yt.iter_mut().enumerate() {
            let panel = &w.b_panels[(o / PANEL) * w.panel_stride..];
            let acc = vt.iter().enumerate().fold(0f32, |acc, (k, &vk)| {
                vk.mul_add(panel[k * PANEL + o % PANEL].to_f32(), acc)
            });
            *yo = w.scale.mul_add(acc, *yo);
        }
    }
}
