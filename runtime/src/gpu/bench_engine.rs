//! The whole engine's part of `caduceus gpu-bench`: scheduler, executor and device sampling on a
//! [`GpuBackend`] (`EngineCore::with_backend`), N concurrent requests of random prompts, each on
//! an adapter drawn from a power-law (Zipf) mix, EOS ignored; output tokens/s end to end.
//!
//! The adapters go through the server's real path (registry, host loader, device slots). PEFT
//! files for an 8B model are ~170 MB each, so a few distinct ones are written and the rest of the
//! folders hard-link their files: the loader still reads and converts each one (its own host cache
//! entry and device slot), which is what serving costs.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Instant;

use caduceus_scheduler::{RequestId, SchedulerConfig};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use serde::Serialize;
use tokio::sync::mpsc;

use super::model::GpuModel;
use super::{GpuBackend, GpuBackendConfig, KvBlocks, StepLimits};
use crate::adapters::make::write_synthetic_adapters;
use crate::adapters::{
    AdapterLimits, AdapterRegistry, AdapterService, AdapterSettings, Projection,
};
use crate::engine::{EngineCore, EngineRequest, SlotSpec};
use crate::model::LoraDtype;

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
}

/// Adapter index of each request: Zipf(s) over `n` adapters, seeded.
pub fn power_law_mix(requests: usize, n: usize, s: f64, seed: u64) -> Vec<usize> {
    if n == 0 {
        return Vec::new();
    }
    let weights: Vec<f64> = (0..n).map(|k| 1.0 / ((k + 1) as f64).powf(s)).collect();
    let total: f64 = weights.iter().sum();
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    (0..requests)
        .map(|_| {
            let mut u = rng.random_range(0.0..total);
            weights
                .iter()
                .position(|&w| {
                    u -= w;
                    u < 0.0
                })
                .unwrap_or(n - 1)
        })
        .collect()
}

/// Writes `count` adapter folders (`doctor-0000`...) under `dir`, `distinct` of them generated.
fn write_adapters(
    config: &crate::model::config::LlamaConfig,
    dir: &Path,
    o: &EngineBenchOptions,
) -> Result<(), EngineBenchError> {
    let src = dir.join("sources");
    let distinct = o.distinct_files.clamp(1, o.adapters);
    let written = write_synthetic_adapters(
        config,
        &src,
        distinct,
        o.rank,
        &Projection::ALL,
        o.seed,
        2.0 * o.rank as f32,
    )
    .map_err(|e| fail("writing adapters")(&e))?;
    let root = dir.join("adapters");
    for i in 0..o.adapters {
        let from = &written[i % written.len()];
        let to = root.join(format!("doctor-{i:04}"));
        std::fs::create_dir_all(&to).map_err(|e| fail("adapter folder")(&e))?;
        for entry in std::fs::read_dir(from).map_err(|e| fail("adapter folder")(&e))? {
            let entry = entry.map_err(|e| fail("adapter folder")(&e))?;
            let target = to.join(entry.file_name());
            if std::fs::hard_link(entry.path(), &target).is_err() {
                std::fs::copy(entry.path(), &target).map_err(|e| fail("adapter copy")(&e))?;
            }
        }
    }
    Ok(())
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
    let result = run_engine(model, o, &dir.join("adapters"), max_len, progress);
    let _ = std::fs::remove_dir_all(&dir);
    let mut fig = result?;
    fig.adapter_files_s = adapter_files_s;
    Ok(fig)
}

fn run_engine(
    model: GpuModel,
    o: &EngineBenchOptions,
    adapter_dir: &Path,
    max_len: usize,
    progress: &mut dyn FnMut(&str),
) -> Result<EngineFigure, EngineBenchError> {
    let config = model.config().clone();
    let sched = SchedulerConfig {
        max_num_seqs: o.max_num_seqs,
        max_num_batched_tokens: o.max_num_batched_tokens,
        block_size: o.block_size,
        max_model_len: max_len,
        ..SchedulerConfig::default()
    };
    let slots = (o.adapters > 0).then_some(SlotSpec {
        num_slots: o.adapters,
        max_rank: o.rank,
        dtype: LoraDtype::F16,
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
                max_model_len: max_len,
            },
            cuda_graph_max_batch: o.cuda_graph_max_batch,
        },
    )
    .map_err(|e| fail("GPU backend")(&e))?;
    let mut core = EngineCore::with_backend(backend, None, Vec::new(), sched)
        .map_err(|e| fail("engine")(&e))?;
    let num_gpu_blocks = core.scheduler_config().num_blocks;
    let names: Vec<Arc<str>> = (0..o.adapters)
        .map(|i| Arc::from(format!("doctor-{i:04}")))
        .collect();
    if o.adapters > 0 {
        let registry = AdapterRegistry::scan(Some(adapter_dir), Vec::new())
            .map_err(|e| fail("adapter registry")(&e))?;
        let settings = AdapterSettings {
            max_loras: o.adapters,
            max_cpu_loras: o.adapters,
            max_cpu_lora_bytes: usize::MAX,
            limits: AdapterLimits {
                max_rank: o.rank,
                max_file_bytes: u64::MAX,
            },
            dtype: LoraDtype::F16,
            loader_share_percent: 100,
        };
        let service = Arc::new(AdapterService::new(registry, config.clone(), settings));
        core = core
            .with_adapters(service)
            .map_err(|e| fail("adapters")(&e))?;
    }
    let mix = power_law_mix(o.requests, o.adapters, o.zipf_s, o.seed);
    let mut per_adapter = vec![0usize; o.adapters];
    let mut rng = ChaCha8Rng::seed_from_u64(o.seed ^ 0x5eed);
    let vocab = config.vocab_size as u32;
    let mut streams = Vec::with_capacity(o.requests);
    progress(&format!(
        "engine: {} requests x ({} in, {} out), {num_gpu_blocks} KV blocks",
        o.requests, o.input_len, o.output_len
    ));
    let start = Instant::now();
    for i in 0..o.requests {
        let prompt = (0..o.input_len)
            .map(|_| rng.random_range(1..vocab.max(2)))
            .collect();
        let mut req = EngineRequest::new(prompt, o.output_len);
        req.ignore_eos = true;
        req.detokenize = false;
        if let Some(&k) = mix.get(i) {
            per_adapter[k] += 1;
            req.adapter = Some(names[k].clone());
        }
        let (tx, rx) = mpsc::unbounded_channel();
        core.add_request(RequestId(i as u64), req, tx)
            .map_err(|e| fail("adding a request")(&e))?;
        streams.push(rx);
    }
    let mut num_steps = 0u64;
    while core.has_unfinished() {
        core.step().map_err(|e| fail("engine step")(&e))?;
        num_steps += 1;
        if num_steps.is_multiple_of(100) {
            progress(&format!("engine: {num_steps} steps"));
        }
    }
    let elapsed_s = start.elapsed().as_secs_f64();
    let mut output_tokens = 0;
    for mut rx in streams {
        while let Ok(out) = rx.try_recv() {
            output_tokens += out.new_tokens.len();
        }
    }
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
        num_steps,
        num_preemptions: core.stats().num_preemptions,
        num_gpu_blocks,
        requests_per_adapter_top: per_adapter,
        adapter_files_s: 0.0,
    })
}
