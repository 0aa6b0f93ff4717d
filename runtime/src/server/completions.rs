//! `POST /v1/completions` (the legacy text-completion endpoint).

use std::sync::Arc;

use axum::extract::State;
use axum::response::{IntoResponse, Response};
use axum::Extension;
use axum::Json;

use super::error::check_token_ids;
use super::generation::{collect_all, compile_constraint, finish_label, off_the_workers, submit};
use super::json::ApiJson;
use super::protocol::{
    random_id, unix_timestamp, validate_completion, ApiError, CompletionChoice, CompletionChunk,
    CompletionRequest, CompletionResponse, FinishReason, PromptInput, Usage, COMPLETION_ID_PREFIX,
};
use super::request_log::RequestLog;
use super::routes::{admit, check_model};
use super::sse::{self, ChunkFormat};
use super::state::AppState;
use super::tenant::Tenant;
use super::token_text::completion_logprobs;
use crate::sampling::SampledToken;
use crate::tokenizer::Tokenizer;

/// A text prompt's ids: special-token strings stay plain text (a client cannot forge control
/// tokens) unless `server.allow_special_tokens_in_prompt` is on.
pub(super) fn prompt_ids(state: &AppState, text: &str) -> Result<Vec<u32>, ApiError> {
    let tokenizer = &state.tokenizer;
    if state.settings.allow_special_tokens_in_prompt || !tokenizer.spells_special_token(text) {
        tokenizer.encode(text)
    } else {
        tokenizer.encode_literal(text)
    }
    .map_err(|e| {
        tracing::error!(error = %e, "tokenizer failed");
        ApiError::internal()
    })
}

/// Every prompt's ids (text tokenized, id lists checked against the vocabulary), returned with
/// the inputs for the prompt log.
fn tokenize_prompts(
    state: &AppState,
    inputs: Vec<PromptInput>,
) -> Result<(Vec<Vec<u32>>, Vec<PromptInput>), ApiError> {
    let vocab = state.tokenizer.vocab_size();
    let mut prompts = Vec::with_capacity(inputs.len());
    for (i, p) in inputs.iter().enumerate() {
        let ids = match p {
            PromptInput::Text(text) => prompt_ids(state, text)?,
            PromptInput::Tokens(ids) => {
                check_token_ids(
                    ids.iter().copied(),
                    vocab,
                    &format!("prompt[{i}]"),
                    "prompt",
                )?;
                ids.clone()
            }
        };
        prompts.push(ids);
    }
    Ok((prompts, inputs))
}

/// Creates a completion (OpenAI's `POST /v1/completions`); choice `i * n + j` is prompt `i`'s
/// `j`-th sample.
#[utoipa::path(post, path = "/v1/completions", request_body = CompletionRequest,
    responses((status = 200, body = CompletionResponse, description = "A completion, or an SSE stream of CompletionChunk when `stream` is true"),
              (status = 400, body = super::protocol::ErrorResponse), (status = 404, body = super::protocol::ErrorResponse),
              (status = 429, body = super::protocol::ErrorResponse), (status = 503, body = super::protocol::ErrorResponse)))]
pub async fn completions(
    State(state): State<AppState>,
    tenant: Option<Extension<Tenant>>,
    ApiJson(req): ApiJson<CompletionRequest>,
) -> Result<Response, ApiError> {
    let in_flight = admit(&state)?;
    let v = validate_completion(req)?;
    let model = check_model(&state, v.params.model.as_deref())?;
    // Tokenizing up to a body limit's worth of text is CPU work: off the async workers.
    let (prompts, inputs) = {
        let state = state.clone();
        let inputs = v.prompts;
        off_the_workers(move || tokenize_prompts(&state, inputs)).await??
    };
    let tenant = tenant.map(|Extension(t)| t);
    let constraint = compile_constraint(&state, v.params.constraint.clone(), tenant).await?;
    let id = random_id(COMPLETION_ID_PREFIX);
    let mut log = RequestLog::new(id.clone(), "completions", model.clone(), in_flight);
    log.prompt_tokens = prompts.iter().map(Vec::len).sum();
    let streams = submit(&state, &prompts, &v.params, "prompt", tenant, constraint)
        .inspect_err(|e| log.status = e.status)?;
    let created = unix_timestamp();
    let timeout = state.settings.request_timeout;
    if state.settings.log_prompts {
        let text = inputs.iter().map(|p| match p {
            PromptInput::Text(t) => t.clone(),
            PromptInput::Tokens(ids) => format!("{ids:?}"),
        });
        log.texts = Some((text.collect::<Vec<_>>().join("\n"), String::new()));
    }
    if v.params.stream {
        let format = CompletionFormat {
            id,
            created,
            model,
            include_usage: v.params.include_usage,
            logprobs: v.params.sampling.logprobs.is_some(),
            tokenizer: state.tokenizer.clone(),
            offsets: vec![0; streams.len()],
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
        .map(|(i, o)| CompletionChoice {
            logprobs: completion_logprobs(&state.tokenizer, &o.tokens, 0),
            text: o.text,
            index: i as u32,
            finish_reason: Some(o.finish_reason),
        })
        .collect::<Vec<_>>();
    if let (Some(t), Some(c)) = (log.texts.as_mut(), choices.first()) {
        t.1 = c.text.clone();
    }
    let usage =
        Usage::new(log.prompt_tokens, log.completion_tokens).with_cached_tokens(log.cached_tokens);
    log.status = 200;
    log.finish_reason = choices
        .first()
        .and_then(|c| c.finish_reason)
        .map_or("none", finish_label);
    Ok(Json(CompletionResponse::new(id, created, model, choices, usage)).into_response())
}

/// Completion chunks: `choices[].text` deltas.
struct CompletionFormat {
    id: String,
    created: u64,
    model: String,
    include_usage: bool,
    logprobs: bool,
    tokenizer: Arc<Tokenizer>,
    /// Bytes of text sent so far per choice (logprobs' `text_offset`).
    offsets: Vec<usize>,
}

impl ChunkFormat for CompletionFormat {
    fn opening(&self, _index: u32) -> Option<serde_json::Value> {
        None
    }

    fn content(
        &mut self,
        index: u32,
        text: String,
        tokens: &[SampledToken],
        finish: Option<FinishReason>,
    ) -> serde_json::Value {
        let offset = self.offsets.get(index as usize).copied().unwrap_or(0);
        let logprobs = completion_logprobs(&self.tokenizer, tokens, offset);
        if let Some(o) = self.offsets.get_mut(index as usize) {
            *o += text.len();
        }
        let choice = CompletionChoice {
            text,
            index,
            logprobs,
            finish_reason: finish,
        };
        let chunk = CompletionChunk::new(
            &self.id,
            self.created,
            &self.model,
            vec![choice],
            self.include_usage,
        );
        serde_json::to_value(chunk).unwrap_or_default()
    }

    fn usage(&self, usage: Usage) -> serde_json::Value {
        serde_json::to_value(CompletionChunk::usage(
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
