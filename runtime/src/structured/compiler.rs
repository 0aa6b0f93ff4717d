//! Compiling constraints: size and CPU-time limits, and a cache keyed by the grammar text so a
//! schema sent with every request is compiled once (and a refused one is not compiled again).

use std::panic::AssertUnwindSafe;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use llguidance::api::TopLevelGrammar;
use llguidance::{Matcher, ParserFactory};
use toktrie::{SimpleVob, TokEnv};

use super::compile_cache::{Flight, GrammarCache, Lookup, Outcome, OverLimit};
use super::thread_clock::ThreadClock;
use super::{ConstraintSpec, RequestMatcher, StructuredError};
use crate::metrics::{
    record_grammar_cache_hit, record_grammar_compile, record_grammar_refused_again, CompileResult,
};

/// Bounds on what a request may ask to compile.
#[derive(Clone, Copy, Debug)]
pub struct CompileLimits {
    /// Longest grammar text (a JSON schema's serialized form) in bytes.
    pub max_text_bytes: usize,
    /// CPU time one compile may take (its thread's time on a core, not time spent waiting for
    /// one).
    pub timeout: Duration,
    /// llguidance's grammar size limit (symbols in productions).
    pub max_grammar_size: usize,
    /// Compiled grammars kept (least recently used dropped first).
    pub cache_entries: usize,
}

impl Default for CompileLimits {
    fn default() -> Self {
        CompileLimits {
            max_text_bytes: 64 * 1024,
            timeout: Duration::from_secs(5),
            max_grammar_size: 100_000,
            cache_entries: 256,
        }
    }
}

/// A compiled constraint: a matcher in its start state that each request clones.
pub struct CompiledConstraint {
    pub(super) template: Mutex<Matcher>,
    pub(super) eos: Arc<SimpleVob>,
}

impl CompiledConstraint {
    /// A fresh matcher for one request (a deep copy: requests never share parser state).
    pub fn matcher(&self) -> RequestMatcher {
        let template = self
            .template
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        RequestMatcher::new(template.deep_clone(), self.eos.clone())
    }
}

impl std::fmt::Debug for CompiledConstraint {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("CompiledConstraint")
    }
}

/// Compiles [`ConstraintSpec`]s for one model's vocabulary; shared by every request handler.
pub struct ConstraintCompiler {
    factory: Arc<ParserFactory>,
    limits: CompileLimits,
    cache: Arc<GrammarCache>,
    eos: Arc<SimpleVob>,
    /// Compiles started (not cache hits, not requests that joined another's compile).
    compiles: AtomicU64,
    /// Fault injection: each compile thread sleeps this long (ms) first, as a thread waiting for
    /// a core would (no CPU time spent).
    #[cfg(feature = "fault-injection")]
    delay_ms: AtomicU64,
}

impl ConstraintCompiler {
    /// A compiler over `tok_env` (see [`super::tok_env::build`]).
    pub fn new(tok_env: TokEnv, limits: CompileLimits) -> Result<Self, StructuredError> {
        let eos = Arc::new(tok_env.tok_trie().eos_token_set());
        let mut factory = ParserFactory::new_simple(&tok_env)
            .map_err(|e| StructuredError::Unavailable(e.to_string()))?;
        // llguidance's own logging would print grammar text (request data) to stderr.
        factory.quiet();
        let l = factory.limits_mut();
        l.max_grammar_size = limits.max_grammar_size;
        l.verbose_errors = false;
        Ok(ConstraintCompiler {
            factory: Arc::new(factory),
            limits,
            cache: Arc::new(GrammarCache::new(limits.cache_entries)),
            eos,
            compiles: AtomicU64::new(0),
            #[cfg(feature = "fault-injection")]
            delay_ms: AtomicU64::new(0),
        })
    }

    /// The limits this compiler enforces.
    pub fn limits(&self) -> CompileLimits {
        self.limits
    }

    /// The compiled form of `spec` (or its refusal): from the cache, from the compile another
    /// request started, or compiled now on a thread of its own. The time limit counts that
    /// thread's CPU time, so a busy server does not refuse a grammar for the time it waited for
    /// a core; `wait` bounds
    /// the caller's wall-clock wait ([`StructuredError::Deadline`] past it, while the compile
    /// goes on for the cache). Blocks: async callers use [`Self::begin`] and poll.
    pub fn compile(
        &self,
        spec: &ConstraintSpec,
        partition: Option<u64>,
        wait: Duration,
    ) -> Result<Arc<CompiledConstraint>, StructuredError> {
        match self.begin(spec, partition, wait) {
            Compiling::Done(outcome) => outcome,
            Compiling::Pending(pending) => pending.wait(),
        }
    }

