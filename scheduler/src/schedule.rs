//! One scheduling step. A single token budget is walked by running requests first (each catches
//! its `num_computed_tokens` up: one token for a decode, the next chunk for a prefill), then by
//! waiting requests in service order. Chunked prefill, prefix hits and decode all fall out of that.

use crate::block_pool::Evict;
use crate::chunk::{chunk_for, Allowances};
use crate::fair_order::FairAdmission;
use crate::fairness::VTC_PROMPT_WEIGHT;
use crate::output::{ScheduledData, ScheduledRequest, SchedulerOutput};
use crate::queue::{merge_sorted, QueueKey};
use crate::request::RequestStatus;
use crate::scheduler::Scheduler;

impl Scheduler {
    /// Decides the next step. Running requests keep their blocks unless the pool runs dry, in
    /// which case the lowest-priority running requests are preempted by recompute; waiting
    /// requests are admitted only in steps without preemption.
    pub fn schedule(&mut self) -> SchedulerOutput {
        self.step += 1;
        let mut out = SchedulerOutput {
            step: self.step,
            scheduled: Vec::with_capacity(self.running.len() + 8),
            finished_ids: self.finished.drain(..).map(|(id, _)| id).collect(),
            ..SchedulerOutput::default()
        };
        self.fair_levels = self.compute_fair_levels();
        self.allowances = Allowances {
            backlog_prefill: self.backlog_prefill_allowance(),
            scored_prompt: self.max_scored_tokens,
        };
        let mut token_budget = self.config.max_num_batched_tokens;
        self.schedule_running(&mut token_budget, &mut out);
        // Admitting now would only take blocks the running requests just proved they need.
        if out.preempted_ids.is_empty() {
            self.schedule_waiting(&mut token_budget, &mut out);
        }
        self.defer_backlogged_prefill(&mut token_budget, &mut out);
        out.total_num_scheduled_tokens = self.config.max_num_batched_tokens - token_budget;
        out
    }

    /// Schedules running requests in service order while the budget lasts. When a request cannot
    /// get blocks, the last request of that order is preempted, possibly the request itself, and
    /// allocation is retried. The order is `running`'s (priority, then arrival) under FCFS; under
    /// VTC, within a priority, requests within their adapter's fair share go first (by arrival),
    /// then surplus ones by counter (`service_order`), so a flood's running requests are the ones
    /// preempted and the last to get budget. Either way a victim is never a request already scheduled in this step.
    fn schedule_running(&mut self, token_budget: &mut usize, out: &mut SchedulerOutput) {
        let mut order = self.service_order();
        let mut i = 0;
        while i < order.len() && *token_budget > 0 {
            let (key, evict) = order[i];
            let id = key.id;
            let Some(req) = self.requests.get_mut(&id) else {
                debug_assert!(false, "running request {id:?} has no record");
                order.remove(i);
                continue;
            };
            if req.num_computed_tokens >= req.num_tokens() {
                // The executor never returned the token this request should have sampled:
                // recompute its last position to sample it again.
                req.num_computed_tokens = req.num_tokens() - 1;
            }
            let wanted = req.num_tokens() - req.num_computed_tokens;
            let chunk = chunk_for(
                self.vtc.as_ref(),
                self.allowances,
                req,
                wanted,
                *token_budget,
            );
            if chunk.len == 0 {
                // Past an allowance of this step (a backlogged adapter's prefill, or prompt
                // positions to score): next step.
                i += 1;
                continue;
            }
            // While a surplus request is left to preempt, ordinary free blocks only: a request
            // within its share takes room from the surplus before other adapters' reused
            // prefixes.
            let surplus_left = order
                .last()
                .is_some_and(|&(k, e)| e == Evict::SpareReused && k != key);
            let evict = if surplus_left {
                Evict::SpareReused
            } else {
                evict
            };
            match self.kv.allocate_slots(req, chunk.len, None, evict) {
                Some(new_block_ids) => {
                    out.scheduled.push(ScheduledRequest {
                        id,
                        num_computed_tokens: req.num_computed_tokens,
                        num_scheduled_tokens: chunk.len,
                        data: ScheduledData::Cached { new_block_ids },
                    });
                    self.spend(chunk, token_budget);
                    i += 1;
                }
                // The victim is at index >= i; if it was this request, the loop ends.
                None => {
                    if let Some((victim, _)) = order.pop() {
                        self.preempt(victim, Requeue::Front, out);
                    }
                }
            }
        }
    }

    /// Preempts a running request by recompute: the blocks go back to the pool (full ones stay
    /// cached, so resuming may hit them), progress resets, and the request waits again. The
    /// caller has made sure it is not among this step's scheduled requests.
    pub(crate) fn preempt(&mut self, key: QueueKey, requeue: Requeue, out: &mut SchedulerOutput) {
        if let Ok(pos) = self.running.binary_search(&key) {
            self.running.remove(pos);
        }
        let Some(req) = self.requests.get_mut(&key.id) else {
            return;
        };
        self.kv.free(req);
        req.num_computed_tokens = 0;
        req.status = RequestStatus::Preempted;
        if let Some(adapter) = req.adapter() {
            self.running_adapters.remove(adapter);
        }
        if let Some(vtc) = &mut self.vtc {
            vtc.on_requeue(req.tenant());
        }
        match requeue {
            Requeue::Front => self.waiting.push_front(key),
            Requeue::InOrder => self.waiting.push(key),
        }
        self.num_preemptions += 1;
        out.preempted_ids.push(key.id);
    }

