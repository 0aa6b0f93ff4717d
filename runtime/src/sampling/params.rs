//! Per-request sampling parameters (OpenAI / vLLM request fields) and their validation.

use serde::{Deserialize, Serialize};

/// Temperatures below this are treated as greedy, as vLLM does: dividing by a tiny temperature
/// would overflow the logits and gives the same result as argmax anyway.
pub const GREEDY_TEMPERATURE_EPS: f32 = 1e-5;

/// Most `top_logprobs` a request may ask for (OpenAI's limit; the GPU kernel's output stride).
pub use caduceus_kernels::sampling::MAX_LOGPROBS;

/// Most token ids one request's `logit_bias` may name (bounds per-step work).
pub const MAX_LOGIT_BIAS: usize = 1024;
/// Largest bias magnitude (OpenAI's range: -100 bans a token, 100 all but forces it).
pub const MAX_BIAS: f32 = 100.0;
/// Most token sequences one request's `bad_words` may become (each is checked every step).
pub const MAX_BAD_WORD_SEQUENCES: usize = 128;
/// Longest `bad_words` token sequence.
pub const MAX_BAD_WORD_TOKENS: usize = 64;

/// How one request wants its tokens chosen. Values come straight from the HTTP request, so
/// [`SamplingParams::validate`] must be called before sampling; the sampler itself never panics on
/// invalid values, it only gives unspecified (but deterministic) choices.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct SamplingParams {
    /// Softmax temperature in [0, 2]; 0 (anything below [`GREEDY_TEMPERATURE_EPS`]) means greedy.
    pub temperature: f32,
    /// Keep only the `k` most likely tokens; `None` or `Some(0)` disables it.
    pub top_k: Option<usize>,
    /// Nucleus sampling: keep the smallest set of tokens whose mass reaches `top_p`; in (0, 1], 1 = off.
    pub top_p: f32,
    /// Keep tokens whose probability is at least `min_p` times the most likely one's; in [0, 1], 0 = off.
    pub min_p: f32,
    /// OpenAI presence penalty in [-2, 2], subtracted once from every token already generated.
    pub presence_penalty: f32,
    /// OpenAI frequency penalty in [-2, 2], subtracted once per previous generation of a token.
    pub frequency_penalty: f32,
    /// HF/vLLM repetition penalty in (0, 2], 1 = off, over prompt and generated tokens:
    /// a positive logit is divided by it, a negative one multiplied.
    pub repetition_penalty: f32,
    /// RNG seed making the request reproducible; `None` seeds from OS entropy.
    pub seed: Option<u64>,
    /// `Some(n)`: return the sampled token's logprob and the `n` (at most 20) most likely tokens.
    pub logprobs: Option<usize>,
    /// OpenAI `logit_bias`: (token id, bias in [-100, 100]) pairs, each id once and at most
    /// [`MAX_LOGIT_BIAS`] of them; a bias is added to its token's logit before everything else.
    pub logit_bias: Vec<(u32, f32)>,
    /// vLLM's `allowed_token_ids`: only these ids may be sampled (the others count as -inf, for
    /// the draw and the logprobs alike); empty allows all.
    pub allowed_token_ids: Vec<u32>,
    /// vLLM's `bad_words` as token sequences: the last token of each is banned whenever the
    /// output ends with the others (a one-token sequence always).
    pub bad_words: Vec<Vec<u32>>,
}

impl Default for SamplingParams {
    fn default() -> Self {
        SamplingParams {
            temperature: 1.0,
            top_k: None,
            top_p: 1.0,
            min_p: 0.0,
            presence_penalty: 0.0,
            frequency_penalty: 0.0,
            repetition_penalty: 1.0,
            seed: None,
            logprobs: None,
            logit_bias: Vec::new(),
            allowed_token_ids: Vec::new(),
            bad_words: Vec::new(),
        }
    }
}

/// A request parameter outside its allowed range; the HTTP layer reports it as a 400.
#[derive(Clone, Debug, thiserror::Error, PartialEq)]
pub enum SamplingError {
    #[error("invalid sampling parameter `{field}` = {value}: allowed range is {allowed}")]
    OutOfRange {
        field: &'static str,
        value: String,
        allowed: &'static str,
    },
}

/// Checks `value` against an inclusive/exclusive range; NaN always fails.
fn check_f32(
    field: &'static str,
    value: f32,
    ok: impl Fn(f32) -> bool,
    allowed: &'static str,
) -> Result<(), SamplingError> {
    if value.is_finite() && ok(value) {
        Ok(())
    } else {
        Err(SamplingError::OutOfRange {
            field,
            value: value.to_string(),
            allowed,
        })
    }
}

impl SamplingParams {
    /// Deterministic argmax decoding (temperature 0, everything else off).
    pub fn greedy() -> Self {
        SamplingParams {
            temperature: 0.0,
            ..Self::default()
        }
    }

    /// True when the sampler takes the argmax instead of drawing; top-k/p and min-p are then moot.
    pub fn is_greedy(&self) -> bool {
        self.temperature < GREEDY_TEMPERATURE_EPS
    }

