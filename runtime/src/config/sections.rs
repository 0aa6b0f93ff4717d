//! The sections of `caduceus.toml` and their defaults. Every field has a default so that
//! `caduceus serve` with no file and no flags serves the default model on localhost; the
//! commented example at `deploy/config/caduceus.toml` documents each key for SREs.

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use caduceus_scheduler::Fairness;

use super::secrets::ApiKey;
use super::units::{ByteSize, HumanDuration};
use crate::model::loader::DEFAULT_MODEL_PATH;
use crate::structured::CompileLimits;

/// The whole server configuration, after defaults, file, environment and flags are merged.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct CaduceusConfig {
    pub server: ServerSection,
    pub model: ModelSection,
    pub scheduler: SchedulerSection,
    pub logging: LoggingSection,
    pub adapters: AdaptersSection,
    pub structured_outputs: StructuredOutputsSection,
    pub kv_events: KvEventsSection,
}

/// `[server]`: the HTTP listener and its guards.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct ServerSection {
    /// Listen address; loopback by default so a fresh install is not exposed.
    pub host: String,
    pub port: u16,
    /// Accepted bearer tokens; with none here or in `api_key_file`, auth is off.
    pub api_keys: Vec<ApiKey>,
    /// A file with one key per line (blank lines and `#` comments skipped), so keys can come
    /// from a secret mount instead of the config file.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub api_key_file: Option<PathBuf>,
    /// Largest request body accepted (413 above it).
    pub body_limit: ByteSize,
    /// Whole-request deadline, generation included.
    pub request_timeout: HumanDuration,
    /// How long in-flight requests may finish after SIGTERM before they are cut.
    pub shutdown_grace_period: HumanDuration,
    /// `/health` answers 503 when the engine has work and finished no step for this long
    /// (a stuck engine is alive but serves nobody); `0s` turns the watchdog off.
    pub engine_stall_timeout: HumanDuration,
    // Health-data hardening (issue 18): tenant isolation, special tokens, admin auth.
    /// Who may reuse whose prefix-cache blocks and compiled grammars (a cache hit is visible to
    /// the caller).
    pub prefix_cache_isolation: PrefixCacheIsolation,
    /// Let `/v1/completions` text spell special tokens (off: a client cannot forge control tokens).
    pub allow_special_tokens_in_prompt: bool,
    /// Render a chat request's own `chat_template` (vLLM's `--trust-request-chat-template`);
    /// off, it is a 400: a template is code run on the server.
    pub trust_request_chat_template: bool,
    /// Honour a request's `priority` (vLLM's: lower is served first); off, a non-zero one is a
    /// 400.
    pub allow_request_priority: bool,
    /// Keys for `/v1/load_lora_adapter` and `/v1/unload_lora_adapter`; inference keys do not
    /// grant them.
    pub admin_api_keys: Vec<ApiKey>,
    /// With no admin keys, open the adapter routes anyway, on a loopback `host` only.
    pub allow_runtime_lora_updating: bool,
    /// Key `/metrics` requires; none = open.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub metrics_api_key: Option<ApiKey>,
    /// Async (HTTP) worker threads; tokenization and templating run on a separate blocking pool.
    pub worker_threads: usize,
    /// Requests per second one API key may send to the generation routes (429 above it); none =
    /// unlimited.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub rate_limit_per_key: Option<f64>,
    /// Requests a key may send at once above `rate_limit_per_key`; default: the rate rounded up.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub rate_limit_burst: Option<u32>,
    /// `POST /v1/load_lora_adapter` calls validating at once; as many more wait, then 429.
    pub max_concurrent_adapter_loads: usize,
}

impl ServerSection {
    /// The per-key rate limit, if `rate_limit_per_key` is set.
    pub fn rate_limit(&self) -> Option<crate::server::RateLimit> {
        let per_second = self.rate_limit_per_key?;
        let burst = self
            .rate_limit_burst
            .unwrap_or_else(|| per_second.ceil().clamp(1.0, f64::from(u32::MAX)) as u32);
        Some(crate::server::RateLimit { per_second, burst })
    }

    /// Whether `host` accepts connections from this machine only.
    pub fn is_loopback(&self) -> bool {
        self.host == "localhost"
            || self
                .host
                .parse::<std::net::IpAddr>()
                .is_ok_and(|ip| ip.is_loopback())
    }
}

