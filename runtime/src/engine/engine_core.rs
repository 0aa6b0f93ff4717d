//! [`EngineCore`]: the iteration-level loop `schedule -> execute -> update`, plus the per-request
//! bookkeeping around it (output streams, detokenization, stop strings, aborts).

use std::collections::HashMap;
use std::ops::Deref;
use std::sync::Arc;
use std::time::Instant;

use caduceus_scheduler::{
    AddRequestError, FinishReason, NewRequest, RequestId, RequestUpdate, ScheduledData, Scheduler,
    SchedulerConfig, SchedulerOutput, SchedulerStats,
};

use super::device_slots::SlotFill;
use super::executor::{ExecuteResult, Executor, ExecutorError, SeqSampling};
use super::output::{Finished, OutputSender, RequestOutput, RequestTimes};
use super::request::{EngineRequest, RequestError, RequestLimits};
use super::stop::{StopCheck, StopStrings};
use crate::adapters::{
    AdapterEntry, AdapterLoader, AdapterService, LoadDone, LoadedAdapter, StepGate,
};
use crate::kv_events::KvEventSink;
use crate::model::{LlamaModel, LoraStack};
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
    /// The adapter slots could not be allocated.
    #[error("adapter slots: {0}")]
    Lora(#[from] caduceus_kernels::lora::LoraError),
    /// The adapter loader thread could not start.
    #[error("adapter loader thread: {0}")]
    Loader(#[from] std::io::Error),
}

/// A request the engine is serving: where its output goes and how text is produced.
struct Tracked {
    out: OutputSender,
    detok: Option<IncrementalDetokenizer>,
    stop: StopStrings,
    num_prompt_tokens: usize,
    num_output_tokens: usize,
    num_cached_tokens: usize,
    times: RequestTimes,
    adapter: Option<Arc<str>>,
}

/// The engine's side of adapter residency: the shared service, the loader thread and the
/// requests parked until their adapter is in host memory.
struct EngineAdapters {
    service: Arc<AdapterService>,
    loader: AdapterLoader,
    /// Holds the loader during steps when the compute threads take every core.
    step_gate: Option<StepGate>,
    /// Requests waiting for a disk load, with the registry entry they named.
    parked: HashMap<RequestId, (EngineRequest, AdapterEntry)>,
    /// The adapter names last published in the info gauge (running, waiting).
    published: (Vec<Arc<str>>, Vec<Arc<str>>),
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
pub struct EngineCore<M> {
    scheduler: Scheduler,
    executor: Executor<M>,
    tokenizer: Option<Arc<Tokenizer>>,
    eos_ids: Vec<u32>,
    limits: RequestLimits,
    requests: HashMap<RequestId, Tracked>,
    next_arrival: u64,
    config: SchedulerConfig,
    adapters: Option<EngineAdapters>,
    kv_events: Option<KvEventSink>,
}

impl<M: Deref<Target = LlamaModel>> EngineCore<M> {
    /// An engine over `model` with a KV pool of `config.num_blocks` blocks. Without a tokenizer
    /// only token-level requests (`detokenize = false`, no stop strings) are accepted.
    pub fn new(
        model: M,
        tokenizer: Option<Arc<Tokenizer>>,
        eos_ids: Vec<u32>,
        config: SchedulerConfig,
    ) -> Result<Self, EngineError> {
        let scheduler = Scheduler::new(config.clone())?;
        let limits = RequestLimits {
            max_model_len: config.max_model_len,
            vocab_size: model.config().vocab_size,
            block_size: config.block_size,
            usable_blocks: config.num_blocks.saturating_sub(1),
            has_tokenizer: tokenizer.is_some(),
        };
        Ok(EngineCore {
            scheduler,
            executor: Executor::new(model, config.num_blocks, config.block_size),
            tokenizer,
            eos_ids,
            limits,
            requests: HashMap::new(),
            next_arrival: 0,
            config,
            adapters: None,
            kv_events: None,
        })
    }

    /// Serves the adapters of `service`: allocates its `max_loras` slots (ranks up to its
    /// `max_lora_rank`, stored as its `dtype`), sets the scheduler's distinct-adapter limit to the
    /// slot count and starts the loader thread. Call before adding requests.
    pub fn with_adapters(mut self, service: Arc<AdapterService>) -> Result<Self, EngineError> {
        let settings = service.settings().clone();
        let dtype = settings.dtype;
        let stack = LoraStack::new(
            self.executor.model().config(),
            settings.max_loras,
            settings.limits.max_rank,
            dtype,
        )?;
        tracing::info!(
            slots = settings.max_loras,
            max_rank = settings.limits.max_rank,
            dtype = ?dtype,
            mib = stack.nbytes() / (1 << 20),
            "adapter slots allocated"
        );
        self.executor.set_lora(stack);
        self.config.max_loras = Some(settings.max_loras);
        self.scheduler = Scheduler::new(self.config.clone())?;
        if self.kv_events.is_some() {
            self.scheduler.enable_kv_cache_events();
        }
        let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
        let step_gate = StepGate::new(
            service.loader_gate(),
            settings.loader_share_percent,
            rayon::current_num_threads(),
            cores,
        );
        if step_gate.is_some() {
            tracing::info!(
                share_percent = settings.loader_share_percent,
                cores,
                "compute threads take every core: the adapter loader runs between steps"
            );
        }
        self.adapters = Some(EngineAdapters {
            loader: AdapterLoader::spawn(service.clone())?,
            step_gate,
            service,
            parked: HashMap::new(),
            published: Default::default(),
        });
        crate::metrics::record_lora_slots(settings.max_loras, 0);
        Ok(self)
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

    /// The scheduler's limits (block size and pool size included).
    pub fn scheduler_config(&self) -> &SchedulerConfig {
        &self.config
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
            detok: req
                .detokenize
                .then(|| IncrementalDetokenizer::new(&req.prompt_token_ids, true)),
            stop: StopStrings::new(req.stop.clone()),
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
            })
            .map_err(|e| match e {
                AddRequestError::ExceedsKvPool {
                    needed_blocks,
                    usable_blocks,
                } => RequestError::ExceedsKvPool {
                    needed_blocks,
                    usable_blocks,
                },
                AddRequestError::TooLong {
                    prompt_tokens,
                    max_tokens,
                    max_model_len,
                } => RequestError::TooLong {
                    prompt_tokens,
                    max_tokens,
                    max_model_len,
                },
                AddRequestError::EmptyPrompt => RequestError::EmptyPrompt,
                AddRequestError::ZeroMaxTokens => RequestError::ZeroMaxTokens,
                AddRequestError::DuplicateId(id) => RequestError::DuplicateId(id.0),
            })?;
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
            },
        );
        Ok(())
    }

    /// Admits the requests parked on loads that finished; fails those whose load failed.
    fn poll_adapter_loads(&mut self) {
        let Some(a) = self.adapters.as_mut() else {
            return;
        };
        let done = a.loader.poll();
        for d in done {
            self.on_load_done(d);
        }
    }

    fn on_load_done(&mut self, d: LoadDone) {
        let Some(a) = self.adapters.as_mut() else {
            return;
        };
        let waiting: Vec<RequestId> = a
            .parked
            .iter()
            .filter(|(_, (_, e))| e.name == d.entry.name && e.version == d.entry.version)
            .map(|(&id, _)| id)
            .collect();
        match &d.result {
            Ok(_) => {
                crate::metrics::record_lora_disk_load(d.elapsed);
                tracing::info!(
                    adapter = %d.entry.name,
                    ms = d.elapsed.as_secs_f64() * 1e3,
                    waiting = waiting.len(),
                    "adapter loaded from disk"
                );
            }
            Err(e) => {
                crate::metrics::record_lora_load_failure(&d.entry.name);
                tracing::warn!(adapter = %d.entry.name, error = %e, "adapter could not be loaded");
            }
        }
        for id in waiting {
            let Some((req, _)) = self.adapters.as_mut().and_then(|a| a.parked.remove(&id)) else {
                continue;
            };
            let admitted = match &d.result {
                Ok(adapter) => self
                    .admit(id, req, Some(adapter.clone()))
                    .map_err(|e| e.to_string()),
                Err(e) => Err(format!(
                    "adapter `{}` could not be loaded: {}",
                    d.entry.name,
                    self.redact_adapter_paths(&e.to_string())
                )),
            };
            if let Err(message) = admitted {
                self.finish_failed(id, message);
            }
        }
    }

    /// An adapter error without the server's paths, for the client.
    fn redact_adapter_paths(&self, message: &str) -> String {
        match &self.adapters {
            Some(a) => a.service.registry().redact(message),
            None => message.to_owned(),
        }
    }

    /// Ends a request that never ran with an error its caller sees.
    fn finish_failed(&mut self, id: RequestId, message: String) {
        if let Some(t) = self.requests.remove(&id) {
            let _ = t.out.send(RequestOutput::failed_with(
                FinishReason::Error,
                Some(message),
            ));
        }
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

    /// Changes the share of each step's time lent to the adapter loader where it runs between
    /// steps (no effect otherwise). 0 holds the loader during this engine's steps without lending
    /// it time: a benchmark's twin engine, stepped in turn with one that lends.
    pub fn set_loader_share_percent(&mut self, percent: u32) {
        if let Some(g) = self.adapters.as_mut().and_then(|a| a.step_gate.as_mut()) {
            g.set_share_percent(percent);
        }
    }

    /// Whether the adapter loader runs between this engine's steps (see [`crate::adapters::gate`]).
    pub fn slices_loader(&self) -> bool {
        self.adapters
            .as_ref()
            .is_some_and(|a| a.step_gate.is_some())
    }

    /// Queues a background load of the registered adapter `name` (what a request on a cold
    /// adapter triggers, without the request); false if it is unknown or already loading.
    pub fn prefetch_adapter(&mut self, name: &str) -> bool {
        let Some(a) = self.adapters.as_mut() else {
            return false;
        };
        let Some(entry) = a.service.registry().get(name) else {
            return false;
        };
        a.loader.request(&entry)
    }

    /// One iteration: schedule, run the model, apply the sampled tokens, stream the outputs.
    pub fn step(&mut self) -> Result<StepStats, EngineError> {
        self.poll_adapter_loads();
        self.abort_disconnected();
        let sched = self.scheduler.schedule();
        self.note_scheduled(&sched);
        let gate = self.adapters.as_ref().and_then(|a| a.step_gate.as_ref());
        let result = match gate {
            Some(g) if sched.total_num_scheduled_tokens > 0 => {
                g.around(|| self.executor.execute(&sched))
            }
            _ => self.executor.execute(&sched),
        }?;
        self.note_slot_fills(&result.slot_fills);
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

    /// Waits up to `timeout` for an adapter load to finish and applies it; for a caller whose
    /// only unfinished requests are parked (nothing can be scheduled until a load lands).
    pub fn wait_for_adapter_load(&mut self, timeout: std::time::Duration) {
        let Some(a) = self.adapters.as_mut() else {
            return;
        };
        if let Some(d) = a.loader.wait(timeout) {
            self.on_load_done(d);
        }
    }

    fn note_slot_fills(&mut self, fills: &[SlotFill]) {
        let Some(a) = &mut self.adapters else {
            return;
        };
        for fill in fills {
            crate::metrics::record_lora_slot_fill(*fill);
        }
        if !fills.is_empty() {
            crate::metrics::record_lora_slots(
                a.service.settings().max_loras,
                self.executor.num_resident_adapters(),
            );
        }
    }

    /// Publishes the running and waiting adapter names when they change (the gateway's info
    /// gauge), after the step's finishes so an idle engine shows none.
    fn publish_adapter_info(&mut self) {
        let Some(a) = &mut self.adapters else {
            return;
        };
        let mut running: Vec<Arc<str>> = Vec::new();
        let mut waiting: Vec<Arc<str>> = Vec::new();
        for t in self.requests.values() {
            if let Some(name) = &t.adapter {
                let list = if t.times.first_scheduled.is_some() {
                    &mut running
                } else {
                    &mut waiting
                };
                list.push(name.clone());
            }
        }
        for list in [&mut running, &mut waiting] {
            list.sort();
            list.dedup();
        }
        if a.published != (running.clone(), waiting.clone()) {
            crate::metrics::record_lora_info(a.service.settings().max_loras, &running, &waiting);
            a.published = (running, waiting);
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
            let sampled = result.samples.remove(&u.id).unwrap_or(SampledToken {
                token_id: u.new_token_id,
                logprob: None,
                top_logprobs: Vec::new(),
            });
            t.num_output_tokens += 1;
            t.times.first_token.get_or_insert(now);
            let (text, stopped) = self
                .tokenizer
                .as_deref()
                .map_or((String::new(), false), |tok| {
                    next_text(t, tok, u.new_token_id, u.finish_reason.is_some())
                });
            let reason = if stopped {
                self.scheduler.finish_request(u.id, FinishReason::Stop);
                Some(FinishReason::Stop)
            } else {
                u.finish_reason
            };
            match reason {
                Some(reason) => {
                    num_finished += 1;
                    self.finish_with(u.id, reason, vec![sampled], text);
                }
                None => {
                    let _ = t.out.send(RequestOutput {
                        new_tokens: vec![sampled],
                        text,
                        finished: None,
                    });
                }
            }
        }
        num_finished
    }

    fn finish(&mut self, id: RequestId, reason: FinishReason, text: String) {
        self.finish_with(id, reason, Vec::new(), text);
    }

    /// Sends the final output of a request and forgets it.
    fn finish_with(
        &mut self,
        id: RequestId,
        reason: FinishReason,
        new_tokens: Vec<SampledToken>,
        text: String,
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
        };
        if let Some(name) = &t.adapter {
            crate::metrics::record_lora_request(name, t.num_output_tokens);
        }
        let _ = t.out.send(RequestOutput {
            new_tokens,
            text,
            finished: Some(finished),
        });
    }
}

/// Detokenizes one new token and runs the stop strings; returns (text to emit, stop matched).
/// On the last token (`last`), held-back text is released.
fn next_text(t: &mut Tracked, tok: &Tokenizer, token_id: u32, last: bool) -> (String, bool) {
    let Some(detok) = t.detok.as_mut() else {
        return (String::new(), false);
    };
    // A token the tokenizer cannot decode yields no text rather than failing the request.
    let mut piece = detok.push(tok, token_id).unwrap_or_default();
    if last {
        piece.push_str(&detok.flush(tok).unwrap_or_default());
    }
    match t.stop.push(&piece) {
        StopCheck::Stopped(text) => (text, true),
        StopCheck::Continue(mut text) => {
            if last {
                text.push_str(&t.stop.flush());
            }
            (text, false)
        }
    }
}
