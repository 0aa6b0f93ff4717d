//! `caduceus bench-throughput`: offline throughput of the engine (continuous batching through the
//! scheduler), like vLLM's `benchmarks/benchmark_throughput.py`: N random prompts of L tokens,
//! M output tokens each (EOS ignored), all submitted at once.

use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Context;
use caduceus_scheduler::{RequestId, SchedulerConfig};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use serde::Serialize;
use tokio::sync::mpsc;

use super::ModelArg;
use crate::engine::{EngineCore, EngineRequest};
use crate::model::loader::LoadedModel;
use crate::model::LlamaModel;
use crate::sampling::SamplingParams;
use crate::structured::{
    mask_stats, tok_env, CompileLimits, CompiledConstraint, ConstraintCompiler, ConstraintSpec,
};

/// Arguments of `caduceus bench-throughput`.
#[derive(Debug, clap::Args)]
pub struct BenchThroughputArgs {
    #[command(flatten)]
    model: ModelArg,
    /// Number of prompts.
    #[arg(long, default_value_t = 64)]
    num_prompts: usize,
    /// Tokens per prompt (random ids, distinct per prompt).
    #[arg(long, default_value_t = 128)]
    input_len: usize,
    /// Tokens generated per prompt.
    #[arg(long, default_value_t = 128)]
    output_len: usize,
    #[command(flatten)]
    engine: EngineArgs,
    /// Also run the same prompts one at a time (max_num_seqs = 1) and print the speed-up.
    #[arg(long)]
    compare_sequential: bool,
    /// Seed of the random prompts.
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// Print one JSON object instead of a table.
    #[arg(long)]
    json: bool,
    /// Constrain the first N requests by a JSON schema (an array of triage objects that cannot
    /// end within `--output-len`), to measure the cost of grammar masks.
    #[arg(long, default_value_t = 0)]
    constrained: usize,
    /// Sampling temperature of every request (0, the default: greedy).
    #[arg(long, default_value_t = 0.0)]
    temperature: f32,
    /// Nucleus of every request (1: off).
    #[arg(long, default_value_t = 1.0)]
    top_p: f32,
    /// Top-k of every request (0: off).
    #[arg(long, default_value_t = 0)]
    top_k: usize,
    /// Logprobs (the sampled token's and this many alternatives) for every token.
    #[arg(long)]
    logprobs: Option<usize>,
}

/// The schema `--constrained` requests follow: triage objects, at least 10 000 of them.
const BENCH_SCHEMA: &str = r#"{"type": "array", "minItems": 10000, "items": {"type": "object",
  "properties": {"urgent": {"type": "boolean"}, "reason": {"type": "string"},
  "see_doctor_within_hours": {"type": "integer"}},
  "required": ["urgent", "reason", "see_doctor_within_hours"]}}"#;

/// Scheduler settings shared by the engine benchmarks.
#[derive(Debug, Clone, clap::Args)]
pub struct EngineArgs {
    /// Most requests per step.
    #[arg(long, default_value_t = 256)]
    pub max_num_seqs: usize,
    /// Token budget per step.
    #[arg(long, default_value_t = 2048)]
    pub max_num_batched_tokens: usize,
    /// Tokens per KV block.
    #[arg(long, default_value_t = 16)]
    pub block_size: usize,
    /// KV pool size in blocks (default: enough for every request at once).
    #[arg(long)]
    pub num_blocks: Option<usize>,
    /// Turn prefix caching off.
    #[arg(long)]
    pub no_prefix_caching: bool,
}

impl EngineArgs {
    /// The scheduler configuration for requests of up to `max_len` tokens, `num_requests` of them.
    pub fn config(
        &self,
        max_model_len: usize,
        max_len: usize,
        num_requests: usize,
    ) -> SchedulerConfig {
        let bs = self.block_size.max(1);
        SchedulerConfig {
            max_num_seqs: self.max_num_seqs,
            max_num_batched_tokens: self.max_num_batched_tokens,
            block_size: bs,
            num_blocks: self
                .num_blocks
                .unwrap_or(1 + num_requests.max(1) * max_len.div_ceil(bs)),
            max_model_len,
            enable_prefix_caching: !self.no_prefix_caching,
            ..SchedulerConfig::default()
        }
    }
}

/// Figures of one throughput run (field names as in vLLM's JSON output).
#[derive(Debug, Clone, Serialize)]
pub struct ThroughputReport {
    pub num_requests: usize,
    pub elapsed_s: f64,
    pub requests_per_s: f64,
    pub output_tokens_per_s: f64,
    pub total_tokens_per_s: f64,
    pub num_preemptions: u64,
    pub num_steps: u64,
    /// Requests constrained by a grammar.
    pub num_constrained: usize,
    /// Grammar masks computed, and their mean time (summed over threads) in microseconds.
    pub num_masks: u64,
    pub mean_mask_us: f64,
}

