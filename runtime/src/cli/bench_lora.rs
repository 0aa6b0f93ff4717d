//! `caduceus bench-lora`: what serving many adapters costs, on the engine itself.
//!
//! 1. Decode throughput of a batch of `--batch` requests, each on its own adapter (synthetic,
//!    rank `--rank`, all seven projections), against the same batch on the base model twice, the
//!    three engines stepped in turn (base, adapters, base, base, adapters, ...) so that machine
//!    drift cancels; only steps where every request decodes count.
//! 2. Cold load: reading and validating one adapter from disk, per adapter.
//! 3. Filling a device slot from host memory, and the step times (= inter-token latency) of
//!    running adapter streams while the engine's loader thread reads `--burst` cold adapters from
//!    disk, against a twin engine serving the same streams without loads, stepped in turn with
//!    it (p50/p99).

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
use crate::adapters::{AdapterRegistry, AdapterService, AdapterSettings, Projection, SlotFormat};
use crate::engine::{CpuBackend, EngineCore, EngineRequest, RequestOutput};
use crate::model::loader::LoadedModel;
use crate::model::{LlamaModel, LoraDtype, LoraStack};

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
    #[arg(long, default_value = "f16", value_parser = ["f16", "f32", "q8"])]
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
    pub burst: usize,
    pub slot_fill_ms: f64,
    /// p50/p99 step time of the running streams on the twin engine without loads.
    pub step_ms_without_loads: [f64; 2],
    /// p50/p99 step time (with the time lent to the loader) while the burst loads.
    pub step_ms_during_loads: [f64; 2],
    pub steps_during_loads: usize,
    /// Seconds until the whole burst was in host memory.
    pub burst_secs: f64,
    /// Whether the loader ran only between steps (compute threads on every core).
    pub loader_between_steps: bool,
    pub p99_during_over_without: f64,
}

struct Bench<'m> {
    model: &'m LlamaModel,
    service: Arc<AdapterService>,
    names: Vec<String>,
}

