//! The sampling math, RNG-free: penalties, greedy argmax, temperature, top-k / top-p / min-p
//! truncation, the inverse-CDF draw given a uniform `u`, and raw log-probabilities.
//!
//! This is the one definition both samplers follow: the runtime's CPU `Sampler` calls it (and
//! owns the request's parameters and seeded RNG), and the GPU kernel `cuda/sampling.cu` is
//! tested against it. Order (vLLM's): penalties -> greedy short-cut -> temperature -> top-k ->
//! top-p -> min-p -> draw over the survivors in ascending id order. NaN logits count as -inf;
//! every tie goes to the lowest id.

pub mod draw;
pub mod logprobs;
pub mod penalties;
pub mod truncation;
pub mod weights;

pub use draw::{argmax, draw, draw_target, raw_argmax};
pub use logprobs::{rank_desc, sanitize, top_logprobs, LogSoftmax};
pub use penalties::{apply_penalties, penalty_entries, Penalties, PenaltyEntry};
pub use truncation::{survivors, Candidate, SurvivorScratch, Truncation};
pub use weights::WEIGHT_ONE;

/// Most top logprobs a request may ask for (OpenAI's limit); the GPU kernel's output stride.
pub const MAX_LOGPROBS: usize = 20;

/// How one row is sampled: penalties, then argmax (`truncation == None`) or a draw.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct RowSampling {
    pub penalties: Penalties,
    /// `None`: greedy.
    pub truncation: Option<Truncation>,
}

/// Reused storage of [`choose_token`], so no vocab-sized allocation happens after the first row.
#[derive(Default)]
pub struct SampleScratch {
    work: Vec<f32>,
    survivors: SurvivorScratch,
    cand: Vec<Candidate>,
}

/// The token for one row of raw logits: `entries` feed the penalties, `u` in [0, 1) is the
/// request's uniform number for this step (unused when greedy). If every logit ends up masked,
/// the raw argmax (NaN as -inf), or token 0.
pub fn choose_token(
    logits: &[f32],
    entries: &[PenaltyEntry],
    s: &RowSampling,
    u: f64,
    scratch: &mut SampleScratch,
) -> u32 {
    // Without penalties the row is read as it is: argmax and survivors count NaN as -inf.
    let row = if entries.is_empty() {
        logits
    } else {
        scratch.work.clear();
        scratch.work.extend(logits.iter().map(|&l| sanitize(l)));
        apply_penalties(&mut scratch.work, entries, &s.penalties);
        &scratch.work
    };
    let Some(t) = s.truncation else {
        return argmax(row).unwrap_or_else(|| raw_argmax(logits));
    };
    survivors(row, &t, &mut scratch.survivors, &mut scratch.cand);
    draw(&scratch.cand, u).unwrap_or_else(|| raw_argmax(logits))
}
