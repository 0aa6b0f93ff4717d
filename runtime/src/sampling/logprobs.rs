//! Log-probabilities of the model's raw distribution: the definitions live in
//! `caduceus_kernels::sampling::logprobs`, shared with the GPU sampling kernel. Prompt tokens
//! are scored against the same distribution ([`score_token`]).

use std::cmp::Ordering;

use caduceus_kernels::sampling::logprobs::{rank_desc, sanitize};
pub use caduceus_kernels::sampling::logprobs::{top_logprobs, LogSoftmax};

/// One prompt token as the model predicted it from the tokens before it (prompt logprobs,
/// `echo` with `logprobs`).
#[derive(Clone, Debug, PartialEq)]
pub struct PromptLogprob {
    pub token_id: u32,
    /// log p of `token_id` under the raw distribution.
    pub logprob: f32,
    /// 1-based place of `token_id` in the ranking of the whole vocabulary (ties to the lowest
    /// id, as [`top_logprobs`] orders them).
    pub rank: u32,
    /// The `n` most likely tokens as `(id, logprob)`, sorted descending.
    pub top_logprobs: Vec<(u32, f32)>,
}

/// Scores `token_id` against one row of raw logits, with the `n` most likely tokens.
pub fn score_token(logits: &[f32], token_id: u32, n: usize) -> PromptLogprob {
    let norm = LogSoftmax::new(logits);
    let own = (
        logits
            .get(token_id as usize)
            .copied()
            .map_or(f32::NEG_INFINITY, sanitize),
        token_id,
    );
    let ahead = logits
        .iter()
        .enumerate()
        .filter(|&(id, &l)| rank_desc(&(sanitize(l), id as u32), &own) == Ordering::Less)
        .count();
    PromptLogprob {
        token_id,
        logprob: norm.logprob(own.0),
        rank: u32::try_from(ahead + 1).unwrap_or(u32::MAX),
        top_logprobs: top_logprobs(logits, n, &norm),
    }
}

/// Scores each vocabulary-sized row of `rows` against its target: row `i` against
/// `targets[i]`, a `(token, number of top logprobs)`. Rows are scored in parallel on the
/// compute pool (each is a pass over the vocabulary); `None` when `rows` does not hold exactly
/// one row per target.
pub fn score_rows(
    rows: &[f32],
    vocab: usize,
    targets: &[(u32, usize)],
) -> Option<Vec<PromptLogprob>> {
    use rayon::prelude::*;
    if vocab == 0 || rows.len() != vocab * targets.len() {
        return None;
    }
    Some(
        rows.par_chunks_exact(vocab)
            .zip(targets.par_iter())
            .map(|(row, &(token, n))| score_token(row, token, n))
            .collect(),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_scored_token_has_its_softmax_logprob_and_its_place_in_the_ranking() {
        let logits = [1.0f32, 3.0, 3.0, -2.0, f32::NAN];
        let z: f64 = logits[..4].iter().map(|&l| (l as f64).exp()).sum();
        for (id, rank) in [(0u32, 3u32), (1, 1), (2, 2), (3, 4), (4, 5)] {
            let s = score_token(&logits, id, 2);
            let expected = if id == 4 {
                f64::NEG_INFINITY
            } else {
                logits[id as usize] as f64 - z.ln()
            };
            assert!(
                (s.logprob as f64 - expected).abs() < 1e-6 || s.logprob == f32::NEG_INFINITY,
                "{id}: {} vs {expected}",
                s.logprob
            );
            assert_eq!(s.rank, rank, "token {id}");
            assert_eq!(
                s.top_logprobs.iter().map(|t| t.0).collect::<Vec<_>>(),
                [1, 2]
            );
        }
        // Past the vocabulary: -inf, after every id (a NaN one's -inf too, being the lower id).
        let past = score_token(&logits, 9, 0);
        assert_eq!((past.rank, past.logprob), (6, f32::NEG_INFINITY));
    }

    #[test]
    fn rows_scored_together_score_as_each_alone_in_order() {
        let vocab = 7;
        let targets: Vec<(u32, usize)> = (0..40).map(|i| ((i * 3 % 7) as u32, i % 4)).collect();
        let rows: Vec<f32> = (0..vocab * targets.len())
            .map(|i| ((i * 37 % 11) as f32 - 5.0) * 0.7)
            .collect();
        let together = score_rows(&rows, vocab, &targets).expect("one row per target");
        let alone: Vec<_> = rows
            .chunks_exact(vocab)
            .zip(&targets)
            .map(|(row, &(t, n))| score_token(row, t, n))
            .collect();
        assert_eq!(together, alone);
        assert_eq!(
            score_rows(&rows[1..], vocab, &targets[..targets.len() - 1]),
            None
        );
        assert_eq!(score_rows(&rows, vocab, &targets[1..]), None);
        assert_eq!(score_rows(&[], 0, &[]), None);
    }
}
