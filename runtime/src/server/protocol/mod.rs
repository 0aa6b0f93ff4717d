//! OpenAI-compatible wire types for `/v1/chat/completions`, `/v1/completions`, `/v1/models` and
//! vLLM's `/tokenize` and `/detokenize`, their validation into engine settings, and OpenAI's
//! error body. Every type derives utoipa's `ToSchema` so `/openapi.json` is generated from the
//! same definitions serde uses.

mod chat;
mod chat_options;
mod common;
mod completion;
mod constraint;
mod convert;
mod error;
mod logprobs;
mod models;
mod output_options;
mod sampling_defaults;
mod sampling_fields;
mod structured;
mod tokenize;
mod unsupported;
mod validate;

pub use chat::{
    ChatChoice, ChatChunkChoice, ChatCompletionChunk, ChatCompletionRequest,
    ChatCompletionResponse, ChatDelta, ChatMessageParam, ChatResponseMessage, ContentPart,
    MessageContent, CHAT_CHUNK_OBJECT, CHAT_COMPLETION_OBJECT,
};
pub use chat_options::{template_strings, Rendering, MAX_REQUEST_CHAT_TEMPLATE_BYTES};
pub use common::{
    random_id, unix_timestamp, FinishReason, PromptTokensDetails, StopReason, StopSpec,
    StreamOptions, StreamUsage, Usage, CHAT_ID_PREFIX, COMPLETION_ID_PREFIX, SSE_DONE,
};
pub use completion::{
    CompletionChoice, CompletionChunk, CompletionRequest, CompletionResponse, Prompt,
    TEXT_COMPLETION_OBJECT,
};
pub use error::{ApiError, ErrorBody, ErrorResponse};
pub use logprobs::{
    ChatLogprobs, ChatTokenLogprob, CompletionLogprobs, PromptLogprobs, PromptTokenLogprob,
    TopLogprob, MIN_LOGPROB,
};
pub use models::{ModelCard, ModelList, OWNED_BY};
pub use output_options::{OutputSettings, PromptTruncation};
pub use sampling_defaults::SamplingDefaults;
pub use structured::{
    tool_calls_text, tool_plan, FunctionCall, FunctionCallDelta, FunctionDef, JsonSchemaFormat,
    NamedFunction, NamedToolChoice, ResponseFormat, StructuredOutputs, ToolCall, ToolCallDelta,
    ToolChoiceParam, ToolMode, ToolParam, ToolPlan, MAX_TOOLS, TOOL_CALL_CLOSE, TOOL_CALL_OPEN,
};
pub use tokenize::{
    validate_tokenize, DetokenizeRequest, DetokenizeResponse, TokenizeInput, TokenizeRequest,
    TokenizeResponse,
};
pub use unsupported::{unsupported_error, unsupported_field, UNSUPPORTED_FIELDS};
pub use validate::{
    validate_chat, validate_completion, GenerationParams, PromptInput, PromptScoring,
    ValidatedChatRequest, ValidatedCompletionRequest, ValidationError,
    DEFAULT_COMPLETION_MAX_TOKENS, MAX_CACHE_SALT_BYTES, MAX_N, MAX_PROMPTS,
};
