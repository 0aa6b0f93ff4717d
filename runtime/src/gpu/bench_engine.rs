//! The whole engine's part of `caduceus gpu-bench`: scheduler, executor and device sampling on a
//! [`GpuBackend`] (`EngineCore::with_backend`), N concurrent requests of random prompts, each on
//! an adapter drawn from a power-law (Zipf) mix, EOS ignored; output tokens/s end to end.
//!
//! The adapters go through the server's real path (registry, host loader, device slots). PEFT
//! files for an 8B model are ~170 MB each, so a few distinct ones are written and the rest of the
//! folders hard-link their files: the loader still reads and converts each one (its own host cache
//! entry and device slot), which is what serving costs.
//!
//! By default the figure is **warm**: every adapter is read into the host cache and copied into
//! its device slot before the clock starts (`warmup`; the time that takes is reported apart),
//! so it is the steady-state serving throughput. **Cold** ([`EngineBenchOptions::cold`]) starts
//! the clock with every adapter on disk, so it includes loading them. Either way the loop blocks
//! on the engine's wait for an adapter load instead of spinning through empty steps, and the
//! figure carries a profile of its steps ([`StepProfile`]).

mod adapters;
mod slot_watch;
mod steps;
mod warmup;

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Instant;

use caduceus_kernels::gpu::pinned_pool::PinnedPool;
use caduceus_scheduler::{FinishReason, RequestId, SchedulerConfig};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use serde::Serialize;
use tokio::sync::mpsc;

use super::lora::{adapter_pool, image_bytes, ADAPTER_PAGE_BYTES};
use super::model::GpuModel;
use super::{GpuBackend, GpuBackendConfig, KvBlocks, StepLimits};
use crate::adapters::{
    AdapterLimits, AdapterRegistry, AdapterService, AdapterSettings, SlotFormat,
};
use crate::engine::{EngineCore, EngineRequest, RequestOutput, SlotSpec};
pub use adapters::power_law_mix;
use adapters::{adapter_name, write_adapters};
pub use slot_watch::SlotWatch;
pub use steps::{StepKind, StepProfile, StepTime};

/// Why the engine part failed (each names the step).
#[derive(Debug, thiserror::Error)]
#[error("engine benchmark, {step}: {message}")]
pub struct EngineBenchError {
    step: &'static str,
    message: String,
}

fn fail(step: &'static str) -> impl Fn(&dyn std::fmt::Display) -> EngineBenchError {
    move |e| EngineBenchError {
        step,
        message: e.to_string(),
    }
}

/// Sizes of the engine part.
#[derive(Clone, Debug, Serialize)]
pub struct EngineBenchOptions {
    pub requests: usize,
    pub input_len: usize,
    pub output_len: usize,
    /// Distinct adapters in the mix (0: base model only).
    pub adapters: usize,
    /// Distinct adapter files actually written (the others hard-link them).
    pub distinct_files: usize,
    pub rank: usize,
    /// Zipf exponent of the adapter mix (adapter k drawn with weight 1 / (k + 1)^s).
    pub zipf_s: f64,
    pub max_num_seqs: usize,
    /// Largest decode batch replayed from a CUDA graph (0: graphs off).
    pub cuda_graph_max_batch: usize,
    pub max_num_batched_tokens: usize,
    pub block_size: usize,
    /// KV blocks (`None`: the memory plan at `gpu_memory_utilization` 0.9).
    pub num_blocks: Option<usize>,
    /// Where the adapter folders are written (removed afterwards).
    pub scratch_dir: PathBuf,
    pub seed: u64,
    /// Start the clock with the adapters on disk (false: warm them first, untimed).
    pub cold: bool,
    /// Launch kernels as programmatic dependents (`model.programmatic_launch`).
    pub programmatic_launch: bool,
}

