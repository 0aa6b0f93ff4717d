//! `caduceus serve`: loads the config and the model, starts the engine thread and serves the
//! OpenAI-compatible API until SIGTERM/SIGINT (drain) or an engine failure (non-zero exit).

use std::sync::Arc;

use anyhow::Context;

use crate::adapters::peft::AdapterLimits;
use crate::adapters::{AdapterRegistry, AdapterService, AdapterSettings, SlotFormat};
use crate::config::{
    CaduceusConfig, ConfigOverrides, Device, Dtype, GenerationConfigSetting, KvCacheSize,
    PrefixCacheIsolation,
};
use crate::engine::{Backend, EngineCore, EngineHandle};
use crate::kv_events::{KvEventPublisher, KvEventSettings, DEFAULT_REPLAY_BUFFER};
use crate::model::loader::LoadedModel;
use crate::model::WeightFormat;
use crate::server::protocol::SamplingDefaults;
use crate::server::{
    run_server, shutdown_signal, AdapterLoadLimit, AppState, Lifecycle, RateLimiter, ServeOutcome,
    ServerSettings,
};
use crate::tokenizer::read_optional_json;

/// The adapter registry and tiers when `adapters.dir` is set (listing it reads no weights).
fn adapter_service(
    config: &CaduceusConfig,
    base: crate::model::config::LlamaConfig,
    served_model_name: &str,
    format: SlotFormat,
) -> anyhow::Result<Option<Arc<AdapterService>>> {
    let a = &config.adapters;
    let Some(dir) = &a.dir else {
        return Ok(None);
    };
    let registry = AdapterRegistry::scan(Some(dir), vec![served_model_name.to_owned()])
        .with_context(|| {
            format!(
                "reading the adapter directory {} (adapters.dir)",
                dir.display()
            )
        })?;
    tracing::info!(
        dir = %dir.display(),
        adapters = registry.len(),
        max_loras = a.max_loras,
        max_cpu_loras = a.max_cpu_loras,
        "adapter registry"
    );
    let host_bytes = a.max_cpu_lora_bytes.bytes() as usize;
    let settings = AdapterSettings {
        max_loras: a.max_loras,
        max_cpu_loras: a.max_cpu_loras,
        max_cpu_lora_bytes: host_bytes,
        limits: AdapterLimits {
            max_rank: a.max_lora_rank,
            max_file_bytes: a.max_cpu_lora_bytes.bytes(),
        },
        format,
        loader_share_percent: a.loader_step_share_percent,
        loader_threads: a.loader_threads,
    };
    Ok(Some(Arc::new(AdapterService::new(
        registry, base, settings,
    ))))
}

/// Arguments of `caduceus serve` (everything else comes from the config file and environment).
#[derive(Debug, clap::Args)]
pub struct ServeArgs {
    #[command(flatten)]
    pub overrides: ConfigOverrides,
}

/// Loads the configuration `serve` would use (also for logging set-up before anything else).
pub fn load_config(args: &ServeArgs) -> anyhow::Result<CaduceusConfig> {
    Ok(CaduceusConfig::load_from_process_env(&args.overrides)?)
}

/// What the generic half of `serve` needs from the loaded model.
pub(super) struct ServedModel {
    pub tokenizer: Arc<crate::tokenizer::Tokenizer>,
    pub chat_template: crate::chat_template::ChatTemplate,
    pub served_model_name: String,
    /// The model's file or folder name (clients never see the server's paths).
    pub model_root: String,
    pub base_config: crate::model::config::LlamaConfig,
    /// Where the KV blocks live, for KV events (`"CPU"`, `"GPU"`).
    pub medium: &'static str,
    /// What the host tier prepares adapters as, for this engine's slots.
    pub adapter_format: SlotFormat,
}

/// Runs the server with `config` on the device `model.device` selects.
pub fn run(config: CaduceusConfig) -> anyhow::Result<()> {
    match select_device(&config)? {
        Selected::Cpu => run_cpu(config),
        #[cfg(any(feature = "cuda", feature = "gpu-emu"))]
        Selected::Cuda(dev) => super::serve_gpu::run(config, *dev),
    }
}

/// The device `model.device` resolves to in this build on this machine.
enum Selected {
    Cpu,
    #[cfg(any(feature = "cuda", feature = "gpu-emu"))]
    Cuda(Box<caduceus_kernels::gpu::Device>),
}

/// Test builds only (feature `gpu-emu`, never in a release): with this variable set to 1, a
/// `cuda` or `auto` device is the kernels' host emulation, so `serve` on the GPU engine runs
/// end to end in CI (slowly). Not `CADUCEUS_*`: those are all config keys.
#[cfg(feature = "gpu-emu")]
pub const EMULATED_GPU_ENV: &str = "CAD_TEST_EMULATED_GPU";

