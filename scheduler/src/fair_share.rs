//! Each adapter's fair share of the running set under VTC: of the seats (`max_num_seqs`) and of
//! the KV pool, each divided max-min fairly (water-filling) among the adapters' demands, that is
//! what their running and waiting requests need, plus the adapter's reused prefixes waiting in
//! the free list. An adapter that needs less than an equal split
//! keeps all it needs, and the rest is split among the others; so ten quiet doctors with one
//! request each are never "over their share" because a flood makes eleven adapters active, while
//! the flood is over as soon as it holds more than what the quiet ones leave.
//!
//! Demand only changes between steps (admitting or preempting moves a request between running
//! and waiting, not out of its adapter's demand), so the levels are computed once per step; what
//! each adapter holds is counted when asked.

use crate::block_pool::Evict;
use crate::fairness::{Tenant, VirtualCounters};
use crate::fx::FxHashMap;
use crate::queue::QueueKey;
use crate::request::Request;
use crate::scheduler::Scheduler;

/// Seats and blocks: what an adapter holds or needs.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub(crate) struct Load {
    pub seats: usize,
    pub blocks: usize,
}

impl Load {
    /// Counts one more request of `blocks` blocks.
    fn add(&mut self, blocks: usize) {
        self.seats += 1;
        self.blocks = self.blocks.saturating_add(blocks);
    }
}

/// The free blocks a request may evict: one past its adapter's share, or admitted while some
/// adapter is, may not evict reused prefixes (a quiet doctor's system prompt), so the room it
/// takes comes from ordinary free blocks or from preempting surplus requests first.
pub(crate) fn eviction(within_share: bool) -> Evict {
    if within_share {
        Evict::Any
    } else {
        Evict::SpareReused
    }
}

/// This step's max-min fair levels: an adapter holding more seats or blocks than these is over
/// its share. `usize::MAX` when every demand fits (nobody is over).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct FairLevels {
    seats: usize,
    blocks: usize,
}

impl FairLevels {
    /// Whether an adapter holding `load` is over its share: more seats or blocks than the level,
    /// with more than one request. Every adapter may run one request whatever its size: requests
    /// cannot be split, and two adapters whose single requests each pass the level would
    /// otherwise take turns preempting each other.
    fn is_surplus(self, load: Load) -> bool {
        load.seats > 1 && (load.seats > self.seats || load.blocks > self.blocks)
    }
}

impl Default for FairLevels {
    fn default() -> Self {
        FairLevels {
            seats: usize::MAX,
            blocks: usize::MAX,
        }
    }
}

/// The largest per-adapter allowance that, given to every adapter that needs more (the others
/// keep their whole demand), fits in `capacity`; `usize::MAX` if every demand fits.
pub(crate) fn water_level(capacity: usize, mut demands: Vec<usize>) -> usize {
    demands.sort_unstable();
    let mut left = capacity;
    let mut n = demands.len();
    for d in demands {
        let level = left / n;
        if d > level {
            return level;
        }
        left -= d;
        n -= 1;
    }
    usize::MAX
}

/// What each adapter holds of the running set, against this step's levels.
pub(crate) struct FairShares {
    pub loads: FxHashMap<Tenant, Load>,
    levels: FairLevels,
}

impl FairShares {
    /// Where `tenant` stands in service order: adapters within their share first, then by
    /// counter (smaller first).
    pub fn rank(&self, vtc: &VirtualCounters, tenant: Tenant) -> (bool, u64) {
        (self.is_over(tenant), vtc.counter(tenant))
    }

    /// Whether `tenant` holds more than its share of seats or blocks.
    pub fn is_over(&self, tenant: Tenant) -> bool {
        self.loads
            .get(&tenant)
            .is_some_and(|&l| self.levels.is_surplus(l))
    }

    /// Whether `tenant` stays within its share with one more request of `blocks` blocks.
    fn fits_one_more(&self, tenant: Tenant, blocks: usize) -> bool {
        let mut own = self.loads.get(&tenant).copied().unwrap_or_default();
        own.add(blocks);
        !self.levels.is_surplus(own)
    }
}