/// `server.prefix_cache_isolation`: a prefix-cache hit shows in `cached_tokens` and in time to
/// first token, so sharing blocks between tenants tells one whether another sent a prompt.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum PrefixCacheIsolation {
    /// Blocks are reused only by requests with the same API key (and the same `cache_salt`).
    #[default]
    PerKey,
    /// Every client shares the cache (only a request's own `cache_salt` separates it).
    Shared,
}

impl Default for ServerSection {
    fn default() -> Self {
        ServerSection {
            host: "127.0.0.1".into(),
            port: 8000,
            api_keys: Vec::new(),
            api_key_file: None,
            body_limit: ByteSize::mib(1),
            request_timeout: HumanDuration::secs(600),
            shutdown_grace_period: HumanDuration::secs(30),
            engine_stall_timeout: HumanDuration::secs(60),
            prefix_cache_isolation: PrefixCacheIsolation::PerKey,
            allow_special_tokens_in_prompt: false,
            trust_request_chat_template: false,
            allow_request_priority: true,
            admin_api_keys: Vec::new(),
            allow_runtime_lora_updating: false,
            metrics_api_key: None,
            worker_threads: 2,
            rate_limit_per_key: None,
            rate_limit_burst: None,
            max_concurrent_adapter_loads: 2,
        }
    }
}

/// Where the model runs (`"auto"`, `"cpu"`, `"cuda"` = `"cuda:0"`, `"cuda:N"`).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub enum Device {
    /// CUDA device 0 when the binary was built with CUDA and a GPU is present, else CPU.
    #[default]
    Auto,
    Cpu,
    /// The CUDA device of this index.
    Cuda(usize),
}

impl std::str::FromStr for Device {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "auto" => Ok(Device::Auto),
            "cpu" => Ok(Device::Cpu),
            "cuda" => Ok(Device::Cuda(0)),
            _ => s
                .strip_prefix("cuda:")
                .and_then(|n| n.parse().ok())
                .map(Device::Cuda)
                .ok_or_else(|| format!("unknown device \"{s}\"")),
        }
    }
}

impl TryFrom<String> for Device {
    type Error = String;
    fn try_from(s: String) -> Result<Self, String> {
        s.parse()
    }
}

impl From<Device> for String {
    fn from(d: Device) -> String {
        match d {
            Device::Auto => "auto".into(),
            Device::Cpu => "cpu".into(),
            Device::Cuda(n) => format!("cuda:{n}"),
        }
    }
}

/// Compute dtype. On the CPU `auto` keeps quantized weights quantized and `f32` dequantizes
/// every weight; on a GPU `auto` is bf16 and weights are converted to bf16 or f16.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Dtype {
    /// The model's own dtype (f32 on CPU).
    #[default]
    Auto,
    F32,
    F16,
    Bf16,
}

/// `model.generation_config`: whether a Hugging Face directory's `generation_config.json`
/// sampling fields (`temperature`, `top_p`, `top_k`, `min_p`, `repetition_penalty`) are the
/// defaults of requests that leave them out (vLLM's `--generation-config auto`, its default).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum GenerationConfigSetting {
    #[default]
    Auto,
    /// The API's own defaults (temperature 1, no truncation) whatever the model recommends.
    Ignore,
}

/// CUDA: how each projection shape picks its GEMM implementation (`caduceus_kernels::gpu::
/// gemm_tune`): `tuned` times cuBLASLt's candidates and our GEMV kernels once per decode-sized
/// shape at start and keeps the fastest; `library` takes cuBLASLt's heuristic choice untimed;
/// `gemv` forces our ring GEMV kernel wherever it applies (A/B measurements).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum GemmSetting {
    #[default]
    Tuned,
    Library,
    Gemv,
}

/// CUDA: which cores run attention (`caduceus_kernels::gpu::attention::AttentionKernel`):
/// `cuda_cores` (f32 FMAs, every head dim) or `tensor_cores` (mma.sync for prefill and decode,
/// head dims up to 128; softmax weights rounded to the dtype before P V, as FlashAttention
/// does).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum AttentionKernelSetting {
    CudaCores,
    #[default]
    TensorCores,
}