impl Bench<'_> {
    fn engine(
        &self,
        num_reqs: usize,
        max_model_len: usize,
    ) -> anyhow::Result<EngineCore<CpuBackend<&LlamaModel>>> {
        let config = SchedulerConfig {
            max_num_seqs: num_reqs.max(1),
            max_num_batched_tokens: 2048,
            block_size: 16,
            num_blocks: 1 + num_reqs * max_model_len.div_ceil(16),
            max_model_len,
            ..SchedulerConfig::default()
        };
        let core = EngineCore::new(self.model, None, Vec::new(), config)?;
        Ok(core.with_adapters(self.service.clone())?)
    }

    /// Decode tokens/s of each workload in `runs` (per-request adapters, `None` = base),
    /// stepped in turn (one step of each, round after round) so that the drift of a shared
    /// machine hits all of them alike. Only steps where every request decodes count.
    fn decode(&self, runs: &[&[Option<&str>]], steps: usize) -> anyhow::Result<Vec<f64>> {
        struct Run<'m> {
            core: EngineCore<CpuBackend<&'m LlamaModel>>,
            _streams: Vec<mpsc::UnboundedReceiver<RequestOutput>>,
            batch: usize,
            decode_steps: usize,
            secs: f64,
        }
        let vocab = self.model.config().vocab_size;
        let mut list = Vec::new();
        for adapters in runs {
            // Steady state: every adapter already in host memory (cold loads are measured apart).
            for name in adapters.iter().flatten() {
                let entry = self
                    .service
                    .registry()
                    .get(name)
                    .context("registered adapter")?;
                if self.service.cached(&entry).is_none() {
                    self.service.cache(self.service.load(&entry)?.0);
                }
            }
            let mut core = self.engine(adapters.len(), 512)?;
            let prompts = random_prompts(adapters.len(), 32, vocab, 1);
            let mut streams = Vec::new();
            for (i, (p, a)) in prompts.iter().zip(adapters.iter()).enumerate() {
                streams.push(submit(&mut core, i, p.clone(), steps + 8, *a)?);
            }
            list.push(Run {
                core,
                _streams: streams,
                batch: adapters.len(),
                decode_steps: 0,
                secs: 0.0,
            });
        }
        let mut busy = true;
        while busy {
            busy = false;
            for r in list.iter_mut().filter(|r| r.core.has_unfinished()) {
                busy = true;
                let t = Instant::now();
                let s = r.core.step()?;
                let took = t.elapsed().as_secs_f64();
                if s.num_scheduled_tokens == 0 {
                    r.core.wait_for_adapter_load(Duration::from_millis(20));
                } else if s.num_scheduled_tokens == r.batch {
                    // The first decode steps warm caches and slots.
                    r.decode_steps += 1;
                    if r.decode_steps > 4 {
                        r.secs += took;
                    }
                }
            }
        }
        list.iter()
            .map(|r| {
                let counted = r.decode_steps.saturating_sub(4);
                anyhow::ensure!(counted > 0, "no decode steps measured");
                Ok((counted * r.batch) as f64 / r.secs)
            })
            .collect()
    }

    /// Step times (ms) of `running` streams (each on its own warm adapter, as in production)
    /// while the engine's own loader thread reads the `cold` adapters from disk, and of a twin
    /// engine serving the same streams without loads, the two stepped in turn: the twin's steps
    /// see the same context lengths and the same machine drift. Where the loader runs between
    /// steps (compute threads on every core), the time lent to it after a step counts in that
    /// step, and the twin holds it during its own steps without lending it anything. The loads
    /// are what a burst of requests on cold adapters triggers; their requests' own prefill is left
    /// out so that only the cost of loading shows.
    fn loads_during_decode(
        &self,
        running: &[Option<&str>],
        cold: &[&str],
    ) -> anyhow::Result<BurstSteps> {
        let mut loading = self.engine(running.len(), BURST_MODEL_LEN)?;
        let mut twin = self.engine(running.len(), BURST_MODEL_LEN)?;
        twin.set_loader_share_percent(0);
        let vocab = self.model.config().vocab_size;
        let prompts = random_prompts(running.len(), 32, vocab, 2);
        let mut streams = Vec::new();
        for core in [&mut loading, &mut twin] {
            for (i, (p, a)) in prompts.iter().zip(running).enumerate() {
                streams.push(submit(core, i, p.clone(), BURST_MODEL_LEN - 64, *a)?);
            }
        }
        let timed_step = |core: &mut EngineCore<CpuBackend<&LlamaModel>>| -> anyhow::Result<f64> {
            let t = Instant::now();
            core.step()?;
            Ok(t.elapsed().as_secs_f64() * 1e3)
        };
        // Prefill and settle.
        for core in [&mut loading, &mut twin] {
            while core.stats().num_running < running.len() || core.num_parked() > 0 {
                timed_step(core)?;
            }
            for _ in 0..4 {
                timed_step(core)?;
            }
        }
        let entries = cold
            .iter()
            .map(|name| {
                self.service
                    .registry()
                    .get(name)
                    .context("registered adapter")
            })
            .collect::<anyhow::Result<Vec<_>>>()?;
        let start = Instant::now();
        for name in cold {
            anyhow::ensure!(loading.prefetch_adapter(name), "could not queue {name}");
        }
        let mut steps = BurstSteps {
            sliced: loading.slices_loader(),
            ..BurstSteps::default()
        };
        while entries.iter().any(|e| self.service.cached(e).is_none()) {
            steps.loading.push(timed_step(&mut loading)?);
            steps.twin.push(timed_step(&mut twin)?);
            anyhow::ensure!(
                loading.stats().num_running == running.len(),
                "the running streams ended before the cold loads did ({} steps)",
                steps.loading.len()
            );
        }
        steps.secs = start.elapsed().as_secs_f64();
        Ok(steps)
    }
}

/// Context length of the burst's engines: room for the steps a burst of slow, time-sliced loads
/// takes.
const BURST_MODEL_LEN: usize = 4096;

/// [`Bench::loads_during_decode`]'s step times.
#[derive(Default)]
struct BurstSteps {
    /// Of the engine whose loader reads the burst (ms).
    loading: Vec<f64>,
    /// Of its twin, at the same context lengths (ms).
    twin: Vec<f64>,
    /// Seconds until every cold adapter was in host memory.
    secs: f64,
    /// Whether the loader ran only between steps.
    sliced: bool,
}

