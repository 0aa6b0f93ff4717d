//! Pieces shared by chat and legacy completions: stop sequences, stream options, token usage,
//! finish reasons and response ids.

use rand::distr::{Alphanumeric, SampleString};
use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

/// `stop`: one string or a list of strings.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, ToSchema)]
#[serde(untagged, expecting = "`stop` must be a string or an array of strings")]
pub enum StopSpec {
    One(String),
    Many(Vec<String>),
}

impl StopSpec {
    /// The stop strings as a list.
    pub fn into_vec(self) -> Vec<String> {
        match self {
            StopSpec::One(s) => vec![s],
            StopSpec::Many(v) => v,
        }
    }
}

/// `stream_options`.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct StreamOptions {
    /// Send a last chunk with `usage` (and `"usage": null` on every other chunk).
    #[serde(default)]
    pub include_usage: Option<bool>,
    /// vLLM extension, with `include_usage`: every chunk carries its choice's counts so far.
    #[serde(default)]
    pub continuous_usage_stats: Option<bool>,
}

/// What a stream reports of its token counts (`stream_options`).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum StreamUsage {
    /// Nothing (the default).
    #[default]
    Off,
    /// A last chunk with the totals; every other chunk has `"usage": null` (`include_usage`).
    Final,
    /// The last chunk, and on every other chunk its choice's prompt and completion tokens so far
    /// (vLLM's `continuous_usage_stats`).
    Continuous,
}

impl StreamUsage {
    /// Whether chunks carry a `usage` field at all.
    pub fn included(self) -> bool {
        self != StreamUsage::Off
    }
}

/// Token counts of one response.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct Usage {
    pub prompt_tokens: usize,
    pub completion_tokens: usize,
    pub total_tokens: usize,
    /// Present when prefix caching reused part of the prompt's KV cache.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub prompt_tokens_details: Option<PromptTokensDetails>,
}

/// `usage.prompt_tokens_details`.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct PromptTokensDetails {
    /// Prompt tokens served from the prefix cache.
    pub cached_tokens: usize,
}

impl Usage {
    /// Counts with `total_tokens` filled in.
    pub fn new(prompt_tokens: usize, completion_tokens: usize) -> Usage {
        Usage {
            prompt_tokens,
            completion_tokens,
            total_tokens: prompt_tokens + completion_tokens,
            prompt_tokens_details: None,
        }
    }

    /// Adds `prompt_tokens_details.cached_tokens`.
    pub fn with_cached_tokens(mut self, cached_tokens: usize) -> Usage {
        self.prompt_tokens_details = Some(PromptTokensDetails { cached_tokens });
        self
    }
}

/// Why a choice ended. `abort` and `error` are vLLM-style extensions for streams cut short.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum FinishReason {
    /// A stop token or stop string.
    Stop,
    /// `max_tokens` or the context limit.
    Length,
    /// The request was aborted.
    Abort,
    /// The engine failed the request.
    Error,
    /// The answer is tool calls.
    ToolCalls,
}

impl From<caduceus_scheduler::FinishReason> for FinishReason {
    fn from(reason: caduceus_scheduler::FinishReason) -> Self {
        match reason {
            caduceus_scheduler::FinishReason::Stop => FinishReason::Stop,
            caduceus_scheduler::FinishReason::Length => FinishReason::Length,
            caduceus_scheduler::FinishReason::Abort => FinishReason::Abort,
            caduceus_scheduler::FinishReason::Error => FinishReason::Error,
        }
    }
}

/// vLLM's `stop_reason`: which of the request's own `stop` strings or `stop_token_ids` ended a
/// choice (absent when it ended otherwise, an EOS token included).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(untagged)]
pub enum StopReason {
    Text(String),
    TokenId(u32),
}

impl From<crate::engine::StopReason> for StopReason {
    fn from(reason: crate::engine::StopReason) -> Self {
        match reason {
            crate::engine::StopReason::Text(s) => StopReason::Text(s),
            crate::engine::StopReason::TokenId(t) => StopReason::TokenId(t),
        }
    }
}

/// Prefix of chat completion ids (`chatcmpl-...`).
pub const CHAT_ID_PREFIX: &str = "chatcmpl";
/// Prefix of legacy completion ids (`cmpl-...`).
pub const COMPLETION_ID_PREFIX: &str = "cmpl";
/// The payload of the last server-sent event of a stream.
pub const SSE_DONE: &str = "[DONE]";

/// A fresh response id such as `chatcmpl-3fK...` (24 random alphanumerics, as OpenAI's are
/// opaque and unique).
pub fn random_id(prefix: &str) -> String {
    format!(
        "{prefix}-{}",
        Alphanumeric.sample_string(&mut rand::rng(), 24)
    )
}

/// Seconds since the Unix epoch, for `created`.
pub fn unix_timestamp() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}
