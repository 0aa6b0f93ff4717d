//! The candidates a token is drawn from: temperature, then top-k, top-p and min-p (vLLM's order).
//!
//! Weights are fixed point: a surviving token weighs `q = trunc(w * 2^40)` where
//! `w = exp(l / T - max)` is its probability relative to the most likely token. Sums of `q` are
//! exact integers, so the nucleus and the draw do not depend on summation order and the GPU
//! kernel (`cuda/sampling.cu`) reproduces them bit for bit from the same `w`; the price is that a
//! token less than 2^-40 times as likely as the best one is never drawn.

use super::logprobs::rank_desc;

/// Fixed-point scale of the weights: a weight of 1.0 (the most likely token) is 2^40.
pub const WEIGHT_ONE: u64 = 1 << 40;

/// One surviving token: its relative weight `w` (f32, in [0, 1]), its fixed-point weight and id.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Candidate {
    pub w: f32,
    pub q: u64,
    pub id: u32,
}

/// The fixed-point weight of a relative weight `w` in [0, 1].
#[inline]
pub fn fixed_weight(w: f32) -> u64 {
    (w * WEIGHT_ONE as f32) as u64
}

/// What truncates the distribution of one request (already validated: temperature > 0,
/// top_p in (0, 1], min_p in [0, 1]; other values give unspecified but panic-free choices).
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Truncation {
    pub temperature: f32,
    /// Keep the `top_k` best tokens; 0 = off.
    pub top_k: u32,
    /// Nucleus: a token is kept iff the mass ranked strictly above it is below `top_p` of the
    /// total (ranked by weight, ties to the lowest id); 1 = off.
    pub top_p: f32,
    /// Keep tokens whose weight is at least `min_p` of the best one's; 0 = off.
    pub min_p: f32,
}

/// The exclusive mass limit of the nucleus: a token stays iff the mass above it is `< limit`.
#[inline]
pub fn nucleus_limit(top_p: f32, total: u64) -> u64 {
    (top_p as f64 * total as f64).ceil() as u64
}

/// Fills `cand` with the survivors of `t` over `row` (penalised logits, NaN-free), in ascending
/// id order: the canonical order of the draw. Leaves it empty when every logit is -inf.
/// `scaled` is reused storage.
pub fn survivors(
    row: &[f32],
    t: &Truncation,
    scaled: &mut Vec<(f32, u32)>,
    cand: &mut Vec<Candidate>,
) {
    cand.clear();
    let inv_t = 1.0 / t.temperature;
    scaled.clear();
    scaled.extend(row.iter().enumerate().filter_map(|(id, &l)| {
        let s = l * inv_t;
        // `>` also drops NaN that invalid penalties could produce.
        (s > f32::NEG_INFINITY).then_some((s, id as u32))
    }));
    if scaled.is_empty() {
        return;
    }
    let k = t.top_k as usize;
    let mut ranked_order = false;
    if k > 0 && k < scaled.len() {
        scaled.select_nth_unstable_by(k - 1, rank_desc);
        scaled.truncate(k);
        ranked_order = true;
    }
    let max = scaled.iter().map(|c| c.0).fold(f32::NEG_INFINITY, f32::max);
    cand.extend(scaled.iter().map(|&(s, id)| {
        let w = relative_weight(s, max);
        Candidate {
            w,
            q: fixed_weight(w),
            id,
        }
    }));
    if t.top_p < 1.0 {
        truncate_to_nucleus(cand, t.top_p);
        ranked_order = true;
    }
    if t.min_p > 0.0 {
        // The maximum has weight exactly 1, so it always survives.
        let threshold = t.min_p.min(1.0);
        cand.retain(|c| c.w >= threshold);
    }
    if ranked_order {
        cand.sort_unstable_by_key(|c| c.id);
    }
}

/// `exp(s - max)`, so the maximum gets exactly 1; with +inf logits those get 1, the rest 0.
#[inline]
pub fn relative_weight(s: f32, max: f32) -> f32 {
    if max == f32::INFINITY {
        if s == f32::INFINITY {
            1.0
        } else {
            0.0
        }
    } else {
        (s - max).exp()
    }
}

/// Keeps the tokens whose mass ranked strictly above them is below the nucleus limit. Sorts a
/// prefix that grows 4x at a time, selected with `select_nth_unstable`, not the whole row, since
/// the nucleus is usually a few dozen tokens. Leaves `cand` in rank order.
pub fn truncate_to_nucleus(cand: &mut Vec<Candidate>, top_p: f32) {
    let total: u64 = cand.iter().map(|c| c.q).sum();
    let limit = nucleus_limit(top_p, total);
    let by_rank = |a: &Candidate, b: &Candidate| rank_desc(&(a.w, a.id), &(b.w, b.id));
    let len = cand.len();
    let mut k = len.min(64);
    while k > 0 {
        if k < len {
            cand.select_nth_unstable_by(k - 1, by_rank);
        }
        cand[..k].sort_unstable_by(by_rank);
        let mut above = 0u64;
        for i in 0..k {
            if above >= limit {
                cand.truncate(i);
                return;
            }
            above += cand[i].q;
        }
        if k == len {
            return;
        }
        k = len.min(k * 4);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn equal(n: u32) -> Vec<Candidate> {
        (0..n)
            .map(|id| Candidate {
                w: 1.0,
                q: WEIGHT_ONE,
                id,
            })
            .collect()
    }

    #[test]
    fn nucleus_grows_past_first_prefix_and_keeps_lowest_ids() {
        // 300 equal tokens: the nucleus for 0.5 needs 150 of them, beyond the 64-token prefix.
        let mut cand = equal(300);
        truncate_to_nucleus(&mut cand, 0.5);
        let ids: Vec<u32> = cand.iter().map(|c| c.id).collect();
        assert_eq!(ids, (0..150).collect::<Vec<u32>>());
    }

    #[test]
    fn top_k_ties_keep_the_lowest_ids_and_survivors_come_in_id_order() {
        let row = [1.0, 3.0, 2.0, 3.0, 3.0, f32::NEG_INFINITY];
        let t = Truncation {
            temperature: 1.0,
            top_k: 3,
            top_p: 1.0,
            min_p: 0.0,
        };
        let (mut scaled, mut cand) = (Vec::new(), Vec::new());
        survivors(&row, &t, &mut scaled, &mut cand);
        let ids: Vec<u32> = cand.iter().map(|c| c.id).collect();
        assert_eq!(ids, vec![1, 3, 4]);
        survivors(&[f32::NEG_INFINITY; 3], &t, &mut scaled, &mut cand);
        assert!(cand.is_empty());
    }
}
