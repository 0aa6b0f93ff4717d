//! An in-process server over the tiny reference Llama, for the HTTP tests.

use std::path::PathBuf;

use axum::body::{to_bytes, Body};
use axum::http::{Request, StatusCode};
use axum::Router;
use serde_json::Value;
use std::sync::Arc;
use std::time::Duration;
use tower::ServiceExt;

use caduceus_runtime::adapters::peft::AdapterLimits;
use caduceus_runtime::adapters::{AdapterRegistry, AdapterService, AdapterSettings, SlotFormat};
use caduceus_runtime::config::PrefixCacheIsolation;
use caduceus_runtime::engine::{EngineCore, EngineHandle, FaultPlan, SchedulerConfig};
use caduceus_runtime::model::loader::LoadedModel;
use caduceus_runtime::model::LoraDtype;
use caduceus_runtime::server::protocol::SamplingDefaults;
use caduceus_runtime::server::{
    AdapterLoadLimit, AppState, Lifecycle, RateLimit, RateLimiter, ServerSettings,
};
use caduceus_runtime::structured::{compiler_for, CompileLimits};

/// Knobs of a test server.
#[derive(Clone)]
pub struct TestServer {
    pub api_keys: Vec<String>,
    pub max_queued: usize,
    pub max_num_seqs: usize,
    pub num_blocks: usize,
    pub request_timeout: Duration,
    pub body_limit_bytes: usize,
    /// Serve the adapters under this root (f32 slots, rank up to 16).
    pub adapter_dir: Option<PathBuf>,
    /// Adapter slots (the scheduler's `max_loras`).
    pub max_loras: usize,
    /// Adapters kept in the host cache.
    pub max_cpu_loras: usize,
    /// `server.prefix_cache_isolation`.
    pub prefix_cache_isolation: PrefixCacheIsolation,
    /// `server.allow_special_tokens_in_prompt`.
    pub allow_special_tokens_in_prompt: bool,
    /// `server.trust_request_chat_template`.
    pub trust_request_chat_template: bool,
    /// `server.allow_request_priority`.
    pub allow_request_priority: bool,
    /// `logging.log_prompts`.
    pub log_prompts: bool,
    /// `server.admin_api_keys`.
    pub admin_api_keys: Vec<String>,
    /// Adapter routes open without admin keys (loopback + allow_runtime_lora_updating).
    pub allow_keyless_admin: bool,
    /// `server.metrics_api_key`.
    pub metrics_api_key: Option<String>,
    /// `server.engine_stall_timeout` (zero: off).
    pub engine_stall_timeout: Duration,
    /// Faults injected into the engine's steps and adapter loader.
    pub faults: FaultPlan,
    /// `server.rate_limit_per_key` and `rate_limit_burst`.
    pub rate_limit: Option<RateLimit>,
    /// Context length past the model's own (RoPE extends; for long prompts such as tool lists).
    pub max_model_len: Option<usize>,
    /// `server.max_concurrent_adapter_loads`.
    pub max_concurrent_adapter_loads: usize,
    /// `[structured_outputs]`.
    pub compile_limits: CompileLimits,
    /// Serve this model directory instead of the shared tiny Llama.
    pub model_dir: Option<PathBuf>,
    /// Sampling fields a request leaves out (`model.generation_config`).
    pub sampling_defaults: SamplingDefaults,
}

impl Default for TestServer {
    fn default() -> Self {
        TestServer {
            api_keys: Vec::new(),
            max_queued: 1024,
            max_num_seqs: 16,
            num_blocks: 2048,
            request_timeout: Duration::from_secs(60),
            body_limit_bytes: 64 * 1024,
            adapter_dir: None,
            max_loras: 4,
            max_cpu_loras: 8,
            prefix_cache_isolation: PrefixCacheIsolation::PerKey,
            allow_special_tokens_in_prompt: false,
            trust_request_chat_template: false,
            allow_request_priority: true,
            log_prompts: false,
            admin_api_keys: Vec::new(),
            allow_keyless_admin: true,
            metrics_api_key: None,
            engine_stall_timeout: Duration::from_secs(60),
            faults: FaultPlan::default(),
            rate_limit: None,
            max_model_len: None,
            max_concurrent_adapter_loads: 2,
            compile_limits: CompileLimits::default(),
            model_dir: None,
            sampling_defaults: SamplingDefaults::default(),
        }
    }
}

/// The served name of the tiny model.
pub const MODEL: &str = "tiny-llama";