/// `[model]`: the base model served.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct ModelSection {
    /// GGUF file or Hugging Face model directory.
    pub path: PathBuf,
    /// The `model` name clients send; defaults to the file name without extension.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub served_model_name: Option<String>,
    /// Prompt + output limit; defaults to the model's trained context length.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub max_model_len: Option<usize>,
    pub device: Device,
    pub dtype: Dtype,
    /// Share of the GPU's memory Caduceus may use; the KV pool gets what is left of it after
    /// weights, adapter slots and activations (vLLM's `gpu_memory_utilization`).
    pub gpu_memory_utilization: f64,
    /// A fixed number of KV blocks on the GPU instead of the memory plan's (tests, debugging).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub num_gpu_blocks_override: Option<usize>,
    /// CUDA: replay pure-decode steps from graphs captured at start (launch overhead off the
    /// host); `false` runs every step eagerly.
    pub cuda_graphs: bool,
    /// CUDA: the largest decode batch that gets a graph (default `scheduler.max_num_seqs`);
    /// larger batches run eagerly.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub cuda_graph_max_batch: Option<usize>,
    /// CUDA: how projections pick their GEMM ([`GemmSetting`]).
    pub gemm: GemmSetting,
    /// CUDA: the cores attention runs on ([`AttentionKernelSetting`]).
    pub attention_kernel: AttentionKernelSetting,
    /// CUDA (sm_90+): launch every kernel as a programmatic dependent of the one before, so its
    /// launch overlaps the previous kernel's end (off until `gpu-bench` shows it pays).
    pub programmatic_launch: bool,
    /// Sampling defaults from the model's `generation_config.json` ([`GenerationConfigSetting`]).
    pub generation_config: GenerationConfigSetting,
}

impl Default for ModelSection {
    fn default() -> Self {
        ModelSection {
            path: PathBuf::from(DEFAULT_MODEL_PATH),
            served_model_name: None,
            max_model_len: None,
            device: Device::Auto,
            dtype: Dtype::Auto,
            gpu_memory_utilization: 0.9,
            num_gpu_blocks_override: None,
            cuda_graphs: true,
            cuda_graph_max_batch: None,
            gemm: GemmSetting::Tuned,
            attention_kernel: AttentionKernelSetting::TensorCores,
            programmatic_launch: false,
            generation_config: GenerationConfigSetting::Auto,
        }
    }
}

impl ModelSection {
    /// The name under which `/v1/models` lists the model: `served_model_name`, else the file
    /// (or directory) name without its extension.
    pub fn served_name(&self) -> String {
        if let Some(name) = &self.served_model_name {
            return name.clone();
        }
        let path: &Path = &self.path;
        path.file_stem()
            .map(|s| s.to_string_lossy().into_owned())
            .unwrap_or_else(|| path.display().to_string())
    }
}

/// How big the KV-cache pool is: a block count, or bytes converted with the model's per-block
/// size once it is loaded.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum KvCacheSize {
    Blocks(usize),
    Bytes(ByteSize),
}

/// Default KV pool when neither `kv_cache_blocks` nor `kv_cache_bytes` is set.
pub const DEFAULT_KV_CACHE_BYTES: ByteSize = ByteSize::mib(256);

/// `[scheduler]`: batching and KV-cache limits (defaults match
/// `caduceus_scheduler::SchedulerConfig::default()`).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct SchedulerSection {
    pub max_num_seqs: usize,
    /// Token budget of one step; none = sized from the measured prefill rate so a step takes
    /// about `max_step_ms`, then steered by measured step times (`cli/step_budget.rs`,
    /// `engine/step_time.rs`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub max_num_batched_tokens: Option<usize>,
    /// Target duration of one engine step when `max_num_batched_tokens` is not set.
    pub max_step_ms: u64,
    pub block_size: usize,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub kv_cache_blocks: Option<usize>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub kv_cache_bytes: Option<ByteSize>,
    pub enable_prefix_caching: bool,
    /// Requests waiting beyond this are refused with 429 instead of queueing without bound.
    pub max_queued_requests: usize,
    /// Order of waiting requests across adapters: least-served first (`vtc`) or `fcfs`.
    #[serde(with = "fairness_name")]
    pub fairness: Fairness,
    /// Under `vtc`, while an adapter with nothing queued has a request running, adapters with
    /// requests queued may fill at most this percent of a step's token budget with prompt
    /// tokens (100 = no limit).
    pub backlog_prefill_percent: usize,
}

