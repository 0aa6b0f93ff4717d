//! `POST /v1/chat/completions`: request, response and streaming chunk.

use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

use super::common::{FinishReason, StopReason, StopSpec, StreamOptions, Usage};
use super::logprobs::{ChatLogprobs, PromptLogprobs};
use super::structured::{
    ResponseFormat, StructuredOutputs, ToolCall, ToolCallDelta, ToolChoiceParam, ToolParam,
};

/// A chat completion request. Unknown fields are ignored; integers are read signed and floats
/// as `f64` so that out-of-range values reach validation, which names the field, instead of
/// failing in serde with a message that does not.
#[derive(Clone, Debug, Default, PartialEq, Deserialize, ToSchema)]
pub struct ChatCompletionRequest {
    /// Served model or adapter name; absent means the base model.
    #[serde(default)]
    pub model: Option<String>,
    pub messages: Vec<ChatMessageParam>,
    /// Deprecated by OpenAI in favour of `max_completion_tokens`, which wins when both are set.
    pub max_tokens: Option<i64>,
    pub max_completion_tokens: Option<i64>,
    pub temperature: Option<f64>,
    pub top_p: Option<f64>,
    /// vLLM extension: -1 or 0 disables it.
    pub top_k: Option<i64>,
    pub min_p: Option<f64>,
    pub seed: Option<i64>,
    pub stop: Option<StopSpec>,
    /// vLLM extension: extra token ids that end generation.
    pub stop_token_ids: Option<Vec<u32>>,
    /// vLLM extension: lower is served first (and preempted last); default 0.
    pub priority: Option<i64>,
    pub n: Option<i64>,
    pub presence_penalty: Option<f64>,
    pub frequency_penalty: Option<f64>,
    pub repetition_penalty: Option<f64>,
    /// Token id (as a string) -> bias in [-100, 100] added to its logit.
    pub logit_bias: Option<std::collections::BTreeMap<String, f64>>,
    pub logprobs: Option<bool>,
    pub top_logprobs: Option<i64>,
    pub stream: Option<bool>,
    pub stream_options: Option<StreamOptions>,
    pub ignore_eos: Option<bool>,
    pub min_tokens: Option<i64>,
    pub user: Option<String>,
    /// vLLM extension: prefix-cache blocks are shared only between requests with the same salt
    /// (and, under `per_key` isolation, the same API key).
    pub cache_salt: Option<String>,
    /// Constrains the answer to JSON (an object, or valid under a schema).
    pub response_format: Option<ResponseFormat>,
    /// vLLM extension: a JSON schema, regex, choice list or Lark grammar the answer must match.
    pub structured_outputs: Option<StructuredOutputs>,
    /// vLLM's older spellings of `structured_outputs`' `json`, `regex`, `choice` and `grammar`
    /// (dropped by vLLM in 0.12; accepted here with the same meaning).
    #[schema(value_type = Option<Object>)]
    pub guided_json: Option<serde_json::Value>,
    pub guided_regex: Option<String>,
    pub guided_choice: Option<Vec<String>>,
    pub guided_grammar: Option<String>,
    /// Functions the model may call.
    pub tools: Option<Vec<ToolParam>>,
    /// `none`, `auto` (default with tools), `required` or a named function.
    pub tool_choice: Option<ToolChoiceParam>,
    /// More than one call per answer (default true).
    pub parallel_tool_calls: Option<bool>,
    /// vLLM extension: each prompt token's logprob (the rendered conversation's) with this many
    /// alternatives (0 to 20), returned as `prompt_logprobs`. Not with `stream`.
    pub prompt_logprobs: Option<i64>,
    /// vLLM extension: the last message, when it is the assistant's, leads the answer's
    /// content (with `continue_final_message`, the answer is then the whole message).
    pub echo: Option<bool>,
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
    /// vLLM extension: end the prompt with the assistant's header (default true; false with
    /// `continue_final_message`).
    pub add_generation_prompt: Option<bool>,
    /// vLLM extension: `false` tokenizes the rendered conversation without the model's own
    /// BOS/EOS (only what the template writes). Default true: the model's BOS where the
    /// template did not write one.
    pub add_special_tokens: Option<bool>,
    /// vLLM extension: end the prompt inside the last message, an assistant's, so the answer
    /// continues its text (e.g. a doctor avatar's greeting written by the caller).
    pub continue_final_message: Option<bool>,
    /// vLLM extension: extra variables for the model's chat template (e.g.
    /// `{"enable_thinking": false}`); templates ignore names they do not use.
    #[schema(value_type = Option<Object>)]
    pub chat_template_kwargs: Option<serde_json::Map<String, serde_json::Value>>,
    /// vLLM extension: a Jinja chat template of the caller's, used instead of the model's; a
    /// 400 unless the server trusts callers with one (`server.trust_request_chat_template`).
    pub chat_template: Option<String>,
    /// vLLM extension: documents for a retrieval-augmented chat template (objects of string
    /// fields, e.g. `{"title": ..., "text": ...}`), passed to it as `documents`; a template that
    /// does not read them renders as without.
    #[schema(value_type = Option<Vec<Object>>)]
    pub documents: Option<Vec<super::chat_options::Document>>,
}

/// One input message.
#[derive(Clone, Debug, PartialEq, Deserialize, ToSchema)]
pub struct ChatMessageParam {
    /// `system`, `user` or `assistant` (checked in validation so the error names the message).
    pub role: String,
    /// A string or text parts; may be null on assistant messages.
    #[serde(default)]
    pub content: Option<MessageContent>,
    #[serde(default)]
    pub name: Option<String>,
    /// The calls an earlier assistant answer made.
    #[serde(default)]
    pub tool_calls: Option<Vec<ToolCall>>,
    /// On `tool` messages: the call this result answers.
    #[serde(default)]
    pub tool_call_id: Option<String>,
}

