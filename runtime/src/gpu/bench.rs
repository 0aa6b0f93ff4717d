//! `caduceus gpu-bench`'s measurements on a random-weight model resident on a [`Device`]: decode
//! step time per batch size, prefill throughput and multi-LoRA decode, each next to its roofline
//! ([`super::roofline`]); the whole engine's part is in [`super::bench_engine`]. Every part's size
//! is an option, so the same code runs Llama-3-8B on an H200 and a tiny shape in the emulation
//! (the unit test below, which is how CI exercises it).
//!
//! The steps run as the engine runs them: in one preallocated [`Workspace`] (a step allocates
//! nothing and makes one upload), decode steps replayed from captured CUDA graphs
//! ([`DecodeGraphs`]) and, beside them, launched eagerly (what the graphs save), prefill eagerly.
//! Each is timed on the host around the step plus a device synchronise (the engine downloads
//! sampled tokens every step, so it synchronises too); no sampling.

use std::time::Instant;

use caduceus_kernels::attention::SeqAttention;
use caduceus_kernels::gpu::{DType, Device};
use caduceus_kernels::lora::segments_from_token_slots;
use serde::Serialize;

use super::decode_graph::DecodeGraphs;
use super::lora::{GpuLoraBatch, GpuLoraStack};
use super::model::{GpuKvCache, GpuModel, GpuModelError};
use super::random_model::random_adapter;
use super::roofline::{decode_step, prefill, GpuSpec, ModelShape, Roofline};
use super::workspace::{StepLimits, Workspace};
use crate::model::ForwardBatch;

/// Sizes and repetitions of the model-level parts.
#[derive(Clone, Debug, Serialize)]
pub struct ModelBenchOptions {
    /// Decode batch sizes (sequences decoding one token each).
    pub decode_batches: Vec<usize>,
    /// Context of every decoding sequence, the new token included.
    pub context: usize,
    /// Untimed steps before timing each configuration.
    pub warmup: usize,
    /// Timed steps per configuration (the median is reported).
    pub steps: usize,
    /// Prompt length of the prefill part (0: skip it).
    pub prefill_len: usize,
    /// Streams of the multi-LoRA part (0: skip it).
    pub lora_streams: usize,
    /// Distinct adapters the streams are spread over, one run each.
    pub lora_distinct: Vec<usize>,
    pub lora_rank: usize,
    pub block_size: usize,
}

/// Median and best of a part's timed repetitions, and its roofline.
#[derive(Clone, Debug, Serialize)]
pub struct Timed {
    pub median_ms: f64,
    pub min_ms: f64,
    pub reps: usize,
    /// `None` when the GPU is not in the spec table (or emulated).
    pub roofline: Option<Roofline>,
    /// median / roofline bound (1.0 = at the roofline).
    pub over_roofline: Option<f64>,
}

impl Timed {
    fn new(mut ms: Vec<f64>, roofline: Option<Roofline>) -> Timed {
        ms.sort_by(f64::total_cmp);
        let median_ms = ms.get(ms.len() / 2).copied().unwrap_or(f64::NAN);
        Timed {
            median_ms,
            min_ms: ms.first().copied().unwrap_or(f64::NAN),
            reps: ms.len(),
            over_roofline: roofline.map(|r| median_ms / 1e3 / r.bound_s),
            roofline,
        }
    }
}

/// One decode batch size.
#[derive(Clone, Debug, Serialize)]
pub struct DecodeFigure {
    pub batch: usize,
    pub context: usize,
    /// Replayed from a captured CUDA graph, as the engine runs decode steps.
    pub step: Timed,
    /// The same step launched kernel by kernel (`model.cuda_graphs = false`).
    pub eager: Timed,
    /// Eager over graph median step time: what the graph saves.
    pub graph_speedup: f64,
    pub tokens_per_s: f64,
    /// The target (batch 1 <= 1.25x, batch 256 <= 1.5x the roofline), when it sets one.
    pub target_over_roofline: Option<f64>,
    pub meets_target: Option<bool>,
}

/// Prefill of one prompt.
#[derive(Clone, Debug, Serialize)]
pub struct PrefillFigure {
    pub prompt_len: usize,
    pub pass: Timed,
    pub tokens_per_s: f64,
    /// Achieved FLOP/s over the GPU's dense bf16 peak.
    pub flops_utilization: Option<f64>,
}