/// `scheduler.fairness` as the words `vtc` and `fcfs` (the scheduler crate has no serde).
mod fairness_name {
    use caduceus_scheduler::Fairness;
    use serde::{Deserialize, Deserializer, Serializer};

    pub fn serialize<S: Serializer>(f: &Fairness, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(match f {
            Fairness::Vtc => "vtc",
            Fairness::Fcfs => "fcfs",
        })
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Fairness, D::Error> {
        match String::deserialize(d)?.as_str() {
            "vtc" => Ok(Fairness::Vtc),
            "fcfs" => Ok(Fairness::Fcfs),
            other => Err(serde::de::Error::unknown_variant(other, &["vtc", "fcfs"])),
        }
    }
}

impl Default for SchedulerSection {
    fn default() -> Self {
        let d = caduceus_scheduler::SchedulerConfig::default();
        SchedulerSection {
            max_num_seqs: d.max_num_seqs,
            max_num_batched_tokens: None,
            max_step_ms: 250,
            block_size: d.block_size,
            kv_cache_blocks: None,
            kv_cache_bytes: None,
            enable_prefix_caching: d.enable_prefix_caching,
            max_queued_requests: 1024,
            fairness: d.fairness,
            backlog_prefill_percent: d.backlog_prefill_percent,
        }
    }
}

impl SchedulerSection {
    /// The KV pool size asked for (validation guarantees at most one of the two keys is set).
    pub fn kv_cache_size(&self) -> KvCacheSize {
        match (self.kv_cache_blocks, self.kv_cache_bytes) {
            (Some(blocks), _) => KvCacheSize::Blocks(blocks),
            (None, bytes) => KvCacheSize::Bytes(bytes.unwrap_or(DEFAULT_KV_CACHE_BYTES)),
        }
    }

    /// The scheduler's limits once the model fixed `num_blocks` and `max_model_len` (and the
    /// engine `max_loras`); with no `max_num_batched_tokens`, the scheduler's default budget
    /// until the caller sizes it.
    pub fn scheduler_config(
        &self,
        num_blocks: usize,
        max_model_len: usize,
        max_loras: Option<usize>,
    ) -> caduceus_scheduler::SchedulerConfig {
        caduceus_scheduler::SchedulerConfig {
            max_num_seqs: self.max_num_seqs,
            max_num_batched_tokens: self
                .max_num_batched_tokens
                .unwrap_or(caduceus_scheduler::SchedulerConfig::default().max_num_batched_tokens),
            block_size: self.block_size,
            num_blocks,
            max_model_len,
            enable_prefix_caching: self.enable_prefix_caching,
            max_loras,
            fairness: self.fairness,
            backlog_prefill_percent: self.backlog_prefill_percent,
            ..caduceus_scheduler::SchedulerConfig::default()
        }
    }
}

/// `[logging]`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct LoggingSection {
    /// A `tracing` EnvFilter directive (`info`, `caduceus_runtime=debug,info`); RUST_LOG wins.
    pub level: String,
    /// One JSON object per line, for log shippers.
    pub json: bool,
    /// Log prompt and completion text; off by default because prompts may hold personal data.
    pub log_prompts: bool,
}

impl Default for LoggingSection {
    fn default() -> Self {
        LoggingSection {
            level: "info".into(),
            json: false,
            log_prompts: false,
        }
    }
}

/// `[adapters]`: LoRA adapters served on top of the base model.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct AdaptersSection {
    /// Directory scanned for adapters; none = base model only.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub dir: Option<PathBuf>,
    /// Distinct adapters in one batch (the scheduler's `max_loras`).
    pub max_loras: usize,
    /// Adapters kept loaded in host memory (LRU beyond it).
    pub max_cpu_loras: usize,
    /// Host memory cap for loaded adapters.
    pub max_cpu_lora_bytes: ByteSize,
    /// Largest LoRA rank accepted when loading an adapter.
    pub max_lora_rank: usize,
    /// Storage type of the adapter slots.
    pub dtype: AdapterDtype,
    /// Where the compute threads take every core: the share of each step's time lent to the
    /// adapter loader between steps, in percent (100 = no slicing).
    pub loader_step_share_percent: u32,
    /// Adapter loader threads (unset: the cores the compute leaves idle, 1 to 4).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub loader_threads: Option<usize>,
}

