//! Running a validated request through the engine: one engine request per prompt and choice,
//! collected into one JSON response, or merged into one SSE stream.

use std::time::{Duration, Instant};

use futures_util::stream::{self, BoxStream, StreamExt};

use super::error::{check_token_ids, failure_error, request_error, timeout_error};
use super::protocol::{ApiError, FinishReason, GenerationParams, StopReason};
use super::request_log::RequestLog;
use super::state::AppState;
use super::tenant::{cache_salt, Tenant};
use crate::engine::{EngineRequest, RequestOutput, RequestStream};
use crate::metrics::record_inter_token;
use crate::sampling::{PromptLogprob, SampledToken};
use crate::structured::{
    CompiledConstraint, Compiling, ConstraintSpec, PendingCompile, StructuredError,
};
use crate::tokenizer::Tokenizer;

/// Everything one choice produced.
#[derive(Clone, Debug)]
pub struct ChoiceOutput {
    /// Generated text (stop strings removed).
    pub text: String,
    /// Generated tokens with their logprobs.
    pub tokens: Vec<SampledToken>,
    /// The prompt tokens' logprobs, when asked for (`[i]` scores prompt token `i + 1`).
    pub prompt_logprobs: Option<Vec<PromptLogprob>>,
    /// Why it ended.
    pub finish_reason: FinishReason,
    /// The request's stop string or stop token that ended it, if one did.
    pub stop_reason: Option<StopReason>,
}

