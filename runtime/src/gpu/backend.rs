//! The CUDA [`Backend`]: the model's weights, the paged KV pool and the adapter slots on one
//! [`Device`], the forward pass of [`GpuModel`], and sampling with the device kernel so only ids
//! and logprobs come back. The KV pool is sized by [`plan_memory`] from what the card has free,
//! after weights, adapter slots, the activation workspace and the decode graphs (or fixed, for
//! tests). Steps run in one preallocated [`Workspace`] with one upload each; pure-decode steps
//! replay a captured graph ([`DecodeGraphs`]).
//!
//! Runs in the kernels' host emulation in CI, and on a GPU under `scripts/gpu-check` (the H200
//! runs are in docs/benchmarking.md).

use caduceus_kernels::gpu::lora::DecodeLoraMapping;
use caduceus_kernels::gpu::{DType, Device, GpuError};
use caduceus_kernels::lora::Segment;
use caduceus_kernels::quant::Floats;

use super::adapter_copies::AdapterCopies;
use super::decode_graph::{graph_sizes, DecodeGraphs, GRAPH_RESERVE_BYTES};
use super::device_sampler::{sampling_bytes, DeviceSampler};
use super::lora::{GpuLoraBatch, GpuLoraStack};
use super::memory_plan::{kv_bytes_per_block, plan_memory, MemoryInputs, MemoryPlan};
use super::model::{GpuKvCache, GpuModel};
use super::workspace::{StepLimits, Workspace};
use crate::adapters::{LoadedAdapter, PreparedAdapter};
use crate::engine::{Backend, BackendError, RowOutcome, SlotSpec};
use crate::model::config::LlamaConfig;
use crate::model::ForwardBatch;
use crate::sampling::{score_rows, PromptLogprob, RowSample};

const NAME: &str = "cuda";

fn err(e: impl std::fmt::Display) -> BackendError {
    BackendError::new(NAME, e)
}

/// How many KV blocks the pool gets.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum KvBlocks {
    /// Exactly this many (vLLM's `num_gpu_blocks_override`; tests).
    Fixed(usize),
    /// What fits in `model.gpu_memory_utilization` of the card after everything else.
    Plan { gpu_memory_utilization: f64 },
}

/// Settings of a [`GpuBackend`].
#[derive(Clone, Debug, PartialEq)]
pub struct GpuBackendConfig {
    pub block_size: usize,
    pub kv_blocks: KvBlocks,
    /// Adapter slots, allocated before the KV pool is sized (`None`: base model only).
    pub adapter_slots: Option<SlotSpec>,
    /// The largest step, which sizes the activation workspace.
    pub step: StepLimits,
    /// Largest decode batch replayed from a captured graph (`model.cuda_graph_max_batch`;
    /// 0: `model.cuda_graphs = false`, every step eager).
    pub cuda_graph_max_batch: usize,
}

/// A model on a CUDA device (or its emulation). Fields drop in order, after [`Drop`] waited
/// for the device: the copies first (they write into `lora`'s slots), the model (the device,
/// its kernel modules and cuBLASLt) last, after every graph and buffer that uses it.
pub struct GpuBackend {
    copies: Option<AdapterCopies>,
    graphs: Option<DecodeGraphs>,
    sampler: DeviceSampler,
    /// Every buffer of a forward step; holds the last forward's logits.
    ws: Workspace,
    kv: GpuKvCache,
    lora: Option<GpuLoraStack>,
    slot_spec: Option<SlotSpec>,
    plan: Option<MemoryPlan>,
    /// Rows of logits the last forward left in `ws` (0: none).
    logit_rows: usize,
    model: GpuModel,
}

impl Drop for GpuBackend {
    /// Work still queued (a step that failed before its read-back) may use any buffer below.
    fn drop(&mut self) {
        let _ = self.model.device().synchronize();
    }
}

