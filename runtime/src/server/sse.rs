//! Server-sent events for `stream: true`: a task pumps engine outputs into OpenAI chunks
//! (`data: {...}`), ending with an optional usage chunk and `data: [DONE]` (with vLLM's
//! `continuous_usage_stats`, every chunk also carries its choice's counts so far). When the client
//! leaves, the task sees the closed channel, drops the engine streams (aborting the requests)
//! and the request is logged as aborted.

use std::convert::Infallible;
use std::time::{Duration, Instant};

use axum::response::sse::{Event, KeepAlive, Sse};
use futures_util::stream::{self, Stream, StreamExt};
use serde::Serialize;
use tokio::sync::mpsc;

use super::error::{failure_error, timeout_error};
use super::generation::{engine_gone, merge, note_stream_output};
use super::protocol::{ApiError, FinishReason, StopReason, StreamUsage, Usage, SSE_DONE};
use super::request_log::RequestLog;
use crate::engine::RequestStream;
use crate::sampling::{PromptLogprob, SampledToken};

/// How one endpoint shapes its chunks.
pub trait ChunkFormat: Send + 'static {
    /// The chunk opening choice `index` (chat sends the assistant role first), if any.
    fn opening(&self, index: u32) -> Option<serde_json::Value>;
    /// A chunk with new text (and the logprobs of the tokens behind it), maybe the last one
    /// (`finish` set, with the stop string or token that ended it).
    fn content(
        &mut self,
        index: u32,
        text: String,
        tokens: &[SampledToken],
        finish: Option<(FinishReason, Option<StopReason>)>,
    ) -> serde_json::Value;
    /// Choice `index`'s prompt logprobs arrived (before its first `content`); formats that do
    /// not echo the prompt ignore them.
    fn prompt_scored(&mut self, index: u32, scored: Vec<PromptLogprob>) {
        let _ = (index, scored);
    }
    /// The final usage chunk.
    fn usage(&self, usage: Usage) -> serde_json::Value;
    /// Whether the generated tokens are the answer's (false for `echo` with `max_tokens: 0`,
    /// whose one computed token is left out of the chunks, `usage`, the request log and its
    /// metrics).
    fn counts_completion(&self) -> bool {
        true
    }
    /// Whether logprobs were asked for (tokens then travel even with empty text).
    fn wants_logprobs(&self) -> bool;
}

/// Serializes a chunk to an SSE event (serialization of these types cannot fail; an empty
/// event is sent if it ever did).
pub fn event<T: Serialize>(chunk: &T) -> Event {
    Event::default().data(serde_json::to_string(chunk).unwrap_or_default())
}

/// What a stream reports of its token counts: `usage`, and each stream's prompt tokens (what
/// [`StreamUsage::Continuous`] chunks count for their choice).
pub struct UsageReport {
    pub usage: StreamUsage,
    pub prompt_tokens: Vec<usize>,
}

/// Starts streaming `streams` as SSE.
pub fn respond<F: ChunkFormat>(
    streams: Vec<RequestStream>,
    format: F,
    log: RequestLog,
    report: UsageReport,
    timeout: Duration,
) -> Sse<impl Stream<Item = Result<Event, Infallible>>> {
    let (tx, rx) = mpsc::channel::<Event>(64);
    tokio::spawn(pump(streams, format, log, report, timeout, tx));
    let body = stream::unfold(
        rx,
        |mut rx| async move { rx.recv().await.map(|e| (Ok(e), rx)) },
    );
    Sse::new(body).keep_alive(KeepAlive::default())
}

async fn pump<F: ChunkFormat>(
    streams: Vec<RequestStream>,
    mut format: F,
    mut log: RequestLog,
    report: UsageReport,
    timeout: Duration,
    tx: mpsc::Sender<Event>,
) {
    let n = streams.len();
    let mut merged = merge(streams);
    // Each choice's completion tokens so far, for continuous usage.
    let mut generated = vec![0usize; n];
    let counted = |i: usize, generated: &[usize], mut chunk: serde_json::Value| {
        if report.usage == StreamUsage::Continuous {
            let prompt = report.prompt_tokens.get(i).copied().unwrap_or(0);
            let usage = Usage::new(prompt, generated[i]);
            if let (Some(chunk), Ok(usage)) = (chunk.as_object_mut(), serde_json::to_value(usage)) {
                chunk.insert("usage".into(), usage);
            }
        }
        chunk
    };
    for i in 0..n {
        if let Some(chunk) = format.opening(i as u32) {
            if tx
                .send(event(&counted(i, &generated, chunk)))
                .await
                .is_err()
            {
                return;
            }
        }
    }
    let mut pending: Vec<Vec<SampledToken>> = vec![Vec::new(); n];
    let mut lasts: Vec<Option<Instant>> = vec![None; n];
    let mut remaining = n;
    let deadline = tokio::time::sleep(timeout);
    tokio::pin!(deadline);
    while remaining > 0 {
        let next = tokio::select! {
            _ = tx.closed() => return, // the client left; dropping `merged` aborts the requests
            _ = &mut deadline => {
                log.status = 504;
                log.finish_reason = "timeout";
                let _ = tx.send(error_event(&timeout_error(timeout))).await;
                return;
            }
            next = merged.next() => next,
        };
        let Some((i, mut out)) = next else {
            let err = engine_gone(&mut log);
            let _ = tx.send(error_event(&err)).await;
            return;
        };
        note_stream_output(&mut log, &mut lasts, i, &out);
        if let Some(failure) = out.finished.as_ref().and_then(|f| f.error.as_ref()) {
            let err = failure_error(failure);
            log.status = err.status;
            let _ = tx.send(error_event(&err)).await;
            return;
        }
        if let Some((_, completion)) = log.texts.as_mut().filter(|_| format.counts_completion()) {
            completion.push_str(&out.text);
        }
        if let Some(scored) = out.prompt_logprobs.take() {
            format.prompt_scored(i as u32, scored);
        }
        if format.counts_completion() {
            generated[i] += out.new_tokens.len();
        }
        pending[i].extend(out.new_tokens);
        let finish = (out.finished).map(|f| {
            (
                FinishReason::from(f.reason),
                f.stop_reason.map(StopReason::from),
            )
        });
        if finish.is_some() {
            remaining -= 1;
        }
        if out.text.is_empty() && finish.is_none() {
            continue; // text held back (partial character or possible stop string)
        }
        let tokens = std::mem::take(&mut pending[i]);
        let tokens: &[SampledToken] = if format.wants_logprobs() {
            &tokens
        } else {
            &[]
        };
        let chunk = format.content(i as u32, out.text, tokens, finish);
        if tx
            .send(event(&counted(i, &generated, chunk)))
            .await
            .is_err()
        {
            return;
        }
    }
    if !format.counts_completion() {
        log.completion_tokens = 0;
    }
    if report.usage.included() {
        let usage = Usage::new(log.prompt_tokens, log.completion_tokens)
            .with_cached_tokens(log.cached_tokens);
        if tx.send(event(&format.usage(usage))).await.is_err() {
            return;
        }
    }
    if tx.send(Event::default().data(SSE_DONE)).await.is_ok() {
        log.status = 200;
    }
}

/// An error in the middle of a stream, as OpenAI sends it: `data: {"error": {...}}`.
fn error_event(err: &ApiError) -> Event {
    event(&err.body)
}