/// `streams` decoding sequences spread over `distinct` adapters (graph replays, as the base).
#[derive(Clone, Debug, Serialize)]
pub struct LoraFigure {
    pub distinct: usize,
    pub step: Timed,
    pub tokens_per_s: f64,
    /// Throughput over the base model's at the same load (target >= 0.9 at 64 distinct).
    pub over_base: f64,
}

/// The multi-LoRA part.
#[derive(Clone, Debug, Serialize)]
pub struct LoraPart {
    pub streams: usize,
    pub rank: usize,
    pub context: usize,
    pub base: Timed,
    pub base_tokens_per_s: f64,
    pub runs: Vec<LoraFigure>,
    pub slot_fill_s: f64,
}

/// What the model-level parts measured.
#[derive(Clone, Debug, Serialize)]
pub struct ModelBenchReport {
    pub decode: Vec<DecodeFigure>,
    pub prefill: Option<PrefillFigure>,
    pub multi_lora: Option<LoraPart>,
}

/// The roofline targets for a decode batch size.
pub fn decode_target(batch: usize) -> Option<f64> {
    match batch {
        1 => Some(1.25),
        256 => Some(1.5),
        _ => None,
    }
}

/// `batch` sequences each decoding its `context`-th token, over disjoint block ranges.
struct DecodeBatch {
    ids: Vec<u32>,
    positions: Vec<u32>,
    slots: Vec<u32>,
    tables: Vec<Vec<u32>>,
    rows: Vec<usize>,
    context: usize,
}

impl DecodeBatch {
    fn new(batch: usize, context: usize, block_size: usize, vocab: usize) -> DecodeBatch {
        let per_seq = context.div_ceil(block_size);
        let tables: Vec<Vec<u32>> = (0..batch)
            .map(|s| ((s * per_seq) as u32..((s + 1) * per_seq) as u32).collect())
            .collect();
        let last = context - 1;
        DecodeBatch {
            ids: (0..batch)
                .map(|s| ((s * 7919 + 13) % vocab) as u32)
                .collect(),
            positions: vec![last as u32; batch],
            slots: tables
                .iter()
                .map(|t| t[last / block_size] * block_size as u32 + (last % block_size) as u32)
                .collect(),
            rows: (0..batch).collect(),
            tables,
            context,
        }
    }

    fn seqs(&self) -> Vec<SeqAttention<'_>> {
        self.tables
            .iter()
            .enumerate()
            .map(|(s, t)| SeqAttention {
                query_start: s,
                query_len: 1,
                context_len: self.context,
                block_table: t,
            })
            .collect()
    }
}

/// Runs the model-level parts on `model` (sized by `opts`), calling `progress` between them.
pub fn run_model_parts(
    model: &GpuModel,
    shape: &ModelShape,
    gpu: Option<&GpuSpec>,
    opts: &ModelBenchOptions,
    progress: &mut dyn FnMut(&str),
) -> Result<ModelBenchReport, GpuModelError> {
    let o = opts;
    if o.context == 0 || o.block_size == 0 {
        return Err(GpuModelError::Batch(
            "context and block size must be at least 1".into(),
        ));
    }
    let most = o
        .decode_batches
        .iter()
        .copied()
        .chain([o.lora_streams])
        .max()
        .unwrap_or(0);
    let blocks = (most * o.context.div_ceil(o.block_size))
        .max(o.prefill_len.div_ceil(o.block_size))
        .max(1);
    progress(&format!("allocating {blocks} KV blocks"));
    let kv = model.new_kv_cache(blocks, o.block_size)?;
    // One workspace for every part, sized for the largest, as the engine keeps one.
    let limits = StepLimits {
        max_num_batched_tokens: most.max(o.prefill_len).max(1),
        max_num_seqs: most.max(1),
        max_model_len: o.context.max(o.prefill_len).max(1),
    };
    let rank = if o.lora_streams > 0 { o.lora_rank } else { 0 };
    let dev = model.device();
    let mut ws = Workspace::new(
        dev,
        model.config(),
        model.dtype(),
        o.block_size,
        limits,
        rank,
    )?;
    let mut sizes = o.decode_batches.clone();
    sizes.sort_unstable();
    sizes.dedup();
    sizes.retain(|&b| b > 0);
    let mut graphs = DecodeGraphs::capture(model, &kv, &mut ws, &sizes, None)?;
    progress(&format!("decode graphs captured for batches {sizes:?}"));
    let mut decode = Vec::new();
    for &b in &o.decode_batches {
        let roof = gpu.map(|g| decode_step(shape, g, b, o.context));
        let step = time_decode(model, &kv, &mut ws, Some(&mut graphs), o, b, None)?;
        let eager = time_decode(model, &kv, &mut ws, None, o, b, None)?;
        let (step, eager) = (Timed::new(step, roof), Timed::new(eager, roof));
        let target = decode_target(b);
        progress(&format!(
            "decode batch {b}: {:.3} ms/step from a graph (x{:.2} roofline), {:.3} ms eager",
            step.median_ms,
            step.over_roofline.unwrap_or(f64::NAN),
            eager.median_ms,
        ));
        decode.push(DecodeFigure {
            batch: b,
            context: o.context,
            tokens_per_s: b as f64 / (step.median_ms / 1e3),
            meets_target: target.zip(step.over_roofline).map(|(t, r)| r <= t),
            target_over_roofline: target,
            graph_speedup: eager.median_ms / step.median_ms,
            step,
            eager,
        });
    }
    drop(graphs);
    let prefill = match o.prefill_len {
        0 => None,
        n => Some(time_prefill(model, &kv, &mut ws, shape, gpu, o, n)?),
    };
    if let Some(p) = &prefill {
        progress(&format!(
            "prefill {}: {:.0} tokens/s",
            p.prompt_len, p.tokens_per_s
        ));
    }
    let multi_lora = match o.lora_streams {
        0 => None,
        _ => Some(time_lora(model, &kv, &mut ws, shape, gpu, o, progress)?),
    };
    Ok(ModelBenchReport {
        decode,
        prefill,
        multi_lora,
    })
}