/// What the engine part measured.
#[derive(Clone, Debug, Serialize)]
pub struct EngineFigure {
    pub requests: usize,
    pub input_len: usize,
    pub output_len: usize,
    pub adapters: usize,
    pub elapsed_s: f64,
    pub output_tokens: usize,
    pub output_tokens_per_s: f64,
    pub total_tokens_per_s: f64,
    pub num_steps: u64,
    pub num_preemptions: u64,
    pub num_gpu_blocks: usize,
    /// Requests per adapter rank (most popular first), to show the mix.
    pub requests_per_adapter_top: Vec<usize>,
    pub adapter_files_s: f64,
    /// Whether the adapters were warmed before the clock started (false: `cold`; true and
    /// vacuous without adapters).
    pub adapters_warm: bool,
    /// Seconds to make every adapter resident in the host cache and a device slot, untimed
    /// (`None` when cold or without adapters).
    pub adapter_warmup_s: Option<f64>,
    /// Adapters in the host cache when the clock started.
    pub adapters_in_host_cache_at_start: usize,
    /// Adapters in device slots when the clock started.
    pub adapters_in_device_slots_at_start: usize,
    /// Adapter copies into device slots while the clock ran (0 when warm).
    pub device_slot_fills: u64,
    /// Mean milliseconds the engine thread spent in one slot fill, warm-up included (`None`:
    /// no fill): the stall of every running stream per adapter load. With the host tier
    /// holding the device slots' image in pinned pages this is queueing its DMAs (in ordinary
    /// memory: a copy into the pinned staging ring first).
    pub slot_fill_ms: Option<f64>,
    /// MiB of pinned host memory for adapter images (`None`: no adapters).
    pub adapter_pinned_pool_mib: Option<usize>,
    /// Images kept in ordinary memory because the pinned pool was full (0: every fill was a
    /// DMA from pinned pages).
    pub adapter_images_not_pinned: u64,
    /// Requests that ended with an error (their missing tokens lower `output_tokens`).
    pub failed_requests: usize,
    /// The timed run's steps by kind, with the wall time of each kind.
    pub step_profile: StepProfile,
    /// The warm-up's steps (`None` when cold or without adapters).
    pub warmup_step_profile: Option<StepProfile>,
    /// Whether kernels launched as programmatic dependents (asked and available).
    pub programmatic_launch: bool,
}

/// Runs the engine part on `model` (consumed: the backend owns it).
pub fn run_engine_part(
    model: GpuModel,
    o: &EngineBenchOptions,
    progress: &mut dyn FnMut(&str),
) -> Result<EngineFigure, EngineBenchError> {
    let config = model.config().clone();
    let max_len = o.input_len + o.output_len;
    let files_start = Instant::now();
    let dir = o
        .scratch_dir
        .join(format!("caduceus-gpu-bench-{}", std::process::id()));
    if o.adapters > 0 {
        progress(&format!("writing {} adapter folders", o.adapters));
        write_adapters(&config, &dir, o)?;
    }
    let adapter_files_s = files_start.elapsed().as_secs_f64();
    // Before the backend captures its graphs, which keep the launches they were captured with.
    let programmatic_launch = model
        .device()
        .set_programmatic_launch(o.programmatic_launch);
    let result = run_engine(model, o, &dir.join("adapters"), max_len, progress);
    let _ = std::fs::remove_dir_all(&dir);
    let mut fig = result?;
    fig.adapter_files_s = adapter_files_s;
    fig.programmatic_launch = programmatic_launch;
    Ok(fig)
}

/// The engine on the GPU backend, its adapter slots watched.
type BenchEngine = EngineCore<SlotWatch<GpuBackend>>;

