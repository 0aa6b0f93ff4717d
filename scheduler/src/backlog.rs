//! Under VTC, a backlogged adapter (one with requests waiting: a flood) yields step time to
//! adapters with nothing waiting (quiet doctors), whose patients are latency-bound: a flood's
//! requests wait in the queue anyway, a quiet patient's first token waits for the step in flight
//! and then for its own. Two rules keep those steps short:
//! - while a quiet adapter has a request running, backlogged adapters' prefill chunks share at
//!   most `backlog_prefill_percent` of a step's token budget (their decodes are not limited),
//!   so a step beside a flood is not a full budget of its prompts;
//! - a step in which a quiet adapter's prompt finishes carries none of their prefill.
//!
//! With every adapter backlogged (plain overload) neither applies: steps stay full.

use crate::fairness::VirtualCounters;
use crate::output::{ScheduledRequest, SchedulerOutput};
use crate::request::{Request, RequestStatus};
use crate::scheduler::Scheduler;

/// Whether `r`'s adapter has requests waiting besides `r` itself.
pub(crate) fn backlog_besides(vtc: &VirtualCounters, r: &Request) -> bool {
    let own = usize::from(matches!(
        r.status,
        RequestStatus::Waiting | RequestStatus::Preempted
    ));
    vtc.num_waiting(r.tenant()) > own
}

impl Scheduler {
    /// This step's allowance for backlogged adapters' prefill tokens: unlimited under FCFS, at
    /// 100%, or when no adapter with nothing waiting has a request running.
    pub(crate) fn backlog_prefill_allowance(&self) -> usize {
        let percent = self.config.backlog_prefill_percent;
        let Some(vtc) = self.vtc.as_ref().filter(|_| percent < 100) else {
            return usize::MAX;
        };
        let quiet_running = self.running.iter().any(|k| {
            self.requests
                .get(&k.id)
                .is_some_and(|r| vtc.num_waiting(r.tenant()) == 0)
        });
        if quiet_running {
            (self.config.max_num_batched_tokens.saturating_mul(percent) / 100).max(1)
        } else {
            usize::MAX
        }
    }

    /// Keeps short a step in which a request of an adapter with nothing waiting finishes its
    /// prompt (VTC): requests of backlogged adapters keep their decodes but give back their
    /// prefill chunks (to one token each, keeping their blocks; they resume next step). A quiet
    /// doctor's patient then waits for that step's own tokens, not for a full step of a flood's
    /// prompts on top; alone the step would have been as short. Never two steps in a row, so a
    /// backlog's prefills advance at least every other step whatever the quiet traffic. The
    /// deferred tokens are computed next step: on the CPU, where a step costs about its tokens,
    /// the backlog loses only one step's fixed overhead.
    pub(crate) fn defer_backlogged_prefill(
        &mut self,
        token_budget: &mut usize,
        out: &mut SchedulerOutput,
    ) {
        let Some(vtc) = &self.vtc else {
            return;
        };
        if std::mem::take(&mut self.deferred_prefill) {
            return;
        }
        let backlogged = |s: &ScheduledRequest| {
            self.requests
                .get(&s.id)
                .is_some_and(|r| backlog_besides(vtc, r))
        };
        let finishes_prompt = |s: &ScheduledRequest| {
            self.requests.get(&s.id).is_some_and(|r| {
                let left = r.num_tokens().saturating_sub(s.num_computed_tokens);
                left > 1 && s.num_scheduled_tokens == left
            })
        };
        if !out
            .scheduled
            .iter()
            .any(|s| !backlogged(s) && finishes_prompt(s))
        {
            return;
        }
        let chunks: Vec<usize> = (0..out.scheduled.len())
            .filter(|&i| out.scheduled[i].num_scheduled_tokens > 1 && backlogged(&out.scheduled[i]))
            .collect();
        for i in chunks {
            *token_budget += out.scheduled[i].shorten(usize::MAX);
            self.deferred_prefill = true;
        }
    }
}
