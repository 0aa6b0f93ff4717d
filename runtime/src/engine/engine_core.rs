//! [`EngineCore`]: the iteration-level loop `schedule -> execute -> update`, plus the per-request
//! bookkeeping around it (output streams, detokenization, stop strings, aborts, one request's
//! failure). The adapter side (loader, parked requests, slot metrics) is in [`adapters`].

mod adapters;
mod run;
mod step_log;

use self::step_log::log_step;

pub use run::RunError;

use std::collections::HashMap;
use std::ops::Deref;
use std::sync::Arc;
use std::time::Instant;

use caduceus_scheduler::{
    FinishReason, NewRequest, RequestId, RequestUpdate, ScheduledData, Scheduler, SchedulerConfig,
    SchedulerOutput, SchedulerStats,
};

use self::adapters::EngineAdapters;
use super::backend::{Backend, BackendError};
use super::cpu_backend::CpuBackend;
use super::executor::{ExecuteResult, Executor, ExecutorError, SeqSampling};
use super::failure::RequestFailure;
use super::output::{Finished, OutputSender, RequestOutput, RequestTimes, StopReason};
use super::request::{EngineRequest, RequestError, RequestLimits};
use super::stop::{StopCheck, StopStrings};
use crate::adapters::LoadedAdapter;
use crate::kv_events::KvEventSink;
use crate::model::LlamaModel;
use crate::sampling::SampledToken;
use crate::tokenizer::detokenizer::IncrementalDetokenizer;
use crate::tokenizer::Tokenizer;