/// Compiles the request's output grammar (cached by its text) off the async workers; a grammar
/// that cannot be compiled is a 400 naming `field` and the problem, before anything is queued;
/// a compile still running when the request's timeout passes is a 504. Under `per_key`
/// isolation a tenant shares compiled grammars only with itself: a cache hit shows in the
/// response time, as a prefix-cache hit does.
pub async fn compile_constraint(
    state: &AppState,
    constraint: Option<(ConstraintSpec, &'static str)>,
    tenant: Option<Tenant>,
) -> Result<Option<std::sync::Arc<CompiledConstraint>>, ApiError> {
    let Some((spec, field)) = constraint else {
        return Ok(None);
    };
    let Some(compiler) = state.structured.clone() else {
        return Err(ApiError::invalid_request(
            format!("`{field}` is not available for this model (its vocabulary could not be read)"),
            Some(field),
        ));
    };
    // The request's own timeout bounds its wait for the compile (a busy server is a timeout,
    // not a bad grammar). The compile runs on its own thread; the wait holds no thread.
    let wait = state.settings.request_timeout;
    // The tenant's part of the prefix-cache salt: grammars are the calling service's, not
    // the patient's, so a request's own `cache_salt` does not split them further.
    let partition = cache_salt(state.settings.prefix_cache_isolation, tenant, None);
    let compiled = match compiler.begin(&spec, partition, wait) {
        Compiling::Done(outcome) => outcome,
        Compiling::Pending(pending) => loop {
            if let Some(outcome) = pending.poll() {
                break outcome;
            }
            tokio::time::sleep(PendingCompile::POLL_INTERVAL).await;
        },
    };
    compiled.map(Some).map_err(|e| match e {
        StructuredError::Deadline { .. } => timeout_error(wait),
        StructuredError::Unavailable(_) => {
            tracing::error!(error = %e, "grammar compile could not start");
            ApiError::unavailable(format!("`{field}` cannot be compiled now; retry"))
        }
        e => ApiError::invalid_request(format!("`{field}`: {e}"), Some(field)),
    })
}

/// Queues one engine request per (prompt, choice), in choice-index order. On any refusal the
/// streams already opened are dropped, which aborts them. `tenant` is the authenticated caller,
/// whose prefix-cache blocks are kept apart from other tenants' under `per_key` isolation.
pub fn submit(
    state: &AppState,
    prompts: &[Vec<u32>],
    params: &GenerationParams,
    prompt_field: &str,
    tenant: Option<Tenant>,
    constraint: Option<std::sync::Arc<CompiledConstraint>>,
) -> Result<Vec<RequestStream>, ApiError> {
    if params.priority != 0 && !state.settings.allow_request_priority {
        return Err(ApiError::invalid_request(
            "`priority` is turned off on this server (`server.allow_request_priority`); \
             send 0 or leave it out",
            Some("priority"),
        ));
    }
    let biased = params.sampling.logit_bias.iter().map(|&(t, _)| t);
    let vocab = state.tokenizer.vocab_size();
    check_token_ids(biased, vocab, "logit_bias", "logit_bias")?;
    let allowed = params.sampling.allowed_token_ids.iter().copied();
    check_token_ids(allowed, vocab, "allowed_token_ids", "allowed_token_ids")?;
    let bad_words = bad_word_sequences(&state.tokenizer, &params.bad_words)?;
    let cache_salt = cache_salt(
        state.settings.prefix_cache_isolation,
        tenant,
        params.cache_salt.as_deref(),
    );
    let limits = state.engine.limits();
    let prompt_logprobs = params.prompt_scoring.top();
    let adapter = params
        .model
        .as_deref()
        .filter(|m| *m != state.settings.served_model_name)
        .map(std::sync::Arc::<str>::from);
    let mut streams = Vec::with_capacity(prompts.len() * params.n);
    for prompt in prompts {
        // No max_tokens: as many as the admission rule allows (the context and the KV pool);
        // with no room at all, the engine's check names the limit the prompt alone breaks.
        let room = limits.admission().max_output_tokens(prompt.len());
        let max_tokens = params.max_tokens.unwrap_or(room.max(1));
        for choice in 0..params.n {
            let mut sampling = params.sampling.clone();
            sampling.bad_words.clone_from(&bad_words);
            // Distinct but reproducible streams for n > 1 with a seed.
            sampling.seed = sampling.seed.map(|s| s.wrapping_add(choice as u64));
            let req = EngineRequest {
                prompt_token_ids: prompt.clone(),
                sampling,
                max_tokens,
                min_tokens: params.min_tokens,
                ignore_eos: params.ignore_eos,
                stop: params.stop.clone(),
                stop_token_ids: params.stop_token_ids.clone(),
                include_stop_str_in_output: params.output.include_stop_str_in_output,
                skip_special_tokens: params.output.skip_special_tokens,
                priority: params.priority,
                adapter: adapter.clone(),
                cache_salt,
                detokenize: true,
                constraint: constraint.clone(),
                prompt_logprobs,
            };
            let stream = state
                .engine
                .submit(req)
                .map_err(|e| request_error(e, prompt_field, params.prompt_scoring.field()))?;
            streams.push(stream);
        }
    }
    Ok(streams)
}

/// `bad_words` as token sequences ([`Tokenizer::word_sequences`] of each); the engine's
/// `SamplingParams::validate` bounds them (a 400 naming `bad_words`).
fn bad_word_sequences(tok: &Tokenizer, words: &[String]) -> Result<Vec<Vec<u32>>, ApiError> {
    let mut sequences = Vec::with_capacity(words.len() * 2);
    for word in words {
        sequences.extend(tok.word_sequences(word).map_err(|e| {
            tracing::error!(error = %e, "tokenizer failed");
            ApiError::internal()
        })?);
    }
    Ok(sequences)
}

/// Runs CPU-bound request work (template rendering, tokenization) on tokio's blocking pool, so
/// the async workers keep serving other connections and `/health` meanwhile.
pub async fn off_the_workers<T: Send + 'static>(
    work: impl FnOnce() -> T + Send + 'static,
) -> Result<T, ApiError> {
    tokio::task::spawn_blocking(work).await.map_err(|e| {
        tracing::error!(error = %e, "request preparation failed on the blocking pool");
        ApiError::internal()
    })
}