impl GpuBackend {
    /// Allocates the adapter slots and the activation workspace, sizes and allocates the KV
    /// pool, then captures the decode graphs.
    pub fn new(model: GpuModel, cfg: GpuBackendConfig) -> Result<Self, BackendError> {
        let c = model.config().clone();
        let (dev, dtype) = (model.device(), model.dtype());
        let lora = match &cfg.adapter_slots {
            Some(s) => Some(
                GpuLoraStack::new(dev, dtype, &c, s.num_slots, s.max_rank).map_err(|e| {
                    err(format!(
                        "allocating {} adapter slots of rank {} on the device: {e}; lower \
                         adapters.max_loras or adapters.max_lora_rank",
                        s.num_slots, s.max_rank
                    ))
                })?,
            ),
            None => None,
        };
        let rank = cfg.adapter_slots.as_ref().map_or(0, |s| s.max_rank);
        let ws = Workspace::new(dev, &c, dtype, cfg.block_size, cfg.step, rank).map_err(err)?;
        let sizes = graph_sizes(
            cfg.step.max_num_seqs,
            cfg.step.max_num_batched_tokens,
            cfg.cuda_graph_max_batch,
        );
        let per_block = kv_bytes_per_block(
            c.num_layers,
            cfg.block_size,
            c.num_kv_heads,
            c.head_dim,
            dtype.size(),
        );
        let (num_blocks, plan) = match cfg.kv_blocks {
            KvBlocks::Fixed(n) => (n, None),
            KvBlocks::Plan {
                gpu_memory_utilization,
            } => {
                // Let the zeroing queued behind the slots' and the workspace's allocations
                // finish before asking what is free (free memory is then settled).
                dev.synchronize().map_err(err)?;
                let (free, total) = dev.memory_info().map_err(err)?;
                let weights = model.weight_bytes() as u64;
                let slots = lora.as_ref().map_or(0, GpuLoraStack::nbytes) as u64;
                let workspace = ws.nbytes() as u64;
                let inputs = MemoryInputs {
                    total_bytes: total as u64,
                    gpu_memory_utilization,
                    // Our weights, slots and workspace are resident already: the rest (the
                    // CUDA context, cuBLASLt's handle and workspace, other processes) is not
                    // ours to plan.
                    used_by_others: (total as u64)
                        .saturating_sub(free as u64)
                        .saturating_sub(weights + slots + workspace),
                    weight_bytes: weights,
                    adapter_slot_bytes: slots,
                    activation_bytes: workspace
                        + sampling_bytes(c.vocab_size, cfg.step.max_num_seqs),
                    graph_bytes: sizes.len() as u64 * GRAPH_RESERVE_BYTES,
                    kv_bytes_per_block: per_block,
                    min_blocks: cfg.step.max_model_len.div_ceil(cfg.block_size) as u64 + 1,
                    block_size: cfg.block_size as u64,
                };
                let plan = plan_memory(&inputs).map_err(err)?;
                let n = usize::try_from(plan.num_gpu_blocks).map_err(err)?;
                (n, Some(plan))
            }
        };
        let kv = model
            .new_kv_cache(num_blocks, cfg.block_size)
            .map_err(|e| {
                err(format!(
                    "allocating {num_blocks} KV blocks: {e}; lower model.gpu_memory_utilization \
                     or set model.num_gpu_blocks_override to fewer blocks"
                ))
            })?;
        let copies = match &lora {
            Some(stack) => {
                let slot_bytes = stack.nbytes() / stack.num_slots().max(1);
                Some(AdapterCopies::new(dev, stack.num_slots(), slot_bytes).map_err(err)?)
            }
            None => None,
        };
        let mut ws = ws;
        let graphs = match sizes.is_empty() {
            true => None,
            false => {
                dev.synchronize().map_err(err)?;
                let free_before = dev.memory_info().map_err(err)?.0;
                // BGMV: the grouped tiles measured slower on the H200 (DecodeLoraMapping).
                let graph_lora = lora.as_ref().map(|s| (s, DecodeLoraMapping::Bgmv));
                let g =
                    DecodeGraphs::capture(&model, &kv, &mut ws, &sizes, graph_lora).map_err(err)?;
                dev.synchronize().map_err(err)?;
                let free_after = dev.memory_info().map_err(err)?.0;
                tracing::info!(
                    graphs = g.sizes().len(),
                    sizes = ?g.sizes(),
                    nodes = ?g.nodes(),
                    measured_mib = free_before.saturating_sub(free_after) >> 20,
                    reserved_mib = (g.sizes().len() as u64 * GRAPH_RESERVE_BYTES) >> 20,
                    "decode graphs captured"
                );
                Some(g)
            }
        };
        Ok(GpuBackend {
            copies,
            model,
            kv,
            lora,
            slot_spec: cfg.adapter_slots,
            plan,
            ws,
            logit_rows: 0,
            graphs,
            sampler: DeviceSampler::default(),
        })
    }

