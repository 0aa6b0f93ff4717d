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
use caduceus_kernels::gpu::gemm_tune::GemmPolicy;
use caduceus_kernels::gpu::Device;
use caduceus_kernels::lora::{segments_from_token_slots, Segment};
use serde::Serialize;

use super::decode_graph::DecodeGraphs;
use super::lora::{GpuLoraBatch, GpuLoraStack};
use super::model::profile::{OpClock, OpProfile};
use super::model::{GpuKvCache, GpuModel, GpuModelError};
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

/// Forward passes each op profile averages (eager, every op's end marked).
const PROFILE_PASSES: usize = 3;

/// What every measurement of the model part reads: the model, its KV pool, the shape the
/// rooflines are of, the GPU's spec (`None` off the spec table) and the options.
#[derive(Clone, Copy)]
struct Bench<'a> {
    model: &'a GpuModel,
    kv: &'a GpuKvCache,
    shape: &'a ModelShape,
    gpu: Option<&'a GpuSpec>,
    o: &'a ModelBenchOptions,
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
        max_scored_rows: 0,
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
    let bench = Bench {
        model,
        kv: &kv,
        shape,
        gpu,
        o,
    };
    let mut sizes = o.decode_batches.clone();
    sizes.sort_unstable();
    sizes.dedup();
    sizes.retain(|&b| b > 0);
    // First with cuBLASLt's heuristic choices alone, then under the serving policy (tuned):
    // graphs captured afresh for each, as a policy change forgets the choices they hold.
    let policy = dev.gemm_policy();
    dev.set_gemm_policy(GemmPolicy::Library)?;
    let mut graphs = DecodeGraphs::capture(model, &kv, &mut ws, &sizes, None)?;
    let mut library = Vec::new();
    for &b in &o.decode_batches {
        let ms = bench.time_decode(&mut ws, Some(&mut graphs), b, None)?;
        library.push(Timed::new(ms, bench.decode_roofline(b)));
    }
    drop(graphs);
    dev.set_gemm_policy(policy)?;
    let mut graphs = DecodeGraphs::capture(model, &kv, &mut ws, &sizes, None)?;
    progress(&format!(
        "decode graphs captured for batches {sizes:?} (GEMM policy {})",
        policy.name()
    ));
    let mut decode = Vec::new();
    for (&b, library_gemm) in o.decode_batches.iter().zip(library) {
        let roof = bench.decode_roofline(b);
        let step = bench.time_decode(&mut ws, Some(&mut graphs), b, None)?;
        let eager = bench.time_decode(&mut ws, None, b, None)?;
        let profile = bench.profile_decode(&mut ws, b, None)?;
        let (step, eager) = (Timed::new(step, roof), Timed::new(eager, roof));
        let target = decode_target(b);
        progress(&format!(
            "decode batch {b}: {:.3} ms/step from a graph (x{:.2} roofline; {:.3} with library \
             GEMMs), {:.3} ms eager",
            step.median_ms,
            step.over_roofline.unwrap_or(f64::NAN),
            library_gemm.median_ms,
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
            library_gemm,
            programmatic_launch: None,
            profile,
        });
    }
    drop(graphs);
    let tuning =
        || -> Vec<TunedGemm> { dev.gemm_tuning().into_iter().map(TunedGemm::from).collect() };
    let gemm_tuning = tuning();
    let mut gemm_tuning_programmatic = Vec::new();
    if let Some(on) = ProgrammaticLaunch::on(dev) {
        // Tuned afresh under them, as serve tunes with model.programmatic_launch on (set before
        // its warm-up): a GEMV kernel that prefetches its weights while the kernel before it
        // ends may win there and not in plain launches.
        dev.set_gemm_policy(policy)?;
        let mut graphs = DecodeGraphs::capture(model, &kv, &mut ws, &sizes, None)?;
        for d in &mut decode {
            let ms = bench.time_decode(&mut ws, Some(&mut graphs), d.batch, None)?;
            let timed = Timed::new(ms, bench.decode_roofline(d.batch));
            progress(&format!(
                "decode batch {}: {:.3} ms/step with programmatic dependent launches",
                d.batch, timed.median_ms
            ));
            d.programmatic_launch = Some(timed);
        }
        gemm_tuning_programmatic = tuning();
        drop((graphs, on));
        // The parts below run plain launches on the plain launches' choices.
        dev.set_gemm_policy(policy)?;
    }
    let attention = bench.sweep_attention()?;
    if let Some(best) = attention
        .iter()
        .filter(|a| a.batch == o.decode_batches.iter().copied().max().unwrap_or(0))
        .min_by(|a, b| a.us_per_layer.total_cmp(&b.us_per_layer))
    {
        progress(&format!(
            "decode attention, batch {}: {:.1} us per layer at best ({}, {}), {:.0} GB/s of K/V",
            best.batch, best.us_per_layer, best.kernel, best.split, best.kv_gb_per_s
        ));
    }
    let prefill_kernels = bench.sweep_prefill_kernels()?;
    for k in &prefill_kernels {
        progress(&format!(
            "prefill attention {} ({} tokens): {:.1} us per layer, {:.0} TFLOP/s",
            k.kernel, k.prompt_len, k.us_per_layer, k.tflops
        ));
    }
    let prefill = match o.prefill_len {
        0 => None,
        n => Some(bench.time_prefill(&mut ws, n, None)?),
    };
    if let Some(p) = &prefill {
        progress(&format!(
            "prefill {}: {:.0} tokens/s",
            p.prompt_len, p.tokens_per_s
        ));
    }
    let multi_lora = match o.lora_streams {
        0 => None,
        _ => Some(bench.time_lora(&mut ws, prefill.as_ref(), progress)?),
    };
    Ok(ModelBenchReport {
        decode,
        attention,
        prefill,
        attention_kernel: model.attention_kernel().name(),
        prefill_kernels,
        multi_lora,
        gemm_policy: dev.gemm_policy().name(),
        gemm_tuning,
        gemm_tuning_programmatic,
    })
}