/// The engine of the options, and its adapter service if it serves adapters.
fn build_engine(
    model: GpuModel,
    o: &EngineBenchOptions,
    adapter_dir: &Path,
    max_len: usize,
) -> Result<(BenchEngine, Option<Arc<AdapterService>>), EngineBenchError> {
    let config = model.config().clone();
    let sched = SchedulerConfig {
        max_num_seqs: o.max_num_seqs,
        max_num_batched_tokens: o.max_num_batched_tokens,
        block_size: o.block_size,
        max_model_len: max_len,
        ..SchedulerConfig::default()
    };
    // As `caduceus serve` on a GPU: the host tier keeps the device slots' image.
    // Pinned pages for every adapter's image (and a quarter more), as serve pins its cache's.
    let pinned = match o.adapters {
        0 => None,
        n => {
            let image = image_bytes(&config, o.rank);
            let bytes = n * image.next_multiple_of(ADAPTER_PAGE_BYTES);
            Some(adapter_pool(model.device(), bytes).map_err(|e| fail("pinned adapter pool")(&e))?)
        }
    };
    let format = SlotFormat::Device {
        dtype: model.dtype(),
        pinned,
    };
    let slots = (o.adapters > 0).then(|| SlotSpec {
        num_slots: o.adapters,
        max_rank: o.rank,
        format: format.clone(),
    });
    let kv_blocks = match o.num_blocks {
        Some(n) => KvBlocks::Fixed(n),
        None => KvBlocks::Plan {
            gpu_memory_utilization: 0.9,
        },
    };
    let backend = GpuBackend::new(
        model,
        GpuBackendConfig {
            block_size: o.block_size,
            kv_blocks,
            adapter_slots: slots,
            step: StepLimits {
                max_num_batched_tokens: o.max_num_batched_tokens,
                max_num_seqs: o.max_num_seqs,
                max_scored_rows: 0,
                max_model_len: max_len,
            },
            cuda_graph_max_batch: o.cuda_graph_max_batch,
        },
    )
    .map_err(|e| fail("GPU backend")(&e))?;
    let core = EngineCore::with_backend(SlotWatch::new(backend), None, Vec::new(), sched)
        .map_err(|e| fail("engine")(&e))?;
    if o.adapters == 0 {
        return Ok((core, None));
    }
    let registry = AdapterRegistry::scan(Some(adapter_dir), Vec::new())
        .map_err(|e| fail("adapter registry")(&e))?;
    // One host entry and one device slot per adapter: nothing is evicted once warm.
    let settings = AdapterSettings {
        max_loras: o.adapters,
        max_cpu_loras: o.adapters,
        max_cpu_lora_bytes: usize::MAX,
        limits: AdapterLimits {
            max_rank: o.rank,
            max_file_bytes: u64::MAX,
        },
        format,
        loader_share_percent: 100,
        loader_threads: None,
    };
    let service = Arc::new(AdapterService::new(registry, config, settings));
    let core = core
        .with_adapters(service.clone())
        .map_err(|e| fail("adapters")(&e))?;
    Ok((core, Some(service)))
}

/// How many of `names` the host cache holds now.
fn count_host_cached(service: Option<&AdapterService>, names: &[Arc<str>]) -> usize {
    let Some(s) = service else {
        return 0;
    };
    names
        .iter()
        .filter_map(|n| s.registry().get(n))
        .filter(|e| s.cached(e).is_some())
        .count()
}

/// Queues the timed requests (ids `0..requests`); returns their streams and the requests per
/// adapter.
fn submit_requests(
    core: &mut BenchEngine,
    o: &EngineBenchOptions,
    names: &[Arc<str>],
    vocab: u32,
) -> Result<(Vec<mpsc::UnboundedReceiver<RequestOutput>>, Vec<usize>), EngineBenchError> {
    let mix = power_law_mix(o.requests, o.adapters, o.zipf_s, o.seed);
    let mut per_adapter = vec![0usize; o.adapters];
    let mut rng = ChaCha8Rng::seed_from_u64(o.seed ^ 0x5eed);
    let mut streams = Vec::with_capacity(o.requests);
    for i in 0..o.requests {
        let prompt = (0..o.input_len)
            .map(|_| rng.random_range(1..vocab.max(2)))
            .collect();
        let mut req = EngineRequest::new(prompt, o.output_len);
        req.ignore_eos = true;
        req.detokenize = false;
        if let Some(&k) = mix.get(i) {
            per_adapter[k] += 1;
            req.adapter = names.get(k).cloned();
        }
        let (tx, rx) = mpsc::unbounded_channel();
        core.add_request(RequestId(i as u64), req, tx)
            .map_err(|e| fail("adding a request")(&e))?;
        streams.push(rx);
    }
    Ok((streams, per_adapter))
}

/// Output tokens streamed, and requests that ended with an error.
fn collect_outputs(streams: Vec<mpsc::UnboundedReceiver<RequestOutput>>) -> (usize, usize) {
    let mut output_tokens = 0;
    let mut failed = 0;
    for mut rx in streams {
        while let Ok(out) = rx.try_recv() {
            output_tokens += out.new_tokens.len();
            if out
                .finished
                .is_some_and(|f| f.reason == FinishReason::Error)
            {
                failed += 1;
            }
        }
    }
    (output_tokens, failed)
}

