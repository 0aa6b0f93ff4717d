//! Applying the executor's answer to the step the scheduler last handed out.

use crate::fairness::{Tenant, VTC_OUTPUT_WEIGHT};
use crate::ids::RequestId;
use crate::output::{RequestUpdate, SchedulerOutput, StepOutput};
use crate::queue::QueueKey;
use crate::request::{FinishReason, Request, RequestStatus};
use crate::scheduler::Scheduler;

/// Per-call scratch of `update`.
#[derive(Default)]
struct Applied {
    updates: Vec<RequestUpdate>,
    finished: Vec<QueueKey>,
}

impl Scheduler {
    /// Advances every scheduled request that is still running by its scheduled tokens (prefill
    /// chunks that sampled nothing included) and caches its newly full blocks; then appends each
    /// sampled token, checks stop conditions and frees finished requests.
    ///
    /// Entries that no longer match (the request finished or was aborted after `schedule()`, a
    /// stale or repeated `sched`, a token for a request that did not reach its end) are ignored.
    pub fn update(&mut self, sched: &SchedulerOutput, step: &StepOutput) -> Vec<RequestUpdate> {
        let mut applied = Applied {
            updates: Vec::with_capacity(step.sampled.len()),
            finished: Vec::new(),
        };
        // Executors usually return tokens in batch order: pair them up on the way through, so
        // each request is looked up once. Any other order falls back to a lookup per token.
        let mut next_sample = 0;
        for s in &sched.scheduled {
            let token = match step.sampled.get(next_sample) {
                Some(&(id, token)) if id == s.id => {
                    next_sample += 1;
                    Some(token)
                }
                _ => None,
            };
            let Some(req) = self.requests.get_mut(&s.id) else {
                continue;
            };
            if req.status != RequestStatus::Running
                || req.num_computed_tokens != s.num_computed_tokens
            {
                continue;
            }
            req.num_computed_tokens =
                (req.num_computed_tokens + s.num_scheduled_tokens).min(req.num_tokens());
            self.kv.cache_full_blocks(req);
            if let Some(token) = token {
                let tenant = req.tenant();
                let outcome = apply_sample(req, token, self.config.max_model_len);
                self.charge_output(tenant, &outcome);
                self.record(s.id, token, outcome, &mut applied);
            }
        }
        for &(id, token) in &step.sampled[next_sample..] {
            if let Some(req) = self.requests.get_mut(&id) {
                let tenant = req.tenant();
                let outcome = apply_sample(req, token, self.config.max_model_len);
                self.charge_output(tenant, &outcome);
                self.record(id, token, outcome, &mut applied);
            }
        }
        self.remove_from_running(&mut applied.finished);
        applied.updates
    }

    /// Counts an accepted output token towards its adapter's VTC service.
    fn charge_output(&mut self, tenant: Tenant, outcome: &Option<Option<FinishReason>>) {
        if let (Some(vtc), Some(_)) = (&mut self.vtc, outcome) {
            vtc.charge(tenant, 1, VTC_OUTPUT_WEIGHT);
        }
    }

    fn record(
        &mut self,
        id: RequestId,
        token: u32,
        outcome: Option<Option<FinishReason>>,
        applied: &mut Applied,
    ) {
        let Some(finish_reason) = outcome else {
            return;
        };
        if let Some(reason) = finish_reason {
            if let Some(req) = self.requests.get(&id) {
                applied.finished.push(req.queue_key());
            }
            self.retire(id, reason);
        }
        applied.updates.push(RequestUpdate {
            id,
            new_token_id: token,
            finish_reason,
        });
    }

    /// Drops `keys` from the sorted running list in one pass.
    fn remove_from_running(&mut self, keys: &mut [QueueKey]) {
        if keys.is_empty() {
            return;
        }
        keys.sort_unstable();
        let mut next = 0;
        self.running.retain(|k| {
            while next < keys.len() && keys[next] < *k {
                next += 1;
            }
            !(next < keys.len() && keys[next] == *k)
        });
    }
}

/// Appends a sampled token to a running request that has computed all its tokens. `None` if
/// the token is not for this step; otherwise whether it finished the request.
fn apply_sample(
    req: &mut Request,
    token: u32,
    max_model_len: usize,
) -> Option<Option<FinishReason>> {
    if req.status != RequestStatus::Running || req.num_computed_tokens != req.num_tokens() {
        return None;
    }
    req.append_output_token(token);
    Some(req.check_stop(max_model_len))
}
