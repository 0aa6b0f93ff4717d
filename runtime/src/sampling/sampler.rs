//! The per-request [`Sampler`]: penalties -> greedy short-cut -> temperature -> top-k -> top-p
//! -> min-p -> draw (vLLM's order). The math is `caduceus_kernels::sampling` (RNG-free, shared
//! with the GPU kernel); this type owns the request's parameters and seeded RNG.
//!
//! Cost per call for a vocabulary V (`benches/sampling`): greedy is a vectorised maximum and a
//! scan; a draw is one vectorised pass of weights, a compaction of the tokens that can be drawn,
//! an O(V) `select_nth_unstable` for top-k, and for top-p a sort of only the tokens heavy enough
//! to be in the nucleus. The row is copied only for penalties or masks. Scratch buffers live in
//! the sampler, so after the first call no vocab-sized allocation happens.

use caduceus_kernels::sampling::{
    penalty_entries, Penalties, PenaltyEntry, RowSampling, Truncation,
};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

use super::params::SamplingParams;
use super::row::{sample_row, RowSample, RowScratch};
use crate::structured::TokenMask;

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
    scratch: RowScratch,
    /// The penalty entries of the current step, and scratch for building them.
    entries: Vec<PenaltyEntry>,
    ids: Vec<u32>,
    /// `allowed_token_ids` as a mask, with the vocabulary size it was built for.
    allowed: Option<(usize, TokenMask)>,
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
            scratch: RowScratch::default(),
            entries: Vec::new(),
            ids: Vec::new(),
            allowed: None,
        }
    }

    /// The mask of `allowed_token_ids` over `vocab` tokens (`None`: every token allowed).
    fn allowed_mask(&mut self, vocab: usize) -> Option<TokenMask> {
        let ids = &self.params.allowed_token_ids;
        if ids.is_empty() {
            return None;
        }
        let (_, mask) = match &mut self.allowed {
            Some(built) if built.0 == vocab => built,
            slot => slot.insert((vocab, TokenMask::from_ids(vocab, ids))),
        };
        Some(mask.clone())
    }

    pub fn params(&self) -> &SamplingParams {
        &self.params
    }

    /// How this request's rows are sampled (the same description the GPU kernel receives).
    pub fn row_sampling(&self) -> RowSampling {
        let p = &self.params;
        RowSampling {
            penalties: self.penalties(),
            truncation: (!p.is_greedy()).then(|| Truncation {
                temperature: p.temperature,
                top_k: p.top_k.map_or(0, |k| u32::try_from(k).unwrap_or(u32::MAX)),
                top_p: p.top_p,
                min_p: p.min_p,
            }),
        }
    }

    /// The uniform number of the next draw: one per non-greedy step, whether or not the row
    /// turns out fully masked, so the CPU and GPU paths consume the RNG alike.
    pub fn next_uniform(&mut self) -> f64 {
        if self.params.is_greedy() {
            0.0
        } else {
            self.rng.random()
        }
    }

    /// The request's penalties.
    fn penalties(&self) -> Penalties {
        let p = &self.params;
        Penalties {
            repetition: p.repetition_penalty,
            frequency: p.frequency_penalty,
            presence: p.presence_penalty,
        }
    }

    /// This step's penalty entries (what the GPU kernel reads): the distinct prompt and output
    /// tokens below `vocab`, prompt-only ones only when the repetition penalty is on; none when
    /// no penalty is on (they would change no logit, and sorting every output so far for each
    /// row of each step was a quarter of a 256-request step's host time: `benches/engine_step`).
    pub fn penalty_entries(
        &mut self,
        prompt_ids: &[u32],
        output_ids: &[u32],
        vocab: usize,
    ) -> &[PenaltyEntry] {
        if !self.penalties().is_active() {
            self.entries.clear();
            return &self.entries;
        }
        let with_prompt = self.params.repetition_penalty != 1.0;
        penalty_entries(
            prompt_ids,
            output_ids,
            vocab,
            with_prompt,
            &mut self.ids,
            &mut self.entries,
        );
        &self.entries
    }

    /// This step's [`RowSample`] for a row of `vocab` logits: consumes one uniform (non-greedy)
    /// and builds the penalty entries; `banned` ids count as -inf, as do the `bad_words`
    /// tokens the output now leads to.
    pub fn row_sample(
        &mut self,
        prompt_ids: &[u32],
        output_ids: &[u32],
        vocab: usize,
        banned: &[u32],
    ) -> RowSample {
        let sampling = self.row_sampling();
        let penalties = self.penalty_entries(prompt_ids, output_ids, vocab).to_vec();
        let mut banned = banned.to_vec();
        banned.extend(bad_word_bans(&self.params.bad_words, output_ids));
        RowSample {
            sampling,
            u: self.next_uniform(),
            penalties,
            banned,
            logprobs: self.params.logprobs,
            allowed: self.allowed_mask(vocab),
            bias: self.params.logit_bias.clone(),
        }
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
        let r = self.row_sample(prompt_ids, output_ids, logits.len(), &[]);
        sample_row(logits, &r, &mut self.scratch)
    }
}

/// The tokens `bad_words` bans after `output`: each sequence's last token where the output
/// ends with the rest of it (vLLM's `NoBadWordsLogitsProcessor`).
fn bad_word_bans<'a>(words: &'a [Vec<u32>], output: &'a [u32]) -> impl Iterator<Item = u32> + 'a {
    words.iter().filter_map(move |w| {
        let (&last, lead) = w.split_last()?;
        output.ends_with(lead).then_some(last)
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use caduceus_kernels::sampling::{choose_token, SampleScratch};

    /// What a GPU step does per request (row description, entries, one uniform, then the
    /// kernel, whose twin is `choose_token`) draws the same tokens as `sample` for one seed.
    #[test]
    fn the_device_path_inputs_reproduce_sample() {
        let params = SamplingParams {
            seed: Some(5),
            temperature: 0.8,
            top_k: Some(30),
            top_p: 0.9,
            repetition_penalty: 1.3,
            frequency_penalty: 0.5,
            ..Default::default()
        };
        let (mut cpu, mut dev) = (Sampler::new(params.clone()), Sampler::new(params));
        let mut rng = ChaCha8Rng::seed_from_u64(9);
        let prompt: Vec<u32> = (0..20).map(|_| rng.random_range(0..200)).collect();
        let mut output = Vec::new();
        let mut scratch = SampleScratch::default();
        for _ in 0..40 {
            let row: Vec<f32> = (0..200).map(|_| rng.random_range(-4.0..4.0)).collect();
            let want = cpu.sample(&row, &prompt, &output).token_id;
            let s = dev.row_sampling();
            let u = dev.next_uniform();
            let entries = dev.penalty_entries(&prompt, &output, row.len()).to_vec();
            assert_eq!(choose_token(&row, &entries, &s, u, &mut scratch), want);
            output.push(want);
        }
        assert!(output.iter().any(|&t| t != output[0]), "the draws vary");
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

    #[test]
    fn bad_words_ban_their_last_token_after_the_rest() {
        let words = vec![vec![7], vec![1, 2], vec![3, 4, 5]];
        let bans = |out: &[u32]| super::bad_word_bans(&words, out).collect::<Vec<_>>();
        assert_eq!(bans(&[]), [7]);
        assert_eq!(bans(&[9, 1]), [7, 2]);
        assert_eq!(bans(&[3, 4]), [7, 5]);
        assert_eq!(bans(&[4, 3]), [7]);
        assert_eq!(bans(&[1, 3, 4]), [7, 5]);
    }
}