    /// Starts getting the compiled form of `spec` without blocking: the size check and a cache
    /// hit end here; otherwise the request joins the compile in progress or starts one, and
    /// waits for it at most `wait` (see [`Self::compile`]). Requests share compiles and cache
    /// entries only within one `partition` (a cache hit shows in the response time, so callers
    /// that must not learn about each other's grammars pass different ones).
    pub fn begin(
        &self,
        spec: &ConstraintSpec,
        partition: Option<u64>,
        wait: Duration,
    ) -> Compiling {
        // A wait too long to add to the clock is no bound at all (a year stands in for it).
        let now = Instant::now();
        let deadline = now
            .checked_add(wait)
            .unwrap_or(now + Duration::from_secs(365 * 24 * 3600));
        let key = spec.cache_key();
        let what = spec.what();
        let len = super::spec::text_len(&key);
        if len > self.limits.max_text_bytes {
            return Compiling::Done(Err(StructuredError::TooLarge {
                what,
                len,
                max: self.limits.max_text_bytes,
            }));
        }
        let key = match partition {
            Some(p) => format!("{p:016x}\0{key}"),
            None => key,
        };
        let flight = match self.cache.lookup(&key) {
            Lookup::Hit(compiled) => {
                record_grammar_cache_hit();
                return Compiling::Done(Ok(compiled));
            }
            Lookup::Refused(refusal) => {
                record_grammar_refused_again();
                return Compiling::Done(Err(refusal));
            }
            Lookup::Compiling(flight) => {
                record_grammar_cache_hit();
                flight
            }
            Lookup::Start(flight) => {
                self.start(spec, key.clone(), flight.clone());
                flight
            }
        };
        Compiling::Pending(PendingCompile {
            flight,
            key,
            what,
            limit: self.limits.timeout,
            deadline,
            cache: self.cache.clone(),
        })
    }

    /// Compiles `spec` on a new thread, which ends `flight` (the abandoned thread of a compile
    /// over its limit still ends, by llguidance's fuel limits, and its result is dropped).
    fn start(&self, spec: &ConstraintSpec, key: String, flight: Arc<Flight>) {
        self.compiles.fetch_add(1, Ordering::Relaxed);
        let what = spec.what();
        let grammar = match spec.to_grammar() {
            Ok(g) => g,
            Err(e) => {
                record_grammar_compile(CompileResult::Invalid, None);
                self.cache.finish(&key, &flight, Err(e));
                return;
            }
        };
        let job = CompileJob {
            factory: self.factory.clone(),
            cache: self.cache.clone(),
            eos: self.eos.clone(),
            limit: self.limits.timeout,
            what,
            #[cfg(feature = "fault-injection")]
            delay: Duration::from_millis(self.delay_ms.load(Ordering::Relaxed)),
        };
        let (thread_key, thread_flight) = (key.clone(), flight.clone());
        let spawned = std::thread::Builder::new()
            .name("grammar-compile".into())
            .spawn(move || job.run(grammar, &thread_key, &thread_flight));
        if let Err(e) = spawned {
            let unavailable = StructuredError::Unavailable(e.to_string());
            self.cache.finish(&key, &flight, Err(unavailable));
        }
    }

    /// Compiled grammars in the cache.
    pub fn num_cached(&self) -> usize {
        self.cache.num_cached()
    }

    /// Refused grammars in the cache (refused again without a compile).
    pub fn num_refused(&self) -> usize {
        self.cache.num_refused()
    }

    /// Compiles started since this compiler was made (cache hits and requests that waited on
    /// another request's compile start none).
    pub fn num_compiles(&self) -> u64 {
        self.compiles.load(Ordering::Relaxed)
    }

    /// Fault injection: every compile thread started from now on sleeps `delay` before it
    /// compiles, as a thread kept off the CPU by a busy server would.
    #[cfg(feature = "fault-injection")]
    pub fn delay_compiles(&self, delay: Duration) {
        let ms = u64::try_from(delay.as_millis()).unwrap_or(u64::MAX);
        self.delay_ms.store(ms, Ordering::Relaxed);
    }
}