    /// Every out-of-range value is an error naming the field, the value and the allowed range.
    pub fn validate(&self) -> Result<(), SamplingError> {
        check_f32(
            "temperature",
            self.temperature,
            |v| (0.0..=2.0).contains(&v),
            "[0, 2]",
        )?;
        check_f32("top_p", self.top_p, |v| v > 0.0 && v <= 1.0, "(0, 1]")?;
        check_f32("min_p", self.min_p, |v| (0.0..=1.0).contains(&v), "[0, 1]")?;
        check_f32(
            "presence_penalty",
            self.presence_penalty,
            |v| (-2.0..=2.0).contains(&v),
            "[-2, 2]",
        )?;
        check_f32(
            "frequency_penalty",
            self.frequency_penalty,
            |v| (-2.0..=2.0).contains(&v),
            "[-2, 2]",
        )?;
        check_f32(
            "repetition_penalty",
            self.repetition_penalty,
            |v| v > 0.0 && v <= 2.0,
            "(0, 2]",
        )?;
        if let Some(n) = self.logprobs {
            if n > MAX_LOGPROBS {
                return Err(SamplingError::OutOfRange {
                    field: "logprobs",
                    value: n.to_string(),
                    allowed: "[0, 20]",
                });
            }
        }
        let bad_word = |value: String| SamplingError::OutOfRange {
            field: "bad_words",
            value,
            allowed: "at most 128 sequences of 1 to 64 tokens",
        };
        if self.bad_words.len() > MAX_BAD_WORD_SEQUENCES {
            return Err(bad_word(format!(
                "{} token sequences",
                self.bad_words.len()
            )));
        }
        let out_of_bounds = |w: &&Vec<u32>| w.is_empty() || w.len() > MAX_BAD_WORD_TOKENS;
        if let Some(w) = self.bad_words.iter().find(out_of_bounds) {
            return Err(bad_word(format!("a sequence of {} tokens", w.len())));
        }
        self.validate_logit_bias()
    }

    fn validate_logit_bias(&self) -> Result<(), SamplingError> {
        let out_of_range = |value: String, allowed| SamplingError::OutOfRange {
            field: "logit_bias",
            value,
            allowed,
        };
        if self.logit_bias.len() > MAX_LOGIT_BIAS {
            let value = format!("{} token ids", self.logit_bias.len());
            return Err(out_of_range(value, "at most 1024 token ids"));
        }
        for &(_, bias) in &self.logit_bias {
            check_f32("logit_bias", bias, |v| v.abs() <= MAX_BIAS, "[-100, 100]")?;
        }
        let mut ids: Vec<u32> = self.logit_bias.iter().map(|&(t, _)| t).collect();
        ids.sort_unstable();
        if let Some(w) = ids.windows(2).find(|w| w[0] == w[1]) {
            let value = format!("token id {} twice", w[0]);
            return Err(out_of_range(value, "each token id once"));
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_are_valid_and_not_greedy() {
        let p = SamplingParams::default();
        assert_eq!(p.validate(), Ok(()));
        assert!(!p.is_greedy());
        assert!(SamplingParams::greedy().is_greedy());
        assert_eq!(SamplingParams::greedy().validate(), Ok(()));
    }

    #[test]
    fn nan_is_rejected() {
        let p = SamplingParams {
            top_p: f32::NAN,
            ..Default::default()
        };
        assert!(matches!(
            p.validate(),
            Err(SamplingError::OutOfRange { field: "top_p", .. })
        ));
    }

    #[test]
    fn logit_bias_is_bounded_in_range_count_and_repeats() {
        let with = |logit_bias: Vec<(u32, f32)>| SamplingParams {
            logit_bias,
            ..Default::default()
        };
        assert_eq!(with(vec![(3, -100.0), (7, 100.0)]).validate(), Ok(()));
        let field = |p: SamplingParams| match p.validate() {
            Err(SamplingError::OutOfRange { field, value, .. }) => (field, value),
            Ok(()) => panic!("accepted"),
        };
        assert_eq!(field(with(vec![(3, 100.5)])).0, "logit_bias");
        assert_eq!(field(with(vec![(3, f32::NAN)])).0, "logit_bias");
        assert_eq!(
            field(with(vec![(3, 1.0), (5, 2.0), (3, 1.0)])),
            ("logit_bias", "token id 3 twice".into())
        );
        let many = (0..=MAX_LOGIT_BIAS as u32).map(|t| (t, 1.0)).collect();
        assert_eq!(field(with(many)).1, "1025 token ids");
    }

    #[test]
    fn missing_json_fields_take_defaults() {
        let p: SamplingParams = serde_json::from_str(r#"{"temperature":0.5,"seed":7}"#).unwrap();
        assert_eq!(p.temperature, 0.5);
        assert_eq!(p.seed, Some(7));
        assert_eq!(p.top_p, 1.0);
        assert_eq!(p.repetition_penalty, 1.0);
    }
}
