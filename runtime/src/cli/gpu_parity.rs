//! `caduceus gpu-parity`: loads a Hugging Face safetensors model and PEFT adapters and prints, as
//! one JSON object, each (adapter, prompt) pair's last-position logits and greedy tokens, run
//! alone and all in one mixed batch, on the CPU (f32), a GPU (bf16/f16) or the GPU emulation.
//! `scripts/gpu-parity/compare.py` holds them against transformers + peft on the same GPU.
//!
//! The greedy loop is the model's own forward pass and an argmax (ties to the lowest id, as
//! torch's), without the engine's scheduler, so a difference is the arithmetic, not a policy.

use std::path::{Path, PathBuf};

use anyhow::Context;
use caduceus_kernels::attention::SeqAttention;
use caduceus_kernels::lora::segments_from_token_slots;
use serde::Serialize;
use serde_json::{json, Value};

use crate::adapters::{load_adapter, AdapterLimits, AdapterWeights};
use crate::kv_cache::KvCache;
use crate::model::config::LlamaConfig;
use crate::model::{ForwardBatch, LoadedModel, LoraBatch, LoraDtype, LoraStack};

/// Arguments of `caduceus gpu-parity`.
#[derive(Debug, clap::Args)]
pub struct GpuParityArgs {
    /// Hugging Face model directory (config.json + safetensors).
    #[arg(long)]
    model: PathBuf,
    /// A PEFT adapter as NAME=DIR (repeatable).
    #[arg(long = "adapter", value_parser = parse_adapter)]
    adapters: Vec<(String, PathBuf)>,
    /// JSON prompts: `[[ids...], ...]` or `{"prompts": [{"token_ids": [...]}, ...]}`.
    #[arg(long)]
    prompts: PathBuf,
    /// `cpu`, `cuda:N` (builds with `cuda`) or `emu` (builds with `gpu-emu`).
    #[arg(long, default_value = "cpu")]
    device: String,
    /// GPU dtype, bf16 or f16 (the CPU computes in f32).
    #[arg(long, default_value = "bf16")]
    dtype: String,
    /// Greedy tokens per request.
    #[arg(long, default_value_t = 16)]
    max_tokens: usize,
    /// Skip the mixed batch (every request alone only).
    #[arg(long)]
    no_mixed: bool,
    /// Where to write the JSON (default: stdout).
    #[arg(long)]
    out: Option<PathBuf>,
}

fn parse_adapter(s: &str) -> Result<(String, PathBuf), String> {
    match s.split_once('=') {
        Some((name, dir)) if !name.is_empty() && !dir.is_empty() => {
            Ok((name.to_string(), PathBuf::from(dir)))
        }
        _ => Err(format!("--adapter {s}: expected NAME=DIR")),
    }
}

/// One request's result.
#[derive(Clone, Debug, Serialize, PartialEq)]
pub struct SeqResult {
    /// Logits of the prompt's last position, `[vocab]`.
    pub last_logits: Vec<f32>,
    pub greedy: Vec<u32>,
}

/// A sequence to run: prompt and adapter slot.
struct SeqSpec<'a> {
    prompt: &'a [u32],
    slot: Option<u32>,
}

/// One forward pass: logits rows of `batch.logits_indices`, each token on `slots[token]`.
type Forward<'f> = dyn FnMut(&ForwardBatch<'_>, &[Option<u32>]) -> anyhow::Result<Vec<f32>> + 'f;

/// Index of the largest value, the lowest on ties (torch.argmax's choice).
pub fn argmax(row: &[f32]) -> u32 {
    let mut best = 0;
    for (i, v) in row.iter().enumerate() {
        if *v > row[best] {
            best = i;
        }
    }
    best as u32
}