    /// The adapter copy stream (`None` without adapter slots).
    pub fn adapter_copies(&mut self) -> Option<&mut AdapterCopies> {
        self.copies.as_mut()
    }

    /// The captured decode graphs (`None`: graphs off).
    pub fn decode_graphs(&self) -> Option<&DecodeGraphs> {
        self.graphs.as_ref()
    }

    /// How the card's memory was divided (`None` with [`KvBlocks::Fixed`]).
    pub fn memory_plan(&self) -> Option<MemoryPlan> {
        self.plan
    }

    /// Rows `first..first + targets.len()` of the last forward's logits, scored on the host:
    /// they come back in the model dtype and are widened to f32, then scored with the CPU
    /// engine's arithmetic ([`score_rows`]). Prompt logprobs are rare (evaluations), so one
    /// copy of at most `max_scored_rows` rows per step is cheaper than a kernel of their own.
    fn score_on_host(
        &self,
        first: usize,
        targets: &[(u32, usize)],
    ) -> Result<Vec<PromptLogprob>, GpuError> {
        let vocab = self.model.config().vocab_size;
        let kept = self.logit_rows;
        let end = first + targets.len();
        if end > kept {
            return Err(GpuError::Shape(format!(
                "rows {first}..{end} to score, the forward kept {kept}"
            )));
        }
        let dt = self.model.dtype();
        let cell = vocab * dt.size();
        let view = self.ws.logits().view(first * cell, targets.len() * cell)?;
        // Little-endian on the host as on the device: decoded as a weights file's values are.
        let bytes: Vec<u8> = self.model.device().download(&view)?;
        let rows = match dt {
            DType::Bf16 => Floats::LeBf16(&bytes),
            DType::F16 => Floats::LeF16(&bytes),
        }
        .to_vec();
        score_rows(&rows, vocab, targets)
            .ok_or_else(|| GpuError::Shape(format!("{} logits to score", rows.len())))
    }

    /// Samples every row on the device; a row whose logits hold NaN or inf fails alone.
    fn sample_on_device(&mut self, rows: &[RowSample]) -> Result<Vec<RowOutcome>, GpuError> {
        let n = self.logit_rows;
        if n == 0 {
            return Err(GpuError::Shape("sample before forward".into()));
        }
        if rows.len() > n {
            return Err(GpuError::Shape(format!(
                "{} rows to sample, the forward kept {n}",
                rows.len()
            )));
        }
        let dev: &Device = self.model.device();
        let vocab = self.model.config().vocab_size;
        self.sampler
            .sample(dev, self.model.dtype(), self.ws.logits(), vocab, rows)
    }
}

impl Backend for GpuBackend {
    fn config(&self) -> &LlamaConfig {
        self.model.config()
    }

    fn num_kv_blocks(&self) -> usize {
        self.kv.shape().num_blocks
    }

    fn block_size(&self) -> usize {
        self.kv.shape().block_size
    }

    fn describe(&self) -> String {
        format!(
            "{} {:?}",
            self.model.device().describe(),
            self.model.dtype()
        )
    }

