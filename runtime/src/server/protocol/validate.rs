//! Request validation: range checks that name the offending field and its limit, producing the
//! settings the engine understands. Converting to `EngineRequest` (templating, tokenizing,
//! context-length checks) happens in the server, which knows the model.

use crate::chat_template::ChatMessage;
use crate::engine::{MAX_STOP_STRINGS, MAX_STOP_STRING_BYTES, MAX_STOP_TOKEN_IDS};
use crate::sampling::SamplingParams;

use super::chat::ChatCompletionRequest;
use super::chat_options::{render_options, ChatTemplateOptions, Rendering};
use super::common::{StopSpec, StreamOptions, StreamUsage};
use super::completion::CompletionRequest;
use super::constraint::{constraint_fields, output_constraint, ConstraintFields};
use super::convert::{convert_messages, convert_prompt};
use super::error::ApiError;
use super::output_options::{output_settings, OutputOptions, OutputSettings};
use super::sampling_defaults::SamplingDefaults;
use super::sampling_fields::{logprob_count, sampling_fields, sampling_params, SamplingFields};
use super::structured::{tool_plan, ToolPlan};
use crate::structured::ConstraintSpec;
use crate::tokenizer::AddedTokens;

/// Most choices per prompt (`n`); each is a full sequence in the batch.
pub const MAX_N: usize = 8;
/// Most prompts in one legacy completion request (times `n` sequences), so one body cannot
/// flood the queue.
pub const MAX_PROMPTS: usize = 64;
/// Longest `cache_salt` accepted (it is hashed, never stored per block).
pub const MAX_CACHE_SALT_BYTES: usize = 256;
/// `max_tokens` of a legacy completion that does not set it (OpenAI's and vLLM's default).
pub const DEFAULT_COMPLETION_MAX_TOKENS: usize = 16;

/// A request field the server refuses; reported as a 400 with `param` set.
#[derive(Clone, Debug, PartialEq, thiserror::Error)]
pub enum ValidationError {
    /// A value outside its range.
    #[error("`{param}` is {value}, but it must be {allowed}")]
    OutOfRange {
        param: String,
        value: String,
        allowed: String,
    },
    /// A value of the right type that is still unusable.
    #[error("`{param}` {reason}")]
    Invalid { param: String, reason: String },
}

impl ValidationError {
    /// The request field at fault, as OpenAI's `param` (e.g. `messages[1].role`).
    pub fn param(&self) -> &str {
        match self {
            ValidationError::OutOfRange { param, .. } | ValidationError::Invalid { param, .. } => {
                param
            }
        }
    }
}

impl From<ValidationError> for ApiError {
    fn from(err: ValidationError) -> ApiError {
        ApiError::invalid_request(err.to_string(), Some(err.param()))
    }
}

pub(super) fn out_of_range(param: &str, value: impl ToString, allowed: &str) -> ValidationError {
    ValidationError::OutOfRange {
        param: param.into(),
        value: value.to_string(),
        allowed: allowed.into(),
    }
}

pub(super) fn invalid(param: &str, reason: impl Into<String>) -> ValidationError {
    ValidationError::Invalid {
        param: param.into(),
        reason: reason.into(),
    }
}

/// Settings shared by both endpoints, in engine terms.
#[derive(Clone, Debug, PartialEq)]
pub struct GenerationParams {
    /// The requested model; `None` means the base model.
    pub model: Option<String>,
    /// Temperature, truncation, penalties, seed and `logprobs` (`Some(k)`: report the sampled
    /// token's logprob and the `k` most likely alternatives).
    pub sampling: SamplingParams,
    /// `None`: generate until a stop or the context is full.
    pub max_tokens: Option<usize>,
    pub min_tokens: usize,
    pub ignore_eos: bool,
    pub stop: Vec<String>,
    pub stop_token_ids: Vec<u32>,
    /// Queue order: lower is served first (vLLM's convention); 0 by default.
    pub priority: i32,
    /// Choices per prompt.
    pub n: usize,
    pub stream: bool,
    /// The usage chunks of a stream.
    pub usage: StreamUsage,
    pub user: Option<String>,
    /// The request's own prefix-cache salt (vLLM's `cache_salt`).
    pub cache_salt: Option<String>,
    /// The grammar the output must match, and the field that asked for it.
    pub constraint: Option<(ConstraintSpec, &'static str)>,
    /// What the request asks of its prompt tokens' logprobs.
    pub prompt_scoring: PromptScoring,
    /// vLLM's text and token options.
    pub output: OutputSettings,
    /// vLLM's `bad_words` (tokenized by the server into `sampling.bad_words`).
    pub bad_words: Vec<String>,
}

/// The prompt-token logprobs a request asks for, each as its number of alternatives.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct PromptScoring {
    /// Legacy completions' `echo` with `logprobs`: the prompt's tokens lead `logprobs`.
    pub echo: Option<usize>,
    /// vLLM's `prompt_logprobs`.
    pub listed: Option<usize>,
}