/// Step times (ms) of `batch` sequences decoding, each token on `slots[token]` when given:
/// replayed from `graphs` (which must hold a graph of size `batch`), else launched eagerly.
fn time_decode(
    model: &GpuModel,
    kv: &GpuKvCache,
    ws: &mut Workspace,
    mut graphs: Option<&mut DecodeGraphs>,
    o: &ModelBenchOptions,
    batch: usize,
    lora: Option<(&GpuLoraStack, &[Option<u32>])>,
) -> Result<Vec<f64>, GpuModelError> {
    let vocab = model.config().vocab_size;
    let d = DecodeBatch::new(batch, o.context, kv.shape().block_size, vocab);
    let seqs = d.seqs();
    let fb = ForwardBatch {
        token_ids: &d.ids,
        positions: &d.positions,
        slot_mapping: &d.slots,
        seqs: &seqs,
        logits_indices: &d.rows,
    };
    let segments = lora.map(|(_, s)| segments_from_token_slots(s));
    let lb = lora
        .zip(segments.as_deref())
        .map(|((stack, _), segments)| GpuLoraBatch { stack, segments });
    time_steps(model.device(), o.warmup, o.steps, || {
        match graphs.as_deref_mut() {
            Some(g) => match g.replay(model, &fb, lb.as_ref(), ws)? {
                Some(_) => Ok(()),
                None => Err(GpuModelError::Batch(format!(
                    "no captured graph replays a decode batch of {batch}"
                ))),
            },
            None => model.forward_in(&fb, kv, lb.as_ref(), ws).map(drop),
        }
    })
}

/// Runs `f` `warmup` times, then `steps` times each followed by a synchronise; the timed ms.
fn time_steps(
    dev: &Device,
    warmup: usize,
    steps: usize,
    mut f: impl FnMut() -> Result<(), GpuModelError>,
) -> Result<Vec<f64>, GpuModelError> {
    for _ in 0..warmup {
        f()?;
    }
    dev.synchronize()?;
    let mut ms = Vec::with_capacity(steps);
    for _ in 0..steps.max(1) {
        let start = Instant::now();
        f()?;
        dev.synchronize()?;
        ms.push(start.elapsed().as_secs_f64() * 1e3);
    }
    Ok(ms)
}