/// Warms every adapter (untimed) unless the run is cold or has none, and checks that each is
/// then in the host cache and a device slot.
fn warm_unless_cold(
    core: &mut BenchEngine,
    service: Option<&AdapterService>,
    o: &EngineBenchOptions,
    names: &[Arc<str>],
    progress: &mut dyn FnMut(&str),
) -> Result<Option<warmup::Warmup>, EngineBenchError> {
    if o.cold || names.is_empty() {
        return Ok(None);
    }
    let w = warmup::warm_up(core, names, o.requests as u64, progress)?;
    let (in_host, in_slots) = (
        count_host_cached(service, names),
        core.backend().num_resident(),
    );
    progress(&format!(
        "engine: {in_slots} adapters resident in {:.1} s ({} slot fills, {} empty steps)",
        w.seconds,
        core.backend().fills(),
        w.steps.empty.steps
    ));
    if (in_host, in_slots) != (names.len(), names.len()) {
        return Err(fail("adapter warm-up")(&format!(
            "{in_host} of {} adapters in the host cache, {in_slots} in device slots",
            names.len()
        )));
    }
    Ok(Some(w))
}

fn run_engine(
    model: GpuModel,
    o: &EngineBenchOptions,
    adapter_dir: &Path,
    max_len: usize,
    progress: &mut dyn FnMut(&str),
) -> Result<EngineFigure, EngineBenchError> {
    let vocab = model.config().vocab_size as u32;
    let (mut core, service) = build_engine(model, o, adapter_dir, max_len)?;
    let pool = match service.as_deref().map(|s| &s.settings().format) {
        Some(SlotFormat::Device { pinned, .. }) => pinned.clone(),
        _ => None,
    };
    let num_gpu_blocks = core.scheduler_config().num_blocks;
    let names: Vec<Arc<str>> = (0..o.adapters)
        .map(|i| Arc::from(adapter_name(i)))
        .collect();
    let warm = warm_unless_cold(&mut core, service.as_deref(), o, &names, progress)?;
    let in_host = count_host_cached(service.as_deref(), &names);
    let in_slots = core.backend().num_resident();
    let fills_before = core.backend().fills();
    let preemptions_before = core.stats().num_preemptions;
    progress(&format!(
        "engine: {} requests x ({} in, {} out), {num_gpu_blocks} KV blocks, adapters {}",
        o.requests,
        o.input_len,
        o.output_len,
        if o.cold { "cold" } else { "warm" }
    ));
    let start = Instant::now();
    let (streams, mut per_adapter) = submit_requests(&mut core, o, &names, vocab)?;
    let step_profile = steps::drive(&mut core, "engine", progress)?;
    let elapsed_s = start.elapsed().as_secs_f64();
    let (output_tokens, failed_requests) = collect_outputs(streams);
    per_adapter.sort_unstable_by(|a, b| b.cmp(a));
    per_adapter.truncate(8);
    Ok(EngineFigure {
        requests: o.requests,
        input_len: o.input_len,
        output_len: o.output_len,
        adapters: o.adapters,
        elapsed_s,
        output_tokens,
        output_tokens_per_s: output_tokens as f64 / elapsed_s,
        total_tokens_per_s: (output_tokens + o.requests * o.input_len) as f64 / elapsed_s,
        num_steps: step_profile.num_steps,
        num_preemptions: core
            .stats()
            .num_preemptions
            .saturating_sub(preemptions_before),
        num_gpu_blocks,
        requests_per_adapter_top: per_adapter,
        adapter_files_s: 0.0,
        adapters_warm: !o.cold,
        adapter_warmup_s: warm.as_ref().map(|w| w.seconds),
        adapters_in_host_cache_at_start: in_host,
        adapters_in_device_slots_at_start: in_slots,
        device_slot_fills: core.backend().fills().saturating_sub(fills_before),
        slot_fill_ms: (core.backend().fills() > 0).then(|| {
            core.backend().fill_time().as_secs_f64() * 1e3 / core.backend().fills() as f64
        }),
        adapter_pinned_pool_mib: pool.as_ref().map(|p| p.nbytes() >> 20),
        adapter_images_not_pinned: pool.as_ref().map_or(0, PinnedPool::refused),
        failed_requests,
        step_profile,
        warmup_step_profile: warm.map(|w| w.steps),
        programmatic_launch: false,
    })
}
