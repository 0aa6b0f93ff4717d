//! Choosing the token: argmax for greedy requests, an inverse-CDF draw over the survivors
//! otherwise. Both are pure functions of the row and a uniform `u`, so the GPU kernel and the CPU
//! sampler give the same token for the same request RNG state.

use super::truncation::Candidate;

/// Index of the largest value above -inf (NaN as -inf), ties to the lowest id (-0 and +0 tie).
/// Two passes: the maximum, in eight lanes that compile to vector instructions, then the
/// first index that equals it (NaN equals nothing).
pub fn argmax(row: &[f32]) -> Option<u32> {
    let max = max_value(row);
    if max == f32::NEG_INFINITY {
        return None;
    }
    row.iter().position(|&l| l == max).map(|i| i as u32)
}

/// The largest value of `row`, ignoring NaN (-inf when empty or all NaN).
pub(super) fn max_value(row: &[f32]) -> f32 {
    const LANES: usize = 8;
    let mut lanes = [f32::NEG_INFINITY; LANES];
    let chunks = row.chunks_exact(LANES);
    let rest = chunks.remainder();
    for chunk in chunks {
        for (m, &l) in lanes.iter_mut().zip(chunk) {
            *m = m.max(l);
        }
    }
    lanes
        .iter()
        .chain(rest)
        .fold(f32::NEG_INFINITY, |m, &l| m.max(l))
}

/// Last-resort choice when every candidate is masked: the raw argmax, or token 0.
pub fn raw_argmax(logits: &[f32]) -> u32 {
    argmax(logits).unwrap_or(0)
}

/// The draw's position in the survivors' total mass for a uniform `u` in [0, 1): the chosen
/// token is the first whose inclusive prefix sum exceeds it.
#[inline]
pub fn draw_target(u: f64, total: u64) -> u64 {
    ((u * total as f64) as u64).min(total.saturating_sub(1))
}

/// Inverse-CDF draw over `cand` in its order (ascending id, see `truncation::survivors`): the
/// first token whose inclusive prefix of fixed-point weights exceeds [`draw_target`]. Zero
/// weights are never chosen; `None` when the total is zero.
pub fn draw(cand: &[Candidate], u: f64) -> Option<u32> {
    let total: u64 = cand.iter().map(|c| c.q).sum();
    if total == 0 {
        return None;
    }
    let target = draw_target(u, total);
    let mut acc = 0u64;
    for c in cand {
        acc += c.q;
        if acc > target {
            return Some(c.id);
        }
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::sampling::weights::WEIGHT_ONE;

    #[test]
    fn draw_respects_cdf_edges() {
        let c = |q, id| Candidate { w: 0.0, q, id };
        let cand = [
            c(0, 3),
            c(WEIGHT_ONE / 4, 5),
            c(3 * WEIGHT_ONE / 4, 7),
            c(0, 9),
        ];
        assert_eq!(draw(&cand, 0.0), Some(5));
        assert_eq!(draw(&cand, 0.2499), Some(5));
        assert_eq!(draw(&cand, 0.25), Some(7));
        assert_eq!(draw(&cand, 0.999_999_9), Some(7));
        assert_eq!(draw(&[c(0, 1)], 0.5), None);
    }

    #[test]
    fn argmax_ties_and_signed_zeros_go_to_lowest_id() {
        assert_eq!(argmax(&[1.0, 5.0, 5.0]), Some(1));
        assert_eq!(argmax(&[-0.0, 0.0]), Some(0));
        assert_eq!(argmax(&[f32::NAN, f32::NEG_INFINITY]), None);
        assert_eq!(argmax(&[]), None);
        // Past the vector lanes, with NaN among them: the first of the largest.
        let mut row = vec![1.0; 21];
        row[3] = f32::NAN;
        row[17] = 4.0;
        row[19] = 4.0;
        assert_eq!(argmax(&row), Some(17));
        row[9] = f32::INFINITY;
        assert_eq!(argmax(&row), Some(9));
    }
}
