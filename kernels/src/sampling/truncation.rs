//! The candidates a token is drawn from: temperature, then top-k, top-p and min-p (vLLM's order).
//!
//! Weights are fixed point: a surviving token weighs `q = trunc(w * 2^40)` where
//! `w = exp(l / T - max)` is its probability relative to the most likely token (`weights`).
//! Sums of `q` are exact integers, so the nucleus and the draw do not depend on summation order
//! and the GPU kernel (`cuda/sampling.cu`), which computes the same `w` bits, reproduces them
//! bit for bit; the price is that a token less than 2^-40 times as likely as the best one is
//! never drawn.

use super::draw::max_value;
use super::logprobs::rank_desc;
use super::weights::{fill_weights, fixed_weight, relative_weight};

/// One surviving token: its relative weight `w` (f32, in [0, 1]), its fixed-point weight and id.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Candidate {
    pub w: f32,
    pub q: u64,
    pub id: u32,
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

/// Weight octaves: octave `j` holds the weights in `[2^-j, 2^-j+1)`; a weight with a non-zero
/// fixed-point weight is at least `2^-40`, so 41 octaves hold them all.
const OCTAVES: usize = 41;

/// Fixed-point mass of the candidates in each weight octave.
type OctaveMass = [u64; OCTAVES];

/// The octave of a weight in `[2^-40, 1]`: minus its binary exponent.
#[inline]
fn octave(w: f32) -> usize {
    let exponent = (w.to_bits() >> 23) as usize;
    127usize.saturating_sub(exponent).min(OCTAVES - 1)
}

/// The smallest weight of octave `j`: `2^-j`.
#[inline]
fn octave_floor(j: usize) -> f32 {
    f32::from_bits(((127 - j.min(OCTAVES - 1)) as u32) << 23)
}

/// Reused storage of [`survivors`].
#[derive(Default)]
pub struct SurvivorScratch {
    /// Scaled logits and ids, for top-k.
    scaled: Vec<(f32, u32)>,
    /// Top-k's strided sample of the row's scaled logits.
    sample: Vec<f32>,
    /// Relative weights of the whole row, by id.
    weights: Vec<f32>,
}

