//! What a caller asks the engine for, and the checks every request passes before it is queued.

use std::sync::Arc;

use caduceus_scheduler::{AddRequestError, AdmissionLimits};

use crate::sampling::{SamplingError, SamplingParams, MAX_LOGPROBS};
use crate::structured::CompiledConstraint;

/// Most stop strings one request may carry (OpenAI allows 4; vLLM more).
pub const MAX_STOP_STRINGS: usize = 16;
/// Longest stop string in bytes: together with the count it bounds the matching work and the
/// text held back per token.
pub const MAX_STOP_STRING_BYTES: usize = 256;
/// Most `stop_token_ids` (each is checked on every sampled token).
pub const MAX_STOP_TOKEN_IDS: usize = 64;

/// One generation request: prompt tokens (already templated and tokenized) plus its settings.
#[derive(Clone, Debug)]
pub struct EngineRequest {
    /// Prompt token ids.
    pub prompt_token_ids: Vec<u32>,
    /// Sampling settings (temperature, top-k/p, penalties, seed, logprobs).
    pub sampling: SamplingParams,
    /// Most tokens to generate.
    pub max_tokens: usize,
    /// End-of-sequence and stop tokens are ignored until this many tokens exist.
    pub min_tokens: usize,
    /// Keep generating past end-of-sequence tokens (stop strings and `stop_token_ids` still apply).
    pub ignore_eos: bool,
    /// Strings that end generation; matched on detokenized text and never emitted.
    pub stop: Vec<String>,
    /// Extra token ids that end generation (besides the model's EOS ids).
    pub stop_token_ids: Vec<u32>,
    /// The stop string or stop token that ended generation ends the text too (vLLM's
    /// `include_stop_str_in_output`); by default neither is emitted.
    pub include_stop_str_in_output: bool,
    /// Leave special tokens (e.g. `<|im_end|>`) out of the text (the default).
    pub skip_special_tokens: bool,
    /// Lower values are scheduled first.
    pub priority: i32,
    /// The LoRA adapter (registry name) this request runs with, if any.
    pub adapter: Option<Arc<str>>,
    /// Isolates this request's prefix-cache entries from requests with another salt.
    pub cache_salt: Option<u64>,
    /// Produce text (incremental detokenization); off for token-only benchmarks.
    pub detokenize: bool,
    /// The grammar the output must match (structured outputs), compiled before queueing.
    pub constraint: Option<Arc<CompiledConstraint>>,
    /// `Some(n)`: the logprob of every prompt token after the first, with its `n` most likely
    /// alternatives, sent with the first output. The prompt is then computed in full (no
    /// prefix-cache hit).
    pub prompt_logprobs: Option<usize>,
}

impl EngineRequest {
    /// A greedy request for `max_tokens` tokens with every other setting at its default.
    pub fn new(prompt_token_ids: Vec<u32>, max_tokens: usize) -> Self {
        EngineRequest {
            prompt_token_ids,
            sampling: SamplingParams::greedy(),
            max_tokens,
            min_tokens: 0,
            ignore_eos: false,
            stop: Vec::new(),
            stop_token_ids: Vec::new(),
            include_stop_str_in_output: false,
            skip_special_tokens: true,
            priority: 0,
            adapter: None,
            cache_salt: None,
            detokenize: true,
            constraint: None,
            prompt_logprobs: None,
        }
    }
}

/// A request the engine refuses; the HTTP layer reports each as a 400 naming the limit.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum RequestError {
    /// The prompt has no tokens.
    #[error("the prompt is empty")]
    EmptyPrompt,
    /// `max_tokens` is zero.
    #[error("`max_tokens` must be at least 1")]
    ZeroMaxTokens,
    /// Prompt plus `max_tokens` exceeds the context.
    #[error(
        "this model's maximum context length is {max_model_len} tokens, but the prompt has \
         {prompt_tokens} tokens and {max_tokens} more were requested (`max_tokens`); \
         shorten the prompt or lower `max_tokens`"
    )]
    TooLong {
        prompt_tokens: usize,
        max_tokens: usize,
        max_model_len: usize,
    },
    /// The request could never fit the KV cache pool, even alone.
    #[error(
        "the request needs {needed_blocks} KV-cache blocks but the pool has {usable_blocks}; \
         shorten the prompt or lower `max_tokens`"
    )]
    ExceedsKvPool {
        needed_blocks: usize,
        usable_blocks: usize,
    },
    /// A token id is outside the vocabulary.
    #[error("token id {token_id} is outside the vocabulary of {vocab_size}")]
    BadToken { token_id: u32, vocab_size: usize },
    /// `min_tokens` above `max_tokens`.
    #[error("`min_tokens` ({min_tokens}) must not exceed `max_tokens` ({max_tokens})")]
    MinAboveMax {
        min_tokens: usize,
        max_tokens: usize,
    },
    /// Too many or empty stop strings.
    #[error("`stop` takes at most {MAX_STOP_STRINGS} non-empty strings of at most {MAX_STOP_STRING_BYTES} bytes")]
    BadStop,
    /// Too many `stop_token_ids`.
    #[error("`stop_token_ids` takes at most {MAX_STOP_TOKEN_IDS} ids")]
    TooManyStopTokenIds,
    /// Stop strings or text were asked of an engine without a tokenizer.
    #[error("this engine has no tokenizer, so it cannot produce text or match stop strings")]
    NoTokenizer,
    /// Sampling settings out of range.
    #[error(transparent)]
    Sampling(#[from] SamplingError),
    /// A request id already in use (a caller bug).
    #[error("request id {0} is already in use")]
    DuplicateId(u64),
    /// The waiting queue is full (HTTP 429).
    #[error("the server is overloaded: {limit} requests are already waiting; retry later")]
    QueueFull { limit: usize },
    /// The engine thread has stopped.
    #[error("the engine is not running")]
    EngineStopped,
    /// The request names an adapter this engine does not serve (HTTP 404).
    #[error("the model `{0}` does not exist")]
    UnknownAdapter(String),
    /// Prompt logprobs asked of a backend that does not compute them.
    #[error("this server's backend does not compute prompt logprobs")]
    PromptLogprobsUnavailable,
    /// More top prompt logprobs than the sampler returns for outputs.
    #[error("prompt logprobs take at most {MAX_LOGPROBS} alternatives per token, {0} were asked")]
    TooManyPromptLogprobs(usize),
}