fn submit(
    core: &mut EngineCore<CpuBackend<&LlamaModel>>,
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
    let dtype = match args.dtype.as_str() {
        "f32" => LoraDtype::F32,
        "q8" => LoraDtype::Q8,
        _ => LoraDtype::F16,
    };
    let settings = AdapterSettings {
        max_loras: args.batch.max(args.burst) + 1,
        max_cpu_loras: count,
        max_cpu_lora_bytes: usize::MAX,
        limits: AdapterLimits {
            max_rank: args.rank,
            max_file_bytes: u64::MAX,
        },
        format: SlotFormat::Host(dtype),
        loader_share_percent: 5,
        loader_threads: None,
    };
    let service = Arc::new(AdapterService::new(
        registry,
        model.config().clone(),
        settings,
    ));
    let b = Bench {
        model,
        service: service.clone(),
        names,
    };
    let n = args.batch;
    let base: Vec<Option<&str>> = vec![None; n];
    let lora: Vec<Option<&str>> = b.names[..n].iter().map(|s| Some(s.as_str())).collect();
    let tok_s = b.decode(&[&base, &lora, &base], args.decode_steps)?;
    let (base1, with_lora, base2) = (tok_s[0], tok_s[1], tok_s[2]);

    // Cold loads straight from disk (not cached), one at a time.
    let mut load_ms = Vec::new();
    let mut adapter_bytes = 0;
    for name in &b.names[n..n + args.burst] {
        let entry = service.registry().get(name).context("registered adapter")?;
        let (adapter, took) = service.load(&entry)?;
        adapter_bytes = adapter.prepared.nbytes();
        load_ms.push(took.as_secs_f64() * 1e3);
    }
    // Filling a device slot from host memory (on the engine thread): a plain copy.
    let entry = service
        .registry()
        .get(&b.names[0])
        .context("registered adapter")?;
    let (adapter, _) = service.load(&entry)?;
    let prepared =
        (adapter.prepared.host()).context("the adapter was not prepared for the CPU slots")?;
    let mut stack = LoraStack::new(model.config(), 4, args.rank, dtype)?;
    let fill = Instant::now();
    for slot in 0..4 {
        stack.copy_from(slot, prepared)?;
    }
    let slot_fill_ms = fill.elapsed().as_secs_f64() * 1e3 / 4.0;
    // Step times of running adapter streams while `burst` cold adapters load.
    let cold: Vec<&str> = b.names[n + args.burst..]
        .iter()
        .map(String::as_str)
        .collect();
    let burst = b.loads_during_decode(&lora, &cold)?;
    let pair = |v: &[f64]| [percentile(v, 0.5), percentile(v, 0.99)];
    let (twin_p, during_p) = (pair(&burst.twin), pair(&burst.loading));
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
        burst: args.burst,
        slot_fill_ms,
        step_ms_without_loads: twin_p,
        step_ms_during_loads: during_p,
        steps_during_loads: burst.loading.len(),
        burst_secs: burst.secs,
        loader_between_steps: burst.sliced,
        p99_during_over_without: during_p[1] / twin_p[1],
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
        "cold load from disk: median {:.2} ms, max {:.2} ms ({:.1} MiB each in the slots' storage)",
        r.cold_load_ms_median, r.cold_load_ms_max, r.adapter_mib
    );
    println!(
        "slot fill from host memory: {:.2} ms per adapter",
        r.slot_fill_ms
    );
    println!(
        "step time p50/p99 ms of {} running adapter streams: {:.2}/{:.2} on a twin engine without loads, {:.2}/{:.2} while {} cold adapters load ({} steps, {:.2} s; loader {}); p99 ratio {:.3}",
        r.batch,
        r.step_ms_without_loads[0],
        r.step_ms_without_loads[1],
        r.step_ms_during_loads[0],
        r.step_ms_during_loads[1],
        r.burst,
        r.steps_during_loads,
        r.burst_secs,
        if r.loader_between_steps {
            "between steps"
        } else {
            "on a free core"
        },
        r.p99_during_over_without
    );
}
