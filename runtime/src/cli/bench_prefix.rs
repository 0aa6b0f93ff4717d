//! `caduceus bench-prefix-cache`: time to first token of a request whose long system prompt an
//! earlier request already computed, with prefix caching on and off (alternating, same run).

use std::time::{Duration, Instant};

use anyhow::Context;
use caduceus_scheduler::{RequestId, SchedulerConfig};
use tokio::sync::mpsc;

use super::bench_throughput::random_prompts;
use super::ModelArg;
use crate::engine::{EngineCore, EngineRequest};
use crate::model::loader::LoadedModel;
use crate::model::LlamaModel;

/// Arguments of `caduceus bench-prefix-cache`.
#[derive(Debug, clap::Args)]
pub struct BenchPrefixArgs {
    #[command(flatten)]
    model: ModelArg,
    /// Tokens of the shared system prompt.
    #[arg(long, default_value_t = 512)]
    prefix_len: usize,
    /// Tokens of each request's own question after the shared prefix.
    #[arg(long, default_value_t = 32)]
    suffix_len: usize,
    /// Repetitions of each setting (the median is reported).
    #[arg(long, default_value_t = 5)]
    repeat: usize,
    /// Print one JSON object instead of text.
    #[arg(long)]
    json: bool,
}

/// Runs a first request to completion, then measures the second one's time to first token.
fn second_ttft(
    model: &LlamaModel,
    caching: bool,
    first: &[u32],
    second: &[u32],
) -> anyhow::Result<Duration> {
    let config = SchedulerConfig {
        max_num_batched_tokens: 2048,
        block_size: 16,
        num_blocks: 1 + 2 * (first.len() + 1).div_ceil(16),
        max_model_len: first.len().max(second.len()) + 1,
        enable_prefix_caching: caching,
        ..SchedulerConfig::default()
    };
    let mut core = EngineCore::new(model, None, Vec::new(), config)?;
    let (tx, _rx_first) = mpsc::unbounded_channel();
    let mut req = EngineRequest::new(first.to_vec(), 1);
    req.detokenize = false;
    core.add_request(RequestId(0), req, tx)?;
    while core.has_unfinished() {
        core.step()?;
    }
    let (tx, mut rx) = mpsc::unbounded_channel();
    let mut req = EngineRequest::new(second.to_vec(), 1);
    req.detokenize = false;
    let start = Instant::now();
    core.add_request(RequestId(1), req, tx)?;
    while rx.try_recv().is_err() {
        anyhow::ensure!(
            core.has_unfinished(),
            "the second request produced no token"
        );
        core.step()?;
    }
    Ok(start.elapsed())
}

fn median(mut v: Vec<Duration>) -> Duration {
    v.sort();
    v[v.len() / 2]
}

/// Runs `caduceus bench-prefix-cache`.
pub fn run(args: BenchPrefixArgs) -> anyhow::Result<()> {
    let loaded = LoadedModel::load(&args.model.model)
        .with_context(|| format!("loading {}", args.model.model.display()))?;
    let vocab = loaded.model.config().vocab_size;
    let parts = random_prompts(3, args.prefix_len.max(args.suffix_len), vocab, 7);
    let prefix = &parts[0][..args.prefix_len];
    let first = [prefix, &parts[1][..args.suffix_len]].concat();
    let second = [prefix, &parts[2][..args.suffix_len]].concat();
    let (mut on, mut off) = (Vec::new(), Vec::new());
    for _ in 0..args.repeat.max(1) {
        on.push(second_ttft(&loaded.model, true, &first, &second)?);
        off.push(second_ttft(&loaded.model, false, &first, &second)?);
    }
    let (on, off) = (median(on), median(off));
    let ratio = off.as_secs_f64() / on.as_secs_f64();
    if args.json {
        let v = serde_json::json!({
            "prefix_len": args.prefix_len,
            "suffix_len": args.suffix_len,
            "ttft_ms_caching_on": on.as_secs_f64() * 1e3,
            "ttft_ms_caching_off": off.as_secs_f64() * 1e3,
            "speedup": ratio,
        });
        println!("{v}");
    } else {
        println!(
            "second request's TTFT ({}-token shared prefix + {} own tokens, threads {}): \
             caching off {:.1} ms, on {:.1} ms: {ratio:.2}x faster",
            args.prefix_len,
            args.suffix_len,
            rayon::current_num_threads(),
            off.as_secs_f64() * 1e3,
            on.as_secs_f64() * 1e3
        );
    }
    Ok(())
}
