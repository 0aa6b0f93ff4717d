//! Structured outputs: grammar-constrained decoding with [llguidance].
//!
//! A request's constraint ([`ConstraintSpec`]: a JSON schema, any JSON object, a regex, a list of
//! choices or a Lark grammar) is compiled once by the [`ConstraintCompiler`] (size and time
//! limits, a cache keyed by the grammar text) before the request is queued, so a bad schema is a
//! 400 and never reaches the engine. The engine gives each constrained request a
//! [`RequestMatcher`]; every step the executor asks it for the [`TokenMask`] of the next token
//! (several requests' masks in parallel, see [`compute_masks`]), applies it to the logits row
//! before sampling and commits the sampled token. Unconstrained requests never touch this module.
//!
//! The token environment is built from our own vocabulary ([`tok_env`]): the bytes llguidance
//! matches are exactly the bytes our detokenizer produces, special tokens included.
//!
//! [llguidance]: https://github.com/guidance-ai/llguidance

mod compile_cache;
mod compiler;
mod mask;
mod matcher;
mod spec;
mod thread_clock;
pub mod tok_env;

pub use compiler::{
    CompileLimits, CompiledConstraint, Compiling, ConstraintCompiler, PendingCompile,
};
pub use mask::{compute_masks, mask_stats, MaskStats, TokenMask};
pub use matcher::RequestMatcher;
pub use spec::{with_json_layout, ConstraintSpec};

/// Why a constraint cannot be used; the HTTP layer reports each as a 400, except
/// [`StructuredError::Deadline`] (a timeout) and [`StructuredError::Unavailable`].
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum StructuredError {
    /// The grammar text is over the size limit.
    #[error("{what} is {len} bytes; at most {max} bytes are accepted")]
    TooLarge {
        what: &'static str,
        len: usize,
        max: usize,
    },
    /// llguidance refused the grammar (syntax, unsupported keyword, unsatisfiable, too complex).
    #[error("{what} cannot be used for constrained decoding: {message}")]
    Invalid { what: &'static str, message: String },
    /// Compiling took more CPU time than the limit.
    #[error("{what} took more than {ms} ms of CPU time to compile; simplify it")]
    Timeout { what: &'static str, ms: u128 },
    /// The caller stopped waiting for the compile (the server was too busy to finish it in
    /// time); the grammar itself may be fine. Not the client's fault: the HTTP layer answers it
    /// as a timeout, not a 400.
    #[error("{what} was still compiling when the request's time ran out")]
    Deadline { what: &'static str },
    /// The served model's tokenizer cannot be described to llguidance.
    #[error("structured outputs are not available for this model: {0}")]
    Unavailable(String),
}

/// The structured-outputs compiler for a model's vocabulary under `limits`, or why its
/// vocabulary cannot be described to llguidance.
pub fn compiler_for(
    tokenizer: std::sync::Arc<crate::tokenizer::Tokenizer>,
    vocab_size: usize,
    limits: CompileLimits,
) -> Result<ConstraintCompiler, StructuredError> {
    tok_env::build(tokenizer, vocab_size).and_then(|env| ConstraintCompiler::new(env, limits))
}
