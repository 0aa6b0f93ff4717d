//! Compiling constraints: size and time limits, and a cache keyed by the grammar text so a
//! schema sent with every request is compiled once.

use std::collections::{HashMap, VecDeque};
use std::sync::{mpsc, Arc, Mutex};
use std::time::Duration;

use llguidance::{Matcher, ParserFactory};
use toktrie::{SimpleVob, TokEnv};

use super::{ConstraintSpec, RequestMatcher, StructuredError};

/// Bounds on what a request may ask to compile.
#[derive(Clone, Copy, Debug)]
pub struct CompileLimits {
    /// Longest grammar text (a JSON schema's serialized form) in bytes.
    pub max_text_bytes: usize,
    /// Wall-clock time one compile may take.
    pub timeout: Duration,
    /// llguidance's grammar size limit (symbols in productions).
    pub max_grammar_size: usize,
    /// Compiled grammars kept (oldest dropped first).
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
    template: Mutex<Matcher>,
    eos: Arc<SimpleVob>,
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

#[derive(Default)]
struct Cache {
    map: HashMap<String, Arc<CompiledConstraint>>,
    order: VecDeque<String>,
}

/// Compiles [`ConstraintSpec`]s for one model's vocabulary; shared by every request handler.
pub struct ConstraintCompiler {
    factory: Arc<ParserFactory>,
    limits: CompileLimits,
    cache: Mutex<Cache>,
    eos: Arc<SimpleVob>,
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
            cache: Mutex::new(Cache::default()),
            eos,
        })
    }

    /// The limits this compiler enforces.
    pub fn limits(&self) -> CompileLimits {
        self.limits
    }

    /// The compiled form of `spec`, from the cache or compiled now. Blocks for up to the time
    /// limit: call it off the async runtime (`spawn_blocking`).
    pub fn compile(
        &self,
        spec: &ConstraintSpec,
    ) -> Result<Arc<CompiledConstraint>, StructuredError> {
        let key = spec.cache_key();
        let what = spec.what();
        let len = super::spec::text_len(&key);
        if len > self.limits.max_text_bytes {
            return Err(StructuredError::TooLarge {
                what,
                len,
                max: self.limits.max_text_bytes,
            });
        }
        if let Some(hit) = self.lock_cache().map.get(&key) {
            return Ok(hit.clone());
        }
        let grammar = spec.to_grammar()?;
        let factory = self.factory.clone();
        let (tx, rx) = mpsc::channel();
        // A thread per compile: the time limit can abandon it (its fuel limits still end it),
        // and a panic inside the compiler ends only that thread.
        let spawned = std::thread::Builder::new()
            .name("grammar-compile".into())
            .spawn(move || {
                let compiled = factory.create_parser(grammar).and_then(|parser| {
                    let mut m = Matcher::new(Ok(parser));
                    // The first mask warms the lexer caches every clone shares, and shows a
                    // grammar that cannot produce anything.
                    m.compute_mask()?;
                    Ok(m)
                });
                let _ = tx.send(compiled.map_err(|e| e.to_string()));
            });
        if let Err(e) = spawned {
            return Err(StructuredError::Unavailable(e.to_string()));
        }
        let matcher = match rx.recv_timeout(self.limits.timeout) {
            Ok(Ok(m)) => m,
            Ok(Err(message)) => return Err(invalid(what, message)),
            Err(mpsc::RecvTimeoutError::Timeout) => {
                return Err(StructuredError::Timeout {
                    what,
                    ms: self.limits.timeout.as_millis(),
                })
            }
            Err(mpsc::RecvTimeoutError::Disconnected) => {
                return Err(invalid(what, "the grammar compiler failed".into()))
            }
        };
        let compiled = Arc::new(CompiledConstraint {
            template: Mutex::new(matcher),
            eos: self.eos.clone(),
        });
        let mut cache = self.lock_cache();
        if !cache.map.contains_key(&key) {
            while cache.order.len() >= self.limits.cache_entries.max(1) {
                if let Some(old) = cache.order.pop_front() {
                    cache.map.remove(&old);
                }
            }
            cache.order.push_back(key.clone());
            cache.map.insert(key, compiled.clone());
        }
        Ok(compiled)
    }

    /// Compiled grammars in the cache.
    pub fn num_cached(&self) -> usize {
        self.lock_cache().map.len()
    }

    fn lock_cache(&self) -> std::sync::MutexGuard<'_, Cache> {
        self.cache
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
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