impl From<AddRequestError> for RequestError {
    fn from(e: AddRequestError) -> Self {
        match e {
            AddRequestError::EmptyPrompt => RequestError::EmptyPrompt,
            AddRequestError::ZeroMaxTokens => RequestError::ZeroMaxTokens,
            AddRequestError::TooLong {
                prompt_tokens,
                max_tokens,
                max_model_len,
            } => RequestError::TooLong {
                prompt_tokens,
                max_tokens,
                max_model_len,
            },
            AddRequestError::ExceedsKvPool {
                needed_blocks,
                usable_blocks,
            } => RequestError::ExceedsKvPool {
                needed_blocks,
                usable_blocks,
            },
            AddRequestError::DuplicateId(id) => RequestError::DuplicateId(id.0),
            AddRequestError::ScoringUnavailable => RequestError::PromptLogprobsUnavailable,
        }
    }
}

/// The limits a request is checked against; copied into every engine handle so callers get
/// errors before anything is queued.
#[derive(Clone, Copy, Debug)]
pub struct RequestLimits {
    /// Longest prompt plus output.
    pub max_model_len: usize,
    /// Vocabulary size.
    pub vocab_size: usize,
    /// Tokens per KV block.
    pub block_size: usize,
    /// KV blocks a single request may use (the pool minus the null block).
    pub usable_blocks: usize,
    /// Whether the engine can detokenize.
    pub has_tokenizer: bool,
    /// Whether the backend computes prompt logprobs.
    pub scores_prompts: bool,
}

impl RequestLimits {
    /// The scheduler's admission rule over these limits (one rule for the server's default
    /// `max_tokens`, this check and `Scheduler::add_request`).
    pub fn admission(&self) -> AdmissionLimits {
        AdmissionLimits {
            max_model_len: self.max_model_len,
            block_size: self.block_size,
            usable_blocks: self.usable_blocks,
        }
    }

    /// Checks `req` against these limits.
    pub fn check(&self, req: &EngineRequest) -> Result<(), RequestError> {
        self.admission()
            .check(req.prompt_token_ids.len(), req.max_tokens)?;
        let vocab_size = self.vocab_size;
        let ids = (req.prompt_token_ids.iter())
            .chain(&req.stop_token_ids)
            .chain(&req.sampling.allowed_token_ids);
        if let Some(&token_id) = ids.into_iter().find(|&&t| t as usize >= vocab_size) {
            return Err(RequestError::BadToken {
                token_id,
                vocab_size,
            });
        }
        if req.min_tokens > req.max_tokens {
            return Err(RequestError::MinAboveMax {
                min_tokens: req.min_tokens,
                max_tokens: req.max_tokens,
            });
        }
        if req.stop.len() > MAX_STOP_STRINGS
            || req
                .stop
                .iter()
                .any(|s| s.is_empty() || s.len() > MAX_STOP_STRING_BYTES)
        {
            return Err(RequestError::BadStop);
        }
        if req.stop_token_ids.len() > MAX_STOP_TOKEN_IDS {
            return Err(RequestError::TooManyStopTokenIds);
        }
        if !self.has_tokenizer && (req.detokenize || !req.stop.is_empty()) {
            return Err(RequestError::NoTokenizer);
        }
        if let Some(n) = req.prompt_logprobs {
            if !self.scores_prompts {
                return Err(RequestError::PromptLogprobsUnavailable);
            }
            if n > MAX_LOGPROBS {
                return Err(RequestError::TooManyPromptLogprobs(n));
            }
        }
        req.sampling.validate()?;
        Ok(())
    }
}
