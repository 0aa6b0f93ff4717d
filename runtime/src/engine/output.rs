//! What the engine streams back to each request's caller.

use std::time::Instant;

use caduceus_scheduler::{FinishReason, RequestId};
use tokio::sync::mpsc;

use super::failure::RequestFailure;
use crate::sampling::{PromptLogprob, SampledToken};

/// One step's worth of output for one request.
#[derive(Clone, Debug)]
pub struct RequestOutput {
    /// Tokens sampled this step (usually one), with logprobs when asked for.
    pub new_tokens: Vec<SampledToken>,
    /// Text released this step (after stop-string hold-back; empty when not detokenizing).
    pub text: String,
    /// The prompt tokens' logprobs (`EngineRequest::prompt_logprobs`), on the first output
    /// that carries a token: `[i]` scores prompt token `i + 1`.
    pub prompt_logprobs: Option<Vec<PromptLogprob>>,
    /// Set on the last output of a request.
    pub finished: Option<Finished>,
}

impl RequestOutput {
    /// The only output of a request that ended before producing anything.
    pub fn failed(reason: FinishReason) -> Self {
        Self::failed_with(reason, None)
    }

    /// [`Self::failed`] with the failure the caller sees (e.g. why it was refused).
    pub fn failed_with(reason: FinishReason, error: Option<RequestFailure>) -> Self {
        let mut times = RequestTimes::arriving_now();
        times.finished = Some(times.arrival);
        RequestOutput {
            new_tokens: Vec::new(),
            text: String::new(),
            prompt_logprobs: None,
            finished: Some(Finished {
                reason,
                num_prompt_tokens: 0,
                num_output_tokens: 0,
                num_cached_tokens: 0,
                times,
                error,
                stop_reason: None,
            }),
        }
    }
}

/// How and when a request ended, sent with its last output.
#[derive(Clone, Debug)]
pub struct Finished {
    /// Why generation ended.
    pub reason: FinishReason,
    /// Prompt tokens.
    pub num_prompt_tokens: usize,
    /// Generated tokens (those emitted, including an EOS token that ended the request).
    pub num_output_tokens: usize,
    /// Prompt tokens served from the prefix cache on first schedule.
    pub num_cached_tokens: usize,
    /// Timestamps of the request's life in the engine.
    pub times: RequestTimes,
    /// Why the request failed, when `reason` is an error the caller should see.
    pub error: Option<RequestFailure>,
    /// What ended a [`FinishReason::Stop`] other than an EOS token (vLLM's `stop_reason`).
    pub stop_reason: Option<StopReason>,
}

/// The request's own stop condition that ended it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum StopReason {
    /// One of its `stop` strings.
    Text(String),
    /// One of its `stop_token_ids`.
    TokenId(u32),
}

/// Timestamps for latency metrics (queue time, time to first token, end to end).
#[derive(Clone, Copy, Debug)]
pub struct RequestTimes {
    /// When the engine accepted the request.
    pub arrival: Instant,
    /// When it was first scheduled.
    pub first_scheduled: Option<Instant>,
    /// When its first token was sampled.
    pub first_token: Option<Instant>,
    /// When it finished.
    pub finished: Option<Instant>,
}

impl RequestTimes {
    /// Times of a request arriving now.
    pub fn arriving_now() -> Self {
        RequestTimes {
            arrival: Instant::now(),
            first_scheduled: None,
            first_token: None,
            finished: None,
        }
    }
}

/// The sending half of a request's output stream. When the receiver is dropped (the client
/// left), the engine aborts the request and frees its blocks.
pub type OutputSender = mpsc::UnboundedSender<RequestOutput>;

/// A submitted request's output stream; dropping it aborts the request.
#[derive(Debug)]
pub struct RequestStream {
    /// The engine's id of the request.
    pub id: RequestId,
    rx: mpsc::UnboundedReceiver<RequestOutput>,
}

impl RequestStream {
    /// Wraps a receiver.
    pub fn new(id: RequestId, rx: mpsc::UnboundedReceiver<RequestOutput>) -> Self {
        RequestStream { id, rx }
    }

    /// The next output; `None` once the request has finished and everything was received, or
    /// when the engine stopped (then no output carried `finished`).
    pub async fn next(&mut self) -> Option<RequestOutput> {
        self.rx.recv().await
    }

    /// Blocking variant of [`Self::next`] for synchronous callers (never call it from async code).
    pub fn blocking_next(&mut self) -> Option<RequestOutput> {
        self.rx.blocking_recv()
    }
}
