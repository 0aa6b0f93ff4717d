//! `caduceus bench-lora`: what serving many adapters costs, on the engine itself.
//!
//! 1. Decode throughput of a batch of `--batch` requests, each on its own adapter (synthetic,
//!    rank `--rank`, all seven projections), against the same batch on the base model, measured in
//!    base / adapters / base order (A-B-A) from the steps where every request decodes.
//! 2. Cold load: reading and validating one adapter from disk, per adapter.
//! 3. Inter-token latency of running streams while a burst of requests on cold adapters arrives,
//!    against the same burst on adapters already in host memory (p50/p99 of step times).

use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Context;
use caduceus_scheduler::{RequestId, SchedulerConfig};
use serde::Serialize;
use tokio::sync::mpsc;

use super::bench_throughput::random_prompts;
use super::ModelArg;
use crate::adapters::make::write_synthetic_adapters;
use crate::adapters::peft::AdapterLimits;
use crate::adapters::{AdapterRegistry, AdapterService, AdapterSettings, Projection};
use crate::engine::{EngineCore, EngineRequest, RequestOutput};
use crate::model::loader::LoadedModel;
use crate::model::{LlamaModel, LoraDtype};

/// Arguments of `caduceus bench-lora`.
#[derive(Debug, clap::Args)]
pub struct BenchLoraArgs {
    #[command(flatten)]
    model: ModelArg,
    /// Requests decoding together (each on its own adapter).
    #[arg(long, default_value_t = 16)]
    batch: usize,
    /// Adapter rank.
    #[arg(long, default_value_t = 16)]
    rank: usize,
    /// Slot storage.
    #[arg(long, default_value = "f16", value_parser = ["f16", "f32"])]
    dtype: String,
    /// Decode steps measured per run.
    #[arg(long, default_value_t = 48)]
    decode_steps: usize,
    /// Adapters loaded cold in the burst.
    #[arg(long, default_value_t = 16)]
    burst: usize,
    /// Print one JSON object.
    #[arg(long)]
    json: bool,
}

/// Figures of one `bench-lora` run.
#[derive(Debug, Serialize)]
pub struct LoraReport {
    pub batch: usize,
    pub rank: usize,
    pub dtype: String,
    pub threads: usize,
    pub base_decode_tok_s: [f64; 2],
    pub lora_decode_tok_s: f64,
    pub lora_over_base: f64,
    pub cold_load_ms_median: f64,
    pub cold_load_ms_max: f64,
    pub adapter_mib: f64,
    pub itl_baseline_ms: [f64; 2],
    pub itl_warm_burst_ms: [f64; 2],
    pub itl_cold_burst_ms: [f64; 2],
    pub p99_cold_over_warm: f64,
}

struct Bench<'m> {
    model: &'m LlamaModel,
    service: Arc<AdapterService>,
    dtype: LoraDtype,
    names: Vec<String>,
}

