//! Token sampling with vLLM semantics: per-request parameters ([`SamplingParams`]), penalties,
//! temperature, top-k / top-p / min-p truncation, seeded per-request RNG ([`Sampler`]) and raw
//! log-probabilities.

pub mod logprobs;
pub mod params;
pub mod penalties;
pub mod row;
pub mod sampler;

pub use logprobs::{score_rows, score_token, PromptLogprob};
pub use params::{
    SamplingError, SamplingParams, GREEDY_TEMPERATURE_EPS, MAX_BAD_WORD_SEQUENCES,
    MAX_BAD_WORD_TOKENS, MAX_LOGIT_BIAS, MAX_LOGPROBS,
};
pub use row::{sample_row, RowSample, RowScratch};
pub use sampler::{SampledToken, Sampler};
