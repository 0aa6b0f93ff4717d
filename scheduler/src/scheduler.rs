//! The scheduler: owns every live request, the waiting queue, the running set and the KV cache
//! manager. `schedule()` (schedule.rs) decides one step, `update()` (update.rs) applies its
//! result; this file holds construction, admission, finishing and read-only views.
//!
//! Finished requests are forgotten at once (their blocks go back to the pool immediately); only
//! their id and reason are kept until the next `schedule()` reports them in `finished_ids`. Until
//! then `status()` answers `Finished(reason)` and the id cannot be reused; afterwards `None`.

use crate::chunk::Allowances;
use crate::config::{ConfigError, SchedulerConfig};
use crate::fair_share::FairLevels;
use crate::fairness::{Fairness, Tenant, VirtualCounters};
use crate::fx::FxHashMap;
use crate::ids::RequestId;
use crate::kv_cache_manager::KvCacheManager;
use crate::kv_events::KvCacheEvent;
use crate::output::SchedulerStats;
use crate::queue::{AdapterCounts, QueueKey, WaitingQueue};
use crate::request::{AddRequestError, FinishReason, NewRequest, Request, RequestStatus};

#[derive(Clone, Debug)]
pub struct Scheduler {
    pub(crate) config: SchedulerConfig,
    pub(crate) kv: KvCacheManager,
    pub(crate) requests: FxHashMap<RequestId, Request>,
    pub(crate) waiting: WaitingQueue,
    /// Sorted by `QueueKey`: served in this order, and the last one is the preemption victim.
    pub(crate) running: Vec<QueueKey>,
    /// Adapters of running requests, so a step never exceeds `max_loras`.
    pub(crate) running_adapters: AdapterCounts,
    /// Finished since the last `schedule()`, reported by the next one.
    pub(crate) finished: Vec<(RequestId, FinishReason)>,
    pub(crate) step: u64,
    pub(crate) num_preemptions: u64,
    /// Per-adapter service counters; `None` under FCFS.
    pub(crate) vtc: Option<VirtualCounters>,
    /// This step's max-min fair shares of seats and blocks (VTC).
    pub(crate) fair_levels: FairLevels,
    /// The previous step deferred backlogged adapters' prefill chunks (`backlog.rs`).
    pub(crate) deferred_prefill: bool,
    /// What is left of this step's allowances (`chunk.rs`).
    pub(crate) allowances: Allowances,
    /// Prompt positions per step whose logits the backend can keep (0: none, and requests that
    /// score their prompt are refused).
    pub(crate) max_scored_tokens: usize,
}

impl Scheduler {
    pub fn new(config: SchedulerConfig) -> Result<Scheduler, ConfigError> {
        config.validate()?;
        Ok(Scheduler {
            vtc: (config.fairness == Fairness::Vtc).then(VirtualCounters::default),
            fair_levels: FairLevels::default(),
            deferred_prefill: false,
            allowances: Allowances::UNLIMITED,
            max_scored_tokens: 0,
            kv: KvCacheManager::new(
                config.num_blocks,
                config.block_size,
                config.enable_prefix_caching,
            ),
            config,
            requests: FxHashMap::default(),
            waiting: WaitingQueue::default(),
            running: Vec::new(),
            running_adapters: AdapterCounts::default(),
            finished: Vec::new(),
            step: 0,
            num_preemptions: 0,
        })
    }

    pub fn config(&self) -> &SchedulerConfig {
        &self.config
    }

    /// Changes the step token budget from the next step on (at least 1): the engine steers it
    /// toward a target step time when it was not configured.
    pub fn set_max_num_batched_tokens(&mut self, budget: usize) {
        self.config.max_num_batched_tokens = budget.max(1);
    }

    /// Lets requests score their prompt (`NewRequest::scores_prompt`): the backend keeps the
    /// logits of at most `tokens` such prompt positions per step (0 refuses those requests).
    pub fn set_max_scored_tokens(&mut self, tokens: usize) {
        self.max_scored_tokens = tokens;
    }

    /// Prompt positions per step whose logits the backend keeps (see [`Self::set_max_scored_tokens`]).
    pub fn max_scored_tokens(&self) -> usize {
        self.max_scored_tokens
    }

    /// Queues a request. Refuses requests that could never finish, by the one admission rule
    /// ([`AdmissionLimits::check`](crate::AdmissionLimits::check)).
    pub fn add_request(&mut self, req: NewRequest) -> Result<(), AddRequestError> {
        if self.requests.contains_key(&req.id) || self.finished.iter().any(|(id, _)| *id == req.id)
        {
            return Err(AddRequestError::DuplicateId(req.id));
        }
        self.config
            .admission_limits()
            .check(req.prompt_token_ids.len(), req.max_tokens)?;
        if req.scores_prompt && self.max_scored_tokens == 0 {
            return Err(AddRequestError::ScoringUnavailable);
        }
        let seed = self
            .config
            .enable_prefix_caching
            .then_some(self.config.hash_seed);
        let request = Request::new(req, self.config.block_size, seed);
        self.waiting.push(request.queue_key());
        if let Some(vtc) = &mut self.vtc {
            vtc.on_arrival(request.tenant());
        }
        self.requests.insert(request.id, request);
        Ok(())
    }

