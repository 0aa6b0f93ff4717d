//! One request's position in its grammar.

use std::sync::Arc;

use llguidance::Matcher;
use toktrie::SimpleVob;

use super::TokenMask;

/// The per-request matcher: the mask of the next token, the sampled token committed, forced
/// tokens, and whether the grammar is complete. A matcher that fails (a mask over its step
/// limits, a token it cannot take) allows only end-of-sequence from then on, so the request
/// ends instead of producing text outside its grammar.
pub struct RequestMatcher {
    inner: Matcher,
    eos: Arc<SimpleVob>,
}

impl RequestMatcher {
    pub(super) fn new(inner: Matcher, eos: Arc<SimpleVob>) -> Self {
        RequestMatcher { inner, eos }
    }

    /// The tokens allowed next (end-of-sequence ones only where the grammar may end here).
    pub fn compute_mask(&mut self) -> TokenMask {
        match self.inner.compute_mask_or_eos() {
            Ok(vob) => TokenMask::from_vob(&vob),
            Err(_) => {
                // The error can quote the output (patient text): not logged.
                tracing::warn!("grammar matcher failed; ending the request");
                TokenMask::from_vob(&self.eos)
            }
        }
    }

    /// Takes the sampled token; false if the grammar refused it (the matcher has then failed).
    pub fn commit(&mut self, token_id: u32) -> bool {
        self.inner.consume_token(token_id).is_ok()
    }

    /// Tokens the grammar forces next (e.g. the rest of a fixed key), without committing them.
    pub fn forced_tokens(&mut self) -> Vec<u32> {
        self.inner.compute_ff_tokens()
    }

    /// Whether the output so far is a complete match (end-of-sequence is allowed).
    pub fn is_accepting(&mut self) -> bool {
        self.inner.is_accepting().unwrap_or(false)
    }

    /// Whether the grammar can take no more tokens (complete, or failed).
    pub fn is_stopped(&self) -> bool {
        self.inner.is_stopped()
    }
}