    /// Admits waiting requests until the budget, `max_num_seqs` or the free blocks run out (a
    /// request that cannot get blocks keeps its place). Under FCFS preempted requests go first,
    /// then each priority level by arrival, and running requests are never preempted for a
    /// waiting one; under VTC see `fair_order.rs` and `fair_room.rs`.
    fn schedule_waiting(&mut self, token_budget: &mut usize, out: &mut SchedulerOutput) {
        let waiting = std::mem::take(&mut self.waiting);
        let mut admitted: Vec<QueueKey> = Vec::new();
        if self.vtc.is_some() {
            let mut step = FairAdmission {
                token_budget,
                out,
                admitted: &mut admitted,
                preempted: 0,
            };
            self.admit_fair(&waiting, &mut step);
        } else {
            for key in waiting.iter() {
                match self.try_admit(key, token_budget, out, &mut admitted, Evict::Any) {
                    Admission::Admitted | Admission::Skipped => {}
                    Admission::Stop | Admission::NoRoom(_) => break,
                }
            }
        }
        // Requests preempted to make room went into the (empty) stand-in queue.
        let requeued = std::mem::replace(&mut self.waiting, waiting);
        self.waiting.remove_all(&admitted);
        self.waiting.append(requeued);
        merge_sorted(&mut self.running, &mut admitted);
    }

    /// Tries to admit one waiting request, evicting only the free blocks `evict` allows. A
    /// request whose adapter would exceed `max_loras` is skipped, unless it has aged: then
    /// admission stops so running adapters drain and free a slot for it.
    pub(crate) fn try_admit(
        &mut self,
        key: QueueKey,
        token_budget: &mut usize,
        out: &mut SchedulerOutput,
        admitted: &mut Vec<QueueKey>,
        evict: Evict,
    ) -> Admission {
        if *token_budget == 0 {
            return Admission::NoRoom(Shortage::Budget);
        }
        if self.running.len() + admitted.len() >= self.config.max_num_seqs {
            return Admission::NoRoom(Shortage::Seats);
        }
        let Some(req) = self.requests.get_mut(&key.id) else {
            debug_assert!(false, "waiting request {:?} has no record", key.id);
            return Admission::Skipped;
        };
        let adapter = req.adapter();
        if let (Some(adapter), Some(max_loras)) = (adapter, self.config.max_loras) {
            if !self.running_adapters.contains(adapter)
                && self.running_adapters.num_distinct() >= max_loras
            {
                if req.num_adapter_skips >= self.config.adapter_aging_steps {
                    return Admission::Stop;
                }
                req.num_adapter_skips = req.num_adapter_skips.saturating_add(1);
                return Admission::Skipped;
            }
        }
        let computed = self.kv.get_computed_blocks(req);
        let chunk = chunk_for(
            self.vtc.as_ref(),
            self.allowances,
            req,
            req.num_tokens() - computed.num_computed_tokens,
            *token_budget,
        );
        if chunk.len == 0 {
            // Past an allowance of this step (see `chunk.rs`).
            return Admission::Skipped;
        }
        if self
            .kv
            .allocate_slots(req, chunk.len, Some(&computed), evict)
            .is_none()
        {
            return Admission::NoRoom(Shortage::Blocks);
        }
        if let Some(vtc) = &mut self.vtc {
            vtc.on_leave_queue(req.tenant());
            // Prompt tokens are charged once; a preempted request's recompute is not its doing.
            if req.status == RequestStatus::Waiting {
                vtc.charge(req.tenant(), req.num_prompt_tokens, VTC_PROMPT_WEIGHT);
            }
        }
        req.num_computed_tokens = computed.num_computed_tokens;
        req.status = RequestStatus::Running;
        req.num_adapter_skips = 0;
        if let Some(adapter) = adapter {
            self.running_adapters.add(adapter);
        }
        out.scheduled.push(ScheduledRequest {
            id: key.id,
            num_computed_tokens: req.num_computed_tokens,
            num_scheduled_tokens: chunk.len,
            data: ScheduledData::New {
                token_ids: req.token_ids.clone(),
                num_prompt_tokens: req.num_prompt_tokens,
                block_ids: req.block_table.clone(),
                adapter,
            },
        });
        self.spend(chunk, token_budget);
        admitted.push(key);
        Admission::Admitted
    }
}

/// What became of one waiting request in `try_admit`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Admission {
    Admitted,
    /// Passed over (its adapter does not fit `max_loras` now); later requests may still run.
    Skipped,
    /// Nothing more is admitted this step: an aged request waits for an adapter slot to drain.
    Stop,
    /// Nothing more fits this step (under VTC, room may be taken from an over-served adapter).
    NoRoom(Shortage),
}

/// What a waiting request lacked.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Shortage {
    /// The step's token budget is spent.
    Budget,
    /// `max_num_seqs` requests are running.
    Seats,
    /// The pool cannot hold its next chunk.
    Blocks,
}

/// Where a preempted request waits.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Requeue {
    /// In front of everything (preempted for blocks: it already spent compute).
    Front,
    /// At its own place by priority and arrival (preempted to make room for an under-served
    /// adapter: going in front would take that room straight back).
    InOrder,
}