impl Scheduler {
    /// The max-min fair levels from every adapter's demand (its running and waiting requests'
    /// seats and blocks, and its protected free blocks); the default (nobody over) under FCFS.
    pub(crate) fn compute_fair_levels(&self) -> FairLevels {
        if self.vtc.is_none() {
            return FairLevels::default();
        }
        let mut demand: FxHashMap<Tenant, Load> = FxHashMap::default();
        for k in self.running.iter().copied().chain(self.waiting.iter()) {
            if let Some(r) = self.requests.get(&k.id) {
                let blocks = self.kv.num_blocks_for(r.num_tokens());
                demand
                    .entry(r.tenant())
                    .or_default()
                    .add(blocks.max(r.block_table.len()));
            }
        }
        // An adapter's reused prefixes waiting in the free list (its system prompt between two
        // of its requests) are part of what it needs: a flood's level leaves room for them, and
        // a request past its level may not evict them (`Evict::SpareReused`).
        for (adapter, blocks) in self.kv.block_pool().protected_free_blocks() {
            let d = demand.entry(adapter).or_default();
            d.blocks = d.blocks.saturating_add(blocks);
        }
        FairLevels {
            seats: water_level(
                self.config.max_num_seqs,
                demand.values().map(|d| d.seats).collect(),
            ),
            blocks: water_level(
                self.kv.block_pool().num_usable_blocks(),
                demand.values().map(|d| d.blocks).collect(),
            ),
        }
    }

    /// Each running request with its rank in service order: whether it is surplus, then (for
    /// surplus ones) its adapter's counter; requests within their share rank equal, so arrival
    /// decides among them: each is entitled to run, and finishing the earlier prompt first gives
    /// it its first token sooner without delaying the later one (sharing the budget by counter
    /// would stretch both). Walking each adapter's running requests in arrival order, a request
    /// is surplus once the adapter's seats or blocks so far pass its level (`is_surplus`).
    /// Preempting a request never makes an earlier one of its adapter surplus, nor changes
    /// another adapter's, so choosing victims by this rank cannot make two adapters take turns
    /// preempting each other (ranking by the adapter's current holding could: the victim's
    /// adapter falls under its share, the other one rises above it).
    pub(crate) fn running_ranks(&self) -> Vec<(QueueKey, (bool, u64))> {
        let Some(vtc) = &self.vtc else {
            return self.running.iter().map(|&k| (k, (false, 0))).collect();
        };
        let mut so_far: FxHashMap<Tenant, Load> = FxHashMap::default();
        self.running
            .iter()
            .map(|&k| {
                let Some(r) = self.requests.get(&k.id) else {
                    return (k, (true, u64::MAX));
                };
                let load = so_far.entry(r.tenant()).or_default();
                load.add(r.block_table.len());
                if self.fair_levels.is_surplus(*load) {
                    (k, (true, vtc.counter(r.tenant())))
                } else {
                    (k, (false, 0))
                }
            })
            .collect()
    }

    /// Whether waiting request `r`'s adapter stays within its share once `r` runs (the room
    /// rule of `fair_room.rs` and the budget rule of `yield_budget`).
    pub(crate) fn fits_share(&self, shares: &FairShares, r: &Request) -> bool {
        shares.fits_one_more(r.tenant(), self.kv.num_blocks_for(r.num_tokens()))
    }

    /// What each adapter holds, counting `admitted` (this step's admissions) as running,
    /// against this step's levels.
    pub(crate) fn fair_shares(&self, admitted: &[QueueKey]) -> FairShares {
        let mut loads: FxHashMap<Tenant, Load> = FxHashMap::default();
        for k in self.running.iter().chain(admitted) {
            if let Some(r) = self.requests.get(&k.id) {
                loads
                    .entry(r.tenant())
                    .or_default()
                    .add(r.block_table.len());
            }
        }
        FairShares {
            loads,
            levels: self.fair_levels,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::water_level;

    #[test]
    fn water_level_gives_small_demands_in_full_and_splits_the_rest() {
        // Ten quiet adapters needing 25 each and a flood needing 5000, in 364 blocks: the quiet
        // ones keep their 25, the flood's level is what is left.
        let mut demands = vec![25; 10];
        demands.push(5000);
        assert_eq!(water_level(364, demands), 114);
        // Everyone hungry: an equal split.
        assert_eq!(water_level(300, vec![1000, 1000, 1000]), 100);
        // Everything fits: nobody is over.
        assert_eq!(water_level(100, vec![10, 20, 30]), usize::MAX);
        assert_eq!(water_level(100, vec![]), usize::MAX);
        // A medium demand between: 10 is kept, the two others split 90.
        assert_eq!(water_level(100, vec![10, 60, 70]), 45);
    }
}
