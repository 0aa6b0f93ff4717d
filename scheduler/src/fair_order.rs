//! Service order under VTC fairness (see `fairness.rs`). Adapters are ranked by whether they
//! hold more than their max-min fair share of the running set (`fair_share.rs`), then by their
//! virtual counter. Waiting requests: each priority level in turn, where the best-ranked adapter
//! sends its next request (its preempted ones first, then by arrival); ranks change as requests
//! are admitted, so the order is decided one admission at a time. A request that finds no room
//! may take it from an over-served adapter (`fair_room.rs`). Running requests: by priority, then
//! rank, so adapters within their share get the step's budget first (a quiet adapter's prompt,
//! charged in full at admission, is not left to trickle in behind a flood's prefills) and the
//! flood's requests are preempted first.

use crate::block_pool::Evict;
use crate::fair_room::FairRoom;
use crate::fair_share::eviction;
use crate::fairness::Tenant;
use crate::fx::FxHashMap;
use crate::output::SchedulerOutput;
use crate::queue::{QueueKey, WaitingQueue};
use crate::schedule::Admission;
use crate::scheduler::Scheduler;
use std::collections::BTreeMap;

/// One tenant's waiting requests at one priority, in service order.
struct TenantQueue {
    tenant: Tenant,
    keys: Vec<QueueKey>,
    /// Index of the next request to offer.
    next: usize,
    /// Its head was passed over for `max_loras`: the rest share the adapter, so stop offering.
    skipped: bool,
}

/// Per-step state of VTC admission.
pub(crate) struct FairAdmission<'a> {
    pub token_budget: &'a mut usize,
    pub out: &'a mut SchedulerOutput,
    pub admitted: &'a mut Vec<QueueKey>,
    /// Requests preempted for fairness so far in this step.
    pub preempted: usize,
}

impl Scheduler {
    /// Running requests in the order a step serves them: `running` itself under FCFS; under VTC
    /// by priority, then requests within their adapter's fair share (by arrival) before surplus
    /// ones (by the adapter's counter, then arrival; see `running_ranks`). Counters alone are not
    /// enough: a quiet adapter is charged its whole prompt at admission, so behind a flood's
    /// ongoing prefills the rest of that prompt would trickle in over many steps, and it would
    /// be the first preempted when the pool runs dry.
    /// Each comes with the eviction its blocks may use: a surplus request's growth may not evict
    /// other adapters' reused prefixes, as its admission could not (`admit_level`).
    pub(crate) fn service_order(&self) -> Vec<(QueueKey, Evict)> {
        if self.vtc.is_none() {
            return self.running.iter().map(|&k| (k, Evict::Any)).collect();
        }
        let mut ranked = self.running_ranks();
        ranked.sort_unstable_by_key(|&(k, rank)| (k.priority, rank, k));
        ranked
            .into_iter()
            .map(|(k, (surplus, _))| (k, eviction(!surplus)))
            .collect()
    }

    /// Admits from `waiting` in VTC order until nothing more fits.
    pub(crate) fn admit_fair(&mut self, waiting: &WaitingQueue, step: &mut FairAdmission) {
        let mut levels: BTreeMap<i32, (Vec<TenantQueue>, FxHashMap<Tenant, usize>)> =
            BTreeMap::new();
        for key in waiting.iter() {
            let Some(tenant) = self.requests.get(&key.id).map(|r| r.tenant()) else {
                debug_assert!(false, "waiting request {:?} has no record", key.id);
                continue;
            };
            let (level, index) = levels.entry(key.priority).or_default();
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
        for (level, _) in levels.values_mut() {
            if !self.admit_level(level, step) {
                return;
            }
        }
    }

    /// Offers one priority level's requests in `FairShares::rank` order: adapters within their
    /// share of the running set first, then the least-served (ties: earliest head).
    /// False when admission stopped for this step.
    fn admit_level(&mut self, level: &mut [TenantQueue], step: &mut FairAdmission) -> bool {
        loop {
            let Some(vtc) = &self.vtc else {
                return false;
            };
            let shares = self.fair_shares(step.admitted);
            let pick = level
                .iter_mut()
                .filter(|q| !q.skipped && q.next < q.keys.len())
                .min_by_key(|q| (shares.rank(vtc, q.tenant), q.keys[q.next]));
            let Some(q) = pick else {
                return true;
            };
            let key = q.keys[q.next];
            let Some(r) = self.requests.get(&key.id) else {
                debug_assert!(false, "waiting request {:?} has no record", key.id);
                q.skipped = true;
                continue;
            };
            let wanted = r.num_tokens() - r.num_computed_tokens;
            // A request past its adapter's share may not evict other adapters' reused prefixes
            // (a quiet doctor's system prompt): it waits for ordinary free blocks instead. One
            // within its share takes room from surplus requests first (preempting them below),
            // and evicts reused prefixes only when none can give way.
            let fits = self.fits_share(&shares, r);
            let surplus_running = shares.loads.keys().any(|&t| shares.is_over(t));
            let mut evict = eviction(fits && !surplus_running);
            if wanted > *step.token_budget {
                let short = wanted - *step.token_budget;
                self.yield_budget(key, short, step.token_budget, step.out, step.admitted);
            }
            let mut outcome =
                self.try_admit(key, step.token_budget, step.out, step.admitted, evict);
            // Room made for `key` is retried for `key` at once: picking again could hand it to
            // the victim's own adapter, whose share just dropped.
            while let Admission::NoRoom(shortage) = outcome {
                match self.make_fair_room(
                    key,
                    shortage,
                    step.token_budget,
                    step.out,
                    step.admitted,
                    &mut step.preempted,
                ) {
                    FairRoom::Made => {}
                    // Its adapter has its share: the next adapter may still be owed room.
                    FairRoom::OverShare => {
                        outcome = Admission::Skipped;
                        break;
                    }
                    FairRoom::Unavailable if fits && evict == Evict::SpareReused => {
                        evict = Evict::Any;
                    }
                    FairRoom::Unavailable => return false,
                }
                outcome = self.try_admit(key, step.token_budget, step.out, step.admitted, evict);
            }
            match outcome {
                Admission::Admitted => q.next += 1,
                Admission::Skipped => q.skipped = true,
                Admission::Stop | Admission::NoRoom(_) => return false,
            }
        }
    }
}