/// Applies one engine output to the log (tokens, finish, cache and queue figures).
fn note_output(log: &mut RequestLog, out: &RequestOutput, last: &mut Option<Instant>) {
    if !out.new_tokens.is_empty() {
        let now = Instant::now();
        if let Some(prev) = last.replace(now) {
            record_inter_token(now - prev);
        }
        log.token_arrived();
        log.completion_tokens += out.new_tokens.len();
    }
    if let Some(f) = &out.finished {
        if log.finish_reason == "none" {
            log.finish_reason = finish_label(f.reason.into());
            log.cached_tokens = f.num_cached_tokens;
            log.queue_time = f.times.first_scheduled.map(|t| t - f.times.arrival);
        }
    }
}

/// The label of a finish reason in metrics and logs.
pub fn finish_label(reason: FinishReason) -> &'static str {
    match reason {
        FinishReason::Stop => "stop",
        FinishReason::Length => "length",
        FinishReason::Abort => "abort",
        FinishReason::Error => "error",
        FinishReason::ToolCalls => "tool_calls",
    }
}

/// Waits for every choice to finish (or the request timeout) and returns them in index order.
pub async fn collect_all(
    streams: Vec<RequestStream>,
    log: &mut RequestLog,
    timeout: Duration,
) -> Result<Vec<ChoiceOutput>, ApiError> {
    let n = streams.len();
    let mut merged = merge(streams);
    let mut outs: Vec<ChoiceOutput> = (0..n)
        .map(|_| ChoiceOutput {
            text: String::new(),
            tokens: Vec::new(),
            prompt_logprobs: None,
            finish_reason: FinishReason::Error,
            stop_reason: None,
        })
        .collect();
    let mut lasts = vec![None; n];
    let mut remaining = n;
    let deadline = tokio::time::sleep(timeout);
    tokio::pin!(deadline);
    while remaining > 0 {
        let (i, out) = tokio::select! {
            _ = &mut deadline => {
                log.status = 504;
                log.finish_reason = "timeout";
                return Err(timeout_error(timeout));
            }
            next = merged.next() => match next {
                Some(item) => item,
                None => return Err(engine_gone(log)),
            },
        };
        note_output(log, &out, &mut lasts[i]);
        if let Some(failure) = out.finished.as_ref().and_then(|f| f.error.as_ref()) {
            let err = failure_error(failure);
            log.status = err.status;
            return Err(err);
        }
        let o = &mut outs[i];
        o.text.push_str(&out.text);
        o.tokens.extend(out.new_tokens);
        if out.prompt_logprobs.is_some() {
            o.prompt_logprobs = out.prompt_logprobs;
        }
        if let Some(f) = out.finished {
            o.finish_reason = f.reason.into();
            o.stop_reason = f.stop_reason.map(StopReason::from);
            remaining -= 1;
        }
    }
    Ok(outs)
}

/// The engine stopped before answering (it died or is shutting down).
pub fn engine_gone(log: &mut RequestLog) -> ApiError {
    log.status = 503;
    log.finish_reason = "error";
    ApiError::unavailable("the engine stopped before the request finished")
}

/// One stream of (choice index, output) over all choices.
pub fn merge(streams: Vec<RequestStream>) -> BoxStream<'static, (usize, RequestOutput)> {
    let per_choice = streams.into_iter().enumerate().map(|(i, s)| {
        stream::unfold(s, |mut s| async move { s.next().await.map(|o| (o, s)) })
            .map(move |o| (i, o))
            .boxed()
    });
    stream::select_all(per_choice).boxed()
}

/// Notes, for the pump of an SSE response, one output; returns it with its choice index.
pub fn note_stream_output(
    log: &mut RequestLog,
    lasts: &mut [Option<Instant>],
    i: usize,
    out: &RequestOutput,
) {
    if let Some(last) = lasts.get_mut(i) {
        note_output(log, out, last);
    }
}
