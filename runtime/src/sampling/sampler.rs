//! The per-request [`Sampler`]: penalties -> greedy short-cut -> temperature -> top-k -> top-p
//! -> min-p -> draw from the softmax (vLLM's order).
//!
//! Cost per call for a vocabulary V: one copy of the row, one pass of `exp`, and an O(V)
//! `select_nth_unstable` for top-k; top-p grows a sorted prefix geometrically instead of sorting
//! the whole row, since the nucleus is usually a few dozen tokens. Scratch buffers live in the
//! sampler, so after the first call no vocab-sized allocation happens.

use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

use super::logprobs::{rank_desc, sanitize, top_logprobs, LogSoftmax};
use super::params::{SamplingParams, MAX_LOGPROBS};
use super::penalties::{apply_frequency_presence_penalties, apply_repetition_penalty};

/// One sampled token, with logprobs when the request asked for them.
#[derive(Clone, Debug, PartialEq)]
pub struct SampledToken {
    pub token_id: u32,
    /// log p of `token_id` under the model's raw distribution (see [`super::logprobs`]);
    /// `Some` iff `params.logprobs` is `Some`.
    pub logprob: Option<f32>,
    /// The `n` most likely raw tokens as `(id, logprob)`, sorted descending, ties to lowest id.
    pub top_logprobs: Vec<(u32, f32)>,
}

/// Per-request sampler: owns the RNG (ChaCha, seeded from `seed`, or from OS entropy when None)
/// so a request's output depends only on its own logits and seed, never on its batch neighbours.
pub struct Sampler {
    params: SamplingParams,
    rng: ChaCha8Rng,
    /// Penalised logits, NaN replaced by -inf.
    work: Vec<f32>,
    /// Surviving `(value, token id)` pairs: logits, then weights relative to the maximum.
    cand: Vec<(f32, u32)>,
    /// Scratch for the penalties' id sorting.
    ids: Vec<u32>,
}

impl Sampler {
    /// Does not validate: call [`SamplingParams::validate`] first (invalid values never panic
    /// here, they only give unspecified choices).
    pub fn new(params: SamplingParams) -> Sampler {
        let rng = match params.seed {
            Some(seed) => ChaCha8Rng::seed_from_u64(seed),
            None => ChaCha8Rng::from_rng(&mut rand::rng()),
        };
        Sampler {
            params,
            rng,
            work: Vec::new(),
            cand: Vec::new(),
            ids: Vec::new(),
        }
    }

    pub fn params(&self) -> &SamplingParams {
        &self.params
    }

    /// Samples one token from one row of raw logits (len = vocab). `prompt_ids`/`output_ids`
    /// feed the penalties. Logprobs are those of the model's raw distribution (log_softmax of
    /// the unmodified logits), as vLLM returns by default, not of the distribution drawn from.
    /// NaN logits count as -inf; if every logit is masked, the raw argmax is returned.
    pub fn sample(
        &mut self,
        logits: &[f32],
        prompt_ids: &[u32],
        output_ids: &[u32],
    ) -> SampledToken {
        let token_id = self.choose(logits, prompt_ids, output_ids);
        match self.params.logprobs {
            None => SampledToken {
                token_id,
                logprob: None,
                top_logprobs: Vec::new(),
            },
            Some(n) => {
                let norm = LogSoftmax::new(logits);
                let raw = logits
                    .get(token_id as usize)
                    .copied()
                    .unwrap_or(f32::NEG_INFINITY);
                SampledToken {
                    token_id,
                    logprob: Some(norm.logprob(raw)),
                    top_logprobs: top_logprobs(logits, n.min(MAX_LOGPROBS), &norm),
                }
            }
        }
    }

    fn choose(&mut self, logits: &[f32], prompt_ids: &[u32], output_ids: &[u32]) -> u32 {
        let p = &self.params;
        self.work.clear();
        self.work.extend(logits.iter().map(|&l| sanitize(l)));
        apply_repetition_penalty(
            &mut self.work,
            prompt_ids,
            output_ids,
            p.repetition_penalty,
            &mut self.ids,
        );
        apply_frequency_presence_penalties(
            &mut self.work,
            output_ids,
            p.frequency_penalty,
            p.presence_penalty,
            &mut self.ids,
        );
        if p.is_greedy() {
            return argmax(&self.work).unwrap_or_else(|| raw_argmax(logits));
        }

        let inv_t = 1.0 / p.temperature;
        self.cand.clear();
        self.cand
            .extend(self.work.iter().enumerate().filter_map(|(id, &l)| {
                let scaled = l * inv_t;
                // `>` also drops NaN that invalid penalties could produce.
                (scaled > f32::NEG_INFINITY).then_some((scaled, id as u32))
            }));
        if self.cand.is_empty() {
            return raw_argmax(logits);
        }
        if let Some(k) = p.top_k.filter(|&k| k > 0 && k < self.cand.len()) {
            self.cand.select_nth_unstable_by(k - 1, rank_desc);
            self.cand.truncate(k);
        }
        to_relative_weights(&mut self.cand);
        if p.top_p < 1.0 {
            truncate_to_nucleus(&mut self.cand, p.top_p);
        }
        if p.min_p > 0.0 {
            // The maximum has weight exactly 1, so it always survives.
            let threshold = p.min_p.min(1.0);
            self.cand.retain(|c| c.0 >= threshold);
        }
        let u: f64 = self.rng.random();
        draw(&self.cand, u)
    }
}

