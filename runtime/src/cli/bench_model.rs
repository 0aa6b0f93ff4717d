//! `caduceus bench-model`: prompt and decode throughput of the model on this machine, measured the
//! way llama.cpp's `llama-bench` does (pp = one prompt of N tokens; tg = N decode steps from a
//! short context), plus aggregate decode throughput at several batch sizes.

use std::time::Instant;

use caduceus_kernels::attention::SeqAttention;

use super::ModelArg;
use crate::kv_cache::KvCache;
use crate::model::loader::LoadedModel;
use crate::model::{ForwardBatch, LlamaModel};

/// Arguments of `caduceus bench-model`.
#[derive(Debug, clap::Args)]
pub struct BenchModelArgs {
    #[command(flatten)]
    model: ModelArg,
    /// Prompt length of the prefill test.
    #[arg(long, default_value_t = 128)]
    prompt_len: usize,
    /// Decode steps per decode test.
    #[arg(long, default_value_t = 128)]
    decode_len: usize,
    /// Batch sizes of the aggregate decode test.
    #[arg(long, value_delimiter = ',', default_value = "1,4,16,64")]
    batch: Vec<usize>,
    /// Repetitions of each test (the median is reported).
    #[arg(long, default_value_t = 3)]
    repeat: usize,
    /// Print one JSON object instead of a table.
    #[arg(long)]
    json: bool,
}

const BLOCK_SIZE: usize = 16;

/// Sequences with contiguous block tables in one KV pool, advanced in lock step.
struct LockStep {
    tables: Vec<Vec<u32>>,
    lens: Vec<usize>,
    kv: KvCache,
}

impl LockStep {
    fn new(model: &LlamaModel, num_seqs: usize, max_len: usize) -> Self {
        let per_seq = max_len.div_ceil(BLOCK_SIZE);
        let tables = (0..num_seqs)
            .map(|s| ((s * per_seq) as u32..((s + 1) * per_seq) as u32).collect())
            .collect();
        let shape = model.kv_cache_shape(num_seqs * per_seq, BLOCK_SIZE);
        Self {
            tables,
            lens: vec![0; num_seqs],
            kv: KvCache::new(model.config().num_layers, shape),
        }
    }

    /// Feeds `tokens[s]` to sequence `s` (all in one forward pass); returns each sequence's logits.
    fn step(&mut self, model: &LlamaModel, tokens: &[Vec<u32>]) -> Vec<f32> {
        let (mut ids, mut positions, mut slots, mut last) = (vec![], vec![], vec![], vec![]);
        let mut seqs = Vec::with_capacity(tokens.len());
        for (s, toks) in tokens.iter().enumerate() {
            let start = ids.len();
            for (i, &t) in toks.iter().enumerate() {
                let pos = self.lens[s] + i;
                ids.push(t);
                positions.push(pos as u32);
                slots.push(
                    self.tables[s][pos / BLOCK_SIZE] * BLOCK_SIZE as u32
                        + (pos % BLOCK_SIZE) as u32,
                );
            }
            self.lens[s] += toks.len();
            last.push(ids.len() - 1);
            seqs.push(SeqAttention {
                query_start: start,
                query_len: toks.len(),
                context_len: self.lens[s],
                block_table: &self.tables[s],
            });
        }
        let batch = ForwardBatch {
            token_ids: &ids,
            positions: &positions,
            slot_mapping: &slots,
            seqs: &seqs,
            logits_indices: &last,
        };
        model.forward(&batch, &mut self.kv)
    }
}

fn argmax(row: &[f32]) -> u32 {
    let mut best = 0;
    for (i, &v) in row.iter().enumerate() {
        if v > row[best] {
            best = i;
        }
    }
    best as u32
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

/// Prefill throughput: one prompt of `len` tokens in one forward pass.
fn bench_prompt(model: &LlamaModel, len: usize) -> f64 {
    let vocab = model.config().vocab_size as u32;
    let prompt: Vec<u32> = (0..len as u32).map(|i| (i * 7919 + 13) % vocab).collect();
    let mut run = LockStep::new(model, 1, len);
    let t = Instant::now();
    run.step(model, &[prompt]);
    len as f64 / t.elapsed().as_secs_f64()
}

/// Aggregate decode throughput of `batch` sequences decoding `steps` tokens each (greedy).
fn bench_decode(model: &LlamaModel, batch: usize, steps: usize) -> f64 {
    let vocab = model.config().vocab_size;
    let prompt_len = 8;
    let mut run = LockStep::new(model, batch, prompt_len + steps + 1);
    let prompts: Vec<Vec<u32>> = (0..batch)
        .map(|s| {
            (0..prompt_len)
                .map(|i| ((s * 131 + i * 17 + 5) % vocab) as u32)
                .collect()
        })
        .collect();
    let logits = run.step(model, &prompts);
    let mut next: Vec<Vec<u32>> = logits
        .chunks_exact(vocab)
        .map(|r| vec![argmax(r)])
        .collect();
    let t = Instant::now();
    for _ in 0..steps {
        let logits = run.step(model, &next);
        next = logits
            .chunks_exact(vocab)
            .map(|r| vec![argmax(r)])
            .collect();
    }
    (batch * steps) as f64 / t.elapsed().as_secs_f64()
}

pub(super) fn run(args: BenchModelArgs) -> anyhow::Result<()> {
    anyhow::ensure!(
        args.repeat >= 1 && args.prompt_len >= 1 && args.decode_len >= 1,
        "lengths and --repeat must be at least 1"
    );
    let loaded = LoadedModel::load(&args.model.model)?;
    let model = &loaded.model;
    let threads = rayon::current_num_threads();
    bench_decode(model, 1, 8); // warm-up: page in weights, spin up threads

    let pp = median(
        (0..args.repeat)
            .map(|_| bench_prompt(model, args.prompt_len))
            .collect(),
    );
    let tg = median(
        (0..args.repeat)
            .map(|_| bench_decode(model, 1, args.decode_len))
            .collect(),
    );
    let mut batches = Vec::new();
    for &b in &args.batch {
        anyhow::ensure!(b >= 1, "--batch sizes must be at least 1");
        let steps = (args.decode_len / b.max(1)).clamp(8, args.decode_len);
        let tps = median(
            (0..args.repeat)
                .map(|_| bench_decode(model, b, steps))
                .collect(),
        );
        batches.push((b, tps));
    }
    if args.json {
        let obj = serde_json::json!({
            "model": loaded.name,
            "threads": threads,
            "prompt_tokens_per_s": pp,
            "prompt_len": args.prompt_len,
            "decode_tokens_per_s": tg,
            "decode_len": args.decode_len,
            "batch_decode_tokens_per_s": batches.iter().map(|(b, t)| serde_json::json!({"batch": b, "tokens_per_s": t})).collect::<Vec<_>>(),
        });
        println!("{obj}");
    } else {
        println!("model {}  threads {threads}", loaded.name);
        println!("pp{:<5} {pp:>9.1} tok/s", args.prompt_len);
        println!("tg{:<5} {tg:>9.1} tok/s", args.decode_len);
        for (b, t) in &batches {
            println!(
                "decode batch {b:<3} {t:>9.1} tok/s aggregate  ({:.2}x single stream)",
                t / tg
            );
        }
    }
    Ok(())
}