impl PromptScoring {
    /// The alternatives the engine computes per prompt token (`None`: no scoring).
    pub fn top(&self) -> Option<usize> {
        self.echo.max(self.listed)
    }

    /// The field that asked, for errors.
    pub fn field(&self) -> &'static str {
        if self.listed.is_some() {
            "prompt_logprobs"
        } else {
            "echo"
        }
    }
}

/// A checked chat request.
#[derive(Clone, Debug, PartialEq)]
pub struct ValidatedChatRequest {
    pub messages: Vec<ChatMessage>,
    /// How the template renders them.
    pub rendering: Rendering,
    /// vLLM's chat `echo`: the last message's content, an assistant's, leads the answer
    /// (with `continue_final_message`, the whole message).
    pub echo: Option<String>,
    pub params: GenerationParams,
    /// The tools the model may call (absent with none, or `tool_choice: "none"`).
    pub tools: Option<ToolPlan>,
}

/// One prompt of a legacy completion request.
#[derive(Clone, Debug, PartialEq)]
pub enum PromptInput {
    Text(String),
    Tokens(Vec<u32>),
}

/// A checked legacy completion request.
#[derive(Clone, Debug, PartialEq)]
pub struct ValidatedCompletionRequest {
    pub prompts: Vec<PromptInput>,
    pub params: GenerationParams,
    /// Return each prompt before its completion.
    pub echo: bool,
    /// `echo` with `max_tokens: 0` (scoring a prompt, as OpenAI's legacy API allowed): the engine
    /// still computes one token, which is left out of the choice and of `usage`.
    pub prompt_only: bool,
    /// Whether text prompts get the model's BOS/EOS (`add_special_tokens`).
    pub added_tokens: AddedTokens,
}

