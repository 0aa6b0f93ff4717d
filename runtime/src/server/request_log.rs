//! The record of one HTTP generation request: counted in flight while alive, and on drop written
//! as metrics and one log line (id, model, token counts, latencies, status; prompt and completion
//! text only when `log_prompts` is on). A request whose client left is recorded as aborted.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use axum::extract::Request;
use axum::middleware::Next;
use axum::response::Response;

use super::state::InFlight;
use crate::metrics::{record_request, RequestRecord};

tokio::task_local! {
    /// Set when the request being served created a [`RequestLog`] (which records it).
    static LOGGED: Arc<AtomicBool>;
}

/// Counts in `caduceus_requests_total` every generation request answered before a
/// [`RequestLog`] existed: 401, 400 from validation, 404, 413, 429 and 503 refusals, and (as 499
/// `abort`) a client that left while its body was read or its prompt tokenized.
pub async fn count_early_responses(req: Request, next: Next) -> Response {
    let mut early = EarlyCount {
        logged: Arc::new(AtomicBool::new(false)),
        status: None,
    };
    let response = LOGGED.scope(early.logged.clone(), next.run(req)).await;
    early.status = Some(response.status().as_u16());
    response
}

/// Records a request no [`RequestLog`] took over, when the middleware ends or is dropped (the
/// client left: hyper drops the handler's future).
struct EarlyCount {
    logged: Arc<AtomicBool>,
    status: Option<u16>,
}

impl Drop for EarlyCount {
    fn drop(&mut self) {
        if self.logged.load(Ordering::Acquire) {
            return;
        }
        record_request(&RequestRecord {
            status: self.status.unwrap_or(499),
            finish_reason: if self.status.is_some() {
                "none"
            } else {
                "abort"
            },
            prompt_tokens: 0,
            generation_tokens: 0,
            ttft: None,
            queue_time: None,
            e2e: None,
        });
    }
}

/// One request's record; fill it in as the request progresses.
#[derive(Debug)]
pub struct RequestLog {
    /// Response id (`chatcmpl-...` / `cmpl-...`).
    pub id: String,
    /// The caller's `X-Request-Id`, if it sent one.
    pub client_id: Option<String>,
    /// `chat` or `completions`.
    pub endpoint: &'static str,
    /// The requested model.
    pub model: String,
    /// Prompt tokens over all prompts.
    pub prompt_tokens: usize,
    /// Generated tokens over all choices.
    pub completion_tokens: usize,
    /// Prompt tokens served from the prefix cache.
    pub cached_tokens: usize,
    /// HTTP status; 499 until the response completes (client closed the request).
    pub status: u16,
    /// Finish reason of the first choice (`none` before one exists).
    pub finish_reason: &'static str,
    /// When the handler started.
    pub arrival: Instant,
    /// When the first generated token reached the server.
    pub first_token: Option<Instant>,
    /// Engine queue time (arrival at the engine to first schedule).
    pub queue_time: Option<Duration>,
    /// Prompt and completion text, kept only when `log_prompts` is on.
    pub texts: Option<(String, String)>,
    _in_flight: InFlight,
}

impl RequestLog {
    /// Starts the record of a request arriving now.
    pub fn new(id: String, endpoint: &'static str, model: String, in_flight: InFlight) -> Self {
        let _ = LOGGED.try_with(|l| l.store(true, Ordering::Release));
        RequestLog {
            id,
            client_id: super::request_id::current(),
            endpoint,
            model,
            prompt_tokens: 0,
            completion_tokens: 0,
            cached_tokens: 0,
            status: 499,
            finish_reason: "none",
            arrival: Instant::now(),
            first_token: None,
            queue_time: None,
            texts: None,
            _in_flight: in_flight,
        }
    }

    /// Notes that a token arrived now.
    pub fn token_arrived(&mut self) {
        self.first_token.get_or_insert_with(Instant::now);
    }
}

impl Drop for RequestLog {
    fn drop(&mut self) {
        if self.status == 499 && self.finish_reason == "none" {
            self.finish_reason = "abort";
        }
        let e2e = self.arrival.elapsed();
        let ttft = self.first_token.map(|t| t - self.arrival);
        record_request(&RequestRecord {
            status: self.status,
            finish_reason: self.finish_reason,
            prompt_tokens: self.prompt_tokens,
            generation_tokens: self.completion_tokens,
            ttft,
            queue_time: self.queue_time,
            e2e: (self.status == 200).then_some(e2e),
        });
        let ms = |d: Option<Duration>| d.map_or(-1.0, |d| d.as_secs_f64() * 1e3);
        // Text fields are recorded only with `log_prompts` (`None` records nothing), quoted and
        // escaped: a newline in a prompt cannot start a forged record.
        let texts = self.texts.as_ref();
        tracing::info!(
            target: "caduceus::request",
            id = %self.id,
            request_id = self.client_id.as_deref().map(tracing::field::display),
            endpoint = self.endpoint,
            model = %self.model,
            status = self.status,
            finish_reason = self.finish_reason,
            prompt_tokens = self.prompt_tokens,
            completion_tokens = self.completion_tokens,
            cached_tokens = self.cached_tokens,
            queue_ms = ms(self.queue_time),
            ttft_ms = ms(ttft),
            e2e_ms = ms(Some(e2e)),
            prompt = texts.map(|(p, _)| tracing::field::debug(p)),
            completion = texts.map(|(_, c)| tracing::field::debug(c)),
            "request"
        );
    }
}