impl TestServer {
    /// Loads the tiny model and starts its engine thread.
    pub fn state(&self) -> AppState {
        let dir =
            (self.model_dir.clone()).unwrap_or_else(|| super::shared("reference/tiny-llama/model"));
        let loaded = LoadedModel::load(&dir).unwrap();
        let tokenizer = Arc::new(loaded.tokenizer);
        let config = SchedulerConfig {
            max_num_seqs: self.max_num_seqs,
            max_num_batched_tokens: 256,
            block_size: 16,
            num_blocks: self.num_blocks,
            max_model_len: self
                .max_model_len
                .unwrap_or(loaded.model.config().max_position_embeddings),
            ..SchedulerConfig::default()
        };
        let eos = tokenizer.eos_ids().to_vec();
        let base = loaded.model.config().clone();
        let vocab_size = base.vocab_size;
        let mut core =
            EngineCore::new(Arc::new(loaded.model), Some(tokenizer.clone()), eos, config).unwrap();
        let adapters = self.adapter_dir.as_ref().map(|dir| {
            let registry = AdapterRegistry::scan(Some(dir), vec![MODEL.into()]).unwrap();
            let settings = AdapterSettings {
                max_loras: self.max_loras,
                max_cpu_loras: self.max_cpu_loras,
                max_cpu_lora_bytes: 1 << 30,
                limits: AdapterLimits {
                    max_rank: 16,
                    max_file_bytes: 1 << 30,
                },
                format: SlotFormat::Host(LoraDtype::F32),
                loader_share_percent: 5,
                loader_threads: None,
            };
            Arc::new(AdapterService::new(registry, base, settings))
        });
        if let Some(service) = &adapters {
            core = core.with_adapters(service.clone()).unwrap();
        }
        let core = core.with_faults(self.faults.clone());
        let structured = compiler_for(tokenizer.clone(), vocab_size, self.compile_limits)
            .ok()
            .map(Arc::new);
        let (engine, _thread) = EngineHandle::spawn(core).unwrap();
        engine.set_max_queued(self.max_queued);
        AppState {
            structured,
            engine,
            tokenizer,
            chat_template: Arc::new(loaded.chat_template),
            settings: Arc::new(ServerSettings {
                served_model_name: MODEL.into(),
                model_root: "tiny".into(),
                api_keys: self.api_keys.clone(),
                request_timeout: self.request_timeout,
                body_limit_bytes: self.body_limit_bytes,
                log_prompts: self.log_prompts,
                prefix_cache_isolation: self.prefix_cache_isolation,
                allow_special_tokens_in_prompt: self.allow_special_tokens_in_prompt,
                trust_request_chat_template: self.trust_request_chat_template,
                allow_request_priority: self.allow_request_priority,
                admin_api_keys: self.admin_api_keys.clone(),
                allow_keyless_admin: self.allow_keyless_admin,
                metrics_api_key: self.metrics_api_key.clone(),
                engine_stall_timeout: self.engine_stall_timeout,
                rate_limiter: self.rate_limit.map(|l| Arc::new(RateLimiter::new(l))),
                sampling_defaults: self.sampling_defaults.clone(),
            }),
            lifecycle: Arc::new(Lifecycle::default()),
            metrics: caduceus_runtime::metrics::install(),
            started: 1_700_000_000,
            adapters,
            adapter_loads: Arc::new(AdapterLoadLimit::new(self.max_concurrent_adapter_loads)),
        }
    }
}

/// Copies the tiny model's `doctor-b` adapter into `root/name` (a served name of a test's own).
pub fn copy_adapter(root: &std::path::Path, name: &str) {
    let from = super::shared("reference/tiny-llama/adapters/doctor-b");
    let to = root.join(name);
    std::fs::create_dir_all(&to).unwrap();
    for f in ["adapter_config.json", "adapter_model.safetensors"] {
        std::fs::copy(from.join(f), to.join(f)).unwrap();
    }
}

/// Parses an SSE body into its `data:` payloads.
pub fn sse_data(body: &str) -> Vec<String> {
    body.lines()
        .filter_map(|l| l.strip_prefix("data: ").or_else(|| l.strip_prefix("data:")))
        .map(|d| d.trim().to_string())
        .collect()
}

/// The JSON chunks of an SSE body, `[DONE]` left out.
pub fn sse_chunks(body: &str) -> Vec<Value> {
    sse_data(body)
        .iter()
        .filter(|d| *d != "[DONE]")
        .map(|d| serde_json::from_str(d).unwrap())
        .collect()
}

/// `body` with each field of `extra` set on it (a request with a few fields changed).
pub fn with_fields(mut body: Value, extra: Value) -> Value {
    for (k, v) in extra.as_object().unwrap() {
        body[k] = v.clone();
    }
    body
}

/// Sends one request to `router` in-process; returns status, headers and body text.
pub async fn call(
    router: &Router,
    method: &str,
    uri: &str,
    body: Option<Value>,
    key: Option<&str>,
) -> (StatusCode, axum::http::HeaderMap, String) {
    let auth = key.map(|k| format!("Bearer {k}"));
    let headers: Vec<(&str, &str)> = auth.iter().map(|a| ("authorization", a.as_str())).collect();
    call_with_headers(router, method, uri, body, &headers).await
}

/// [`call`] with any request headers.
pub async fn call_with_headers(
    router: &Router,
    method: &str,
    uri: &str,
    body: Option<Value>,
    headers: &[(&str, &str)],
) -> (StatusCode, axum::http::HeaderMap, String) {
    let mut req = Request::builder().method(method).uri(uri);
    for (name, value) in headers {
        req = req.header(*name, *value);
    }
    let body = match body {
        Some(v) => {
            req = req.header("content-type", "application/json");
            Body::from(v.to_string())
        }
        None => Body::empty(),
    };
    let resp = router
        .clone()
        .oneshot(req.body(body).unwrap())
        .await
        .unwrap();
    let status = resp.status();
    let headers = resp.headers().clone();
    let bytes = to_bytes(resp.into_body(), 1 << 24).await.unwrap();
    (status, headers, String::from_utf8(bytes.to_vec()).unwrap())
}
