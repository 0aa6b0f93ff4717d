//! Fair admission across adapters: the Virtual Token Counter (VTC) of "Fairness in Serving Large
//! Language Models" (Sheng et al., OSDI '24). Each tenant (one LoRA adapter; the base model is a
//! tenant of its own) has a counter of the weighted service it received: prompt tokens when a
//! request is first admitted, output tokens as they are sampled. Among waiting requests of the
//! same priority, the tenant with the smallest counter is admitted first, so one doctor's viral
//! burst waits behind the others instead of in front of them.
//!
//! A tenant whose queue was empty is lifted to the smallest counter of the backlogged tenants
//! (or, when nobody waits, to the counter of the last tenant that left the queue) when a request
//! of it arrives: idle time earns no credit, so a tenant cannot save up service and then flood.

use crate::fx::FxHashMap;

/// How waiting requests of equal priority are ordered (`scheduler.fairness`).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum Fairness {
    /// The adapter with the least weighted service goes first (VTC).
    #[default]
    Vtc,
    /// First come, first served, whichever adapter a request is for.
    Fcfs,
}

/// VTC weight of one prompt token (the paper's w_p).
pub const VTC_PROMPT_WEIGHT: u64 = 1;
/// VTC weight of one output token (the paper's w_q): a decoded token costs a step's share of the
/// weights' memory traffic, a prompt token only a slice of one batched matmul.
pub const VTC_OUTPUT_WEIGHT: u64 = 2;

/// A fairness tenant: the adapter id, `None` for the base model. A reloaded adapter (new
/// generation) is the same doctor, so the generation is not part of it.
pub(crate) type Tenant = Option<u32>;

/// The counters, plus how many requests each tenant has waiting (the backlogged set).
#[derive(Clone, Debug, Default)]
pub(crate) struct VirtualCounters {
    counters: FxHashMap<Tenant, u64>,
    /// Only tenants with at least one waiting request have an entry.
    waiting: FxHashMap<Tenant, usize>,
    /// Counter of the tenant that last left the queue, the floor for an arrival into an empty one.
    last_left: u64,
}

impl VirtualCounters {
    pub fn counter(&self, tenant: Tenant) -> u64 {
        self.counters.get(&tenant).copied().unwrap_or(0)
    }

    /// How many requests of `tenant` are waiting.
    pub fn num_waiting(&self, tenant: Tenant) -> usize {
        self.waiting.get(&tenant).copied().unwrap_or(0)
    }

    /// A new request of `tenant` joins the queue; a tenant that was not backlogged is lifted.
    pub fn on_arrival(&mut self, tenant: Tenant) {
        if !self.waiting.contains_key(&tenant) {
            let floor = self
                .waiting
                .keys()
                .map(|&t| self.counter(t))
                .min()
                .unwrap_or(self.last_left);
            let counter = self.counters.entry(tenant).or_insert(0);
            *counter = (*counter).max(floor);
        }
        *self.waiting.entry(tenant).or_insert(0) += 1;
    }

    /// A preempted request goes back to the queue: backlogged again, but not lifted (being
    /// preempted is not idleness).
    pub fn on_requeue(&mut self, tenant: Tenant) {
        *self.waiting.entry(tenant).or_insert(0) += 1;
    }

    /// A request of `tenant` left the queue (admitted, or finished while waiting).
    pub fn on_leave_queue(&mut self, tenant: Tenant) {
        if let Some(n) = self.waiting.get_mut(&tenant) {
            *n -= 1;
            if *n == 0 {
                self.waiting.remove(&tenant);
                self.last_left = self.counter(tenant);
            }
        }
    }

    /// Adds `tokens` of service at `weight` to `tenant`'s counter.
    pub fn charge(&mut self, tenant: Tenant, tokens: usize, weight: u64) {
        let cost = (tokens as u64).saturating_mul(weight);
        let counter = self.counters.entry(tenant).or_insert(0);
        *counter = counter.saturating_add(cost);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn arrivals_are_lifted_to_the_backlog_minimum_and_never_lowered() {
        let mut v = VirtualCounters::default();
        v.on_arrival(Some(1));
        v.on_arrival(Some(2));
        v.charge(Some(1), 10, VTC_PROMPT_WEIGHT);
        v.charge(Some(2), 4, VTC_OUTPUT_WEIGHT);
        assert_eq!((v.counter(Some(1)), v.counter(Some(2))), (10, 8));
        // Idle until now: lifted to min(10, 8), not left at 0.
        v.on_arrival(None);
        assert_eq!(v.counter(None), 8);
        // Already backlogged: a second request changes nothing.
        v.charge(None, 1, VTC_PROMPT_WEIGHT);
        v.on_arrival(None);
        assert_eq!(v.counter(None), 9);
        // Everyone leaves; tenant 1 left last, so an arrival into the empty queue starts there.
        v.on_leave_queue(Some(2));
        v.on_leave_queue(None);
        v.on_leave_queue(None);
        v.on_leave_queue(Some(1));
        v.on_arrival(Some(3));
        assert_eq!(v.counter(Some(3)), 10);
        // A tenant above the floor keeps its own counter.
        v.charge(Some(2), 50, VTC_PROMPT_WEIGHT);
        v.on_arrival(Some(2));
        assert_eq!(v.counter(Some(2)), 58);
    }

    #[test]
    fn an_arrival_behind_a_backlogged_tenant_starts_at_its_counter() {
        let mut v = VirtualCounters::default();
        v.on_arrival(Some(1));
        v.charge(Some(1), 10, VTC_PROMPT_WEIGHT);
        v.on_arrival(Some(2));
        assert_eq!(v.counter(Some(2)), 10);
    }

    #[test]
    fn a_requeued_tenant_is_backlogged_but_not_lifted() {
        let mut v = VirtualCounters::default();
        v.on_arrival(Some(1));
        v.charge(Some(1), 100, VTC_PROMPT_WEIGHT);
        v.on_requeue(Some(2));
        assert_eq!(v.counter(Some(2)), 0);
        // Tenant 2 is backlogged at 0, so a newcomer is lifted to 0, not 100.
        v.on_arrival(Some(3));
        assert_eq!(v.counter(Some(3)), 0);
    }
}
