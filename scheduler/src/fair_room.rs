//! Room for under-served adapters (VTC only). Ordering the queue is not enough once a flooded
//! adapter's running requests hold every seat or KV block: they would keep them until they
//! finish, and a quiet doctor's patient would wait for whole generations. So when a waiting
//! request finds no room, and its adapter would still be within its fair share of the running
//! set with it (`fair_share.rs`: seats and blocks, divided max-min fairly by demand), room is
//! taken from an adapter above its share that has received at least as much service: that
//! adapter's latest running request is preempted by recompute (its full blocks stay cached) and
//! waits again at its own place in the queue, not in front, so it cannot take the room straight
//! back.

use crate::fx::FxHashMap;
use crate::ids::RequestId;
use crate::output::SchedulerOutput;
use crate::queue::QueueKey;
use crate::schedule::{Requeue, Shortage};
use crate::scheduler::Scheduler;

/// At most this many requests are preempted for fairness in one step, so a burst of quiet
/// arrivals costs the flood a bounded amount of recompute per step.
pub(crate) const MAX_FAIR_PREEMPTIONS_PER_STEP: usize = 4;

/// What `make_fair_room` could do for a waiting request.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum FairRoom {
    /// A running request was preempted: try the admission again.
    Made,
    /// Its adapter already holds its fair share: it waits, others may still fit.
    OverShare,
    /// Nothing can be done this step.
    Unavailable,
}

impl Scheduler {
    /// Tries to free room for waiting request `key`, which lacked `shortage`. Never preempts a
    /// request of higher priority (lower value) than `key`'s, nor one admitted in this step.
    pub(crate) fn make_fair_room(
        &mut self,
        key: QueueKey,
        shortage: Shortage,
        token_budget: &mut usize,
        out: &mut SchedulerOutput,
        admitted: &[QueueKey],
        preempted: &mut usize,
    ) -> FairRoom {
        // More blocks or seats do not give a step more tokens.
        if shortage == Shortage::Budget {
            return FairRoom::Unavailable;
        }
        let victim = match self.fair_victim(key, admitted) {
            Ok(_) if *preempted >= MAX_FAIR_PREEMPTIONS_PER_STEP => return FairRoom::Unavailable,
            Ok(victim) => victim,
            Err(why) => return why,
        };
        if let Some(pos) = out.scheduled.iter().position(|s| s.id == victim.id) {
            *token_budget += out.scheduled.remove(pos).num_scheduled_tokens;
        }
        self.preempt(victim, Requeue::InOrder, out);
        *preempted += 1;
        FairRoom::Made
    }

    /// Gives waiting request `key` up to `wanted` more tokens of this step's budget by shortening
    /// prefill chunks already scheduled for running requests of adapters later in service order
    /// (`FairShares::rank`; each keeps at least one token, and its blocks: it resumes next step
    /// where it stopped).
    /// Without it a quiet adapter's prompt would trickle in behind a flood's ongoing prefills.
    pub(crate) fn yield_budget(
        &mut self,
        key: QueueKey,
        wanted: usize,
        token_budget: &mut usize,
        out: &mut SchedulerOutput,
        admitted: &[QueueKey],
    ) {
        let Some(vtc) = &self.vtc else {
            return;
        };
        let Some(r) = self.requests.get(&key.id) else {
            return;
        };
        let shares = self.fair_shares(admitted);
        let floor = (!self.fits_share(&shares, r), vtc.counter(r.tenant()));
        let ranks: FxHashMap<RequestId, (bool, u64)> = self
            .running_ranks()
            .into_iter()
            .map(|(k, rank)| (k.id, rank))
            .collect();
        let mut left = wanted;
        // Latest-scheduled chunks first: the most-served adapters come last in service order.
        for s in out.scheduled.iter_mut().rev() {
            if left == 0 {
                break;
            }
            let (Some(r), Some(&rank)) = (self.requests.get(&s.id), ranks.get(&s.id)) else {
                continue;
            };
            if s.num_scheduled_tokens <= 1
                || r.priority < key.priority
                || rank <= floor
                || !matches!(s.data, crate::output::ScheduledData::Cached { .. })
            {
                continue;
            }
            let give = s.shorten(left);
            *token_budget += give;
            left -= give;
        }
    }

    /// The running request to preempt for `key`, if its adapter is under its fair share and
    /// another is over its own without having received less service: that adapter's last
    /// running request. Otherwise why not (`OverShare` or `Unavailable`).
    fn fair_victim(&self, key: QueueKey, admitted: &[QueueKey]) -> Result<QueueKey, FairRoom> {
        let vtc = self.vtc.as_ref().ok_or(FairRoom::Unavailable)?;
        let tenant_of = |k: &QueueKey| self.requests.get(&k.id).map(|r| r.tenant());
        let waiting = self.requests.get(&key.id).ok_or(FairRoom::Unavailable)?;
        let candidate = waiting.tenant();
        let shares = self.fair_shares(admitted);
        // Only room that keeps the waiting request's adapter within its own share is taken, so
        // it can never become the next victim and hand the room back (no ping-pong).
        if !self.fits_share(&shares, waiting) {
            return Err(FairRoom::OverShare);
        }
        // Arrivals are lifted to the backlog's smallest counter, so a quiet adapter often ties
        // with the flood: the share decides then.
        let floor = vtc.counter(candidate);
        let over = shares
            .loads
            .iter()
            .filter(|&(&t, _)| t != candidate && shares.is_over(t) && vtc.counter(t) >= floor)
            .max_by_key(|&(&t, l)| (vtc.counter(t), l.blocks));
        let (&victim_tenant, _) = over.ok_or(FairRoom::Unavailable)?;
        self.running
            .iter()
            .rev()
            .find(|k| k.priority >= key.priority && tenant_of(k) == Some(victim_tenant))
            .copied()
            .ok_or(FairRoom::Unavailable)
    }
}