impl Bench<'_> {
    fn engine(&self, num_reqs: usize) -> anyhow::Result<EngineCore<&LlamaModel>> {
        let config = SchedulerConfig {
            max_num_seqs: num_reqs.max(1),
            max_num_batched_tokens: 2048,
            block_size: 16,
            num_blocks: 1 + num_reqs * 32,
            max_model_len: 512,
            ..SchedulerConfig::default()
        };
        let core = EngineCore::new(self.model, None, Vec::new(), config)?;
        Ok(core.with_adapters(self.service.clone(), self.dtype)?)
    }

    /// Decode tokens/s of `adapters.len()` requests (each on its adapter, `None` = base).
    fn decode(&self, adapters: &[Option<&str>], steps: usize) -> anyhow::Result<f64> {
        let mut core = self.engine(adapters.len())?;
        let prompts = random_prompts(adapters.len(), 32, self.model.config().vocab_size, 1);
        let mut streams = Vec::new();
        for (i, (p, a)) in prompts.iter().zip(adapters).enumerate() {
            streams.push(submit(&mut core, i, p.clone(), steps + 8, *a)?);
        }
        // Warm-up: prefill, loads and the first decode steps.
        let mut decode_steps = Vec::new();
        while core.has_unfinished() {
            let t = Instant::now();
            let s = core.step()?;
            if s.num_scheduled_tokens == 0 {
                core.wait_for_adapter_load(Duration::from_millis(20));
            } else if s.num_scheduled_tokens == adapters.len() {
                decode_steps.push(t.elapsed());
            }
        }
        let measured = &decode_steps[decode_steps.len().min(4)..];
        anyhow::ensure!(!measured.is_empty(), "no decode steps measured");
        let secs: f64 = measured.iter().map(Duration::as_secs_f64).sum();
        Ok((measured.len() * adapters.len()) as f64 / secs)
    }

    /// Step times (ms) of `running` base streams while a burst of requests on `burst` adapters
    /// arrives at step 8; returns (baseline before the burst, during the burst).
    fn burst(&self, running: usize, burst: &[&str]) -> anyhow::Result<(Vec<f64>, Vec<f64>)> {
        let mut core = self.engine(running + burst.len())?;
        let vocab = self.model.config().vocab_size;
        let prompts = random_prompts(running, 32, vocab, 2);
        let mut streams = Vec::new();
        for (i, p) in prompts.iter().enumerate() {
            streams.push(submit(&mut core, i, p.clone(), 400, None)?);
        }
        let mut before = Vec::new();
        let mut during = Vec::new();
        let mut step = 0;
        let mut burst_done: Option<usize> = None;
        let burst_prompts = random_prompts(burst.len(), 16, vocab, 3);
        let mut burst_streams = Vec::new();
        loop {
            if step == 24 {
                for (j, (p, a)) in burst_prompts.iter().zip(burst).enumerate() {
                    burst_streams.push(submit(&mut core, running + j, p.clone(), 4, Some(a))?);
                }
            }
            let t = Instant::now();
            core.step()?;
            let ms = t.elapsed().as_secs_f64() * 1e3;
            step += 1;
            if (8..24).contains(&step) {
                before.push(ms);
            } else if step > 24 && burst_done.is_none() {
                during.push(ms);
                if burst_streams.iter_mut().all(finished) {
                    burst_done = Some(step);
                }
            }
            if burst_done.is_some_and(|d| step >= d + 8) || !core.has_unfinished() {
                break;
            }
        }
        Ok((before, during))
    }
}

fn submit(
    core: &mut EngineCore<&LlamaModel>,
    id: usize,
    prompt: Vec<u32>,
    max_tokens: usize,
    adapter: Option<&str>,
) -> anyhow::Result<mpsc::UnboundedReceiver<RequestOutput>> {
    let (tx, rx) = mpsc::unbounded_channel();
    let mut req = EngineRequest::new(prompt, max_tokens);
    req.ignore_eos = true;
    req.detokenize = false;
    req.adapter = adapter.map(Arc::from);
    core.add_request(RequestId(id as u64), req, tx)?;
    Ok(rx)
}

/// Drains a stream; true once it has finished.
fn finished(rx: &mut mpsc::UnboundedReceiver<RequestOutput>) -> bool {
    let mut done = false;
    while let Ok(o) = rx.try_recv() {
        done |= o.finished.is_some();
    }
    done || rx.is_closed()
}

fn percentile(v: &[f64], p: f64) -> f64 {
    let mut s = v.to_vec();
    s.sort_by(f64::total_cmp);
    if s.is_empty() {
        return 0.0;
    }
    s[((s.len() - 1) as f64 * p).round() as usize]
}

/// Runs `caduceus bench-lora`.
pub fn run(args: BenchLoraArgs) -> anyhow::Result<()> {
    let loaded = LoadedModel::load(&args.model.model)
        .with_context(|| format!("loading {}", args.model.model.display()))?;
    let model = &loaded.model;
    let dir = std::env::temp_dir().join(format!("caduceus-bench-lora-{}", std::process::id()));
    let count = args.batch + 2 * args.burst;
    write_synthetic_adapters(
        model.config(),
        &dir,
        count,
        args.rank,
        &Projection::ALL,
        7,
        32.0,
    )?;
    let result = run_in(&args, model, &dir, count);
    let _ = std::fs::remove_dir_all(&dir);
    let report = result?;
    if args.json {
        println!("{}", serde_json::to_string(&report)?);
    } else {
        print_report(&report);
    }
    Ok(())
}

