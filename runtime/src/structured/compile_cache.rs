//! The compiled-grammar cache: least recently used entries leave first, and a grammar being
//! compiled is compiled once however many requests ask for it meanwhile (they wait on its
//! [`Flight`]).

use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, Condvar, Mutex, MutexGuard, PoisonError};
use std::time::{Duration, Instant};

use super::compiler::CompiledConstraint;
use super::thread_clock::ThreadClock;
use super::StructuredError;

/// What a compile produced.
pub type Outcome = Result<Arc<CompiledConstraint>, StructuredError>;

/// How often a blocked waiter checks the compile's CPU time against the limit.
const POLL: Duration = Duration::from_millis(20);

/// One compile in progress, shared by the requests waiting for it.
#[derive(Debug, Default)]
pub struct Flight {
    state: Mutex<FlightState>,
    done: Condvar,
}

#[derive(Debug, Default)]
struct FlightState {
    outcome: Option<Outcome>,
    /// The compiling thread's clock, once it runs.
    clock: Option<ThreadClock>,
}

/// Why a waiter stopped waiting without an outcome.
#[derive(Debug, PartialEq, Eq)]
pub enum WaitEnd {
    /// The compile spent more than its CPU-time limit (the caller ends the flight).
    OverLimit,
    /// The caller's deadline passed first (the compile goes on for the others and the cache).
    Deadline,
}

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
        self.done.notify_all();
        true
    }

    /// The outcome if the compile has ended, [`WaitEnd::OverLimit`] if it has spent more than
    /// `limit` of CPU time, `None` while it runs within it.
    fn check(s: &FlightState, limit: Duration) -> Option<Result<Outcome, WaitEnd>> {
        if let Some(outcome) = &s.outcome {
            return Some(Ok(outcome.clone()));
        }
        let over = s.clock.and_then(|c| c.elapsed()).is_some_and(|t| t > limit);
        over.then_some(Err(WaitEnd::OverLimit))
    }

    /// [`Self::wait`] without waiting: `None` while the compile runs within `limit`.
    pub fn poll(&self, limit: Duration) -> Option<Result<Outcome, WaitEnd>> {
        Self::check(&self.lock(), limit)
    }

    /// Waits for the outcome until `deadline`, checking the compile's CPU time against `limit`.
    pub fn wait(&self, deadline: Instant, limit: Duration) -> Result<Outcome, WaitEnd> {
        let mut s = self.lock();
        loop {
            if let Some(end) = Self::check(&s, limit) {
                return end;
            }
            let now = Instant::now();
            if now >= deadline {
                return Err(WaitEnd::Deadline);
            }
            let slice = POLL.min(deadline - now);
            s = self
                .done
                .wait_timeout(s, slice)
                .unwrap_or_else(PoisonError::into_inner)
                .0;
        }
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