    /// Ends a request wherever it is (waiting, running, preempted) and frees its blocks now.
    /// Returns false if the id is unknown or already finished. The id is reported in the next
    /// `SchedulerOutput::finished_ids`; a token sampled for it meanwhile is ignored by `update`.
    pub fn finish_request(&mut self, id: RequestId, reason: FinishReason) -> bool {
        let Some(status) = self.requests.get(&id).map(|r| r.status) else {
            return false;
        };
        if status == RequestStatus::Running {
            if let Some(key) = self.requests.get(&id).map(Request::queue_key) {
                if let Ok(pos) = self.running.binary_search(&key) {
                    self.running.remove(pos);
                }
            }
        }
        self.retire(id, reason);
        true
    }

    /// Frees a request's blocks and forgets it, keeping its id for `finished_ids`. The caller
    /// has already taken it out of `running`; a waiting request leaves the queue here.
    pub(crate) fn retire(&mut self, id: RequestId, reason: FinishReason) {
        let Some(mut req) = self.requests.remove(&id) else {
            return;
        };
        match req.status {
            RequestStatus::Running => {
                if let Some(adapter) = req.adapter() {
                    self.running_adapters.remove(adapter);
                }
            }
            RequestStatus::Waiting | RequestStatus::Preempted => {
                self.waiting.remove(&req.queue_key());
                if let Some(vtc) = &mut self.vtc {
                    vtc.on_leave_queue(req.tenant());
                }
            }
            RequestStatus::Finished(_) => {}
        }
        self.kv.free(&mut req);
        self.finished.push((id, reason));
    }

    /// `None` for unknown requests and for finished ones already reported by `schedule()`.
    pub fn status(&self, id: RequestId) -> Option<RequestStatus> {
        if let Some(req) = self.requests.get(&id) {
            return Some(req.status);
        }
        self.finished
            .iter()
            .find(|(f, _)| *f == id)
            .map(|&(_, reason)| RequestStatus::Finished(reason))
    }

    /// Whether any request is waiting or running.
    pub fn has_unfinished(&self) -> bool {
        !self.requests.is_empty()
    }

    /// Whether finished ids are waiting to be reported by the next `schedule()` (an idle engine
    /// can call `schedule()` once more so the executor drops their state).
    pub fn has_finished_to_report(&self) -> bool {
        !self.finished.is_empty()
    }

    pub fn num_waiting(&self) -> usize {
        self.waiting.len()
    }

    pub fn num_running(&self) -> usize {
        self.running.len()
    }

    pub fn stats(&self) -> SchedulerStats {
        let pool = self.kv.block_pool();
        SchedulerStats {
            num_waiting: self.num_waiting(),
            num_running: self.num_running(),
            kv_usage: pool.usage(),
            num_free_blocks: pool.num_free_blocks(),
            num_usable_blocks: pool.num_usable_blocks(),
            prefix_cache_queries: self.kv.prefix_cache_queries(),
            prefix_cache_hits: self.kv.prefix_cache_hits(),
            num_preemptions: self.num_preemptions,
        }
    }

    /// A live request's state (tokens, progress, block table), for tests and diagnostics.
    pub fn request(&self, id: RequestId) -> Option<&Request> {
        self.requests.get(&id)
    }

    /// Running requests in service order.
    pub fn running_ids(&self) -> impl Iterator<Item = RequestId> + '_ {
        self.running.iter().map(|k| k.id)
    }

    /// Waiting requests in service order (preempted ones first).
    pub fn waiting_ids(&self) -> impl Iterator<Item = RequestId> + '_ {
        self.waiting.iter().map(|k| k.id)
    }

    /// An adapter's (`None`: the base model's) weighted service so far under VTC fairness;
    /// `None` under FCFS. For diagnostics and tests.
    pub fn fairness_counter(&self, adapter_id: Option<u32>) -> Option<u64> {
        self.vtc.as_ref().map(|v| v.counter(adapter_id))
    }

    pub fn kv_cache_manager(&self) -> &KvCacheManager {
        &self.kv
    }

    /// Starts recording [`KvCacheEvent`]s for [`Self::take_kv_cache_events`] (for a publisher
    /// that lets a gateway mirror this cache; off by default).
    pub fn enable_kv_cache_events(&mut self) {
        self.kv.block_pool_mut().set_events_enabled(true);
    }

    /// The prefix cache's changes since the last call, oldest first (empty unless enabled).
    pub fn take_kv_cache_events(&mut self) -> Vec<KvCacheEvent> {
        self.kv.block_pool_mut().take_events()
    }

    /// Forgets every cached block when no request holds one; see [`BlockPool::reset_prefix_cache`].
    ///
    /// [`BlockPool::reset_prefix_cache`]: crate::BlockPool::reset_prefix_cache
    pub fn reset_prefix_cache(&mut self) -> bool {
        self.kv.block_pool_mut().reset_prefix_cache()
    }
}

impl Request {
    pub(crate) fn queue_key(&self) -> QueueKey {
        QueueKey {
            priority: self.priority,
            arrival_seq: self.arrival_seq,
            id: self.id,
        }
    }

    /// Whose service this request counts as under VTC fairness.
    pub(crate) fn tenant(&self) -> Tenant {
        self.adapter().map(|a| a.id)
    }
}
