//! The CPU [`Backend`]: the reference model on the host, its f32 paged KV pool and the CPU
//! adapter slots; samples (and scores) rows with the shared sampling math, in parallel on the
//! compute pool.

use std::cell::RefCell;
use std::ops::Deref;

use caduceus_kernels::lora::Segment;
use rayon::prelude::*;

use super::backend::{scored_rows_per_step, Backend, BackendError, RowOutcome, SlotSpec};
use super::failure::RequestFailure;
use crate::adapters::LoadedAdapter;
use crate::kv_cache::KvCache;
use crate::model::config::LlamaConfig;
use crate::model::{ForwardBatch, LlamaModel, LoraBatch, LoraStack};
use crate::sampling::{sample_row, score_rows, PromptLogprob, RowSample, RowScratch};

const NAME: &str = "cpu";

thread_local! {
    /// Each compute thread's sampling scratch (vocabulary-sized, reused across steps).
    static SCRATCH: RefCell<RowScratch> = RefCell::new(RowScratch::default());
}

/// The model `M` (owned, `Arc` or borrowed) on the CPU.
pub struct CpuBackend<M> {
    model: M,
    kv: KvCache,
    lora: Option<LoraStack>,
    logits: Vec<f32>,
}

impl<M: Deref<Target = LlamaModel>> CpuBackend<M> {
    /// `model` with a KV pool of `num_blocks` blocks of `block_size` tokens.
    pub fn new(model: M, num_blocks: usize, block_size: usize) -> Self {
        let kv = KvCache::new(
            model.config().num_layers,
            model.kv_cache_shape(num_blocks, block_size),
        );
        CpuBackend {
            model,
            kv,
            lora: None,
            logits: Vec::new(),
        }
    }

    /// The model.
    pub fn model(&self) -> &LlamaModel {
        &self.model
    }
}

impl<M: Deref<Target = LlamaModel> + Send> Backend for CpuBackend<M> {
    fn config(&self) -> &LlamaConfig {
        self.model.config()
    }

    fn num_kv_blocks(&self) -> usize {
        self.kv.num_blocks()
    }

    fn block_size(&self) -> usize {
        self.kv.block_size()
    }

    fn describe(&self) -> String {
        format!("cpu ({} threads)", rayon::current_num_threads())
    }

    fn init_adapter_slots(&mut self, spec: SlotSpec) -> Result<usize, BackendError> {
        let dtype = spec.format.host().ok_or_else(|| {
            BackendError::new(
                NAME,
                "adapters prepared for a device cannot fill the CPU engine's slots",
            )
        })?;
        let stack = LoraStack::new(self.model.config(), spec.num_slots, spec.max_rank, dtype)
            .map_err(|e| BackendError::new(NAME, e))?;
        let bytes = stack.nbytes();
        self.lora = Some(stack);
        Ok(bytes)
    }

    fn load_adapter(&mut self, slot: u32, adapter: &LoadedAdapter) -> Result<(), BackendError> {
        let stack = self
            .lora
            .as_mut()
            .ok_or_else(|| BackendError::new(NAME, "no adapter slots were allocated"))?;
        let prepared = adapter.prepared.host().ok_or_else(|| {
            BackendError::new(
                NAME,
                "adapter prepared for a device, not the CPU engine's slots",
            )
        })?;
        stack
            .copy_from(slot as usize, prepared)
            .map_err(|e| BackendError::new(NAME, e))
    }

    fn forward(&mut self, batch: &ForwardBatch<'_>, lora: &[Segment]) -> Result<(), BackendError> {
        let lora = match &self.lora {
            Some(stack) if !lora.is_empty() => Some(LoraBatch {
                stack,
                segments: lora,
            }),
            _ => None,
        };
        self.logits = self
            .model
            .forward_with_lora(batch, &mut self.kv, lora.as_ref())
            .map_err(|e| BackendError::new(NAME, format!("LoRA: {e}")))?;
        Ok(())
    }

    fn sample(&mut self, rows: &[RowSample]) -> Result<Vec<RowOutcome>, BackendError> {
        let vocab = self.model.config().vocab_size;
        if rows.len() * vocab > self.logits.len() {
            return Err(BackendError::new(
                NAME,
                format!(
                    "{} rows to sample, {} logits of vocab {vocab} kept",
                    rows.len(),
                    self.logits.len()
                ),
            ));
        }
        // Rows are independent (each draws with its own request's number): they are sampled in
        // parallel on the compute pool, idle between forwards.
        Ok(self.logits[..rows.len() * vocab]
            .par_chunks_exact(vocab)
            .zip(rows.par_iter())
            .map(|(row, r)| {
                // NaN or inf would sample garbage (or nothing): this request fails alone.
                if row.iter().any(|l| !l.is_finite()) {
                    return Err(RequestFailure::NonFiniteLogits);
                }
                Ok(SCRATCH.with_borrow_mut(|scratch| sample_row(row, r, scratch)))
            })
            .collect())
    }

    fn max_scored_rows(&self) -> usize {
        scored_rows_per_step(self.model.config().vocab_size)
    }

    fn score(
        &mut self,
        first: usize,
        targets: &[(u32, usize)],
    ) -> Result<Vec<PromptLogprob>, BackendError> {
        let vocab = self.model.config().vocab_size;
        let rows = self
            .logits
            .get(first * vocab..(first + targets.len()) * vocab)
            .and_then(|rows| score_rows(rows, vocab, targets));
        rows.ok_or_else(|| {
            BackendError::new(
                NAME,
                format!(
                    "{} rows to score after row {first}, {} logits of vocab {vocab} kept",
                    targets.len(),
                    self.logits.len()
                ),
            )
        })
    }

    #[cfg(feature = "fault-injection")]
    fn poison_logits_row(&mut self, row: usize) -> Result<(), BackendError> {
        let vocab = self.model.config().vocab_size;
        let cell = self
            .logits
            .get_mut(row * vocab)
            .ok_or_else(|| BackendError::new(NAME, format!("no logits row {row}")))?;
        *cell = f32::NAN;
        Ok(())
    }
}