    /// The engine thread, which launches the device's work and waits for it.
    fn host_compute_threads(&self) -> usize {
        1
    }

    fn init_adapter_slots(&mut self, spec: SlotSpec) -> Result<usize, BackendError> {
        match (&self.lora, &self.slot_spec) {
            (Some(stack), Some(planned))
                if planned.num_slots == spec.num_slots && planned.max_rank == spec.max_rank =>
            {
                Ok(stack.nbytes())
            }
            _ => Err(err(format!(
                "adapter slots {spec:?} were not planned when the backend was built \
                 (planned: {:?})",
                self.slot_spec
            ))),
        }
    }

    fn load_adapter(&mut self, slot: u32, adapter: &LoadedAdapter) -> Result<(), BackendError> {
        let dev = self.model.device();
        let (Some(stack), Some(copies)) = (self.lora.as_mut(), self.copies.as_mut()) else {
            return Err(err("no adapter slots were allocated"));
        };
        let converted;
        let image = match &adapter.prepared {
            PreparedAdapter::Device(image) => image,
            // Prepared for the CPU's slots (tools and tests): converted here, on this thread.
            PreparedAdapter::Host(host) => {
                converted = stack.image_of_prepared(host).map_err(err)?;
                &converted
            }
        };
        // On the copy stream: the running batch is not stalled (see `adapter_copies`).
        copies.load(dev, stack, slot as usize, image).map_err(err)
    }

    fn forward(&mut self, batch: &ForwardBatch<'_>, lora: &[Segment]) -> Result<(), BackendError> {
        self.logit_rows = 0;
        if let Some(copies) = &mut self.copies {
            copies
                .before_forward(self.model.device(), lora)
                .map_err(err)?;
        }
        let lora = match &self.lora {
            Some(stack) if !lora.is_empty() => Some(GpuLoraBatch {
                stack,
                segments: lora,
            }),
            _ => None,
        };
        if let Some(graphs) = &mut self.graphs {
            if let Some(rows) = graphs
                .replay(&self.model, batch, lora.as_ref(), &mut self.ws)
                .map_err(err)?
            {
                self.logit_rows = rows;
                return Ok(());
            }
        }
        self.logit_rows = self
            .model
            .forward_in(batch, &self.kv, lora.as_ref(), &mut self.ws)
            .map_err(err)?;
        Ok(())
    }

    /// Rows are sampled on the device; the kernel flags a row whose logits hold NaN or inf,
    /// and that request fails alone, as on the CPU.
    fn sample(&mut self, rows: &[RowSample]) -> Result<Vec<RowOutcome>, BackendError> {
        if rows.is_empty() {
            return Ok(Vec::new());
        }
        self.sample_on_device(rows).map_err(err)
    }

    fn max_scored_rows(&self) -> usize {
        self.ws.limits().max_scored_rows
    }

    fn score(
        &mut self,
        first: usize,
        targets: &[(u32, usize)],
    ) -> Result<Vec<PromptLogprob>, BackendError> {
        self.score_on_host(first, targets).map_err(err)
    }

    #[cfg(feature = "fault-injection")]
    fn poison_logits_row(&mut self, row: usize) -> Result<(), BackendError> {
        let vocab = self.model.config().vocab_size;
        if self.logit_rows == 0 {
            return Err(err("no logits kept"));
        }
        let logits = self.ws.logits();
        let dt = self.model.dtype();
        let nan: u16 = match dt {
            DType::Bf16 => half::bf16::NAN.to_bits(),
            DType::F16 => half::f16::NAN.to_bits(),
        };
        self.model
            .device()
            .write(logits, row * vocab * dt.size(), &[nan])
            .map_err(err)
    }
}

#[cfg(all(test, feature = "gpu-emu"))]
mod copy_tests;
#[cfg(all(test, feature = "gpu-emu"))]
mod reference_tests;
#[cfg(all(test, feature = "gpu-emu"))]
mod scoring_tests;
#[cfg(all(test, feature = "gpu-emu"))]
mod tests;
