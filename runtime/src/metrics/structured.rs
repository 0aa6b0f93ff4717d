//! Structured-outputs metrics: grammar compiles by result, their CPU time, and requests served
//! (or refused) from the grammar cache.

use std::time::Duration;

/// Grammar compiles run, by `result`: `ok`, `invalid` (refused by the compiler), `timeout` (over
/// `structured_outputs.compile_timeout` of CPU time).
pub const GRAMMAR_COMPILES: &str = "caduceus_grammar_compiles_total";
/// CPU time of each grammar compile that ran to its end.
pub const GRAMMAR_COMPILE_TIME: &str = "caduceus_grammar_compile_cpu_seconds";
/// Constrained requests whose grammar was already compiled: found in the cache, or compiled
/// once for several requests that asked for it at the same time.
pub const GRAMMAR_CACHE_HITS: &str = "caduceus_grammar_cache_hits_total";
/// Constrained requests refused from the cache: their grammar was refused before (invalid, or
/// over the CPU-time limit) and was not compiled again.
pub const GRAMMAR_REFUSED_AGAIN: &str = "caduceus_grammar_cached_refusals_total";

/// How a grammar compile ended.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum CompileResult {
    /// Compiled.
    Ok,
    /// The compiler refused the grammar.
    Invalid,
    /// The compile spent its CPU-time limit.
    Timeout,
}

impl CompileResult {
    fn label(self) -> &'static str {
        match self {
            CompileResult::Ok => "ok",
            CompileResult::Invalid => "invalid",
            CompileResult::Timeout => "timeout",
        }
    }
}

/// Records one grammar compile and, when it ran to its end, its CPU time.
pub fn record_grammar_compile(result: CompileResult, cpu: Option<Duration>) {
    metrics::counter!(GRAMMAR_COMPILES, "result" => result.label()).increment(1);
    if let Some(cpu) = cpu {
        metrics::histogram!(GRAMMAR_COMPILE_TIME).record(cpu.as_secs_f64());
    }
}

/// Records a request served by an already compiled (or compiling) grammar.
pub fn record_grammar_cache_hit() {
    metrics::counter!(GRAMMAR_CACHE_HITS).increment(1);
}

/// Records a request refused by a refusal kept in the cache.
pub fn record_grammar_refused_again() {
    metrics::counter!(GRAMMAR_REFUSED_AGAIN).increment(1);
}

pub(super) fn describe() {
    use metrics::{describe_counter, describe_histogram, Unit};
    describe_counter!(
        GRAMMAR_COMPILES,
        Unit::Count,
        "Grammar compiles by result (ok, invalid, timeout)."
    );
    describe_histogram!(
        GRAMMAR_COMPILE_TIME,
        Unit::Seconds,
        "CPU time of grammar compiles that ran to their end."
    );
    describe_counter!(
        GRAMMAR_CACHE_HITS,
        Unit::Count,
        "Constrained requests served by a grammar compiled before or for another request."
    );
    describe_counter!(
        GRAMMAR_REFUSED_AGAIN,
        Unit::Count,
        "Constrained requests refused by a grammar refusal kept in the cache (not compiled again)."
    );
}
