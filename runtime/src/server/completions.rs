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
    CompletionLogprobs, CompletionRequest, CompletionResponse, FinishReason, PromptInput,
    StopReason, Usage, COMPLETION_ID_PREFIX,
};
use super::request_log::RequestLog;
use super::routes::{admit, check_model};
use super::sse::{self, ChunkFormat, UsageReport};
use super::state::AppState;
use super::tenant::Tenant;
use super::token_text::{completion_logprobs, echo_logprobs, listed_prompt_logprobs, TokenNames};
use crate::sampling::{PromptLogprob, SampledToken};
use crate::tokenizer::{AddedTokens, Tokenizer};

/// A text prompt's ids: special-token strings stay plain text (a client cannot forge control
/// tokens) unless `server.allow_special_tokens_in_prompt` is on; `added` says whether the
/// model's BOS/EOS go around them.
pub(super) fn prompt_ids(
    state: &AppState,
    text: &str,
    added: AddedTokens,
) -> Result<Vec<u32>, ApiError> {
    let tokenizer = &state.tokenizer;
    let parse_special =
        state.settings.allow_special_tokens_in_prompt || !tokenizer.spells_special_token(text);
    match (parse_special, added) {
        (true, AddedTokens::Model) => tokenizer.encode(text),
        _ => tokenizer.encode_segments(&[(text, parse_special)], added),
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
    added: AddedTokens,
) -> Result<(Vec<Vec<u32>>, Vec<PromptInput>), ApiError> {
    let vocab = state.tokenizer.vocab_size();
    let mut prompts = Vec::with_capacity(inputs.len());
    for (i, p) in inputs.iter().enumerate() {
        let ids = match p {
            PromptInput::Text(text) => prompt_ids(state, text, added)?,
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
    let v = validate_completion(req, &state.settings.sampling_defaults)?;
    let model = check_model(&state, v.params.model.as_deref())?;
    // Tokenizing up to a body limit's worth of text is CPU work: off the async workers.
    let (mut prompts, inputs) = {
        let state = state.clone();
        let (inputs, added) = (v.prompts, v.added_tokens);
        off_the_workers(move || tokenize_prompts(&state, inputs, added)).await??
    };
    let max_model_len = state.engine.limits().max_model_len;
    let truncated: Vec<bool> = (prompts.iter_mut())
        .map(|ids| (v.params.output.truncate_prompt).is_some_and(|t| t.apply(ids, max_model_len)))
        .collect();
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
    let n = v.params.n;
    // Each prompt as `echo` returns it: its text as sent (token ids, or what truncation kept,
    // decoded) and its ids.
    let echoes: Vec<Option<Echo>> = (inputs.iter().zip(&prompts).zip(&truncated))
        .map(|((input, ids), &truncated)| {
            v.echo.then(|| Echo {
                text: echo_text(&state.tokenizer, input, ids, truncated),
                ids: ids.clone(),
                scored: Vec::new(),
            })
        })
        .collect();
    if v.params.stream {
        // Streams are prompt-major: `n` choices of each prompt in turn.
        let report = UsageReport {
            usage: v.params.usage,
            prompt_tokens: (0..streams.len()).map(|i| prompts[i / n].len()).collect(),
        };
        let format = CompletionFormat {
            id,
            created,
            model,
            include_usage: v.params.usage.included(),
            logprobs: v.params.sampling.logprobs.is_some(),
            tokenizer: state.tokenizer.clone(),
            tokens_as_ids: v.params.output.tokens_as_ids,
            offsets: vec![0; streams.len()],
            echo_top: v.params.prompt_scoring.echo,
            echoes: (0..streams.len()).map(|i| echoes[i / n].clone()).collect(),
            prompt_only: v.prompt_only,
        };
        return Ok(sse::respond(streams, format, log, report, timeout).into_response());
    }
    let outs = collect_all(streams, &mut log, timeout)
        .await
        .inspect_err(|e| log.status = e.status)?;
    // With `log_prompts`, the first choice's completion (without the prompt `echo` puts
    // before it).
    if let (Some(t), Some(o)) = (log.texts.as_mut(), outs.first()) {
        t.1 = if v.prompt_only {
            String::new()
        } else {
            o.text.clone()
        };
    }
    let tok = &state.tokenizer;
    let names = TokenNames {
        tok,
        as_ids: v.params.output.tokens_as_ids,
    };
    let scoring = v.params.prompt_scoring;
    let choices = outs
        .into_iter()
        .enumerate()
        .map(|(i, o)| {
            let scored = o.prompt_logprobs.unwrap_or_default();
            let listed = scoring
                .listed
                .map(|k| listed_prompt_logprobs(tok, &prompts[i / n], &scored, k));
            let echo = echoes[i / n].clone().map(|e| Echo { scored, ..e });
            let (text, tokens) = if v.prompt_only {
                (String::new(), &[][..])
            } else {
                (o.text, &o.tokens[..])
            };
            let (text, logprobs) = with_echo(names, echo, scoring.echo, text, tokens, 0);
            // Nothing generated: the answer ends at its (zero) length.
            let (finish_reason, stop_reason) = if v.prompt_only {
                (FinishReason::Length, None)
            } else {
                (o.finish_reason, o.stop_reason)
            };
            CompletionChoice {
                logprobs,
                text,
                index: i as u32,
                finish_reason: Some(finish_reason),
                stop_reason,
                prompt_logprobs: listed,
            }
        })
        .collect::<Vec<_>>();
    if v.prompt_only {
        log.completion_tokens = 0;
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

/// A choice's prompt, returned before its completion (`echo`).
#[derive(Clone)]
struct Echo {
    text: String,
    ids: Vec<u32>,
    /// Its tokens' logprobs (`[i]` scores token `i + 1`), when asked for.
    scored: Vec<PromptLogprob>,
}

/// The text `echo` returns for a prompt: as sent, or its token ids decoded (special tokens
/// included, as they are in the prompt), as are the tokens `truncate_prompt_tokens` kept.
fn echo_text(tok: &Tokenizer, input: &PromptInput, ids: &[u32], truncated: bool) -> String {
    match input {
        PromptInput::Text(text) if !truncated => text.clone(),
        _ => tok.decode(ids, false).unwrap_or_default(),
    }
}

/// A choice's text and `logprobs`: `text` and `tokens` (whose text starts at byte `offset` of
/// the choice), after `echo`'s prompt when there is one, whose tokens lead `logprobs` with
/// `top` alternatives when `echo` came with `logprobs`.
fn with_echo(
    names: TokenNames,
    echo: Option<Echo>,
    top: Option<usize>,
    text: String,
    tokens: &[SampledToken],
    offset: usize,
) -> (String, Option<CompletionLogprobs>) {
    let Some(echo) = echo else {
        return (text, completion_logprobs(names, tokens, offset));
    };
    let generated = completion_logprobs(names, tokens, offset + echo.text.len());
    let logprobs = match top.map(|k| echo_logprobs(names, &echo.ids, &echo.scored, k)) {
        Some(mut prompt) => {
            prompt.extend(generated.unwrap_or_default());
            Some(prompt)
        }
        None => generated,
    };
    (echo.text + &text, logprobs)
}

/// Completion chunks: `choices[].text` deltas; with `echo`, a choice's first chunk starts with
/// its prompt.
struct CompletionFormat {
    id: String,
    created: u64,
    model: String,
    include_usage: bool,
    logprobs: bool,
    tokenizer: Arc<Tokenizer>,
    /// Logprobs name tokens `token_id:{id}`.
    tokens_as_ids: bool,
    /// Bytes of text sent so far per choice (logprobs' `text_offset`).
    offsets: Vec<usize>,
    /// Prompts still to echo, per choice (with their logprobs once they arrive).
    echoes: Vec<Option<Echo>>,
    /// `echo` with `logprobs`: the alternatives per prompt token.
    echo_top: Option<usize>,
    /// `echo` with `max_tokens: 0`: the computed token is left out.
    prompt_only: bool,
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
        finish: Option<(FinishReason, Option<StopReason>)>,
    ) -> serde_json::Value {
        let i = index as usize;
        let start = self.offsets.get(i).copied().unwrap_or(0);
        let (text, tokens, finish) = if self.prompt_only {
            (
                String::new(),
                &[][..],
                finish.map(|_| (FinishReason::Length, None)),
            )
        } else {
            (text, tokens, finish)
        };
        let (finish, stop_reason) = finish.unzip();
        let echo = self.echoes.get_mut(i).and_then(Option::take);
        let names = TokenNames {
            tok: &self.tokenizer,
            as_ids: self.tokens_as_ids,
        };
        let (text, logprobs) = with_echo(names, echo, self.echo_top, text, tokens, start);
        if let Some(o) = self.offsets.get_mut(i) {
            *o = start + text.len();
        }
        let choice = CompletionChoice {
            text,
            index,
            logprobs,
            finish_reason: finish,
            stop_reason: stop_reason.flatten(),
            prompt_logprobs: None,
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

    fn prompt_scored(&mut self, index: u32, scored: Vec<PromptLogprob>) {
        if let Some(Some(echo)) = self.echoes.get_mut(index as usize) {
            echo.scored = scored;
        }
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
    fn counts_completion(&self) -> bool {
        !self.prompt_only
    }
}