/// Prefills every sequence of `seqs` in one batch, then decodes them together greedily for
/// `max_tokens` tokens (the first from the prefill's logits). Sequence `i` owns blocks
/// `[i * per_seq, (i + 1) * per_seq)` of the pool.
fn greedy(
    forward: &mut Forward<'_>,
    seqs: &[SeqSpec<'_>],
    vocab: usize,
    max_tokens: usize,
    block_size: usize,
    per_seq: usize,
) -> anyhow::Result<Vec<SeqResult>> {
    let tables: Vec<Vec<u32>> = (0..seqs.len())
        .map(|i| ((i * per_seq) as u32..((i + 1) * per_seq) as u32).collect())
        .collect();
    let slot_of = |s: usize, pos: usize| {
        tables[s][pos / block_size] * block_size as u32 + (pos % block_size) as u32
    };
    let mut out: Vec<SeqResult> = Vec::with_capacity(seqs.len());
    for step in 0..max_tokens {
        let (mut ids, mut pos, mut slots, mut lora, mut rows, mut attn) =
            (vec![], vec![], vec![], vec![], vec![], vec![]);
        for (s, spec) in seqs.iter().enumerate() {
            let (start, tokens): (usize, Vec<u32>) = match step {
                0 => (0, spec.prompt.to_vec()),
                _ => {
                    let last = *out[s].greedy.last().context("a generated token")?;
                    (spec.prompt.len() + step - 1, vec![last])
                }
            };
            let query_start = ids.len();
            for (k, &t) in tokens.iter().enumerate() {
                ids.push(t);
                pos.push((start + k) as u32);
                slots.push(slot_of(s, start + k));
                lora.push(spec.slot);
            }
            rows.push(ids.len() - 1);
            attn.push((query_start, tokens.len(), start + tokens.len()));
        }
        let seq_attn: Vec<SeqAttention<'_>> = attn
            .iter()
            .zip(&tables)
            .map(|(&(query_start, query_len, context_len), t)| SeqAttention {
                query_start,
                query_len,
                context_len,
                block_table: t,
            })
            .collect();
        let batch = ForwardBatch {
            token_ids: &ids,
            positions: &pos,
            slot_mapping: &slots,
            seqs: &seq_attn,
            logits_indices: &rows,
        };
        let logits = forward(&batch, &lora)?;
        anyhow::ensure!(
            logits.len() == seqs.len() * vocab,
            "forward returned {} logits for {} rows of {vocab}",
            logits.len(),
            seqs.len()
        );
        for (s, row) in logits.chunks_exact(vocab).enumerate() {
            let token = argmax(row);
            match out.get_mut(s) {
                Some(r) => r.greedy.push(token),
                None => out.push(SeqResult {
                    last_logits: row.to_vec(),
                    greedy: vec![token],
                }),
            }
        }
    }
    Ok(out)
}

/// The prompts of a `--prompts` file.
pub fn read_prompts(path: &Path) -> anyhow::Result<Vec<Vec<u32>>> {
    let text =
        std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
    let v: Value = serde_json::from_str(&text).with_context(|| format!("{}", path.display()))?;
    let list = v.get("prompts").unwrap_or(&v);
    let items = list.as_array().with_context(|| {
        format!(
            "{}: expected a list of prompts or {{\"prompts\": [...]}}",
            path.display()
        )
    })?;
    let prompts = items
        .iter()
        .map(|p| serde_json::from_value(p.get("token_ids").unwrap_or(p).clone()))
        .collect::<Result<Vec<Vec<u32>>, _>>()
        .with_context(|| format!("{}: prompts are lists of token ids", path.display()))?;
    anyhow::ensure!(
        prompts.iter().all(|p| !p.is_empty()),
        "{}: an empty prompt",
        path.display()
    );
    Ok(prompts)
}

/// Solo and mixed runs of every (adapter key, prompt) pair with `forward` (over a pool of
/// `pairs * per_seq` blocks of `block_size`).
struct Plan<'p> {
    keys: Vec<(String, Option<u32>)>,
    prompts: &'p [Vec<u32>],
    vocab: usize,
    max_tokens: usize,
    block_size: usize,
    per_seq: usize,
    mixed: bool,
}