/// The fields both request kinds share, borrowed from either.
struct Common {
    model: Option<String>,
    max_tokens: Option<(&'static str, i64)>,
    sampling: SamplingFields,
    stop: Option<StopSpec>,
    stop_token_ids: Option<Vec<u32>>,
    priority: Option<i64>,
    n: Option<i64>,
    stream: Option<bool>,
    stream_options: Option<StreamOptions>,
    ignore_eos: Option<bool>,
    min_tokens: Option<i64>,
    user: Option<String>,
    cache_salt: Option<String>,
    constraint: Option<(ConstraintSpec, &'static str)>,
    prompt_logprobs: Option<i64>,
    /// Legacy completions' `echo` (chat refuses it before).
    echo: bool,
    output: OutputOptions,
}

/// The vLLM output options of a request (chat and completion requests declare the same fields,
/// so a wrong JSON type is a 400 naming its field).
macro_rules! output_options {
    ($req:ident) => {
        OutputOptions {
            include_stop_str_in_output: $req.include_stop_str_in_output,
            skip_special_tokens: $req.skip_special_tokens,
            truncate_prompt_tokens: $req.truncate_prompt_tokens,
            allowed_token_ids: $req.allowed_token_ids,
            bad_words: $req.bad_words,
            return_tokens_as_token_ids: $req.return_tokens_as_token_ids,
        }
    };
}

/// Checks a chat request and converts its messages for the chat template; sampling fields it
/// leaves out come from `defaults`.
pub fn validate_chat(
    req: ChatCompletionRequest,
    defaults: &SamplingDefaults,
) -> Result<ValidatedChatRequest, ValidationError> {
    if req.logprobs != Some(true) && req.top_logprobs.is_some_and(|k| k > 0) {
        return Err(invalid("top_logprobs", "requires `logprobs` to be true"));
    }
    let logprobs = match (req.logprobs, req.top_logprobs) {
        (Some(true), k) => Some(logprob_count("top_logprobs", k.unwrap_or(0))?),
        _ => None,
    };
    let messages = convert_messages(req.messages)?;
    // vLLM's chat `echo`: the last message leads the answer when it is the assistant's own.
    let echo = (req.echo == Some(true))
        .then(|| messages.last().filter(|m| m.role == "assistant"))
        .flatten()
        .map(|m| m.content.clone());
    let template = ChatTemplateOptions {
        add_generation_prompt: req.add_generation_prompt,
        continue_final_message: req.continue_final_message,
        chat_template_kwargs: req.chat_template_kwargs,
        chat_template: req.chat_template,
        documents: req.documents,
        add_special_tokens: req.add_special_tokens,
    };
    let rendering = render_options(template, &messages)?;
    let constraint = output_constraint(constraint_fields!(req))?;
    let tools = tool_plan(req.tools, req.tool_choice, req.parallel_tool_calls)?;
    if let (Some((_, field)), Some(_)) = (&constraint, &tools) {
        return Err(invalid(
            field,
            "cannot be combined with `tools`; send `tool_choice: \"none\"` or drop one",
        ));
    }
    if tools.is_some() && req.echo == Some(true) {
        return Err(invalid(
            "echo",
            "cannot be combined with `tools` (an answer of calls has no text to lead)",
        ));
    }
    if tools.is_some() && req.allowed_token_ids.is_some() {
        return Err(invalid(
            "allowed_token_ids",
            "cannot be combined with `tools` (their grammar chooses the tokens)",
        ));
    }
    // OpenAI deprecated `max_tokens` for `max_completion_tokens`; the newer field wins.
    let max_tokens = match (req.max_completion_tokens, req.max_tokens) {
        (Some(v), _) => Some(("max_completion_tokens", v)),
        (None, Some(v)) => Some(("max_tokens", v)),
        (None, None) => None,
    };
    let common = Common {
        model: req.model,
        max_tokens,
        sampling: sampling_fields!(req).or(defaults),
        stop: req.stop,
        stop_token_ids: req.stop_token_ids,
        priority: req.priority,
        n: req.n,
        stream: req.stream,
        stream_options: req.stream_options,
        ignore_eos: req.ignore_eos,
        min_tokens: req.min_tokens,
        user: req.user,
        cache_salt: req.cache_salt,
        constraint,
        prompt_logprobs: req.prompt_logprobs,
        echo: false,
        output: output_options!(req),
    };
    let params = generation_params(common, logprobs)?;
    Ok(ValidatedChatRequest {
        messages,
        rendering,
        echo,
        params,
        tools,
    })
}

/// Checks a legacy completion request; `max_tokens` defaults to
/// [`DEFAULT_COMPLETION_MAX_TOKENS`] as in OpenAI's API, sampling fields it leaves out come
/// from `defaults`.
pub fn validate_completion(
    req: CompletionRequest,
    defaults: &SamplingDefaults,
) -> Result<ValidatedCompletionRequest, ValidationError> {
    let logprobs = req
        .logprobs
        .map(|k| logprob_count("logprobs", k))
        .transpose()?;
    let prompts = convert_prompt(req.prompt)?;
    let echo = req.echo == Some(true);
    let prompt_only = echo && req.max_tokens == Some(0);
    let added_tokens = AddedTokens::from_request(req.add_special_tokens);
    let max_tokens = match req.max_tokens {
        Some(0) if prompt_only => 1,
        v => v.unwrap_or(DEFAULT_COMPLETION_MAX_TOKENS as i64),
    };
    let common = Common {
        model: req.model,
        max_tokens: Some(("max_tokens", max_tokens)),
        sampling: sampling_fields!(req).or(defaults),
        stop: req.stop,
        stop_token_ids: req.stop_token_ids,
        priority: req.priority,
        n: req.n,
        stream: req.stream,
        stream_options: req.stream_options,
        ignore_eos: req.ignore_eos,
        min_tokens: req.min_tokens,
        user: req.user,
        cache_salt: req.cache_salt,
        constraint: output_constraint(constraint_fields!(req))?,
        prompt_logprobs: req.prompt_logprobs,
        echo,
        output: output_options!(req),
    };
    let params = generation_params(common, logprobs)?;
    Ok(ValidatedCompletionRequest {
        prompts,
        params,
        echo,
        prompt_only,
        added_tokens,
    })
}

fn generation_params(
    mut c: Common,
    logprobs: Option<usize>,
) -> Result<GenerationParams, ValidationError> {
    let (output, choices) = output_settings(std::mem::take(&mut c.output))?;
    if let (Some((_, field)), false) = (&c.constraint, choices.allowed.is_empty()) {
        return Err(invalid(
            "allowed_token_ids",
            format!("cannot be combined with `{field}` (its grammar chooses the tokens)"),
        ));
    }
    let mut sampling = sampling_params(&c.sampling, logprobs)?;
    sampling.allowed_token_ids = choices.allowed;
    if c.constraint.is_some() && c.ignore_eos == Some(true) {
        return Err(invalid(
            "ignore_eos",
            "cannot be combined with a structured output (the grammar ends the answer)",
        ));
    }
    let max_tokens = match c.max_tokens {
        Some((param, v)) if v < 1 => return Err(out_of_range(param, v, "at least 1")),
        Some((_, v)) => Some(usize::try_from(v).unwrap_or(usize::MAX)),
        None => None,
    };
    let min_tokens = match c.min_tokens {
        None => 0,
        Some(v) if v < 0 => return Err(out_of_range("min_tokens", v, "at least 0")),
        Some(v) => usize::try_from(v).unwrap_or(usize::MAX),
    };
    if let Some(max) = max_tokens.filter(|&max| min_tokens > max) {
        return Err(out_of_range(
            "min_tokens",
            min_tokens,
            &format!("at most `max_tokens` ({max})"),
        ));
    }
    let n = c.n.unwrap_or(1);
    let n = usize::try_from(n)
        .ok()
        .filter(|n| (1..=MAX_N).contains(n))
        .ok_or_else(|| out_of_range("n", n, &format!("in [1, {MAX_N}]")))?;
    let stop = c.stop.map(StopSpec::into_vec).unwrap_or_default();
    if stop.len() > MAX_STOP_STRINGS {
        let allowed = format!("at most {MAX_STOP_STRINGS} strings");
        return Err(out_of_range(
            "stop",
            format!("{} strings", stop.len()),
            &allowed,
        ));
    }
    if stop.iter().any(String::is_empty) {
        return Err(invalid("stop", "must not contain empty strings"));
    }
    if let Some(long) = stop.iter().find(|s| s.len() > MAX_STOP_STRING_BYTES) {
        let allowed = format!("at most {MAX_STOP_STRING_BYTES} bytes per string");
        return Err(out_of_range(
            "stop",
            format!("{} bytes", long.len()),
            &allowed,
        ));
    }
    let stop_token_ids = c.stop_token_ids.unwrap_or_default();
    if stop_token_ids.len() > MAX_STOP_TOKEN_IDS {
        let allowed = format!("at most {MAX_STOP_TOKEN_IDS} ids");
        return Err(out_of_range(
            "stop_token_ids",
            format!("{} ids", stop_token_ids.len()),
            &allowed,
        ));
    }
    let priority = c.priority.unwrap_or(0);
    let priority = i32::try_from(priority)
        .map_err(|_| out_of_range("priority", priority, "a 32-bit integer"))?;
    let stream = c.stream.unwrap_or(false);
    if c.stream_options.is_some() && !stream {
        return Err(invalid(
            "stream_options",
            "is only allowed when `stream` is true",
        ));
    }
    if let Some(salt) = &c.cache_salt {
        if salt.is_empty() || salt.len() > MAX_CACHE_SALT_BYTES {
            let allowed = format!("a string of 1 to {MAX_CACHE_SALT_BYTES} bytes");
            return Err(out_of_range(
                "cache_salt",
                format!("{} bytes long", salt.len()),
                &allowed,
            ));
        }
    }
    let prompt_scoring = PromptScoring {
        echo: if c.echo { logprobs } else { None },
        listed: c
            .prompt_logprobs
            .map(|k| logprob_count("prompt_logprobs", k))
            .transpose()?,
    };
    if prompt_scoring.listed.is_some() && stream {
        return Err(invalid(
            "prompt_logprobs",
            "cannot be combined with `stream` (they are returned with the whole response)",
        ));
    }
    let usage = stream_usage(c.stream_options)?;
    Ok(GenerationParams {
        model: c.model,
        sampling,
        max_tokens,
        min_tokens,
        ignore_eos: c.ignore_eos.unwrap_or(false),
        stop,
        stop_token_ids,
        priority,
        n,
        stream,
        usage,
        user: c.user,
        cache_salt: c.cache_salt,
        constraint: c.constraint,
        prompt_scoring,
        output,
        bad_words: choices.bad_words,
    })
}

/// What `stream_options` asks a stream to report of its token counts.
fn stream_usage(options: Option<StreamOptions>) -> Result<StreamUsage, ValidationError> {
    let Some(o) = options else {
        return Ok(StreamUsage::Off);
    };
    Ok(match (o.include_usage, o.continuous_usage_stats) {
        (Some(true), Some(true)) => StreamUsage::Continuous,
        (_, Some(true)) => {
            return Err(invalid(
                "stream_options.continuous_usage_stats",
                "needs `include_usage: true` (the counts travel in the `usage` field it adds)",
            ))
        }
        (Some(true), _) => StreamUsage::Final,
        _ => StreamUsage::Off,
    })
}