impl Bench<'_> {
    /// The roofline of a decode step of `batch` sequences at the options' context.
    fn decode_roofline(&self, batch: usize) -> Option<Roofline> {
        self.gpu
            .map(|g| decode_step(self.shape, g, batch, self.o.context))
    }

    /// Runs `f` on the forward batch of `batch` sequences decoding, each token on
    /// `slots[token]` when given.
    fn with_decode_batch<R>(
        &self,
        batch: usize,
        lora: Option<(&GpuLoraStack, &[Option<u32>])>,
        f: impl FnOnce(&ForwardBatch<'_>, Option<&GpuLoraBatch<'_>>) -> R,
    ) -> R {
        let vocab = self.model.config().vocab_size;
        let block_size = self.kv.shape().block_size;
        let d = DecodeBatch::new(batch, self.o.context, block_size, vocab);
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
        f(&fb, lb.as_ref())
    }

    /// Step times (ms) of `batch` sequences decoding (see [`Self::with_decode_batch`]):
    /// replayed from `graphs` (which must hold a graph of size `batch`), else launched eagerly.
    fn time_decode(
        &self,
        ws: &mut Workspace,
        mut graphs: Option<&mut DecodeGraphs>,
        batch: usize,
        lora: Option<(&GpuLoraStack, &[Option<u32>])>,
    ) -> Result<Vec<f64>, GpuModelError> {
        let (model, o) = (self.model, self.o);
        self.with_decode_batch(batch, lora, |fb, lb| {
            time_steps(model.device(), o.warmup, o.steps, || {
                match graphs.as_deref_mut() {
                    Some(g) => match g.replay(model, fb, lb, ws)? {
                        Some(_) => Ok(()),
                        None => Err(GpuModelError::Batch(format!(
                            "no captured graph replays a decode batch of {batch}"
                        ))),
                    },
                    None => model.forward_in(fb, self.kv, lb, ws).map(drop),
                }
            })
        })
    }

    /// Device time by op of `batch` sequences decoding eagerly (after one unmarked warm-up
    /// pass).
    fn profile_decode(
        &self,
        ws: &mut Workspace,
        batch: usize,
        lora: Option<(&GpuLoraStack, &[Option<u32>])>,
    ) -> Result<OpProfile, GpuModelError> {
        self.with_decode_batch(batch, lora, |fb, lb| {
            profile_passes(self.model, |clock| {
                self.model
                    .forward_in_timed(fb, self.kv, lb, ws, clock)
                    .map(drop)
            })
        })
    }

    /// One sequence's prefill of `len` tokens, eager; `lora`: the adapter slots and the runs
    /// of tokens on each.
    fn time_prefill(
        &self,
        ws: &mut Workspace,
        len: usize,
        lora: Option<(&GpuLoraStack, &[Segment])>,
    ) -> Result<PrefillFigure, GpuModelError> {
        let (model, kv, o) = (self.model, self.kv, self.o);
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
        let lb = lora.map(|(stack, segments)| GpuLoraBatch { stack, segments });
        let ms = time_steps(model.device(), o.warmup.min(1), o.steps.div_ceil(4), || {
            model.forward_in(&fb, kv, lb.as_ref(), ws).map(drop)
        })?;
        let profile = profile_passes(model, |clock| {
            model
                .forward_in_timed(&fb, kv, lb.as_ref(), ws, clock)
                .map(drop)
        })?;
        let gpu = self.gpu;
        let pass = Timed::new(ms, gpu.map(|g| prefill(self.shape, g, 1, len)));
        let secs = pass.median_ms / 1e3;
        Ok(PrefillFigure {
            profile,
            prompt_len: len,
            tokens_per_s: len as f64 / secs,
            flops_utilization: pass
                .roofline
                .zip(gpu)
                .map(|(r, g)| r.flops as f64 / secs / g.bf16_flops_per_s),
            pass,
        })
    }
}

/// Runs `pass` once unmarked, then [`PROFILE_PASSES`] times on one clock.
fn profile_passes(
    model: &GpuModel,
    mut pass: impl FnMut(Option<&OpClock<'_>>) -> Result<(), GpuModelError>,
) -> Result<OpProfile, GpuModelError> {
    let dev = model.device();
    pass(None)?;
    dev.synchronize()?;
    let clock = OpClock::start(dev)?;
    for _ in 0..PROFILE_PASSES {
        pass(Some(&clock))?;
    }
    Ok(clock.finish(PROFILE_PASSES)?)
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

/// Programmatic dependent launches on a device for as long as this lives.
struct ProgrammaticLaunch<'a>(&'a Device);

impl<'a> ProgrammaticLaunch<'a> {
    /// Turns them on; `None` where the device has none.
    fn on(dev: &'a Device) -> Option<ProgrammaticLaunch<'a>> {
        dev.set_programmatic_launch(true)
            .then_some(ProgrammaticLaunch(dev))
    }
}

impl Drop for ProgrammaticLaunch<'_> {
    fn drop(&mut self) {
        self.0.set_programmatic_launch(false);
    }
}

mod attention;
mod lora;
pub use attention::{AttentionFigure, PrefillKernelFigure};
mod report;
pub use report::{
    decode_target, DecodeFigure, LoraFigure, LoraPart, LoraPrefillFigure, ModelBenchReport,
    PrefillFigure, Timed, TunedGemm,
};

#[cfg(all(test, feature = "gpu-emu"))]
pub(crate) mod tests;