impl Plan<'_> {
    fn num_blocks(&self) -> usize {
        self.keys.len() * self.prompts.len() * self.per_seq
    }

    fn run(&self, forward: &mut Forward<'_>) -> anyhow::Result<Value> {
        let specs: Vec<SeqSpec<'_>> = self
            .keys
            .iter()
            .flat_map(|(_, slot)| {
                self.prompts.iter().map(|p| SeqSpec {
                    prompt: p,
                    slot: *slot,
                })
            })
            .collect();
        let (vocab, n, bs, per) = (self.vocab, self.max_tokens, self.block_size, self.per_seq);
        let mut solo = Vec::with_capacity(specs.len());
        for spec in &specs {
            let one = greedy(forward, std::slice::from_ref(spec), vocab, n, bs, per)?;
            solo.extend(one);
        }
        let mixed = match self.mixed {
            true => Some(greedy(forward, &specs, vocab, n, bs, per)?),
            false => None,
        };
        let by_key = |results: &[SeqResult]| -> Value {
            let per_key = results.chunks(self.prompts.len().max(1));
            self.keys
                .iter()
                .zip(per_key)
                .map(|((k, _), r)| (k.clone(), json!(r)))
                .collect::<serde_json::Map<_, _>>()
                .into()
        };
        Ok(json!({
            "keys": self.keys.iter().map(|(k, _)| k).collect::<Vec<_>>(),
            "prompts": self.prompts,
            "solo": by_key(&solo),
            "mixed": mixed.as_deref().map(by_key),
        }))
    }
}

fn adapters(args: &GpuParityArgs, config: &LlamaConfig) -> anyhow::Result<Vec<AdapterWeights>> {
    let limits = AdapterLimits {
        max_rank: 256,
        max_file_bytes: 1 << 34,
    };
    args.adapters
        .iter()
        .map(|(name, dir)| {
            load_adapter(dir, config, &limits)
                .with_context(|| format!("adapter {name} from {}", dir.display()))
        })
        .collect()
}

/// Runs `caduceus gpu-parity` and returns its JSON.
pub fn parity_json(args: &GpuParityArgs) -> anyhow::Result<Value> {
    let prompts = read_prompts(&args.prompts)?;
    let longest = prompts.iter().map(Vec::len).max().unwrap_or(0);
    let block_size = 16;
    let mut keys = vec![("base".to_string(), None)];
    keys.extend(
        args.adapters
            .iter()
            .enumerate()
            .map(|(i, (name, _))| (name.clone(), Some(i as u32))),
    );
    // The vocabulary is known once the model is loaded.
    let plan = Plan {
        keys,
        prompts: &prompts,
        vocab: 0,
        max_tokens: args.max_tokens.max(1),
        block_size,
        per_seq: (longest + args.max_tokens).div_ceil(block_size),
        mixed: !args.no_mixed,
    };
    let (mut report, dtype) = if args.device == "cpu" {
        (run_cpu(args, plan)?, "f32")
    } else {
        run_gpu(args, plan)?
    };
    report["device"] = json!(args.device);
    report["dtype"] = json!(dtype);
    report["model"] = json!(args.model.display().to_string());
    Ok(report)
}

fn run_cpu(args: &GpuParityArgs, mut plan: Plan<'_>) -> anyhow::Result<Value> {
    let loaded = LoadedModel::load(&args.model)
        .with_context(|| format!("loading {}", args.model.display()))?;
    let model = &loaded.model;
    let c = model.config().clone();
    let weights = adapters(args, &c)?;
    let max_rank = weights.iter().map(|w| w.rank).max().unwrap_or(1);
    let mut stack = LoraStack::new(&c, weights.len().max(1), max_rank, LoraDtype::F32)?;
    for (slot, w) in weights.iter().enumerate() {
        stack.load(slot, w)?;
    }
    plan.vocab = c.vocab_size;
    let mut kv = KvCache::new(
        c.num_layers,
        model.kv_cache_shape(plan.num_blocks(), plan.block_size),
    );
    let mut forward = |batch: &ForwardBatch<'_>, slots: &[Option<u32>]| {
        let segments = segments_from_token_slots(slots);
        let lora = LoraBatch {
            stack: &stack,
            segments: &segments,
        };
        Ok(model.forward_with_lora(batch, &mut kv, Some(&lora))?)
    };
    plan.run(&mut forward)
}