/// `auto` takes CUDA device 0 when this build has CUDA and a GPU answers, else the CPU (and
/// says why); `cuda:N` must open or the server does not start.
fn select_device(config: &CaduceusConfig) -> anyhow::Result<Selected> {
    #[cfg(feature = "gpu-emu")]
    if std::env::var(EMULATED_GPU_ENV).is_ok_and(|v| v == "1")
        && matches!(config.model.device, Device::Cuda(_) | Device::Auto)
    {
        tracing::warn!("{EMULATED_GPU_ENV}=1: the GPU engine runs in host emulation (tests only)");
        return Ok(Selected::Cuda(Box::new(
            caduceus_kernels::gpu::Device::emulated(),
        )));
    }
    match config.model.device {
        Device::Cpu => Ok(Selected::Cpu),
        #[cfg(feature = "cuda")]
        Device::Cuda(n) => caduceus_kernels::gpu::Device::cuda(n)
            .map(|d| Selected::Cuda(Box::new(d)))
            .map_err(|e| {
                anyhow::anyhow!(
                    "model.device = \"cuda:{n}\": {e}; set model.device to \"cpu\" or \"auto\""
                )
            }),
        #[cfg(not(feature = "cuda"))]
        Device::Cuda(n) => anyhow::bail!(
            "model.device = \"cuda:{n}\": this binary was built without CUDA support (the `cuda` \
             feature); set model.device to \"cpu\" or \"auto\""
        ),
        #[cfg(feature = "cuda")]
        Device::Auto => match caduceus_kernels::gpu::Device::cuda(0) {
            Ok(dev) => Ok(Selected::Cuda(Box::new(dev))),
            Err(e) => {
                tracing::info!(reason = %e, "model.device = \"auto\": no usable GPU, running on the CPU");
                Ok(Selected::Cpu)
            }
        },
        #[cfg(not(feature = "cuda"))]
        Device::Auto => Ok(Selected::Cpu),
    }
}

/// Loads the model for the CPU engine and serves it.
fn run_cpu(config: CaduceusConfig) -> anyhow::Result<()> {
    check_cpu_dtype(&config)?;
    let weights = match config.model.dtype {
        Dtype::F32 => WeightFormat::F32,
        _ => WeightFormat::Native,
    };
    let loaded = LoadedModel::load_with(&config.model.path, weights)
        .with_context(|| format!("loading the model from {}", config.model.path.display()))?;
    let max_model_len = config
        .model
        .max_model_len
        .unwrap_or_else(|| loaded.max_model_len());
    let s = &config.scheduler;
    let block_bytes = loaded.model.kv_bytes_per_token() * s.block_size;
    let num_blocks = match s.kv_cache_size() {
        KvCacheSize::Blocks(n) => n,
        KvCacheSize::Bytes(b) => (b.bytes() as usize / block_bytes.max(1)).max(2),
    };
    // max_loras is set by the adapter service when there is one (EngineCore::with_adapters).
    let mut sched = s.scheduler_config(num_blocks, max_model_len, None);
    let step_timer = super::step_budget::resolve(s, &loaded.model, &mut sched)?;
    tracing::info!(
        num_blocks,
        kv_cache_mib = num_blocks * block_bytes / (1 << 20),
        max_model_len,
        max_num_seqs = sched.max_num_seqs,
        "KV cache pool"
    );
    let served = ServedModel {
        tokenizer: Arc::new(loaded.tokenizer),
        chat_template: loaded.chat_template,
        served_model_name: served_name(&config, &loaded.name),
        model_root: root_name(&loaded.path, &loaded.name),
        base_config: loaded.model.config().clone(),
        medium: "CPU",
        adapter_format: SlotFormat::Host(config.adapters.dtype.resolve()),
    };
    let eos = served.tokenizer.eos_ids().to_vec();
    let mut core = EngineCore::new(
        Arc::new(loaded.model),
        Some(served.tokenizer.clone()),
        eos,
        sched,
    )?;
    if let Some(timer) = step_timer {
        core = core.with_step_timer(timer);
    }
    serve(config, core, served)
}

/// `model.served_model_name`, else the model's own name.
pub(super) fn served_name(config: &CaduceusConfig, loaded_name: &str) -> String {
    config
        .model
        .served_model_name
        .clone()
        .unwrap_or_else(|| loaded_name.to_owned())
}

/// The file or folder name of the model (what `/v1/models` may show instead of a path).
pub(super) fn root_name(path: &std::path::Path, fallback: &str) -> String {
    path.file_name()
        .map_or_else(|| fallback.to_owned(), |n| n.to_string_lossy().into_owned())
}

