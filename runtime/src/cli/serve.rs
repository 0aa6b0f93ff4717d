//! `caduceus serve`: loads the config and the model, starts the engine thread and serves the
//! OpenAI-compatible API until SIGTERM/SIGINT (drain) or an engine failure (non-zero exit).

use std::sync::Arc;

use anyhow::Context;

use crate::adapters::peft::AdapterLimits;
use crate::adapters::{AdapterRegistry, AdapterService, AdapterSettings};
use crate::config::{
    CaduceusConfig, ConfigOverrides, Device, Dtype, KvCacheSize, PrefixCacheIsolation,
};
use crate::engine::{EngineCore, EngineHandle, SchedulerConfig};
use crate::kv_events::{KvEventPublisher, KvEventSettings, DEFAULT_REPLAY_BUFFER};
use crate::model::loader::LoadedModel;
use crate::model::WeightFormat;
use crate::server::{
    run_server, shutdown_signal, AdapterLoadLimit, AppState, Lifecycle, ServeOutcome,
    ServerSettings,
};

/// The adapter registry and tiers when `adapters.dir` is set (listing it reads no weights).
fn adapter_service(
    config: &CaduceusConfig,
    base: crate::model::config::LlamaConfig,
    served_model_name: &str,
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
        dtype: a.dtype.resolve(),
        loader_share_percent: a.loader_step_share_percent,
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

/// Runs the server with `config`.
pub fn run(config: CaduceusConfig) -> anyhow::Result<()> {
    check_device(&config)?;
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
    let sched = SchedulerConfig {
        max_num_seqs: s.max_num_seqs,
        max_num_batched_tokens: s.max_num_batched_tokens,
        block_size: s.block_size,
        num_blocks,
        max_model_len,
        enable_prefix_caching: s.enable_prefix_caching,
        ..SchedulerConfig::default()
    };
    tracing::info!(
        num_blocks,
        kv_cache_mib = num_blocks * block_bytes / (1 << 20),
        max_model_len,
        max_num_seqs = s.max_num_seqs,
        "KV cache pool"
    );
    let served_model_name = config
        .model
        .served_model_name
        .clone()
        .unwrap_or_else(|| loaded.name.clone());
    let tokenizer = Arc::new(loaded.tokenizer);
    let eos = tokenizer.eos_ids().to_vec();
    let base_config = loaded.model.config().clone();
    let mut core = EngineCore::new(Arc::new(loaded.model), Some(tokenizer.clone()), eos, sched)?;
    let adapters = adapter_service(&config, base_config, &served_model_name)?;
    if let Some(service) = &adapters {
        core = core.with_adapters(service.clone())?;
    }
    let _kv_events = match kv_event_publisher(&config, &served_model_name)? {
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
    let state = AppState {
        engine,
        tokenizer,
        chat_template: Arc::new(loaded.chat_template),
        settings: Arc::new(ServerSettings {
            served_model_name: served_model_name.clone(),
            // The file or folder name only: clients never see the server's paths.
            model_root: loaded.path.file_name().map_or_else(
                || served_model_name.clone(),
                |n| n.to_string_lossy().into_owned(),
            ),
            api_keys,
            request_timeout: config.server.request_timeout.get(),
            body_limit_bytes: config.server.body_limit.bytes() as usize,
            log_prompts: config.logging.log_prompts,
            prefix_cache_isolation: config.server.prefix_cache_isolation,
            allow_special_tokens_in_prompt: config.server.allow_special_tokens_in_prompt,
            admin_api_keys: expose(&config.server.admin_api_keys),
            allow_keyless_admin: config.server.allow_runtime_lora_updating
                && config.server.is_loopback(),
            metrics_api_key: config
                .server
                .metrics_api_key
                .as_ref()
                .map(|k| k.expose().to_owned()),
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
        medium: "CPU",
        replay_buffer: DEFAULT_REPLAY_BUFFER,
    })?;
    Ok(Some(publisher))
}

/// Refuses settings this build cannot honour, naming the key and the fix.
fn check_device(config: &CaduceusConfig) -> anyhow::Result<()> {
    if config.model.device == Device::Cuda {
        #[cfg(feature = "cuda")]
        {
            let gpu = caduceus_kernels::gpu::Device::cuda(0)
                .map_err(|e| anyhow::anyhow!("model.device = \"cuda\": {e}"))?;
            anyhow::bail!(
                "model.device = \"cuda\": found {}, but this version has the CUDA kernels only, not \
                 the GPU engine yet; set model.device to \"cpu\" or \"auto\"",
                gpu.describe()
            );
        }
        #[cfg(not(feature = "cuda"))]
        anyhow::bail!(
            "model.device = \"cuda\": this binary was built without CUDA support (the `cuda` \
             feature); set model.device to \"cpu\" or \"auto\""
        );
    }
    if matches!(config.model.dtype, Dtype::F16 | Dtype::Bf16) {
        anyhow::bail!(
            "model.dtype = \"{}\": the CPU engine computes in f32; set model.dtype to \"auto\" or \"f32\"",
            if config.model.dtype == Dtype::F16 { "f16" } else { "bf16" }
        );
    }
    Ok(())
}