/// Why the engine cannot start or must stop.
#[derive(Debug, thiserror::Error)]
pub enum EngineError {
    /// The scheduler configuration is invalid.
    #[error("invalid scheduler configuration: {0}")]
    Config(#[from] caduceus_scheduler::ConfigError),
    /// Internal inconsistency between scheduler and executor.
    #[error(transparent)]
    Executor(#[from] ExecutorError),
    /// The backend failed (e.g. the adapter slots could not be allocated).
    #[error(transparent)]
    Backend(#[from] BackendError),
    /// The adapter loader thread could not start.
    #[error("adapter loader thread: {0}")]
    Loader(#[from] std::io::Error),
}

/// A request the engine is serving: where its output goes and how text is produced.
struct Tracked {
    out: OutputSender,
    detok: Option<IncrementalDetokenizer>,
    stop: StopStrings,
    /// The request's own `stop_token_ids` (not the model's EOS ids), for `stop_reason`.
    stop_token_ids: Vec<u32>,
    num_prompt_tokens: usize,
    num_output_tokens: usize,
    num_cached_tokens: usize,
    times: RequestTimes,
    adapter: Option<Arc<str>>,
}

/// What one [`EngineCore::step`] did, for logs and metrics.
#[derive(Clone, Copy, Debug, Default)]
pub struct StepStats {
    /// Requests in the batch.
    pub num_scheduled_reqs: usize,
    /// Tokens in the batch.
    pub num_scheduled_tokens: usize,
    /// Requests that finished during the step.
    pub num_finished: usize,
}

/// The engine: one scheduler, one executor, and the requests they serve. Single-threaded; see
/// [`super::EngineHandle`] for running it on its own thread.
pub struct EngineCore<B> {
    scheduler: Scheduler,
    executor: Executor<B>,
    tokenizer: Option<Arc<Tokenizer>>,
    eos_ids: Vec<u32>,
    limits: RequestLimits,
    requests: HashMap<RequestId, Tracked>,
    next_arrival: u64,
    adapters: Option<EngineAdapters>,
    kv_events: Option<KvEventSink>,
    /// Steers the step token budget toward a step time (when it was sized, not configured).
    step_timer: Option<super::StepTimer>,
}

impl<M: Deref<Target = LlamaModel> + Send> EngineCore<CpuBackend<M>> {
    /// An engine over `model` on the CPU with a KV pool of `config.num_blocks` blocks. Without a
    /// tokenizer only token-level requests (`detokenize = false`, no stop strings) are accepted.
    pub fn new(
        model: M,
        tokenizer: Option<Arc<Tokenizer>>,
        eos_ids: Vec<u32>,
        config: SchedulerConfig,
    ) -> Result<Self, EngineError> {
        let backend = CpuBackend::new(model, config.num_blocks, config.block_size);
        Self::with_backend(backend, tokenizer, eos_ids, config)
    }
}

impl<B: Backend> EngineCore<B> {
    /// An engine over `backend`; the scheduler manages the backend's KV pool (its block count
    /// and size replace `config`'s).
    pub fn with_backend(
        backend: B,
        tokenizer: Option<Arc<Tokenizer>>,
        eos_ids: Vec<u32>,
        mut config: SchedulerConfig,
    ) -> Result<Self, EngineError> {
        config.num_blocks = backend.num_kv_blocks();
        config.block_size = backend.block_size();
        let scheduler = Self::scheduler_for(config.clone(), &backend)?;
        let limits = RequestLimits {
            max_model_len: config.max_model_len,
            vocab_size: backend.config().vocab_size,
            block_size: config.block_size,
            usable_blocks: config.num_blocks.saturating_sub(1),
            has_tokenizer: tokenizer.is_some(),
            scores_prompts: backend.max_scored_rows() > 0,
        };
        Ok(EngineCore {
            scheduler,
            executor: Executor::new(backend),
            tokenizer,
            eos_ids,
            limits,
            requests: HashMap::new(),
            next_arrival: 0,
            adapters: None,
            kv_events: None,
            step_timer: None,
        })
    }

    /// A scheduler over `backend`'s KV pool, scoring as many prompt positions per step as the
    /// backend keeps logits for.
    fn scheduler_for(config: SchedulerConfig, backend: &B) -> Result<Scheduler, EngineError> {
        let mut scheduler = Scheduler::new(config)?;
        scheduler.set_max_scored_tokens(backend.max_scored_rows());
        Ok(scheduler)
    }

    /// Lets `timer` move the step token budget after each step, from the time steps take.
    pub fn with_step_timer(mut self, timer: super::StepTimer) -> Self {
        self.step_timer = Some(timer);
        self
    }

    /// Injects test faults into this engine's steps and adapter loader (see [`super::fault`]).
    /// Only with the `fault-injection` feature; call after [`Self::with_adapters`].
    #[cfg(feature = "fault-injection")]
    pub fn with_faults(mut self, plan: super::fault::FaultPlan) -> Self {
        if let (Some(name), Some(a)) = (&plan.loader_panic, &self.adapters) {
            a.loader.panic_on_load_of(name.clone());
        }
        *self.executor.faults_mut() = super::fault::Faults::new(plan);
        self
    }

    /// Publishes the prefix cache's changes to `sink` after every step, starting with
    /// `AllBlocksCleared` (a restarted replica on the same topic holds nothing).
    pub fn with_kv_events(mut self, sink: KvEventSink) -> Self {
        self.scheduler.enable_kv_cache_events();
        self.scheduler.reset_prefix_cache();
        self.kv_events = Some(sink);
        self
    }

    /// The scheduler, read-only (its block pool's cache, for tests and diagnostics).
    pub fn scheduler(&self) -> &Scheduler {
        &self.scheduler
    }

    /// The backend, read-only (diagnostics: e.g. how many decode steps replayed a graph).
    pub fn backend(&self) -> &B {
        self.executor.backend()
    }

    /// The limits every request is checked against.
    pub fn limits(&self) -> RequestLimits {
        self.limits
    }

    /// Scheduler statistics (queue lengths, KV usage, prefix-cache hits, preemptions);
    /// requests parked on an adapter load count as waiting (a gateway must see them queued).
    pub fn stats(&self) -> SchedulerStats {
        let mut stats = self.scheduler.stats();
        // A request parked on a cold adapter waits too: the queue bound (429) and
        // `caduceus_num_requests_waiting` must count it.
        stats.num_waiting += self.num_parked();
        stats
    }

    /// The scheduler's limits (block size and pool size included; the step budget as it is now).
    pub fn scheduler_config(&self) -> &SchedulerConfig {
        self.scheduler.config()
    }

    /// Whether any request is waiting or running.
    pub fn has_unfinished(&self) -> bool {
        self.scheduler.has_unfinished() || self.num_parked() > 0
    }

    /// Requests waiting for their adapter to be read from disk.
    pub fn num_parked(&self) -> usize {
        self.adapters.as_ref().map_or(0, |a| a.parked.len())
    }

    /// Queues a request; its outputs go to `out`. A request whose adapter is not in host memory
    /// is parked (not scheduled, blocking nobody) until the loader thread has read it.
    pub fn add_request(
        &mut self,
        id: RequestId,
        req: EngineRequest,
        out: OutputSender,
    ) -> Result<(), RequestError> {
        self.limits.check(&req)?;
        if self.requests.contains_key(&id) {
            return Err(RequestError::DuplicateId(id.0));
        }
        let tracked = Tracked {
            out,
            detok: req.detokenize.then(|| {
                IncrementalDetokenizer::new(&req.prompt_token_ids, req.skip_special_tokens)
            }),
            stop: StopStrings::new(req.stop.clone(), req.include_stop_str_in_output),
            stop_token_ids: req.stop_token_ids.clone(),
            num_prompt_tokens: req.prompt_token_ids.len(),
            num_output_tokens: 0,
            num_cached_tokens: 0,
            times: RequestTimes::arriving_now(),
            adapter: req.adapter.clone(),
        };
        let adapter = match &req.adapter {
            None => None,
            Some(name) => {
                let unknown = || RequestError::UnknownAdapter(name.to_string());
                let a = self.adapters.as_mut().ok_or_else(unknown)?;
                let entry = a.service.registry().get(name).ok_or_else(unknown)?;
                match a.service.cached(&entry) {
                    Some(loaded) => Some(loaded),
                    None => {
                        if !a.loader.request(&entry) && !a.loader.is_loading(&entry) {
                            return Err(RequestError::EngineStopped);
                        }
                        a.parked.insert(id, (req, entry));
                        self.requests.insert(id, tracked);
                        return Ok(());
                    }
                }
            }
        };
        self.admit(id, req, adapter)?;
        self.requests.insert(id, tracked);
        Ok(())
    }

    /// Hands a request (its adapter, if any, in host memory) to the scheduler and executor.
    fn admit(
        &mut self,
        id: RequestId,
        req: EngineRequest,
        adapter: Option<Arc<LoadedAdapter>>,
    ) -> Result<(), RequestError> {
        #[cfg(feature = "fault-injection")]
        self.executor.faults_mut().mark(id, &req);
        let mut stop_token_ids = req.stop_token_ids.clone();
        if !req.ignore_eos {
            stop_token_ids.extend(&self.eos_ids);
        }
        let masked_ids = stop_token_ids.clone();
        self.scheduler
            .add_request(NewRequest {
                id,
                prompt_token_ids: req.prompt_token_ids,
                max_tokens: req.max_tokens,
                min_tokens: req.min_tokens,
                stop_token_ids,
                priority: req.priority,
                arrival_seq: self.next_arrival,
                adapter: adapter.as_ref().map(|a| a.key),
                cache_salt: req.cache_salt,
                scores_prompt: req.prompt_logprobs.is_some(),
            })
            .map_err(RequestError::from)?;
        self.next_arrival += 1;
        if let (Some(sink), Some(a)) = (&mut self.kv_events, &adapter) {
            sink.note_adapter(a.key.id, &a.name);
        }
        self.executor.add_request(
            id,
            SeqSampling {
                params: req.sampling,
                min_tokens: req.min_tokens,
                masked_ids,
                adapter,
                constraint: req.constraint.as_ref().map(|c| c.matcher()),
                prompt_logprobs: req.prompt_logprobs,
            },
        );
        Ok(())
    }

    /// Ends a request with an error its caller sees, wherever it is: its KV blocks (and with
    /// them its hold on an adapter slot) go back through the scheduler's finish path, as for an
    /// abort. The error is logged with the request's id and adapter, never its text.
    fn finish_failed(&mut self, id: RequestId, failure: RequestFailure) {
        self.scheduler.finish_request(id, FinishReason::Error);
        self.executor.remove_request(id);
        let Some(mut t) = self.requests.remove(&id) else {
            return;
        };
        tracing::error!(
            request_id = id.0,
            adapter = t.adapter.as_deref().unwrap_or(""),
            code = failure.code(),
            error = %failure,
            "request failed in the engine; the others go on"
        );
        t.times.finished = Some(Instant::now());
        let _ = t.out.send(RequestOutput {
            new_tokens: Vec::new(),
            text: String::new(),
            prompt_logprobs: None,
            finished: Some(Finished {
                reason: FinishReason::Error,
                num_prompt_tokens: t.num_prompt_tokens,
                num_output_tokens: t.num_output_tokens,
                num_cached_tokens: t.num_cached_tokens,
                times: t.times,
                error: Some(failure),
                stop_reason: None,
            }),
        });
    }

    /// Ends a request wherever it is and frees its blocks now; its stream gets a final output
    /// with `reason` (if anyone still listens).
    pub fn abort_request(&mut self, id: RequestId, reason: FinishReason) {
        let parked = self
            .adapters
            .as_mut()
            .and_then(|a| a.parked.remove(&id))
            .is_some();
        if parked || self.scheduler.finish_request(id, reason) {
            self.finish(id, reason, String::new());
        }
    }

    /// One iteration: schedule, run the model, apply the sampled tokens, stream the outputs.
    pub fn step(&mut self) -> Result<StepStats, EngineError> {
        self.poll_adapter_loads();
        self.abort_disconnected();
        let sched = self.scheduler.schedule();
        self.note_scheduled(&sched);
        let started = Instant::now();
        let gate = self.adapters.as_ref().and_then(|a| a.step_gate.as_ref());
        let mut result = match gate {
            Some(g) if sched.total_num_scheduled_tokens > 0 => {
                g.around(|| self.executor.execute(&sched))
            }
            _ => self.executor.execute(&sched),
        }?;
        for (id, failure) in std::mem::take(&mut result.failed) {
            self.finish_failed(id, failure);
        }
        self.note_slot_fills(&result.slot_fills);
        let elapsed = started.elapsed();
        log_step(&sched, elapsed);
        self.steer_budget(sched.total_num_scheduled_tokens, elapsed);
        let updates = self.scheduler.update(&sched, &result.step);
        let num_finished = self.emit(updates, result);
        self.publish_adapter_info();
        if let Some(sink) = &self.kv_events {
            sink.publish(self.scheduler.take_kv_cache_events());
        }
        Ok(StepStats {
            num_scheduled_reqs: sched.scheduled.len(),
            num_scheduled_tokens: sched.total_num_scheduled_tokens,
            num_finished,
        })
    }

    /// Feeds a step's size and time to the step timer, if any, and applies the budget it wants.
    fn steer_budget(&mut self, tokens: usize, elapsed: std::time::Duration) {
        let Some(timer) = &mut self.step_timer else {
            return;
        };
        let budget = self.scheduler.config().max_num_batched_tokens;
        if let Some(next) = timer.observe(tokens, budget, elapsed.as_secs_f64() * 1e3) {
            self.scheduler.set_max_num_batched_tokens(next);
            tracing::debug!(target: "caduceus::step", from = budget, to = next, "step budget");
        }
    }

    /// A client that dropped its stream has left: abort its request, wherever it is.
    fn abort_disconnected(&mut self) {
        let gone: Vec<RequestId> = self
            .requests
            .iter()
            .filter(|(_, t)| t.out.is_closed())
            .map(|(&id, _)| id)
            .collect();
        for id in gone {
            self.abort_request(id, FinishReason::Abort);
        }
    }

    fn note_scheduled(&mut self, sched: &SchedulerOutput) {
        let now = Instant::now();
        for r in &sched.scheduled {
            if let (Some(t), ScheduledData::New { .. }) = (self.requests.get_mut(&r.id), &r.data) {
                if t.times.first_scheduled.is_none() {
                    t.times.first_scheduled = Some(now);
                    t.num_cached_tokens = r.num_computed_tokens;
                }
            }
        }
    }

    /// Streams each update; returns how many requests finished.
    fn emit(&mut self, updates: Vec<RequestUpdate>, mut result: ExecuteResult) -> usize {
        let now = Instant::now();
        let mut num_finished = 0;
        for u in updates {
            let Some(t) = self.requests.get_mut(&u.id) else {
                continue;
            };
            let prompt_logprobs = result.prompt_logprobs.remove(&u.id);
            let sampled = result.samples.remove(&u.id).unwrap_or(SampledToken {
                token_id: u.new_token_id,
                logprob: None,
                top_logprobs: Vec::new(),
            });
            t.num_output_tokens += 1;
            t.times.first_token.get_or_insert(now);
            // A stop token its mask left as the only choice before `min_tokens` ends it here.
            let ended_by_mask = u.finish_reason.is_none() && result.ended_by_mask.contains(&u.id);
            let finish_reason = u
                .finish_reason
                .or(ended_by_mask.then_some(FinishReason::Stop));
            let stop_token = finish_reason == Some(FinishReason::Stop);
            let (text, stop_string) = self
                .tokenizer
                .as_deref()
                .map_or((String::new(), None), |tok| {
                    next_text(t, tok, u.new_token_id, finish_reason.is_some(), stop_token)
                });
            let stop_reason = match stop_string {
                Some(s) => Some(StopReason::Text(s)),
                None => (stop_token && t.stop_token_ids.contains(&u.new_token_id))
                    .then_some(StopReason::TokenId(u.new_token_id)),
            };
            // The stops the engine finds, not the scheduler, end the request here.
            let reason = if ended_by_mask || matches!(stop_reason, Some(StopReason::Text(_))) {
                self.scheduler.finish_request(u.id, FinishReason::Stop);
                Some(FinishReason::Stop)
            } else {
                finish_reason
            };
            match reason {
                Some(reason) => {
                    num_finished += 1;
                    let out = RequestOutput {
                        new_tokens: vec![sampled],
                        text,
                        prompt_logprobs,
                        finished: None,
                    };
                    self.finish_with(u.id, reason, out, stop_reason);
                }
                None => {
                    let _ = t.out.send(RequestOutput {
                        new_tokens: vec![sampled],
                        text,
                        prompt_logprobs,
                        finished: None,
                    });
                }
            }
        }
        num_finished
    }

    fn finish(&mut self, id: RequestId, reason: FinishReason, text: String) {
        let out = RequestOutput {
            new_tokens: Vec::new(),
            text,
            prompt_logprobs: None,
            finished: None,
        };
        self.finish_with(id, reason, out, None);
    }

    /// Sends `out`, completed with how the request finished, as its final output, and forgets
    /// the request.
    fn finish_with(
        &mut self,
        id: RequestId,
        reason: FinishReason,
        mut out: RequestOutput,
        stop_reason: Option<StopReason>,
    ) {
        let Some(mut t) = self.requests.remove(&id) else {
            return;
        };
        t.times.finished = Some(Instant::now());
        let finished = Finished {
            reason,
            num_prompt_tokens: t.num_prompt_tokens,
            num_output_tokens: t.num_output_tokens,
            num_cached_tokens: t.num_cached_tokens,
            times: t.times,
            error: None,
            stop_reason,
        };
        if let Some(name) = &t.adapter {
            crate::metrics::record_lora_request(name, t.num_output_tokens);
        }
        out.finished = Some(finished);
        let _ = t.out.send(out);
    }
}

/// Detokenizes one new token and runs the stop strings; returns (text to emit, the stop string
/// that matched). On the last token (`last`), held-back text is released. The text of a stop
/// token (`stop_token`: it ends the request) is left out unless the request keeps stops, as in
/// vLLM.
fn next_text(
    t: &mut Tracked,
    tok: &Tokenizer,
    token_id: u32,
    last: bool,
    stop_token: bool,
) -> (String, Option<String>) {
    let Some(detok) = t.detok.as_mut() else {
        return (String::new(), None);
    };
    // A token the tokenizer cannot decode yields no text rather than failing the request.
    let mut piece = if stop_token && !t.stop.keeps_stop() {
        String::new()
    } else {
        detok.push(tok, token_id).unwrap_or_default()
    };
    if last {
        piece.push_str(&detok.flush(tok).unwrap_or_default());
    }
    match t.stop.push(&piece) {
        StopCheck::Stopped { text, stop } => (text, Some(stop)),
        StopCheck::Continue(mut text) => {
            if last {
                text.push_str(&t.stop.flush());
            }
            (text, None)
        }
    }
}