/// Where [`ConstraintCompiler::begin`] left a request.
pub enum Compiling {
    /// Refused, or found compiled.
    Done(Result<Arc<CompiledConstraint>, StructuredError>),
    /// Compiling (for this request or another one asking for the same grammar).
    Pending(PendingCompile),
}

/// A request's wait for a compile in progress.
pub struct PendingCompile {
    flight: Arc<Flight>,
    key: String,
    what: &'static str,
    limit: Duration,
    /// When the request stops waiting.
    deadline: Instant,
    cache: Arc<GrammarCache>,
}

impl PendingCompile {
    /// How often a waiter should look at the compile again.
    pub const POLL_INTERVAL: Duration = Duration::from_millis(5);

    /// The request's result once there is one: the compile's outcome, its CPU-time limit spent
    /// (the first waiter to see it ends the compile for all, and the abandoned thread's later
    /// result is dropped), or [`StructuredError::Deadline`] once the request's wait is over (the
    /// compile goes on for the cache). `None` meanwhile: look again after
    /// [`Self::POLL_INTERVAL`].
    pub fn poll(&self) -> Option<Outcome> {
        match self.flight.poll(self.limit) {
            Some(Ok(outcome)) => Some(outcome),
            Some(Err(OverLimit)) => {
                let timeout = over_limit(self.what, self.limit);
                if self
                    .cache
                    .finish(&self.key, &self.flight, Err(timeout.clone()))
                {
                    record_grammar_compile(CompileResult::Timeout, None);
                }
                Some(Err(timeout))
            }
            None => (Instant::now() >= self.deadline)
                .then_some(Err(StructuredError::Deadline { what: self.what })),
        }
    }

    /// Blocks for [`Self::poll`]'s result.
    pub fn wait(&self) -> Outcome {
        loop {
            if let Some(outcome) = self.poll() {
                return outcome;
            }
            std::thread::sleep(Self::POLL_INTERVAL);
        }
    }
}

/// What a compile thread needs.
struct CompileJob {
    factory: Arc<ParserFactory>,
    cache: Arc<GrammarCache>,
    eos: Arc<SimpleVob>,
    limit: Duration,
    what: &'static str,
    #[cfg(feature = "fault-injection")]
    delay: Duration,
}

impl CompileJob {
    fn run(self, grammar: TopLevelGrammar, key: &str, flight: &Arc<Flight>) {
        let clock = ThreadClock::current();
        flight.set_clock(clock);
        #[cfg(feature = "fault-injection")]
        std::thread::sleep(self.delay);
        // A panic inside the compiler ends the flight like any refusal (its waiters would
        // otherwise wait for an outcome that never comes).
        let compiled = std::panic::catch_unwind(AssertUnwindSafe(|| {
            self.factory.create_parser(grammar).and_then(|parser| {
                let mut m = Matcher::new(Ok(parser));
                // The first mask warms the lexer caches every clone shares, and shows a grammar
                // that cannot produce anything.
                m.compute_mask()?;
                Ok(m)
            })
        }))
        .unwrap_or_else(|_| Err(anyhow::anyhow!("the grammar compiler failed")));
        let cpu = clock.elapsed();
        let (result, outcome) = match compiled {
            Ok(_) if cpu.is_some_and(|t| t > self.limit) => (
                CompileResult::Timeout,
                Err(over_limit(self.what, self.limit)),
            ),
            Ok(matcher) => (
                CompileResult::Ok,
                Ok(Arc::new(CompiledConstraint {
                    template: Mutex::new(matcher),
                    eos: self.eos.clone(),
                })),
            ),
            Err(e) => (
                CompileResult::Invalid,
                Err(invalid(self.what, e.to_string())),
            ),
        };
        if self.cache.finish(key, flight, outcome) {
            record_grammar_compile(result, cpu);
        }
    }
}

/// A compile of `what` spent more than `limit` of CPU time.
fn over_limit(what: &'static str, limit: Duration) -> StructuredError {
    StructuredError::Timeout {
        what,
        ms: limit.as_millis(),
    }
}

/// llguidance's message, first line only and bounded (its errors can quote the grammar).
fn invalid(what: &'static str, message: String) -> StructuredError {
    let first = message.lines().next().unwrap_or("").trim();
    let mut message: String = first.chars().take(400).collect();
    if message.is_empty() {
        message = "the grammar was refused".into();
    }
    StructuredError::Invalid { what, message }
}