/// Runs `prompts` to completion on one engine and measures it.
pub fn run_throughput(
    model: &LlamaModel,
    config: SchedulerConfig,
    prompts: &[Vec<u32>],
    output_len: usize,
    sampling: &SamplingParams,
    constrained: Option<(&Arc<CompiledConstraint>, usize)>,
) -> anyhow::Result<ThroughputReport> {
    let mut core = EngineCore::new(model, None, Vec::new(), config)?;
    let masks_before = mask_stats();
    let mut streams = Vec::new();
    let start = Instant::now();
    for (i, p) in prompts.iter().enumerate() {
        let (tx, rx) = mpsc::unbounded_channel();
        let mut req = EngineRequest::new(p.clone(), output_len);
        req.ignore_eos = true;
        req.detokenize = false;
        req.sampling = sampling.clone();
        if let Some((grammar, _)) = constrained.filter(|&(_, n)| i < n) {
            req.constraint = Some(grammar.clone());
        }
        core.add_request(RequestId(i as u64), req, tx)?;
        streams.push(rx);
    }
    let mut num_steps = 0;
    while core.has_unfinished() {
        core.step()?;
        num_steps += 1;
    }
    let elapsed_s = start.elapsed().as_secs_f64();
    let mut output_tokens = 0;
    for mut rx in streams {
        while let Ok(o) = rx.try_recv() {
            output_tokens += o.new_tokens.len();
        }
    }
    let input_tokens: usize = prompts.iter().map(Vec::len).sum();
    let masks = mask_stats();
    let num_masks = masks.num_masks - masks_before.num_masks;
    let mask_nanos = masks.total_nanos - masks_before.total_nanos;
    Ok(ThroughputReport {
        num_requests: prompts.len(),
        elapsed_s,
        requests_per_s: prompts.len() as f64 / elapsed_s,
        output_tokens_per_s: output_tokens as f64 / elapsed_s,
        total_tokens_per_s: (input_tokens + output_tokens) as f64 / elapsed_s,
        num_preemptions: core.stats().num_preemptions,
        num_steps,
        num_constrained: constrained.map_or(0, |(_, n)| n.min(prompts.len())),
        num_masks,
        mean_mask_us: mask_nanos as f64 / 1e3 / num_masks.max(1) as f64,
    })
}

/// `n` prompts of `len` random token ids in `[lo, vocab)`, distinct per prompt.
pub fn random_prompts(n: usize, len: usize, vocab: usize, seed: u64) -> Vec<Vec<u32>> {
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    let lo = (vocab / 100).min(1000) as u32;
    (0..n)
        .map(|_| {
            (0..len)
                .map(|_| rng.random_range(lo..vocab as u32))
                .collect()
        })
        .collect()
}

/// Runs `caduceus bench-throughput`.
pub fn run(args: BenchThroughputArgs) -> anyhow::Result<()> {
    let sampling = SamplingParams {
        temperature: args.temperature,
        top_p: args.top_p,
        top_k: (args.top_k > 0).then_some(args.top_k),
        logprobs: args.logprobs,
        ..SamplingParams::default()
    };
    sampling.validate()?;
    let loaded = LoadedModel::load(&args.model.model)
        .with_context(|| format!("loading {}", args.model.model.display()))?;
    let model = &loaded.model;
    let max_len = args.input_len + args.output_len;
    let max_model_len = loaded.max_model_len().max(max_len);
    let prompts = random_prompts(
        args.num_prompts,
        args.input_len,
        model.config().vocab_size,
        args.seed,
    );
    let config = args.engine.config(max_model_len, max_len, args.num_prompts);
    let grammar = if args.constrained > 0 {
        let tokenizer = Arc::new(loaded.tokenizer.clone());
        let env = tok_env::build(tokenizer, model.config().vocab_size)?;
        let compiler = ConstraintCompiler::new(env, CompileLimits::default())?;
        let start = Instant::now();
        let schema = ConstraintSpec::JsonSchema(serde_json::from_str(BENCH_SCHEMA)?);
        let g = compiler.compile(&schema, None, Duration::from_secs(60))?;
        if !args.json {
            println!(
                "schema compiled in {:.1} ms",
                start.elapsed().as_secs_f64() * 1e3
            );
        }
        Some(g)
    } else {
        None
    };
    let constrained = grammar.as_ref().map(|g| (g, args.constrained));
    let batched = run_throughput(
        model,
        config.clone(),
        &prompts,
        args.output_len,
        &sampling,
        constrained,
    )?;
    let sequential = if args.compare_sequential {
        let seq_config = SchedulerConfig {
            max_num_seqs: 1,
            ..config
        };
        Some(run_throughput(
            model,
            seq_config,
            &prompts,
            args.output_len,
            &sampling,
            constrained,
        )?)
    } else {
        None
    };
    if args.json {
        let mut v = serde_json::to_value(&batched)?;
        if let Some(s) = &sequential {
            v["sequential"] = serde_json::to_value(s)?;
            v["speedup_vs_sequential"] = (batched.requests_per_s / s.requests_per_s).into();
        }
        println!("{v}");
        return Ok(());
    }
    println!(
        "{} prompts x ({} in, {} out), temperature {}, top_p {}, top_k {}, logprobs {:?}, threads {}",
        args.num_prompts,
        args.input_len,
        args.output_len,
        args.temperature,
        args.top_p,
        args.top_k,
        args.logprobs,
        rayon::current_num_threads()
    );
    print_report("batched", &batched);
    if let Some(s) = &sequential {
        print_report("sequential", s);
        println!(
            "speed-up of batched over sequential: {:.2}x",
            batched.requests_per_s / s.requests_per_s
        );
    }
    Ok(())
}

fn print_report(label: &str, r: &ThroughputReport) {
    println!(
        "{label:<11} {:>8.2} s  {:>7.3} req/s  {:>8.1} output tok/s  {:>8.1} total tok/s  {} steps, {} preemptions",
        r.elapsed_s, r.requests_per_s, r.output_tokens_per_s, r.total_tokens_per_s, r.num_steps, r.num_preemptions
    );
    if r.num_constrained > 0 {
        println!(
            "{:<11} {} requests constrained, {} masks, {:.1} us per mask (summed over threads)",
            "", r.num_constrained, r.num_masks, r.mean_mask_us
        );
    }
}