fn time_prefill(
    model: &GpuModel,
    kv: &GpuKvCache,
    ws: &mut Workspace,
    shape: &ModelShape,
    gpu: Option<&GpuSpec>,
    o: &ModelBenchOptions,
    len: usize,
) -> Result<PrefillFigure, GpuModelError> {
    let bs = kv.shape().block_size;
    let vocab = model.config().vocab_size as u32;
    let ids: Vec<u32> = (0..len as u32).map(|i| (i * 31 + 7) % vocab).collect();
    let positions: Vec<u32> = (0..len as u32).collect();
    let table: Vec<u32> = (0..len.div_ceil(bs) as u32).collect();
    let seqs = [SeqAttention {
        query_start: 0,
        query_len: len,
        context_len: len,
        block_table: &table,
    }];
    let fb = ForwardBatch {
        token_ids: &ids,
        positions: &positions,
        slot_mapping: &positions,
        seqs: &seqs,
        logits_indices: &[len - 1],
    };
    let ms = time_steps(model.device(), o.warmup.min(1), o.steps.div_ceil(4), || {
        model.forward_in(&fb, kv, None, ws).map(drop)
    })?;
    let pass = Timed::new(ms, gpu.map(|g| prefill(shape, g, 1, len)));
    let secs = pass.median_ms / 1e3;
    Ok(PrefillFigure {
        prompt_len: len,
        tokens_per_s: len as f64 / secs,
        flops_utilization: pass
            .roofline
            .zip(gpu)
            .map(|(r, g)| r.flops as f64 / secs / g.bf16_flops_per_s),
        pass,
    })
}

fn time_lora(
    model: &GpuModel,
    kv: &GpuKvCache,
    ws: &mut Workspace,
    shape: &ModelShape,
    gpu: Option<&GpuSpec>,
    o: &ModelBenchOptions,
    progress: &mut dyn FnMut(&str),
) -> Result<LoraPart, GpuModelError> {
    let n = o.lora_streams;
    let roof = gpu.map(|g| decode_step(shape, g, n, o.context));
    let mut base_graph = DecodeGraphs::capture(model, kv, ws, &[n], None)?;
    let base = time_decode(model, kv, ws, Some(&mut base_graph), o, n, None)?;
    drop(base_graph);
    let base = Timed::new(base, roof);
    let base_tokens_per_s = n as f64 / (base.median_ms / 1e3);
    progress(&format!(
        "multi-LoRA base, {n} streams: {:.3} ms/step",
        base.median_ms
    ));
    let num_slots = o.lora_distinct.iter().copied().max().unwrap_or(1).max(1);
    let (dev, c) = (model.device(), model.config());
    let mut stack = GpuLoraStack::new(dev, model.dtype(), c, num_slots, o.lora_rank)?;
    let start = Instant::now();
    // Distinct slots hold distinct memory, which is what the kernels' cost depends on; a few
    // distinct random adapters cycled over the slots keep generation out of the budget.
    let adapters: Vec<_> = (0..num_slots.min(4))
        .map(|s| random_adapter(c, o.lora_rank, 100 + s as u64))
        .collect();
    for slot in 0..num_slots {
        stack.load(dev, slot, &adapters[slot % adapters.len()])?;
    }
    dev.synchronize()?;
    let slot_fill_s = start.elapsed().as_secs_f64();
    progress(&format!(
        "{num_slots} adapter slots filled in {slot_fill_s:.1} s"
    ));
    // The engine's decode graphs carry the adapter launches, sized for the slots' largest rank.
    let mut lora_graph = DecodeGraphs::capture(model, kv, ws, &[n], Some(&stack))?;
    let mut runs = Vec::new();
    for &distinct in &o.lora_distinct {
        let distinct = distinct.clamp(1, num_slots);
        // Streams grouped by adapter, as a batch sorted by adapter (S-LoRA, Punica).
        let slots: Vec<Option<u32>> = (0..n).map(|i| Some((i * distinct / n) as u32)).collect();
        let lora = Some((&stack, &slots[..]));
        let step = time_decode(model, kv, ws, Some(&mut lora_graph), o, n, lora)?;
        let step = Timed::new(step, roof);
        let tokens_per_s = n as f64 / (step.median_ms / 1e3);
        progress(&format!(
            "multi-LoRA {distinct} distinct: {:.3} ms/step ({:.2}x base)",
            step.median_ms,
            tokens_per_s / base_tokens_per_s
        ));
        runs.push(LoraFigure {
            distinct,
            over_base: tokens_per_s / base_tokens_per_s,
            tokens_per_s,
            step,
        });
    }
    Ok(LoraPart {
        streams: n,
        rank: o.lora_rank,
        context: o.context,
        base,
        base_tokens_per_s,
        runs,
        slot_fill_s,
    })
}

/// The dtype name the JSON reports.
pub fn dtype_name(d: DType) -> &'static str {
    match d {
        DType::Bf16 => "bf16",
        DType::F16 => "f16",
    }
}

#[cfg(all(test, feature = "gpu-emu"))]
pub(crate) mod tests;