/// `messages[].content`: a string, or an array of content parts.
#[derive(Clone, Debug, PartialEq, Deserialize, ToSchema)]
#[serde(
    untagged,
    expecting = "`content` must be a string or an array of content parts"
)]
pub enum MessageContent {
    Text(String),
    Parts(Vec<ContentPart>),
}

/// One content part; only `{"type": "text", "text": ...}` is supported, others are refused in
/// validation with the part's index.
#[derive(Clone, Debug, PartialEq, Deserialize, ToSchema)]
pub struct ContentPart {
    #[serde(rename = "type")]
    pub kind: String,
    #[serde(default)]
    pub text: Option<String>,
}

/// `object` of a chat completion.
pub const CHAT_COMPLETION_OBJECT: &str = "chat.completion";
/// `object` of a chat completion chunk.
pub const CHAT_CHUNK_OBJECT: &str = "chat.completion.chunk";

/// The non-streaming response.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct ChatCompletionResponse {
    pub id: String,
    /// Always `"chat.completion"`.
    pub object: String,
    pub created: u64,
    pub model: String,
    pub choices: Vec<ChatChoice>,
    pub usage: Usage,
    /// vLLM extension: the prompt tokens' logprobs, when `prompt_logprobs` was sent.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub prompt_logprobs: Option<PromptLogprobs>,
}

impl ChatCompletionResponse {
    pub fn new(
        id: String,
        created: u64,
        model: String,
        choices: Vec<ChatChoice>,
        usage: Usage,
    ) -> Self {
        ChatCompletionResponse {
            id,
            object: CHAT_COMPLETION_OBJECT.into(),
            created,
            model,
            choices,
            usage,
            prompt_logprobs: None,
        }
    }
}

/// One generated answer.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct ChatChoice {
    pub index: u32,
    pub message: ChatResponseMessage,
    pub logprobs: Option<ChatLogprobs>,
    pub finish_reason: FinishReason,
    /// vLLM extension: the `stop` string or `stop_token_ids` id that ended the answer.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub stop_reason: Option<StopReason>,
}

/// The assistant's message.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct ChatResponseMessage {
    /// Always `"assistant"`.
    pub role: String,
    /// The text; `null` when the answer is tool calls.
    pub content: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tool_calls: Option<Vec<ToolCall>>,
}

impl ChatChoice {
    pub fn new(
        index: u32,
        text: String,
        logprobs: Option<ChatLogprobs>,
        finish_reason: FinishReason,
    ) -> Self {
        ChatChoice {
            index,
            message: ChatResponseMessage {
                role: "assistant".into(),
                content: Some(text),
                tool_calls: None,
            },
            logprobs,
            finish_reason,
            stop_reason: None,
        }
    }
}

/// One server-sent event of a streamed chat completion.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct ChatCompletionChunk {
    pub id: String,
    /// Always `"chat.completion.chunk"`.
    pub object: String,
    pub created: u64,
    pub model: String,
    pub choices: Vec<ChatChunkChoice>,
    /// Absent without `include_usage`; with it, `null` on every chunk but the last, which has
    /// empty `choices` and the totals.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schema(value_type = Option<Usage>)]
    pub usage: Option<Option<Usage>>,
}

impl ChatCompletionChunk {
    /// A chunk with `choices`; `include_usage` adds `"usage": null`.
    pub fn new(
        id: &str,
        created: u64,
        model: &str,
        choices: Vec<ChatChunkChoice>,
        include_usage: bool,
    ) -> Self {
        ChatCompletionChunk {
            id: id.into(),
            object: CHAT_CHUNK_OBJECT.into(),
            created,
            model: model.into(),
            choices,
            usage: include_usage.then_some(None),
        }
    }

    /// The last chunk of an `include_usage` stream: no choices, the totals.
    pub fn usage(id: &str, created: u64, model: &str, usage: Usage) -> Self {
        ChatCompletionChunk {
            usage: Some(Some(usage)),
            ..ChatCompletionChunk::new(id, created, model, Vec::new(), true)
        }
    }
}

/// One choice's increment.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct ChatChunkChoice {
    pub index: u32,
    pub delta: ChatDelta,
    pub logprobs: Option<ChatLogprobs>,
    pub finish_reason: Option<FinishReason>,
    /// On the last chunk, as in [`ChatChoice`].
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub stop_reason: Option<StopReason>,
}

/// New text (and on the first chunk, the role).
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct ChatDelta {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub role: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub content: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tool_calls: Option<Vec<ToolCallDelta>>,
}

impl ChatChunkChoice {
    /// The first chunk of a choice: `{"role": "assistant", "content": ""}`.
    pub fn role(index: u32) -> Self {
        let delta = ChatDelta {
            role: Some("assistant".into()),
            content: Some(String::new()),
            tool_calls: None,
        };
        ChatChunkChoice {
            index,
            delta,
            logprobs: None,
            finish_reason: None,
            stop_reason: None,
        }
    }

    /// New text, possibly the last (`finish_reason` set).
    pub fn content(
        index: u32,
        text: String,
        logprobs: Option<ChatLogprobs>,
        finish_reason: Option<FinishReason>,
    ) -> Self {
        let delta = ChatDelta {
            role: None,
            content: Some(text),
            tool_calls: None,
        };
        ChatChunkChoice {
            index,
            delta,
            logprobs,
            finish_reason,
            stop_reason: None,
        }
    }
}
