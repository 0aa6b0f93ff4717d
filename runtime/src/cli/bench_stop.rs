//! `caduceus bench-stop`: how much one hostile request (the most stop strings allowed, each of the
//! longest length, built so its whole output stays a partial match and is held back) slows the
//! engine steps of the other streams. Two batches, alternated: N ordinary greedy streams plus
//! one more ordinary stream, and the same N plus the hostile one (same prompt, so the same
//! tokens); the ratio of their mean step times is the stop strings' cost.

use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Context;
use caduceus_scheduler::{RequestId, SchedulerConfig};
use tokio::sync::mpsc;

use super::bench_throughput::random_prompts;
use super::ModelArg;
use crate::engine::{
    EngineCore, EngineRequest, StopStrings, MAX_STOP_STRINGS, MAX_STOP_STRING_BYTES,
};
use crate::model::loader::LoadedModel;
use crate::model::LlamaModel;
use crate::tokenizer::Tokenizer;

/// Arguments of `caduceus bench-stop`.
#[derive(Debug, clap::Args)]
pub struct BenchStopArgs {
    #[command(flatten)]
    model: ModelArg,
    /// Ordinary streams running beside the one under test.
    #[arg(long, default_value_t = 8)]
    streams: usize,
    /// Prompt tokens of each stream.
    #[arg(long, default_value_t = 32)]
    prompt_len: usize,
    /// Tokens each stream generates.
    #[arg(long, default_value_t = 64)]
    max_tokens: usize,
    /// Alternations of the two batches (the median of each is reported).
    #[arg(long, default_value_t = 5)]
    repeat: usize,
    /// Print one JSON object instead of text.
    #[arg(long)]
    json: bool,
}

struct Setup<'a> {
    model: &'a LlamaModel,
    tokenizer: Arc<Tokenizer>,
    eos: Vec<u32>,
    prompts: Vec<Vec<u32>>,
    max_tokens: usize,
}

impl Setup<'_> {
    /// Runs every prompt (the last with `stop`) to the end; mean step time and the text of the
    /// last stream.
    fn run(&self, stop: &[String]) -> anyhow::Result<(Duration, String)> {
        let blocks: usize = self
            .prompts
            .iter()
            .map(|p| (p.len() + self.max_tokens).div_ceil(16))
            .sum();
        let config = SchedulerConfig {
            max_num_seqs: self.prompts.len(),
            max_num_batched_tokens: 4096,
            block_size: 16,
            num_blocks: blocks + 1,
            max_model_len: self.prompts.iter().map(Vec::len).max().unwrap_or(0) + self.max_tokens,
            ..SchedulerConfig::default()
        };
        let mut core = EngineCore::new(
            self.model,
            Some(self.tokenizer.clone()),
            self.eos.clone(),
            config,
        )?;
        let mut last = None;
        for (i, p) in self.prompts.iter().enumerate() {
            let mut req = EngineRequest::new(p.clone(), self.max_tokens);
            req.ignore_eos = true;
            if i + 1 == self.prompts.len() {
                req.stop = stop.to_vec();
            }
            let (tx, rx) = mpsc::unbounded_channel();
            core.add_request(RequestId(i as u64), req, tx)?;
            last = Some(rx);
        }
        let mut rx = last.context("no prompts")?;
        let (mut steps, start) = (0u32, Instant::now());
        while core.has_unfinished() {
            core.step()?;
            steps += 1;
        }
        let elapsed = start.elapsed() / steps.max(1);
        let mut text = String::new();
        while let Ok(out) = rx.try_recv() {
            text.push_str(&out.text);
        }
        Ok((elapsed, text))
    }
}

/// The most and longest stop strings a request may send, each starting with the stream's whole
/// `text` (so every byte it generates extends a partial match and stays held back) and ending in
/// a character the stream never produces.
pub fn hostile_stops(text: &str) -> Vec<String> {
    (0..MAX_STOP_STRINGS)
        .map(|i| {
            let marker = char::from_u32(0xE000 + i as u32).unwrap_or('\u{E000}');
            let room = MAX_STOP_STRING_BYTES - marker.len_utf8();
            let mut cut = text.len().min(room);
            while !text.is_char_boundary(cut) {
                cut -= 1;
            }
            let mut s = text[..cut].to_owned();
            s.push(marker);
            while s.len() < MAX_STOP_STRING_BYTES {
                s.push('~');
            }
            s
        })
        .collect()
}