/// Storage type of the adapter slots (`adapters.dtype`).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum AdapterDtype {
    /// `q8` where the CPU has AVX-512 VNNI, else `f16`.
    #[default]
    Auto,
    /// Exactly PEFT's arithmetic; four times q8's bytes.
    F32,
    /// Half the bytes of f32 to stream per decode step.
    F16,
    /// 8-bit weights and activations (~1% RMS error on the delta), a quarter of f32's bytes.
    Q8,
}

impl AdapterDtype {
    /// The slot storage this setting means on this machine.
    pub fn resolve(self) -> crate::model::LoraDtype {
        use crate::model::LoraDtype;
        match self {
            AdapterDtype::Auto => LoraDtype::fastest(),
            AdapterDtype::F32 => LoraDtype::F32,
            AdapterDtype::F16 => LoraDtype::F16,
            AdapterDtype::Q8 => LoraDtype::Q8,
        }
    }
}

impl Default for AdaptersSection {
    fn default() -> Self {
        AdaptersSection {
            dir: None,
            max_loras: 8,
            max_cpu_loras: 64,
            max_cpu_lora_bytes: ByteSize::gib(1),
            max_lora_rank: 64,
            dtype: AdapterDtype::Auto,
            loader_step_share_percent: 5,
            loader_threads: None,
        }
    }
}

/// `[structured_outputs]`: bounds on the grammars requests ask for (`response_format`,
/// `structured_outputs`, `tools`); a request past one gets a 400 before it is queued.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct StructuredOutputsSection {
    /// Longest grammar text one request may send (a serialized JSON schema, regex, choice list
    /// or Lark grammar).
    pub max_grammar_bytes: ByteSize,
    /// CPU time one compile may take (not counting waits for a core).
    pub compile_timeout: HumanDuration,
    /// llguidance's grammar size limit (symbols in productions).
    pub max_grammar_symbols: usize,
    /// Compiled grammars kept, keyed by their text (least recently used dropped first), and as
    /// many refused ones.
    pub grammar_cache_entries: usize,
}

impl StructuredOutputsSection {
    /// The limits the constraint compiler enforces.
    pub fn limits(&self) -> CompileLimits {
        CompileLimits {
            max_text_bytes: usize::try_from(self.max_grammar_bytes.0).unwrap_or(usize::MAX),
            timeout: self.compile_timeout.get(),
            max_grammar_size: self.max_grammar_symbols,
            cache_entries: self.grammar_cache_entries,
        }
    }
}

impl Default for StructuredOutputsSection {
    fn default() -> Self {
        let d = CompileLimits::default();
        StructuredOutputsSection {
            max_grammar_bytes: ByteSize(d.max_text_bytes as u64),
            compile_timeout: HumanDuration(d.timeout),
            max_grammar_symbols: d.max_grammar_size,
            grammar_cache_entries: d.cache_entries,
        }
    }
}

/// `[kv_events]`: publish KV-cache events (vLLM's ZeroMQ wire format) so a prefix-aware
/// gateway (llm-d's precise prefix-cache scorer) can mirror this replica's cache.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct KvEventsSection {
    /// Off by default: the events carry prompt token ids, so the socket must only be reachable
    /// by the gateway.
    pub enabled: bool,
    /// ZeroMQ PUB endpoint to bind (`tcp://HOST:PORT`, `*` = every interface).
    pub endpoint: String,
    /// ZeroMQ ROUTER endpoint answering replay requests for missed events; none = no replay.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub replay_endpoint: Option<String>,
    /// First frame of every message; default `kv@<POD_IP or server.host>:<server.port>@<model>`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub topic: Option<String>,
}

impl Default for KvEventsSection {
    fn default() -> Self {
        KvEventsSection {
            enabled: false,
            endpoint: "tcp://*:5557".into(),
            replay_endpoint: None,
            topic: None,
        }
    }
}