/// Index of the largest non-NaN value above -inf, ties to the lowest id.
fn argmax(row: &[f32]) -> Option<u32> {
    let mut best: Option<(f32, u32)> = None;
    for (id, &l) in row.iter().enumerate() {
        let l = sanitize(l);
        if l > best.map_or(f32::NEG_INFINITY, |b| b.0) {
            best = Some((l, id as u32));
        }
    }
    best.map(|b| b.1)
}

/// Last-resort choice when every candidate is masked: the raw argmax, or token 0.
fn raw_argmax(logits: &[f32]) -> u32 {
    argmax(logits).unwrap_or(0)
}

/// Replaces each logit by `exp(l - max)` (so the maximum gets exactly 1). If some logits are
/// +inf they get weight 1 and everything else 0.
fn to_relative_weights(cand: &mut [(f32, u32)]) {
    let max = cand.iter().map(|c| c.0).fold(f32::NEG_INFINITY, f32::max);
    for c in cand.iter_mut() {
        c.0 = if max == f32::INFINITY {
            if c.0 == f32::INFINITY {
                1.0
            } else {
                0.0
            }
        } else {
            (c.0 - max).exp()
        };
    }
}

/// Keeps the smallest set of most likely candidates whose mass reaches `top_p` (vLLM: a token
/// is kept iff the mass ranked strictly above it is below `top_p`). Sorts a prefix that grows
/// 4x at a time, selected with `select_nth_unstable`, instead of the whole row.
fn truncate_to_nucleus(cand: &mut Vec<(f32, u32)>, top_p: f32) {
    let total: f64 = cand.iter().map(|c| c.0 as f64).sum();
    let target = top_p as f64 * total;
    let len = cand.len();
    let mut k = len.min(64);
    while k > 0 {
        if k < len {
            cand.select_nth_unstable_by(k - 1, rank_desc);
        }
        cand[..k].sort_unstable_by(rank_desc);
        let mut acc = 0.0f64;
        for i in 0..k {
            acc += cand[i].0 as f64;
            if acc >= target {
                cand.truncate(i + 1);
                return;
            }
        }
        if k == len {
            return; // rounding left the target unreached: keep everything
        }
        k = len.min(k * 4);
    }
}

/// Inverse-CDF draw over the weights with `u` in [0, 1). Zero weights are never chosen.
fn draw(cand: &[(f32, u32)], u: f64) -> u32 {
    let total: f64 = cand.iter().map(|c| c.0 as f64).sum();
    let target = u * total;
    let mut acc = 0.0f64;
    let mut last_positive = cand.first().map_or(0, |c| c.1);
    for &(w, id) in cand {
        if w > 0.0 {
            acc += w as f64;
            last_positive = id;
            if acc > target {
                return id;
            }
        }
    }
    last_positive
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn nucleus_grows_past_first_prefix() {
        // 300 equal tokens: the nucleus for 0.5 needs 150 of them, beyond the 64-token prefix.
        let mut cand: Vec<(f32, u32)> = (0..300).map(|i| (1.0, i)).collect();
        truncate_to_nucleus(&mut cand, 0.5);
        assert_eq!(cand.len(), 150);
        let ids: Vec<u32> = cand.iter().map(|c| c.1).collect();
        assert_eq!(
            ids,
            (0..150).collect::<Vec<u32>>(),
            "ties keep the lowest ids"
        );
    }

    #[test]
    fn draw_respects_cdf_edges() {
        let cand = [(0.0, 7), (1.0, 3), (3.0, 5), (0.0, 9)];
        assert_eq!(draw(&cand, 0.0), 3);
        assert_eq!(draw(&cand, 0.2499), 3);
        assert_eq!(draw(&cand, 0.25), 5);
        assert_eq!(draw(&cand, 0.999_999_9), 5);
    }

    #[test]
    fn nan_and_inf_rows_do_not_panic() {
        let mut s = Sampler::new(SamplingParams {
            seed: Some(1),
            top_k: Some(2),
            top_p: 0.5,
            min_p: 0.1,
            logprobs: Some(3),
            ..Default::default()
        });
        let all_masked = [f32::NAN, f32::NEG_INFINITY, f32::NAN];
        assert_eq!(s.sample(&all_masked, &[], &[]).token_id, 0);
        let inf = [0.0, f32::INFINITY, f32::NAN, f32::INFINITY];
        for _ in 0..20 {
            let t = s.sample(&inf, &[2], &[1]).token_id;
            assert!(t == 1 || t == 3);
        }
        assert_eq!(s.sample(&[], &[], &[]).token_id, 0);
    }
}
