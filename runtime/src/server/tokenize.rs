//! `POST /tokenize` and `POST /detokenize` (vLLM's): the ids a prompt or a conversation becomes,
//! exactly as the generation endpoints would feed them to the model, and the text of ids. Like
//! every route, they never log the text.

use axum::extract::State;
use axum::Json;

use super::chat::render_chat;
use super::completions::prompt_ids;
use super::error::check_token_ids;
use super::generation::off_the_workers;
use super::json::ApiJson;
use super::protocol::{
    validate_tokenize, ApiError, DetokenizeRequest, DetokenizeResponse, TokenizeInput,
    TokenizeRequest, TokenizeResponse,
};
use super::routes::check_model;
use super::state::AppState;

/// Tokenizes a prompt (as `/v1/completions` does) or a conversation (as `/v1/chat/completions`
/// renders it); `count` is the request's `usage.prompt_tokens` there.
#[utoipa::path(post, path = "/tokenize", request_body = TokenizeRequest,
    responses((status = 200, body = TokenizeResponse), (status = 400, body = super::protocol::ErrorResponse),
              (status = 404, body = super::protocol::ErrorResponse)))]
pub async fn tokenize(
    State(state): State<AppState>,
    ApiJson(req): ApiJson<TokenizeRequest>,
) -> Result<Json<TokenizeResponse>, ApiError> {
    check_model(&state, req.model.as_deref())?;
    let strs = req.return_token_strs.unwrap_or(false);
    let tokens = match validate_tokenize(req)? {
        TokenizeInput::Prompt { text, added } => {
            let s = state.clone();
            off_the_workers(move || prompt_ids(&s, &text, added)).await??
        }
        TokenizeInput::Chat {
            messages,
            rendering,
        } => render_chat(&state, messages, rendering).await?.token_ids,
    };
    let token_strs = strs.then(|| {
        let t = &state.tokenizer;
        tokens
            .iter()
            .map(|&id| t.id_to_token(id).unwrap_or_default())
            .collect()
    });
    Ok(Json(TokenizeResponse {
        count: tokens.len(),
        max_model_len: state.engine.limits().max_model_len,
        tokens,
        token_strs,
    }))
}

/// The text of `tokens` (special tokens spelled out).
#[utoipa::path(post, path = "/detokenize", request_body = DetokenizeRequest,
    responses((status = 200, body = DetokenizeResponse), (status = 400, body = super::protocol::ErrorResponse),
              (status = 404, body = super::protocol::ErrorResponse)))]
pub async fn detokenize(
    State(state): State<AppState>,
    ApiJson(req): ApiJson<DetokenizeRequest>,
) -> Result<Json<DetokenizeResponse>, ApiError> {
    check_model(&state, req.model.as_deref())?;
    let vocab = state.tokenizer.vocab_size();
    check_token_ids(req.tokens.iter().copied(), vocab, "tokens", "tokens")?;
    let tokenizer = state.tokenizer.clone();
    let prompt = off_the_workers(move || tokenizer.decode(&req.tokens, false))
        .await?
        .map_err(|e| {
            tracing::error!(error = %e, "detokenizer failed");
            ApiError::internal()
        })?;
    Ok(Json(DetokenizeResponse { prompt }))
}