/// Serves `core` (any backend) with the adapters, KV events, metrics and the HTTP API `config`
/// asks for, until drained or the engine fails.
pub(super) fn serve<B: Backend + Send + 'static>(
    config: CaduceusConfig,
    mut core: EngineCore<B>,
    model: ServedModel,
) -> anyhow::Result<()> {
    let ServedModel {
        tokenizer,
        chat_template,
        served_model_name,
        model_root,
        base_config,
        medium,
        adapter_format,
    } = model;
    let s = &config.scheduler;
    let vocab_size = base_config.vocab_size;
    let adapters = adapter_service(&config, base_config, &served_model_name, adapter_format)?;
    if let Some(service) = &adapters {
        core = core.with_adapters(service.clone())?;
    }
    let _kv_events = match kv_event_publisher(&config, &served_model_name, medium)? {
        Some(publisher) => {
            core = core.with_kv_events(publisher.sink());
            Some(publisher)
        }
        None => None,
    };
    // Installed before the engine starts so the engine thread's first gauges are kept.
    let metrics = crate::metrics::install();
    let (engine, _thread) = EngineHandle::spawn(core).context("starting the engine thread")?;
    engine.set_max_queued(s.max_queued_requests);
    let api_keys = expose(&config.server.resolve_api_keys()?);
    log_cache_isolation(&config, api_keys.is_empty());
    let structured = structured_compiler(&tokenizer, vocab_size, &config.structured_outputs);
    let state = AppState {
        engine,
        structured,
        tokenizer,
        chat_template: Arc::new(chat_template),
        settings: Arc::new(ServerSettings {
            served_model_name: served_model_name.clone(),
            model_root,
            api_keys,
            request_timeout: config.server.request_timeout.get(),
            engine_stall_timeout: config.server.engine_stall_timeout.get(),
            body_limit_bytes: config.server.body_limit.bytes() as usize,
            log_prompts: config.logging.log_prompts,
            prefix_cache_isolation: config.server.prefix_cache_isolation,
            allow_special_tokens_in_prompt: config.server.allow_special_tokens_in_prompt,
            trust_request_chat_template: config.server.trust_request_chat_template,
            allow_request_priority: config.server.allow_request_priority,
            admin_api_keys: expose(&config.server.admin_api_keys),
            allow_keyless_admin: config.server.allow_runtime_lora_updating
                && config.server.is_loopback(),
            metrics_api_key: config
                .server
                .metrics_api_key
                .as_ref()
                .map(|k| k.expose().to_owned()),
            rate_limiter: config
                .server
                .rate_limit()
                .map(|limit| Arc::new(RateLimiter::new(limit))),
            sampling_defaults: sampling_defaults(&config)?,
        }),
        lifecycle: Arc::new(Lifecycle::default()),
        metrics,
        started: crate::server::protocol::unix_timestamp(),
        adapters,
        adapter_loads: Arc::new(AdapterLoadLimit::new(
            config.server.max_concurrent_adapter_loads,
        )),
    };
    let addr = format!("{}:{}", config.server.host, config.server.port);
    let grace = config.server.shutdown_grace_period.get();
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(config.server.worker_threads)
        .enable_all()
        .thread_name("caduceus-http")
        .build()
        .context("starting the async runtime")?;
    let outcome = runtime.block_on(async {
        let listener = tokio::net::TcpListener::bind(&addr)
            .await
            .with_context(|| format!("binding {addr} (`server.host`, `server.port`)"))?;
        tracing::info!(addr = %listener.local_addr()?, model = %served_model_name, "serving the OpenAI API");
        Ok::<_, anyhow::Error>(run_server(listener, state, grace, shutdown_signal()).await?)
    })?;
    match outcome {
        ServeOutcome::Drained => tracing::info!("drained; exiting"),
        ServeOutcome::GraceExpired { in_flight } => {
            tracing::warn!(
                in_flight,
                "grace period over; exiting with requests still running"
            )
        }
        ServeOutcome::EngineFailed => anyhow::bail!("the engine thread stopped"),
    }
    Ok(())
}

/// The keys in full, for the server's comparisons.
/// The sampling defaults `model.generation_config` takes from a Hugging Face directory's
/// `generation_config.json` (none for GGUF files), logged.
fn sampling_defaults(config: &CaduceusConfig) -> anyhow::Result<SamplingDefaults> {
    let dir = &config.model.path;
    if config.model.generation_config == GenerationConfigSetting::Ignore || !dir.is_dir() {
        return Ok(SamplingDefaults::default());
    }
    let Some(json) = read_optional_json(&dir.join("generation_config.json"))? else {
        return Ok(SamplingDefaults::default());
    };
    let (defaults, refused) = SamplingDefaults::from_generation_config(&json);
    for reason in refused {
        tracing::warn!(%reason, "generation_config.json: a sampling default not used");
    }
    if !defaults.is_empty() {
        tracing::info!(
            defaults = %defaults.describe(),
            "requests that leave these sampling fields out take the model's \
             generation_config.json values (model.generation_config = \"ignore\": the API's own)"
        );
    }
    Ok(defaults)
}

