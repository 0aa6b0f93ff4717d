//! One row's sampling as data ([`RowSample`]): everything a backend needs to pick a request's
//! next token from its logits row, with the request's RNG already consumed on the host. The CPU
//! backend runs [`sample_row`]; the GPU backend hands the same fields to the sampling kernel, so
//! both draw the same token for one seed whatever the batch.

use caduceus_kernels::sampling::{
    choose_token, top_logprobs, LogSoftmax, PenaltyEntry, RowSampling, SampleScratch,
};

use super::params::MAX_LOGPROBS;
use super::sampler::SampledToken;
use crate::structured::TokenMask;

/// How one logits row is sampled.
#[derive(Clone, Debug, PartialEq)]
pub struct RowSample {
    pub sampling: RowSampling,
    /// The request's uniform number for this step (unused when greedy).
    pub u: f64,
    /// Distinct prompt/output tokens feeding the penalties.
    pub penalties: Vec<PenaltyEntry>,
    /// Ids that may not be sampled this step (EOS and stop ids before `min_tokens`): their
    /// logits count as -inf, for the draw and the logprobs alike.
    pub banned: Vec<u32>,
    /// `Some(n)`: the sampled token's logprob and the `n` most likely tokens.
    pub logprobs: Option<usize>,
    /// Structured outputs: only these tokens may be sampled (others count as -inf, for the
    /// draw and the logprobs alike).
    pub allowed: Option<TokenMask>,
    /// `logit_bias`: added to these tokens' logits first (for the draw and the logprobs alike);
    /// each id once, ids past the vocabulary ignored.
    pub bias: Vec<(u32, f32)>,
}

/// Reused storage of [`sample_row`].
#[derive(Default)]
pub struct RowScratch {
    choose: SampleScratch,
    masked: Vec<f32>,
}

/// Samples `r` from `logits` (one row, len = vocab). Logprobs are those of the raw distribution
/// after the bias and the bans (log_softmax of the row), as vLLM returns by default.
pub fn sample_row(logits: &[f32], r: &RowSample, scratch: &mut RowScratch) -> SampledToken {
    let row = if r.banned.is_empty() && r.allowed.is_none() && r.bias.is_empty() {
        logits
    } else {
        scratch.masked.clear();
        scratch.masked.extend_from_slice(logits);
        for &(t, bias) in &r.bias {
            if let Some(l) = scratch.masked.get_mut(t as usize) {
                *l += bias;
            }
        }
        if let Some(mask) = &r.allowed {
            mask.apply(&mut scratch.masked);
        }
        for &t in &r.banned {
            if let Some(l) = scratch.masked.get_mut(t as usize) {
                *l = f32::NEG_INFINITY;
            }
        }
        &scratch.masked[..]
    };
    let token_id = choose_token(row, &r.penalties, &r.sampling, r.u, &mut scratch.choose);
    match r.logprobs {
        None => SampledToken {
            token_id,
            logprob: None,
            top_logprobs: Vec::new(),
        },
        Some(n) => {
            let norm = LogSoftmax::new(row);
            let raw = row
                .get(token_id as usize)
                .copied()
                .unwrap_or(f32::NEG_INFINITY);
            SampledToken {
                token_id,
                logprob: Some(norm.logprob(raw)),
                top_logprobs: top_logprobs(row, n.min(MAX_LOGPROBS), &norm),
            }
        }
    }
}
