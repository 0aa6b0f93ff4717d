//! `POST /v1/completions` (legacy): request, response and streaming chunk.

use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

use super::common::{FinishReason, StopReason, StopSpec, StreamOptions, Usage};
use super::logprobs::{CompletionLogprobs, PromptLogprobs};
use super::structured::{ResponseFormat, StructuredOutputs};

/// A legacy completion request; the same reading rules as the chat request.
#[derive(Clone, Debug, PartialEq, Deserialize, ToSchema)]
pub struct CompletionRequest {
    #[serde(default)]
    pub model: Option<String>,
    pub prompt: Prompt,
    /// OpenAI's default for this endpoint is 16; 0 only with `echo` (the prompt alone, scored
    /// with `logprobs`).
    pub max_tokens: Option<i64>,
    pub temperature: Option<f64>,
    pub top_p: Option<f64>,
    pub top_k: Option<i64>,
    pub min_p: Option<f64>,
    pub seed: Option<i64>,
    pub stop: Option<StopSpec>,
    pub stop_token_ids: Option<Vec<u32>>,
    /// As in chat: lower is served first (and preempted last); default 0.
    pub priority: Option<i64>,
    pub n: Option<i64>,
    pub presence_penalty: Option<f64>,
    pub frequency_penalty: Option<f64>,
    pub repetition_penalty: Option<f64>,
    /// As in chat: token id (as a string) -> bias in [-100, 100] added to its logit.
    pub logit_bias: Option<std::collections::BTreeMap<String, f64>>,
    /// Number of alternatives per token (an integer here, unlike chat's boolean).
    pub logprobs: Option<i64>,
    pub stream: Option<bool>,
    pub stream_options: Option<StreamOptions>,
    pub ignore_eos: Option<bool>,
    pub min_tokens: Option<i64>,
    pub user: Option<String>,
    /// As in chat: separates this request's prefix-cache blocks from other salts.
    pub cache_salt: Option<String>,
    /// As in chat: constrains the text to JSON.
    pub response_format: Option<ResponseFormat>,
    /// vLLM extension, as in chat.
    pub structured_outputs: Option<StructuredOutputs>,
    /// vLLM's older spellings of `structured_outputs`' `json`, `regex`, `choice` and `grammar`
    /// (dropped by vLLM in 0.12; accepted here with the same meaning).
    #[schema(value_type = Option<Object>)]
    pub guided_json: Option<serde_json::Value>,
    pub guided_regex: Option<String>,
    pub guided_choice: Option<Vec<String>>,
    pub guided_grammar: Option<String>,
    /// Returns the prompt before the completion in `text` (and, with `logprobs`, the prompt
    /// tokens' logprobs first).
    pub echo: Option<bool>,
    /// vLLM extension: each prompt token's logprob with this many alternatives (0 to 20),
    /// returned as `choices[].prompt_logprobs`. Not with `stream`.
    pub prompt_logprobs: Option<i64>,
    /// vLLM extension: the stop string (or `stop_token_ids` token) that ended the answer ends
    /// its text too (default false: neither is returned).
    pub include_stop_str_in_output: Option<bool>,
    /// vLLM extension: leave special tokens (e.g. `<|im_end|>`) out of the text (default true).
    pub skip_special_tokens: Option<bool>,
    /// vLLM extension: keep only the prompt's last k tokens (k >= 1), or -1: its last
    /// `max_model_len`.
    pub truncate_prompt_tokens: Option<i64>,
    /// vLLM extension: only these token ids may be generated.
    pub allowed_token_ids: Option<Vec<u32>>,
    /// vLLM extension: words never generated (each as written and with a leading space): a
    /// word's last token is banned wherever the answer ends with the rest of it.
    pub bad_words: Option<Vec<String>>,
    /// vLLM extension: logprobs name each token `token_id:{id}` instead of its text.
    pub return_tokens_as_token_ids: Option<bool>,
    /// vLLM extension: `false` tokenizes text prompts without the model's BOS/EOS (for clients
    /// that render the model's markup themselves). Default true; a prompt that starts with BOS
    /// keeps one.
    pub add_special_tokens: Option<bool>,
}

/// `prompt`: text, several texts, token ids, or several token-id lists.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, ToSchema)]
#[serde(
    untagged,
    expecting = "`prompt` must be a string, an array of strings, or an array of token ids (or of token-id arrays)"
)]
pub enum Prompt {
    Text(String),
    Texts(Vec<String>),
    Tokens(Vec<u32>),
    TokenLists(Vec<Vec<u32>>),
}

/// `object` of completions and their chunks.
pub const TEXT_COMPLETION_OBJECT: &str = "text_completion";

/// The non-streaming response.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct CompletionResponse {
    pub id: String,
    /// Always `"text_completion"`.
    pub object: String,
    pub created: u64,
    pub model: String,
    pub choices: Vec<CompletionChoice>,
    pub usage: Usage,
}

impl CompletionResponse {
    pub fn new(
        id: String,
        created: u64,
        model: String,
        choices: Vec<CompletionChoice>,
        usage: Usage,
    ) -> Self {
        CompletionResponse {
            id,
            object: TEXT_COMPLETION_OBJECT.into(),
            created,
            model,
            choices,
            usage,
        }
    }
}

/// One generated text; in chunks, its increment (`finish_reason` null until the last).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct CompletionChoice {
    pub text: String,
    /// `prompt_index * n + sample_index` with several prompts.
    pub index: u32,
    pub logprobs: Option<CompletionLogprobs>,
    pub finish_reason: Option<FinishReason>,
    /// vLLM extension: the `stop` string or `stop_token_ids` id that ended the text.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub stop_reason: Option<StopReason>,
    /// vLLM extension: the prompt tokens' logprobs, when `prompt_logprobs` was sent.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub prompt_logprobs: Option<PromptLogprobs>,
}

/// One server-sent event of a streamed completion (OpenAI uses `text_completion` here too).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct CompletionChunk {
    pub id: String,
    pub object: String,
    pub created: u64,
    pub model: String,
    pub choices: Vec<CompletionChoice>,
    /// As in chat chunks: absent, `null`, or the totals on the last chunk.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schema(value_type = Option<Usage>)]
    pub usage: Option<Option<Usage>>,
}

impl CompletionChunk {
    /// A chunk with `choices`; `include_usage` adds `"usage": null`.
    pub fn new(
        id: &str,
        created: u64,
        model: &str,
        choices: Vec<CompletionChoice>,
        include_usage: bool,
    ) -> Self {
        CompletionChunk {
            id: id.into(),
            object: TEXT_COMPLETION_OBJECT.into(),
            created,
            model: model.into(),
            choices,
            usage: include_usage.then_some(None),
        }
    }

    /// The last chunk of an `include_usage` stream: no choices, the totals.
    pub fn usage(id: &str, created: u64, model: &str, usage: Usage) -> Self {
        CompletionChunk {
            usage: Some(Some(usage)),
            ..CompletionChunk::new(id, created, model, Vec::new(), true)
        }
    }
}
