//! The compiled-grammar cache: least recently used entries leave first, and a grammar being
//! compiled is compiled once however many requests ask for it meanwhile (they poll its
//! [`Flight`]).

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
    /// Being compiled for another request: wait on it.
    Compiling(Arc<Flight>),
    /// Not there: the caller compiles it and ends this new flight with [`GrammarCache::finish`].
    Start(Arc<Flight>),
}

#[derive(Default)]
struct Entries {
    map: HashMap<String, (Arc<CompiledConstraint>, u64)>,
    /// Last use -> key, oldest first.
    by_use: BTreeMap<u64, String>,
    uses: u64,
    flights: HashMap<String, Arc<Flight>>,
}

/// Compiled grammars by key, at most `capacity` of them.
pub struct GrammarCache {
    entries: Mutex<Entries>,
    capacity: usize,
}

impl GrammarCache {
    /// An empty cache keeping at most `capacity` (at least 1) grammars.
    pub fn new(capacity: usize) -> Self {
        GrammarCache {
            entries: Mutex::new(Entries::default()),
            capacity: capacity.max(1),
        }
    }

    fn lock(&self) -> MutexGuard<'_, Entries> {
        self.entries.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// The grammar under `key`, the compile of it in progress, or a new flight to compile it.
    pub fn lookup(&self, key: &str) -> Lookup {
        let mut e = self.lock();
        e.uses += 1;
        let now = e.uses;
        if let Some((compiled, used)) = e.map.get_mut(key) {
            let (compiled, before) = (compiled.clone(), std::mem::replace(used, now));
            e.by_use.remove(&before);
            e.by_use.insert(now, key.to_owned());
            return Lookup::Hit(compiled);
        }
        if let Some(flight) = e.flights.get(key) {
            return Lookup::Compiling(flight.clone());
        }
        let flight = Arc::new(Flight::default());
        e.flights.insert(key.to_owned(), flight.clone());
        Lookup::Start(flight)
    }

    /// Ends `flight` (the compile of `key`) with `outcome` unless a waiter ended it first, and
    /// keeps a compiled grammar, dropping the least recently used one when full. True if this
    /// call ended the flight.
    pub fn finish(&self, key: &str, flight: &Arc<Flight>, outcome: Outcome) -> bool {
        let mut e = self.lock();
        if e.flights.get(key).is_some_and(|f| Arc::ptr_eq(f, flight)) {
            e.flights.remove(key);
        }
        if let Ok(compiled) = &outcome {
            if flight.lock().outcome.is_none() && !e.map.contains_key(key) {
                while e.map.len() >= self.capacity {
                    let Some((_, old)) = e.by_use.pop_first() else {
                        break;
                    };
                    e.map.remove(&old);
                }
                e.uses += 1;
                let now = e.uses;
                e.by_use.insert(now, key.to_owned());
                e.map.insert(key.to_owned(), (compiled.clone(), now));
            }
        }
        // Ended under the cache's lock, so a lookup never finds neither the entry nor the flight
        // of a grammar that compiled.
        flight.end(outcome)
    }

    /// Grammars held.
    pub fn num_cached(&self) -> usize {
        self.lock().map.len()
    }
}