fn run_in(
    args: &BenchLoraArgs,
    model: &LlamaModel,
    dir: &std::path::Path,
    count: usize,
) -> anyhow::Result<LoraReport> {
    let registry = AdapterRegistry::scan(Some(dir), Vec::new())?;
    let names: Vec<String> = registry.list().iter().map(|e| e.name.to_string()).collect();
    let settings = AdapterSettings {
        max_loras: args.batch.max(args.burst) + 1,
        max_cpu_loras: count,
        max_cpu_lora_bytes: usize::MAX,
        limits: AdapterLimits {
            max_rank: args.rank,
            max_file_bytes: u64::MAX,
        },
    };
    let service = Arc::new(AdapterService::new(
        registry,
        model.config().clone(),
        settings,
    ));
    let dtype = if args.dtype == "f32" {
        LoraDtype::F32
    } else {
        LoraDtype::F16
    };
    let b = Bench {
        model,
        service: service.clone(),
        dtype,
        names,
    };
    let n = args.batch;
    let base: Vec<Option<&str>> = vec![None; n];
    let lora: Vec<Option<&str>> = b.names[..n].iter().map(|s| Some(s.as_str())).collect();
    let base1 = b.decode(&base, args.decode_steps)?;
    let with_lora = b.decode(&lora, args.decode_steps)?;
    let base2 = b.decode(&base, args.decode_steps)?;

    // Cold loads straight from disk (not cached), one at a time.
    let mut load_ms = Vec::new();
    let mut adapter_bytes = 0;
    for name in &b.names[n..n + args.burst] {
        let entry = service.registry().get(name).context("registered adapter")?;
        let (adapter, took) = service.load(&entry)?;
        adapter_bytes = adapter.nbytes();
        load_ms.push(took.as_secs_f64() * 1e3);
    }
    // Burst on adapters now in host memory (warm) vs never loaded (cold).
    for name in &b.names[n..n + args.burst] {
        let entry = service.registry().get(name).context("registered adapter")?;
        let (adapter, _) = service.load(&entry)?;
        service.cache(adapter);
    }
    let warm: Vec<&str> = b.names[n..n + args.burst]
        .iter()
        .map(String::as_str)
        .collect();
    let cold: Vec<&str> = b.names[n + args.burst..]
        .iter()
        .map(String::as_str)
        .collect();
    let (base_itl, warm_itl) = b.burst(n, &warm)?;
    let (base_itl2, cold_itl) = b.burst(n, &cold)?;
    let pair = |v: &[f64]| [percentile(v, 0.5), percentile(v, 0.99)];
    let all_base: Vec<f64> = base_itl.iter().chain(&base_itl2).copied().collect();
    let (warm_p, cold_p) = (pair(&warm_itl), pair(&cold_itl));
    Ok(LoraReport {
        batch: n,
        rank: args.rank,
        dtype: args.dtype.clone(),
        threads: rayon::current_num_threads(),
        base_decode_tok_s: [base1, base2],
        lora_decode_tok_s: with_lora,
        lora_over_base: with_lora / (0.5 * (base1 + base2)),
        cold_load_ms_median: percentile(&load_ms, 0.5),
        cold_load_ms_max: percentile(&load_ms, 1.0),
        adapter_mib: adapter_bytes as f64 / (1 << 20) as f64,
        itl_baseline_ms: pair(&all_base),
        itl_warm_burst_ms: warm_p,
        itl_cold_burst_ms: cold_p,
        p99_cold_over_warm: cold_p[1] / warm_p[1],
    })
}

fn print_report(r: &LoraReport) {
    println!(
        "batch {} x rank-{} adapters ({} slots), {} threads",
        r.batch, r.rank, r.dtype, r.threads
    );
    println!(
        "decode tok/s: base {:.1} / {:.1}, {} distinct adapters {:.1} -> {:.3}x base",
        r.base_decode_tok_s[0],
        r.base_decode_tok_s[1],
        r.batch,
        r.lora_decode_tok_s,
        r.lora_over_base
    );
    println!(
        "cold load from disk: median {:.2} ms, max {:.2} ms ({:.1} MiB f32 each)",
        r.cold_load_ms_median, r.cold_load_ms_max, r.adapter_mib
    );
    println!(
        "step time p50/p99 ms: no burst {:.2}/{:.2}, warm burst {:.2}/{:.2}, cold burst {:.2}/{:.2}; p99 cold/warm {:.3}",
        r.itl_baseline_ms[0],
        r.itl_baseline_ms[1],
        r.itl_warm_burst_ms[0],
        r.itl_warm_burst_ms[1],
        r.itl_cold_burst_ms[0],
        r.itl_cold_burst_ms[1],
        r.p99_cold_over_warm
    );
}