/// Fills `cand` with the survivors of `t` over `row` (penalised logits; NaN counts as -inf), in
/// ascending id order: the canonical order of the draw. Leaves it empty when every logit is
/// -inf.
///
/// Tokens whose fixed-point weight is 0 are left out: they are never drawn, add nothing to a
/// mass and rank below every other token, so leaving them out changes no draw.
pub fn survivors(
    row: &[f32],
    t: &Truncation,
    scratch: &mut SurvivorScratch,
    cand: &mut Vec<Candidate>,
) {
    cand.clear();
    let inv_t = 1.0 / t.temperature;
    // Rounding keeps the order, so scaling the maximum gives the scaled maximum.
    let max = max_value(row) * inv_t;
    if max == f32::NEG_INFINITY {
        return;
    }
    let k = t.top_k as usize;
    let mut ranked_order = false;
    if k > 0 {
        top_k_candidates(row, inv_t, k, scratch);
        let scaled = &mut scratch.scaled;
        if k < scaled.len() {
            scaled.select_nth_unstable_by(k - 1, rank_desc);
            scaled.truncate(k);
            ranked_order = true;
        }
        cand.extend(scaled.iter().filter_map(|&(s, id)| {
            let w = relative_weight(s, max);
            let q = fixed_weight(w);
            (q > 0).then_some(Candidate { w, q, id })
        }));
    } else {
        fill_weights(row, inv_t, max, &mut scratch.weights);
        weighted(&scratch.weights, cand);
    }
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

/// Top-k's threshold sample takes one scaled logit in this many.
const TOP_K_STRIDE: usize = 32;

/// Fills `scratch.scaled` with (scaled logit, id) pairs that include the `k` best of the row:
/// every finite one, or, when a threshold estimated from a strided sample leaves at least `k`,
/// only those at or above it. The pairs above a value are a prefix of the ranking (ties to the
/// lowest id), so the `k` best of them are the row's; the estimate only decides how few pairs
/// the selection sorts (a few hundred instead of the vocabulary).
fn top_k_candidates(row: &[f32], inv_t: f32, k: usize, scratch: &mut SurvivorScratch) {
    let sample = &mut scratch.sample;
    sample.clear();
    sample.extend(
        (row.iter().step_by(TOP_K_STRIDE))
            .map(|&l| l * inv_t)
            .filter(|&s| s > f32::NEG_INFINITY),
    );
    // About twice the sample's share of k, so that fewer than k pass only by a rare draw.
    let j = k / TOP_K_STRIDE * 2 + 4;
    if j < sample.len() {
        let (_, &mut threshold, _) = sample.select_nth_unstable_by(j - 1, |a, b| b.total_cmp(a));
        scaled_at_or_above(row, inv_t, threshold, &mut scratch.scaled);
        if scratch.scaled.len() >= k {
            return;
        }
    }
    scaled_at_or_above(row, inv_t, f32::NEG_INFINITY, &mut scratch.scaled);
}

/// Sets `scaled` to the row's finite (scaled logit, id) pairs at or above `threshold` (`>
/// -inf` also drops NaN that invalid penalties could produce).
fn scaled_at_or_above(row: &[f32], inv_t: f32, threshold: f32, scaled: &mut Vec<(f32, u32)>) {
    scaled.clear();
    scaled.extend(row.iter().enumerate().filter_map(|(id, &l)| {
        let s = l * inv_t;
        (s >= threshold && s > f32::NEG_INFINITY).then_some((s, id as u32))
    }));
}

/// Sets `cand` to the tokens of `weights` (by id) with a non-zero fixed-point weight. Every
/// token is written and the next one overwrites it unless it counts: no branch to mispredict.
fn weighted(weights: &[f32], cand: &mut Vec<Candidate>) {
    const NONE: Candidate = Candidate {
        w: 0.0,
        q: 0,
        id: 0,
    };
    cand.resize(weights.len(), NONE);
    let mut kept = 0;
    for (id, &w) in weights.iter().enumerate() {
        let q = fixed_weight(w);
        cand[kept] = Candidate {
            w,
            q,
            id: id as u32,
        };
        kept += usize::from(q > 0);
    }
    cand.truncate(kept);
}

/// Keeps the tokens whose mass ranked strictly above them is below the nucleus limit. Only the
/// octaves whose mass, from the top, first reaches the limit can hold the nucleus (every token
/// below them has at least that mass above it), so the rest are dropped first; of those left, a
/// prefix that grows 4x at a time is selected with `select_nth_unstable` and sorted, not the
/// whole set, since the nucleus is usually a few dozen tokens. Leaves `cand` in rank order.
fn truncate_to_nucleus(cand: &mut Vec<Candidate>, top_p: f32) {
    let mut mass: OctaveMass = [0; OCTAVES];
    for c in cand.iter() {
        mass[octave(c.w)] += c.q;
    }
    let total: u64 = mass.iter().sum();
    let limit = nucleus_limit(top_p, total);
    let mut reached = 0u64;
    let last = mass
        .iter()
        .position(|&m| {
            reached += m;
            reached >= limit
        })
        .unwrap_or(OCTAVES - 1);
    let floor = octave_floor(last);
    cand.retain(|c| c.w >= floor);
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
    use crate::sampling::weights::WEIGHT_ONE;

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
        let (mut scratch, mut cand) = (SurvivorScratch::default(), Vec::new());
        survivors(&row, &t, &mut scratch, &mut cand);
        let ids: Vec<u32> = cand.iter().map(|c| c.id).collect();
        assert_eq!(ids, vec![1, 3, 4]);
        survivors(&[f32::NEG_INFINITY; 3], &t, &mut scratch, &mut cand);
        assert!(cand.is_empty());
    }

    /// The survivors by definition, sorting everything: scaled logits ranked, the top k, weights
    /// relative to their maximum, the nucleus walked over the whole ranking, min-p, id order;
    /// without the zero fixed-point weights, which `survivors` leaves out.
    fn by_definition(row: &[f32], t: &Truncation) -> Vec<Candidate> {
        let mut ranked: Vec<(f32, u32)> = row
            .iter()
            .enumerate()
            .map(|(id, &l)| (l * (1.0 / t.temperature), id as u32))
            .filter(|c| c.0 > f32::NEG_INFINITY)
            .collect();
        ranked.sort_by(rank_desc);
        if t.top_k > 0 {
            ranked.truncate(t.top_k as usize);
        }
        let max = ranked.first().map_or(f32::NEG_INFINITY, |c| c.0);
        let mut cand: Vec<Candidate> = ranked
            .iter()
            .map(|&(s, id)| {
                let w = relative_weight(s, max);
                Candidate {
                    w,
                    q: fixed_weight(w),
                    id,
                }
            })
            .collect();
        cand.sort_by(|a, b| rank_desc(&(a.w, a.id), &(b.w, b.id)));
        let limit = nucleus_limit(t.top_p, cand.iter().map(|c| c.q).sum());
        let mut above = 0;
        cand.retain(|c| {
            let keep = t.top_p >= 1.0 || above < limit;
            above += c.q;
            keep && c.q > 0 && c.w >= t.min_p
        });
        cand.sort_by_key(|c| c.id);
        cand
    }

    /// Rows of real-looking logits (a few leaders over a broad tail), with ties, -inf, NaN and
    /// +inf mixed in, under every kind of truncation: the same survivors as by definition.
    #[test]
    fn survivors_match_the_definition() {
        use rand::{Rng, SeedableRng};
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(3);
        for case in 0..3000 {
            // Every tenth row vocabulary-sized, where top-k selects above a sampled threshold.
            let n = if case % 10 == 9 {
                rng.random_range(400..6000)
            } else {
                rng.random_range(1..400)
            };
            let spread = [0.5f32, 3.0, 12.0][case % 3];
            let mut row: Vec<f32> = (0..n)
                .map(|_| (rng.random_range(-spread..spread) * 4.0).round() / 4.0)
                .collect();
            for _ in 0..rng.random_range(0..4) {
                let i = rng.random_range(0..n);
                row[i] = [f32::NEG_INFINITY, f32::NAN, 20.0, 35.0, f32::INFINITY, -0.0]
                    [rng.random_range(0..6)];
            }
            let t = Truncation {
                temperature: [0.3, 0.8, 1.0, 1.7][rng.random_range(0..4)],
                top_k: [0, 0, 1, 5, 50, 1000][rng.random_range(0..6)],
                top_p: [1.0, 1.0, 0.9, 0.5, 0.999, 0.05][rng.random_range(0..6)],
                min_p: [0.0, 0.0, 0.1, 0.5][rng.random_range(0..4)],
            };
            let (mut scratch, mut cand) = (SurvivorScratch::default(), Vec::new());
            survivors(&row, &t, &mut scratch, &mut cand);
            assert_eq!(
                cand,
                by_definition(&row, &t),
                "case {case}: {t:?} over {row:?}"
            );
        }
    }

    /// Rows whose sampled positions (every 32nd) hold their largest logits: the sample's
    /// threshold leaves fewer than k above it, and top-k must look at the whole row.
    #[test]
    fn top_k_does_not_trust_a_sample_that_leaves_too_few() {
        let row: Vec<f32> = (0..3200)
            .map(|i| {
                if i % TOP_K_STRIDE == 0 {
                    10.0
                } else {
                    (i % 7) as f32
                }
            })
            .collect();
        for top_k in [1, 50, 99, 100, 101, 200, 3000] {
            let t = Truncation {
                temperature: 1.0,
                top_k,
                top_p: 1.0,
                min_p: 0.0,
            };
            let (mut scratch, mut cand) = (SurvivorScratch::default(), Vec::new());
            survivors(&row, &t, &mut scratch, &mut cand);
            assert_eq!(cand.len(), top_k.min(3200) as usize);
            assert_eq!(cand, by_definition(&row, &t), "top_k {top_k}");
        }
    }

    #[test]
    fn octaves_bound_their_weights() {
        for j in 0..OCTAVES {
            let floor = octave_floor(j);
            assert_eq!(octave(floor), j);
            if j > 0 {
                assert_eq!(octave(floor * 1.999), j);
            }
            assert!(j == OCTAVES - 1 || octave(floor * 0.999) == j + 1);
        }
        assert_eq!(octave(1.0), 0);
        assert!(octave_floor(OCTAVES - 1) as f64 <= 1.0 / WEIGHT_ONE as f64);
    }
}
