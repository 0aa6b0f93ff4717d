//! Admission order under VTC fairness (see `fairness.rs`): preempted requests first, as under
//! FCFS; then each priority level in turn, where the adapter with the smallest virtual counter
//! sends its earliest request next. Counters grow as requests are admitted, so the order is
//! decided one admission at a time.

use crate::fairness::Tenant;
use crate::fx::FxHashMap;
use crate::output::SchedulerOutput;
use crate::queue::{QueueKey, WaitingQueue};
use crate::schedule::Admission;
use crate::scheduler::Scheduler;

/// One tenant's waiting requests at one priority, in arrival order.
struct TenantQueue {
    tenant: Tenant,
    keys: Vec<QueueKey>,
    /// Index of the next request to offer.
    next: usize,
    /// Its head was passed over for `max_loras`: the rest share the adapter, so stop offering.
    skipped: bool,
}

impl Scheduler {
    /// Admits from `waiting` in VTC order until `try_admit` says stop.
    pub(crate) fn admit_fair(
        &mut self,
        waiting: &WaitingQueue,
        token_budget: &mut usize,
        out: &mut SchedulerOutput,
        admitted: &mut Vec<QueueKey>,
    ) {
        for key in waiting.front_iter() {
            if self.try_admit(key, token_budget, out, admitted) == Admission::Stop {
                return;
            }
        }
        let mut queue = waiting.queue_iter().peekable();
        while let Some(first) = queue.peek().copied() {
            // The queue is sorted by priority first: take one level.
            let mut level: Vec<TenantQueue> = Vec::new();
            let mut index: FxHashMap<Tenant, usize> = FxHashMap::default();
            while let Some(key) = queue.next_if(|k| k.priority == first.priority) {
                let Some(tenant) = self.requests.get(&key.id).map(|r| r.tenant()) else {
                    debug_assert!(false, "waiting request {:?} has no record", key.id);
                    continue;
                };
                let slot = *index.entry(tenant).or_insert_with(|| {
                    level.push(TenantQueue {
                        tenant,
                        keys: Vec::new(),
                        next: 0,
                        skipped: false,
                    });
                    level.len() - 1
                });
                level[slot].keys.push(key);
            }
            if !self.admit_level(&mut level, token_budget, out, admitted) {
                return;
            }
        }
    }

    /// Offers one priority level's requests, least-served tenant first (ties: earliest head).
    /// False when admission stopped for this step.
    fn admit_level(
        &mut self,
        level: &mut [TenantQueue],
        token_budget: &mut usize,
        out: &mut SchedulerOutput,
        admitted: &mut Vec<QueueKey>,
    ) -> bool {
        loop {
            let Some(vtc) = &self.vtc else {
                return false;
            };
            let pick = level
                .iter_mut()
                .filter(|q| !q.skipped && q.next < q.keys.len())
                .min_by_key(|q| (vtc.counter(q.tenant), q.keys[q.next]));
            let Some(q) = pick else {
                return true;
            };
            let key = q.keys[q.next];
            match self.try_admit(key, token_budget, out, admitted) {
                Admission::Admitted => q.next += 1,
                Admission::Skipped => q.skipped = true,
                Admission::Stop => return false,
            }
        }
    }
}