/// The GPU (or its emulation) in bf16 or f16.
#[cfg(any(feature = "cuda", feature = "gpu-emu"))]
fn run_gpu(args: &GpuParityArgs, mut plan: Plan<'_>) -> anyhow::Result<(Value, &'static str)> {
    use caduceus_kernels::gpu::{DType, Device};

    use crate::gpu::lora::{GpuLoraBatch, GpuLoraStack};
    use crate::gpu::model::GpuModel;
    use crate::model::loader::LoadError;

    let (dtype, name) = match args.dtype.as_str() {
        "bf16" => (DType::Bf16, "bf16"),
        "f16" => (DType::F16, "f16"),
        other => anyhow::bail!("--dtype {other}: the GPU computes in bf16 or f16"),
    };
    let dev = match args.device.as_str() {
        #[cfg(feature = "gpu-emu")]
        "emu" => Device::emulated(),
        #[cfg(feature = "cuda")]
        d if d.starts_with("cuda") => {
            let n = d.strip_prefix("cuda:").unwrap_or("0");
            let ordinal: usize = n.parse().with_context(|| format!("--device {d}"))?;
            Device::cuda(ordinal).with_context(|| format!("opening GPU {d}"))?
        }
        d => anyhow::bail!("--device {d}: expected cpu, cuda:N or emu (as this build has)"),
    };
    let described = dev.describe();
    let loaded = LoadedModel::load_into(&args.model, |c, store| {
        GpuModel::from_tensors(c, store, dev, dtype).map_err(|e| LoadError::Device {
            device: described.clone(),
            message: e.to_string(),
        })
    })
    .with_context(|| format!("loading {}", args.model.display()))?;
    let model = &loaded.model;
    let c = model.config().clone();
    let weights = adapters(args, &c)?;
    let max_rank = weights.iter().map(|w| w.rank).max().unwrap_or(1);
    let mut stack = GpuLoraStack::new(model.device(), dtype, &c, weights.len().max(1), max_rank)?;
    for (slot, w) in weights.iter().enumerate() {
        stack.load(model.device(), slot, w)?;
    }
    plan.vocab = c.vocab_size;
    let kv = model.new_kv_cache(plan.num_blocks(), plan.block_size)?;
    let mut forward = |batch: &ForwardBatch<'_>, slots: &[Option<u32>]| {
        let segments = segments_from_token_slots(slots);
        let lora = GpuLoraBatch {
            stack: &stack,
            segments: &segments,
        };
        Ok(model.forward_with_lora(batch, &kv, Some(&lora))?)
    };
    let mut report = plan.run(&mut forward)?;
    report["gpu"] = json!(described);
    Ok((report, name))
}

#[cfg(not(any(feature = "cuda", feature = "gpu-emu")))]
fn run_gpu(args: &GpuParityArgs, _plan: Plan<'_>) -> anyhow::Result<(Value, &'static str)> {
    anyhow::bail!(
        "--device {}: this build has no GPU support; rebuild with --features cuda or use --device cpu",
        args.device
    )
}

/// Runs `caduceus gpu-parity`.
pub fn run(args: GpuParityArgs) -> anyhow::Result<()> {
    let report = parity_json(&args)?;
    let text = serde_json::to_string(&report)?;
    match &args.out {
        Some(path) => std::fs::write(path, text + "\n")
            .with_context(|| format!("writing {}", path.display()))?,
        None => println!("{text}"),
    }
    Ok(())
}

#[cfg(test)]
mod tests;
