//! Relative weights: a token's probability relative to the most likely one,
//! `w = exp(s - max)` for its scaled logit `s`, and its fixed-point weight `q = trunc(w * 2^40)`.
//!
//! `exp` is this module's own polynomial, not the platform's `expf`: plain f32 operations, none
//! fused, so the GPU kernel (`cuda/sampling.cu`, `relative_weight`) computes the same bits, and
//! a row of them compiles to vector instructions (a quarter of the cost of calling `expf`).

/// Fixed-point scale of the weights: a weight of 1.0 (the most likely token) is 2^40.
pub const WEIGHT_ONE: u64 = 1 << 40;

/// Below this, `s - max` gives a weight of 0: `e^-30 < 2^-40`, so its fixed-point weight would
/// be 0 anyway, and the polynomial is only ever evaluated where its result is a normal float.
pub const NEGLIGIBLE: f32 = -30.0;

/// The fixed-point weight of a relative weight `w` in [0, 1] (0 for NaN or below 0). Through
/// i64, whose conversion from f32 is one instruction where u64's takes several.
#[inline]
pub fn fixed_weight(w: f32) -> u64 {
    ((w * WEIGHT_ONE as f32) as i64).max(0) as u64
}

/// `exp(s - max)`, exactly 1 for the maximum, 0 below [`NEGLIGIBLE`] (and for NaN); with +inf
/// logits those weigh 1 and the rest 0.
#[inline]
pub fn relative_weight(s: f32, max: f32) -> f32 {
    if max == f32::INFINITY {
        if s == f32::INFINITY {
            1.0
        } else {
            0.0
        }
    } else {
        weight_below(s - max)
    }
}

/// Writes `relative_weight(l * inv_t, max)` for each `l` of `row` into `out` (resized to it).
pub fn fill_weights(row: &[f32], inv_t: f32, max: f32, out: &mut Vec<f32>) {
    out.clear();
    if max == f32::INFINITY {
        out.extend(row.iter().map(|&l| relative_weight(l * inv_t, max)));
        return;
    }
    out.resize(row.len(), 0.0);
    // No branch inside: the compiler turns this loop into vector instructions.
    for (w, &l) in out.iter_mut().zip(row) {
        *w = weight_below(l * inv_t - max);
    }
}

/// `e^x` for `x <= 0` at [`NEGLIGIBLE`] or above (within 1 ulp, exactly 1 at 0); 0 below it and
/// for NaN.
#[inline]
fn weight_below(x: f32) -> f32 {
    let e = exp_near_zero(x);
    if x >= NEGLIGIBLE {
        e
    } else {
        0.0
    }
}

/// Adding then subtracting 1.5 * 2^23 rounds an f32 of magnitude below 2^22 to an integer (ties
/// to even), which is left in the low bits of the sum.
const ROUNDER: f32 = 12_582_912.0;
/// ln 2 in two parts: `n * LN2_HIGH` is exact for the `n` here (355/512 has 9 significant
/// bits), and LN2_LOW is the rest.
const LN2_HIGH: f32 = 355.0 / 512.0;
const LN2_LOW: f32 = -2.121_944_4e-4;

/// `e^x = 2^n * e^r` with `n = round(x / ln 2)` and `|r| <= ln 2 / 2`, `e^r` by its Taylor
/// series to the 7th power (the first term left out is below 2^-26). Meaningful for `x` in
/// `[-87, 0]`; any other input gives some float without panicking.
#[inline]
fn exp_near_zero(x: f32) -> f32 {
    let shifted = x * std::f32::consts::LOG2_E + ROUNDER;
    let n = shifted - ROUNDER;
    let r = (x - n * LN2_HIGH) - n * LN2_LOW;
    let mut p = 1.0 / 5040.0;
    for c in [
        1.0 / 720.0,
        1.0 / 120.0,
        1.0 / 24.0,
        1.0 / 6.0,
        0.5,
        1.0,
        1.0,
    ] {
        p = p * r + c;
    }
    let exponent = (shifted.to_bits() as i32)
        .wrapping_sub(ROUNDER.to_bits() as i32)
        .wrapping_add(127);
    p * f32::from_bits((exponent << 23) as u32)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Within one ulp of f64's `exp` over the whole range it is used on, exactly 1 at 0, and 0
    /// below the cut-off.
    #[test]
    fn weights_follow_exp() {
        let mut worst = 0.0f64;
        let mut x = 0.0f32;
        while x >= NEGLIGIBLE {
            let want = (x as f64).exp();
            let ulp = f32::EPSILON as f64 * (want as f32) as f64;
            worst = worst.max((relative_weight(x, 0.0) as f64 - want).abs() / ulp);
            x -= 3.1e-5;
        }
        assert!(worst < 1.0, "{worst} ulp");
        assert_eq!(relative_weight(2.5, 2.5), 1.0);
        assert_eq!(relative_weight(-0.0, 0.0), 1.0);
        assert_eq!(relative_weight(-30.01, 0.0), 0.0);
        assert_eq!(relative_weight(f32::NEG_INFINITY, 0.0), 0.0);
        assert_eq!(relative_weight(f32::NAN, 0.0), 0.0);
        assert_eq!(relative_weight(f32::INFINITY, f32::INFINITY), 1.0);
        assert_eq!(relative_weight(1e30, f32::INFINITY), 0.0);
        assert_eq!(fixed_weight(relative_weight(NEGLIGIBLE, 0.0)), 0);
    }

    #[test]
    fn a_filled_row_equals_its_weights() {
        let row = [0.0, -3.0, f32::NAN, 7.5, f32::NEG_INFINITY, -70.0, 7.5];
        for (inv_t, max) in [(1.0, 7.5), (1.25, 9.375), (1.0, f32::INFINITY)] {
            let mut out = Vec::new();
            fill_weights(&row, inv_t, max, &mut out);
            let want: Vec<f32> = row
                .iter()
                .map(|&l| relative_weight(l * inv_t, max))
                .collect();
            assert_eq!(out.len(), want.len());
            assert!(out
                .iter()
                .zip(&want)
                .all(|(a, b)| a.to_bits() == b.to_bits()));
        }
    }
}
