//! `POST /v1/chat/completions`.

use std::sync::Arc;

use axum::extract::State;
use axum::response::{IntoResponse, Response};
use axum::Extension;
use axum::Json;

use super::generation::{collect_all, finish_label, off_the_workers, submit};
use super::json::ApiJson;
use super::protocol::{
    random_id, unix_timestamp, validate_chat, ApiError, ChatChoice, ChatChunkChoice,
    ChatCompletionChunk, ChatCompletionRequest, ChatCompletionResponse, FinishReason, Usage,
    CHAT_ID_PREFIX,
};
use super::request_log::RequestLog;
use super::routes::{admit, check_model};
use super::sse::{self, ChunkFormat};
use super::state::AppState;
use super::tenant::Tenant;
use super::token_text::chat_logprobs;
use crate::chat_template::ChatTemplateError;
use crate::sampling::SampledToken;
use crate::tokenizer::chat_prompt::{encode_chat, ChatPrompt, ChatPromptError};
use crate::tokenizer::Tokenizer;

/// Creates a chat completion (OpenAI's `POST /v1/chat/completions`).
#[utoipa::path(post, path = "/v1/chat/completions", request_body = ChatCompletionRequest,
    responses((status = 200, body = ChatCompletionResponse, description = "A completion, or an SSE stream of ChatCompletionChunk when `stream` is true"),
              (status = 400, body = super::protocol::ErrorResponse), (status = 404, body = super::protocol::ErrorResponse),
              (status = 429, body = super::protocol::ErrorResponse), (status = 503, body = super::protocol::ErrorResponse)))]
pub async fn chat_completions(
    State(state): State<AppState>,
    tenant: Option<Extension<Tenant>>,
    ApiJson(req): ApiJson<ChatCompletionRequest>,
) -> Result<Response, ApiError> {
    let in_flight = admit(&state)?;
    let v = validate_chat(req)?;
    let model = check_model(&state, v.params.model.as_deref())?;
    let ChatPrompt {
        text,
        token_ids: prompt,
    } = {
        // Rendering and tokenizing a long conversation takes milliseconds of CPU: off the async
        // workers, so `/health` and other connections keep answering.
        let (template, tokenizer) = (state.chat_template.clone(), state.tokenizer.clone());
        let messages = v.messages;
        off_the_workers(move || encode_chat(&template, &tokenizer, &messages, true)).await?
    }
    .map_err(|e| match e {
        ChatPromptError::Template(ChatTemplateError::Raised(msg)) => {
            ApiError::invalid_request(msg, Some("messages"))
        }
        ChatPromptError::Template(other) => {
            tracing::error!(error = %other, "chat template failed");
            ApiError::invalid_request(
                "the model's chat template could not render these messages",
                Some("messages"),
            )
        }
        ChatPromptError::Unseparable => ApiError::invalid_request(e.to_string(), Some("messages")),
        ChatPromptError::Tokenizer(e) => {
            tracing::error!(error = %e, "tokenizer failed");
            ApiError::internal()
        }
    })?;
    let id = random_id(CHAT_ID_PREFIX);
    let mut log = RequestLog::new(id.clone(), "chat", model.clone(), in_flight);
    log.prompt_tokens = prompt.len();
    let tenant = tenant.map(|Extension(t)| t);
    let streams = submit(
        &state,
        std::slice::from_ref(&prompt),
        &v.params,
        "messages",
        tenant,
    )
    .inspect_err(|e| log.status = e.status)?;
    let created = unix_timestamp();
    let timeout = state.settings.request_timeout;
    if state.settings.log_prompts {
        log.texts = Some((text, String::new()));
    }
    if v.params.stream {
        let format = ChatFormat {
            id,
            created,
            model,
            include_usage: v.params.include_usage,
            logprobs: v.params.sampling.logprobs.is_some(),
            tokenizer: state.tokenizer.clone(),
        };
        return Ok(
            sse::respond(streams, format, log, v.params.include_usage, timeout).into_response(),
        );
    }
    let outs = collect_all(streams, &mut log, timeout)
        .await
        .inspect_err(|e| log.status = e.status)?;
    let choices = outs
        .into_iter()
        .enumerate()
        .map(|(i, o)| {
            let lp = chat_logprobs(&state.tokenizer, &o.tokens);
            ChatChoice::new(i as u32, o.text, lp, o.finish_reason)
        })
        .collect::<Vec<_>>();
    if let (Some(t), Some(c)) = (log.texts.as_mut(), choices.first()) {
        t.1 = c.message.content.clone().unwrap_or_default();
    }
    let usage =
        Usage::new(log.prompt_tokens, log.completion_tokens).with_cached_tokens(log.cached_tokens);
    log.status = 200;
    log.finish_reason = choices
        .first()
        .map_or("none", |c| finish_label(c.finish_reason));
    Ok(Json(ChatCompletionResponse::new(
        id, created, model, choices, usage,
    ))
    .into_response())
}

/// Chat chunks: the role first, then content deltas.
struct ChatFormat {
    id: String,
    created: u64,
    model: String,
    include_usage: bool,
    logprobs: bool,
    tokenizer: Arc<Tokenizer>,
}

impl ChunkFormat for ChatFormat {
    fn opening(&self, index: u32) -> Option<serde_json::Value> {
        let chunk = ChatCompletionChunk::new(
            &self.id,
            self.created,
            &self.model,
            vec![ChatChunkChoice::role(index)],
            self.include_usage,
        );
        serde_json::to_value(chunk).ok()
    }

    fn content(
        &mut self,
        index: u32,
        text: String,
        tokens: &[SampledToken],
        finish: Option<FinishReason>,
    ) -> serde_json::Value {
        let lp = chat_logprobs(&self.tokenizer, tokens);
        let chunk = ChatCompletionChunk::new(
            &self.id,
            self.created,
            &self.model,
            vec![ChatChunkChoice::content(index, text, lp, finish)],
            self.include_usage,
        );
        serde_json::to_value(chunk).unwrap_or_default()
    }

    fn usage(&self, usage: Usage) -> serde_json::Value {
        serde_json::to_value(ChatCompletionChunk::usage(
            &self.id,
            self.created,
            &self.model,
            usage,
        ))
        .unwrap_or_default()
    }

    fn wants_logprobs(&self) -> bool {
        self.logprobs
    }
}
