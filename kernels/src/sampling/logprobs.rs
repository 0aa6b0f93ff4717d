//! Log-probabilities of the model's raw distribution (log_softmax of the unmodified logits), as
//! vLLM returns by default: they describe what the model predicted, not the distribution after
//! penalties, temperature or truncation that the token was actually drawn from.
//!
//! NaN logits count as -inf. A token with a -inf logit gets a -inf logprob (the HTTP layer must
//! map non-finite values before JSON encoding, e.g. to -9999 like vLLM). Degenerate rows are
//! defined so nothing is NaN: if some logits are +inf they share the mass equally, and if all
//! are -inf the distribution is uniform.

use std::cmp::Ordering;

/// Treats NaN as -inf so that comparisons and softmax never see NaN.
#[inline]
pub fn sanitize(l: f32) -> f32 {
    if l.is_nan() {
        f32::NEG_INFINITY
    } else {
        l
    }
}

/// Descending by value (`total_cmp`, so -0 ranks below +0), ties to the lowest id: the order of
/// every ranking in the sampler (top-k, top-p, top-N logprobs).
#[inline]
pub fn rank_desc(a: &(f32, u32), b: &(f32, u32)) -> Ordering {
    b.0.total_cmp(&a.0).then(a.1.cmp(&b.1))
}

/// The normaliser of one row of raw logits, computed once per row in f64.
#[derive(Clone, Copy, Debug)]
pub struct LogSoftmax {
    max: f64,
    /// ln of the sum of the row's weights relative to `max`.
    log_sum: f64,
}

impl LogSoftmax {
    /// Scans the row once (NaN as -inf).
    pub fn new(logits: &[f32]) -> Self {
        let max = logits
            .iter()
            .map(|&l| sanitize(l))
            .fold(f32::NEG_INFINITY, f32::max) as f64;
        let sum: f64 = logits
            .iter()
            .map(|&l| weight(sanitize(l) as f64, max))
            .sum();
        LogSoftmax {
            max,
            log_sum: sum.ln(),
        }
    }

    /// log p of a token whose raw logit is `logit`.
    pub fn logprob(&self, logit: f32) -> f32 {
        (weight(sanitize(logit) as f64, self.max).ln() - self.log_sum) as f32
    }
}

/// Unnormalised probability of `l` relative to the row maximum `max`, with the degenerate rows
/// (max = +inf, max = -inf) defined as described in the module docs. `l` must not be NaN.
#[inline]
fn weight(l: f64, max: f64) -> f64 {
    if max == f64::INFINITY {
        if l == f64::INFINITY {
            1.0
        } else {
            0.0
        }
    } else if max == f64::NEG_INFINITY {
        1.0
    } else {
        (l - max).exp()
    }
}

/// The `n` most likely tokens of the raw row with their logprobs, sorted descending (ties to
/// the lowest id). One pass with a small insertion buffer: no vocab-sized allocation.
pub fn top_logprobs(logits: &[f32], n: usize, norm: &LogSoftmax) -> Vec<(u32, f32)> {
    let mut best: Vec<(f32, u32)> = Vec::with_capacity(n + 1);
    if n == 0 {
        return Vec::new();
    }
    for (id, &l) in logits.iter().enumerate() {
        let c = (sanitize(l), id as u32);
        if best.len() == n && rank_desc(&c, &best[n - 1]) != Ordering::Less {
            continue;
        }
        let pos = best.partition_point(|b| rank_desc(b, &c) == Ordering::Less);
        best.insert(pos, c);
        best.truncate(n);
    }
    best.into_iter()
        .map(|(l, id)| (id, norm.logprob(l)))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn all_neg_inf_is_uniform_and_plus_inf_takes_all() {
        let row = [
            f32::NEG_INFINITY,
            f32::NAN,
            f32::NEG_INFINITY,
            f32::NEG_INFINITY,
        ];
        let norm = LogSoftmax::new(&row);
        assert!((norm.logprob(row[0]) - (0.25f32).ln()).abs() < 1e-6);

        let row = [f32::INFINITY, 0.0, f32::INFINITY];
        let norm = LogSoftmax::new(&row);
        assert!((norm.logprob(row[0]) - (0.5f32).ln()).abs() < 1e-6);
        assert_eq!(norm.logprob(row[1]), f32::NEG_INFINITY);
    }

    #[test]
    fn top_n_ties_go_to_lowest_id() {
        let row = [1.0, 3.0, 3.0, f32::NAN, 2.0];
        let norm = LogSoftmax::new(&row);
        let ids: Vec<u32> = top_logprobs(&row, 3, &norm).iter().map(|t| t.0).collect();
        assert_eq!(ids, vec![1, 2, 4]);
        assert_eq!(top_logprobs(&row, 10, &norm).len(), 5);
    }
}
