//! The compiled-grammar cache: least recently used entries leave first, a grammar being
//! compiled is compiled once however many requests ask for it meanwhile (they poll its
//! [`Flight`]), and a grammar the compiler refused is refused again without another compile.

use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::Duration;

use super::compiler::CompiledConstraint;
use super::thread_clock::ThreadClock;
use super::StructuredError;

/// What a compile produced.
pub type Outcome = Result<Arc<CompiledConstraint>, StructuredError>;

/// One compile in progress, shared by the requests waiting for it.
#[derive(Debug, Default)]
pub struct Flight {
    state: Mutex<FlightState>,
}

#[derive(Debug, Default)]
struct FlightState {
    outcome: Option<Outcome>,
    /// The compiling thread's clock, once it runs.
    clock: Option<ThreadClock>,
}

/// The compile has spent more than its CPU-time limit (the waiter that sees it ends the flight).
#[derive(Debug, PartialEq, Eq)]
pub struct OverLimit;

impl Flight {
    fn lock(&self) -> MutexGuard<'_, FlightState> {
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Compile thread: its clock, read by the waiters.
    pub fn set_clock(&self, clock: ThreadClock) {
        self.lock().clock = Some(clock);
    }

    /// Whether the compile's time was measured as CPU time (so a timeout is the grammar's own
    /// doing, not the server's load, and will recur).
    fn timed_on_cpu(&self) -> bool {
        self.lock().clock.is_some_and(|c| c.counts_cpu())
    }

    /// Ends the flight with `outcome` unless it has ended already; true if this call ended it.
    fn end(&self, outcome: Outcome) -> bool {
        let mut s = self.lock();
        if s.outcome.is_some() {
            return false;
        }
        s.outcome = Some(outcome);
        true
    }

    /// The outcome if the compile has ended, [`OverLimit`] if it has spent more than `limit` of
    /// CPU time, `None` while it runs within it.
    pub fn poll(&self, limit: Duration) -> Option<Result<Outcome, OverLimit>> {
        let s = self.lock();
        if let Some(outcome) = &s.outcome {
            return Some(Ok(outcome.clone()));
        }
        let over = s.clock.and_then(|c| c.elapsed()).is_some_and(|t| t > limit);
        over.then_some(Err(OverLimit))
    }
}

/// What a lookup found.
pub enum Lookup {
    /// Compiled before.
    Hit(Arc<CompiledConstraint>),
    /// Refused before (invalid, or over the CPU-time limit): refused again, not compiled again.
    Refused(StructuredError),
    /// Being compiled for another request: wait on it.
    Compiling(Arc<Flight>),
    /// Not there: the caller compiles it and ends this new flight with [`GrammarCache::finish`].
    Start(Arc<Flight>),
}

/// Values by key, at most `capacity` of them, the least recently used dropped first.
struct Lru<V> {
    map: HashMap<String, (V, u64)>,
    /// Last use -> key, oldest first.
    by_use: BTreeMap<u64, String>,
    capacity: usize,
}

impl<V: Clone> Lru<V> {
    fn new(capacity: usize) -> Self {
        Lru {
            map: HashMap::new(),
            by_use: BTreeMap::new(),
            capacity: capacity.max(1),
        }
    }

    /// The value under `key`, now its most recent use.
    fn get(&mut self, key: &str, now: u64) -> Option<V> {
        let (value, used) = self.map.get_mut(key)?;
        let (value, before) = (value.clone(), std::mem::replace(used, now));
        self.by_use.remove(&before);
        self.by_use.insert(now, key.to_owned());
        Some(value)
    }

    /// Keeps `value` under `key` (unless there is one), dropping the least recently used when
    /// full.
    fn insert(&mut self, key: &str, value: V, now: u64) {
        if self.map.contains_key(key) {
            return;
        }
        while self.map.len() >= self.capacity {
            let Some((_, old)) = self.by_use.pop_first() else {
                break;
            };
            self.map.remove(&old);
        }
        self.by_use.insert(now, key.to_owned());
        self.map.insert(key.to_owned(), (value, now));
    }
}

struct Entries {
    compiled: Lru<Arc<CompiledConstraint>>,
    refused: Lru<StructuredError>,
    /// Uses so far: the clock of both LRUs.
    uses: u64,
    flights: HashMap<String, Arc<Flight>>,
}

impl Entries {
    fn tick(&mut self) -> u64 {
        self.uses += 1;
        self.uses
    }
}

/// Compiled grammars by key, at most `capacity` of them, and as many refused ones.
pub struct GrammarCache {
    entries: Mutex<Entries>,
}

impl GrammarCache {
    /// An empty cache keeping at most `capacity` (at least 1) compiled grammars, and as many
    /// refusals.
    pub fn new(capacity: usize) -> Self {
        GrammarCache {
            entries: Mutex::new(Entries {
                compiled: Lru::new(capacity),
                refused: Lru::new(capacity),
                uses: 0,
                flights: HashMap::new(),
            }),
        }
    }

    fn lock(&self) -> MutexGuard<'_, Entries> {
        self.entries.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// The grammar under `key`, its refusal, the compile of it in progress, or a new flight to
    /// compile it.
    pub fn lookup(&self, key: &str) -> Lookup {
        let mut e = self.lock();
        let now = e.tick();
        if let Some(compiled) = e.compiled.get(key, now) {
            return Lookup::Hit(compiled);
        }
        if let Some(refusal) = e.refused.get(key, now) {
            return Lookup::Refused(refusal);
        }
        if let Some(flight) = e.flights.get(key) {
            return Lookup::Compiling(flight.clone());
        }
        let flight = Arc::new(Flight::default());
        e.flights.insert(key.to_owned(), flight.clone());
        Lookup::Start(flight)
    }

    /// Ends `flight` (the compile of `key`) with `outcome` unless a waiter ended it first, and
    /// keeps a compiled grammar, or a refusal that will recur: an invalid grammar, or a timeout
    /// measured in CPU time. A failure to start the compile (and a timeout that may have been
    /// the server's load) is not kept. True if this call ended the flight.
    pub fn finish(&self, key: &str, flight: &Arc<Flight>, outcome: Outcome) -> bool {
        let mut e = self.lock();
        if e.flights.get(key).is_some_and(|f| Arc::ptr_eq(f, flight)) {
            e.flights.remove(key);
        }
        if flight.lock().outcome.is_none() {
            let now = e.tick();
            match &outcome {
                Ok(compiled) => e.compiled.insert(key, compiled.clone(), now),
                Err(refusal @ StructuredError::Invalid { .. }) => {
                    e.refused.insert(key, refusal.clone(), now)
                }
                Err(refusal @ StructuredError::Timeout { .. }) if flight.timed_on_cpu() => {
                    e.refused.insert(key, refusal.clone(), now)
                }
                Err(_) => {}
            }
        }
        // Ended under the cache's lock, so a lookup never finds neither an entry nor the flight
        // of a grammar whose compile ended.
        flight.end(outcome)
    }

    /// Grammars held compiled.
    pub fn num_cached(&self) -> usize {
        self.lock().compiled.map.len()
    }

    /// Refusals held.
    pub fn num_refused(&self) -> usize {
        self.lock().refused.map.len()
    }
}
