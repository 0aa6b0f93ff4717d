//! [`RequestFailure`]: why the engine ended one request it had accepted with an error, while the
//! others go on. Distinct from [`super::RequestError`] (a refusal at the door, before the
//! request holds anything): a failure happens to a request that may hold KV blocks and an
//! adapter slot, which the engine gives back through the scheduler's finish path.

use super::request::RequestError;

/// One request's failure inside the engine; the engine keeps serving every other request.
/// Messages carry no server paths and no prompt text: they go to the client and the log.
#[derive(Clone, Debug, PartialEq, thiserror::Error)]
pub enum RequestFailure {
    /// Its adapter could not be read from disk or converted (message already redacted).
    #[error("adapter `{adapter}` could not be loaded: {message}")]
    AdapterLoad { adapter: String, message: String },
    /// The adapter loader thread died while this request waited for its adapter; the loader
    /// was restarted, so a retry loads it afresh.
    #[error(
        "the adapter loader stopped while loading adapter `{adapter}` and was restarted; \
         retry the request"
    )]
    LoaderStopped { adapter: String },
    /// Its adapter was loaded, but the request was then refused (e.g. the KV pool is too small).
    #[error(transparent)]
    Rejected(#[from] RequestError),
    /// Its adapter could not be placed in a device slot for this step.
    #[error("the request's adapter could not be placed in a device slot: {0}")]
    AdapterSlot(String),
    /// The model produced NaN or infinite logits for it (a broken adapter or numerical blow-up):
    /// sampling them would yield garbage, so the request ends instead.
    #[error("the model produced non-finite logits for this request")]
    NonFiniteLogits,
}

impl RequestFailure {
    /// A short stable label for logs and the client's error `code`.
    pub fn code(&self) -> &'static str {
        match self {
            RequestFailure::AdapterLoad { .. } | RequestFailure::LoaderStopped { .. } => {
                "adapter_load_failed"
            }
            RequestFailure::Rejected(_) => "rejected",
            RequestFailure::AdapterSlot(_) => "adapter_slot_failed",
            RequestFailure::NonFiniteLogits => "non_finite_logits",
        }
    }
}
