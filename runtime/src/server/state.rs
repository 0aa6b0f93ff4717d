//! Shared server state: the engine handle, what turns text into tokens, the served name and
//! limits, and the lifecycle (ready, draining, failed) that `/health` and admission read.

use std::sync::atomic::{AtomicU8, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use metrics_exporter_prometheus::PrometheusHandle;

use super::admin_loads::AdapterLoadLimit;
use crate::adapters::AdapterService;
use crate::chat_template::ChatTemplate;
use crate::config::PrefixCacheIsolation;
use crate::engine::EngineHandle;
use crate::structured::ConstraintCompiler;
use crate::tokenizer::Tokenizer;

use super::protocol::SamplingDefaults;
use super::rate_limit::RateLimiter;

/// Where the server is in its life.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(u8)]
pub enum Phase {
    /// Serving.
    Ready = 0,
    /// Shutting down: in-flight requests finish, new ones get 503.
    Draining = 1,
    /// The engine died: everything gets 503 and the process exits non-zero.
    Failed = 2,
}

/// The phase plus the number of requests in flight (for draining).
#[derive(Debug, Default)]
pub struct Lifecycle {
    phase: AtomicU8,
    in_flight: AtomicUsize,
    changed: tokio::sync::Notify,
}

impl Lifecycle {
    /// The current phase.
    pub fn phase(&self) -> Phase {
        match self.phase.load(Ordering::Acquire) {
            0 => Phase::Ready,
            1 => Phase::Draining,
            _ => Phase::Failed,
        }
    }

    /// Moves to `phase` (never back from Failed).
    pub fn set_phase(&self, phase: Phase) {
        let _ = self
            .phase
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |p| {
                (p != Phase::Failed as u8).then_some(phase as u8)
            });
        self.changed.notify_waiters();
    }

    /// Requests being served now.
    pub fn in_flight(&self) -> usize {
        self.in_flight.load(Ordering::Acquire)
    }

    /// Counts a request in; the guard counts it out when dropped.
    pub fn enter(self: &Arc<Self>) -> InFlight {
        self.in_flight.fetch_add(1, Ordering::AcqRel);
        InFlight(self.clone())
    }

    /// Waits until no request is in flight.
    pub async fn idle(&self) {
        loop {
            let notified = self.changed.notified();
            if self.in_flight() == 0 {
                return;
            }
            notified.await;
        }
    }
}

/// One request in flight; dropping it counts the request out.
#[derive(Debug)]
pub struct InFlight(Arc<Lifecycle>);

impl Drop for InFlight {
    fn drop(&mut self) {
        self.0.in_flight.fetch_sub(1, Ordering::AcqRel);
        self.0.changed.notify_waiters();
    }
}

/// Per-server settings taken from the config file.
#[derive(Clone, Debug)]
pub struct ServerSettings {
    /// Name the base model is served under (`model` field, `/v1/models`).
    pub served_model_name: String,
    /// Where the model came from (`root` in `/v1/models`).
    pub model_root: String,
    /// Accepted API keys; empty means no authentication.
    pub api_keys: Vec<String>,
    /// Longest a request may take before it is aborted.
    pub request_timeout: Duration,
    /// Largest accepted request body.
    pub body_limit_bytes: usize,
    /// Log prompt and completion text (off by default: patient questions are health data).
    pub log_prompts: bool,
    /// Whether API keys separate prefix-cache tenants.
    pub prefix_cache_isolation: PrefixCacheIsolation,
    /// `/v1/completions` text may spell special tokens (off: they stay plain text).
    pub allow_special_tokens_in_prompt: bool,
    /// A chat request's own `chat_template` is rendered (off: a 400).
    pub trust_request_chat_template: bool,
    /// A request's `priority` is honoured (off: a non-zero one is a 400).
    pub allow_request_priority: bool,
    /// Keys for the adapter load/unload routes (inference keys do not grant them).
    pub admin_api_keys: Vec<String>,
    /// With no admin keys, the adapter routes are open (to inference keys, if any) only when
    /// `allow_runtime_lora_updating` is on and the server listens on loopback.
    pub allow_keyless_admin: bool,
    /// Key `/metrics` requires, if any.
    pub metrics_api_key: Option<String>,
    /// `/health` answers 503 while the engine has work and finished no step for this long
    /// (zero: no watchdog).
    pub engine_stall_timeout: Duration,
    /// Per-key request-rate limit of the generation routes, if configured.
    pub rate_limiter: Option<Arc<RateLimiter>>,
    /// Sampling fields a request leaves out (`model.generation_config`).
    pub sampling_defaults: SamplingDefaults,
}

/// Everything a handler needs; cheap to clone.
#[derive(Clone)]
pub struct AppState {
    /// The engine running on its own thread.
    pub engine: EngineHandle,
    /// The model's tokenizer.
    pub tokenizer: Arc<Tokenizer>,
    /// The model's chat template.
    pub chat_template: Arc<ChatTemplate>,
    /// Settings from the config.
    pub settings: Arc<ServerSettings>,
    /// Ready / draining / failed, and requests in flight.
    pub lifecycle: Arc<Lifecycle>,
    /// Renders `/metrics` (None when another metrics recorder was installed first).
    pub metrics: Option<PrometheusHandle>,
    /// Unix time the server started (`created` of `/v1/models`).
    pub started: u64,
    /// The LoRA adapters served on the base model (None: base model only).
    pub adapters: Option<Arc<AdapterService>>,
    /// Compiles structured-output grammars for this model's vocabulary (None: the tokenizer
    /// cannot be described to llguidance, and such requests get a 400).
    pub structured: Option<Arc<ConstraintCompiler>>,
    /// Bounds concurrent `POST /v1/load_lora_adapter` work (queue, then 429).
    pub adapter_loads: Arc<AdapterLoadLimit>,
}