/// Time the hostile stop strings take per generated piece of `text` (about a token's worth of
/// bytes), fed as the engine feeds them: the direct cost behind the step-time ratio, which a
/// noisy machine blurs.
fn stop_cost_per_token(text: &str, stops: &[String]) -> Duration {
    let mut pieces = Vec::new();
    let mut start = 0;
    while start < text.len() {
        let mut end = (start + 4).min(text.len());
        while !text.is_char_boundary(end) {
            end += 1;
        }
        pieces.push(&text[start..end]);
        start = end;
    }
    let reps = 200u32;
    let begin = Instant::now();
    for _ in 0..reps {
        let mut m = StopStrings::new(stops.to_vec(), false);
        for p in &pieces {
            std::hint::black_box(m.push(p));
        }
        std::hint::black_box(m.flush());
    }
    begin.elapsed() / (reps * pieces.len().max(1) as u32)
}

fn median(mut v: Vec<Duration>) -> Duration {
    v.sort();
    v[v.len() / 2]
}

/// Runs `caduceus bench-stop`.
pub fn run(args: BenchStopArgs) -> anyhow::Result<()> {
    let loaded = LoadedModel::load(&args.model.model)
        .with_context(|| format!("loading {}", args.model.model.display()))?;
    let vocab = loaded.model.config().vocab_size;
    let tokenizer = Arc::new(loaded.tokenizer);
    let setup = Setup {
        model: &loaded.model,
        eos: tokenizer.eos_ids().to_vec(),
        tokenizer,
        prompts: random_prompts(args.streams + 1, args.prompt_len, vocab, 11),
        max_tokens: args.max_tokens,
    };
    // The stream under test alone first: its text, from which the hostile stops are built.
    let (_, text) = setup.run(&[])?;
    let stops = hostile_stops(&text);
    let (mut plain, mut hostile) = (Vec::new(), Vec::new());
    for _ in 0..args.repeat.max(1) {
        let (t, plain_text) = setup.run(&[])?;
        plain.push(t);
        let (t, held_text) = setup.run(&stops)?;
        hostile.push(t);
        anyhow::ensure!(
            held_text == plain_text,
            "the hostile stream's output changed: the stop strings matched"
        );
    }
    let (plain, hostile) = (median(plain), median(hostile));
    let ratio = hostile.as_secs_f64() / plain.as_secs_f64();
    let per_token = stop_cost_per_token(&text, &stops);
    let share = per_token.as_secs_f64() / plain.as_secs_f64();
    if args.json {
        let v = serde_json::json!({
            "streams": args.streams + 1,
            "stop_strings": stops.len(),
            "stop_string_bytes": MAX_STOP_STRING_BYTES,
            "step_ms_plain": plain.as_secs_f64() * 1e3,
            "step_ms_hostile": hostile.as_secs_f64() * 1e3,
            "ratio": ratio,
            "stop_us_per_token": per_token.as_secs_f64() * 1e6,
            "stop_share_of_step": share,
        });
        println!("{v}");
    } else {
        println!(
            "mean engine step, {} streams x {} tokens (threads {}): all plain {:.2} ms; one with \
             {} stop strings of {} bytes held back throughout {:.2} ms: {:+.1}%",
            args.streams + 1,
            args.max_tokens,
            rayon::current_num_threads(),
            plain.as_secs_f64() * 1e3,
            stops.len(),
            MAX_STOP_STRING_BYTES,
            hostile.as_secs_f64() * 1e3,
            (ratio - 1.0) * 100.0
        );
        println!(
            "the hostile stop strings' matching alone: {:.1} us per token, {:.2}% of a plain step",
            per_token.as_secs_f64() * 1e6,
            share * 100.0
        );
    }
    Ok(())
}