fn expose(keys: &[crate::config::ApiKey]) -> Vec<String> {
    keys.iter().map(|k| k.expose().to_owned()).collect()
}

/// Says at start whether one client can see another's prefix-cache hits.
fn log_cache_isolation(config: &CaduceusConfig, no_api_keys: bool) {
    if !config.scheduler.enable_prefix_caching {
        return;
    }
    match config.server.prefix_cache_isolation {
        PrefixCacheIsolation::PerKey if no_api_keys => tracing::warn!(
            "no API keys configured: every client shares the prefix cache, so one can tell from \
             cached_tokens whether another sent the same prompt; set server.api_keys to \
             isolate tenants (server.prefix_cache_isolation = \"per_key\")"
        ),
        PrefixCacheIsolation::PerKey => {
            tracing::info!("prefix cache isolated per API key (server.prefix_cache_isolation)")
        }
        PrefixCacheIsolation::Shared => tracing::warn!(
            "server.prefix_cache_isolation = \"shared\": every client shares the prefix cache \
             (only a request's own cache_salt separates it)"
        ),
    }
}

/// Starts the KV-event publisher when `kv_events.enabled`; the default topic names this pod
/// (`POD_IP` from the environment, else `server.host`) the way llm-d's subscriber expects.
fn kv_event_publisher(
    config: &CaduceusConfig,
    served_model_name: &str,
    medium: &'static str,
) -> anyhow::Result<Option<KvEventPublisher>> {
    let k = &config.kv_events;
    if !k.enabled {
        return Ok(None);
    }
    let topic = k.topic.clone().unwrap_or_else(|| {
        let host = std::env::var("POD_IP").unwrap_or_else(|_| config.server.host.clone());
        format!("kv@{host}:{}@{served_model_name}", config.server.port)
    });
    let publisher = KvEventPublisher::start(KvEventSettings {
        endpoint: k.endpoint.clone(),
        replay_endpoint: k.replay_endpoint.clone(),
        topic,
        medium,
        replay_buffer: DEFAULT_REPLAY_BUFFER,
    })?;
    Ok(Some(publisher))
}

/// The CPU engine computes in f32 (quantized weights stay quantized).
fn check_cpu_dtype(config: &CaduceusConfig) -> anyhow::Result<()> {
    if matches!(config.model.dtype, Dtype::F16 | Dtype::Bf16) {
        anyhow::bail!(
            "model.dtype = \"{}\": the CPU engine computes in f32; set model.dtype to \"auto\" or \"f32\" (or model.device to \"cuda\")",
            if config.model.dtype == Dtype::F16 { "f16" } else { "bf16" }
        );
    }
    Ok(())
}

/// The structured-outputs compiler for this model, or None (logged) when its vocabulary cannot
/// be described to llguidance: those requests then get a 400, everything else is served.
fn structured_compiler(
    tokenizer: &Arc<crate::tokenizer::Tokenizer>,
    vocab_size: usize,
    section: &crate::config::StructuredOutputsSection,
) -> Option<Arc<crate::structured::ConstraintCompiler>> {
    match crate::structured::compiler_for(tokenizer.clone(), vocab_size, section.limits()) {
        Ok(c) => Some(Arc::new(c)),
        Err(e) => {
            tracing::warn!(error = %e, "structured outputs disabled");
            None
        }
    }
}

#[cfg(test)]
mod tests {
    use super::{sampling_defaults, CaduceusConfig, GenerationConfigSetting, SamplingDefaults};

    #[test]
    fn a_model_directory_gives_its_generation_config_defaults_unless_ignored() {
        let dir = tempfile::tempdir().unwrap();
        let mut config = CaduceusConfig::default();
        config.model.path = dir.path().to_owned();
        // No generation_config.json: none.
        assert!(sampling_defaults(&config).unwrap().is_empty());
        let file = dir.path().join("generation_config.json");
        std::fs::write(
            &file,
            r#"{"temperature": 0.6, "top_p": 0.9, "eos_token_id": 2}"#,
        )
        .unwrap();
        let want = SamplingDefaults {
            temperature: Some(0.6),
            top_p: Some(0.9),
            ..SamplingDefaults::default()
        };
        assert_eq!(sampling_defaults(&config).unwrap(), want);
        config.model.generation_config = GenerationConfigSetting::Ignore;
        assert!(sampling_defaults(&config).unwrap().is_empty());
        // A GGUF file (not a directory) has none.
        config.model.generation_config = GenerationConfigSetting::Auto;
        config.model.path = file;
        assert!(sampling_defaults(&config).unwrap().is_empty());
    }
}
