//! The one seam where hardware enters the engine: a [`Backend`] holds the model weights, the
//! paged KV pool and the adapter slots on its device, runs a flattened forward pass and samples
//! from the logits it keeps. The executor (batch preparation, request state, slot bookkeeping)
//! and everything above it are shared by the CPU backend ([`super::CpuBackend`], the reference)
//! and the CUDA one ([`crate::gpu::GpuBackend`]).

use caduceus_kernels::lora::Segment;

use super::failure::RequestFailure;
use crate::adapters::{LoadedAdapter, SlotFormat};
use crate::model::config::LlamaConfig;
use crate::model::ForwardBatch;
use crate::sampling::{PromptLogprob, RowSample, SampledToken};

/// A failure inside the backend (a kernel, a copy, an adapter that does not fit its slots).
#[derive(Debug, thiserror::Error)]
#[error("{backend} backend: {message}")]
pub struct BackendError {
    pub backend: &'static str,
    pub message: String,
}

impl BackendError {
    pub fn new(backend: &'static str, e: impl std::fmt::Display) -> Self {
        BackendError {
            backend,
            message: e.to_string(),
        }
    }
}

/// One sampled row: its token, or why its request fails alone (NaN or inf in its logits).
pub type RowOutcome = Result<SampledToken, RequestFailure>;

/// The adapter slots a backend allocates (`adapters.max_loras` of them).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SlotSpec {
    pub num_slots: usize,
    /// Largest adapter rank a slot holds.
    pub max_rank: usize,
    /// What the host tier prepares adapters as, for these slots to copy.
    pub format: SlotFormat,
}

/// Bytes of kept logits for scored prompt positions per step, as the f32 rows they are scored
/// from: 64 MiB is 341 rows of a 49k vocabulary, 130 of a 128k one.
const SCORED_LOGITS_BYTES: usize = 64 << 20;

/// Prompt positions a backend scores per step ([`Backend::max_scored_rows`]) for a vocabulary
/// of `vocab`: what [`SCORED_LOGITS_BYTES`] holds, at least one.
pub fn scored_rows_per_step(vocab: usize) -> usize {
    (SCORED_LOGITS_BYTES / (vocab.max(1) * std::mem::size_of::<f32>())).max(1)
}

/// Hardware for the engine (see the module docs). Calls come from the engine thread, in order:
/// `forward` then `sample` for each step; the executor computes grammar masks on other threads
/// while `forward` runs (so a backend is `Send`).
pub trait Backend: Send {
    /// The model's geometry.
    fn config(&self) -> &LlamaConfig;
    /// Blocks in the KV pool (the scheduler's `num_blocks`).
    fn num_kv_blocks(&self) -> usize;
    /// Tokens per KV block.
    fn block_size(&self) -> usize;
    /// What runs the model, for logs.
    fn describe(&self) -> String;
    /// Threads of this process that compute a step on the host's cores: the compute pool where
    /// the model runs on the CPU (the default), the engine thread alone where a device runs it.
    /// When they take every core, the adapter loader is time-sliced between steps
    /// ([`crate::adapters::StepGate`]); where a device computes, the idle cores load adapters
    /// while it runs.
    fn host_compute_threads(&self) -> usize {
        rayon::current_num_threads()
    }
    /// Allocates the adapter slots; returns their bytes.
    fn init_adapter_slots(&mut self, spec: SlotSpec) -> Result<usize, BackendError>;
    /// Copies `adapter` (from the host tier) into `slot`; projections it does not target are
    /// cleared there. The executor never names a slot a running request still reads.
    fn load_adapter(&mut self, slot: u32, adapter: &LoadedAdapter) -> Result<(), BackendError>;
    /// Runs the model over `batch` (writing its K/V into the pool); `lora`: runs of tokens on
    /// one slot (empty: base model only). Keeps the logits of `batch.logits_indices`.
    fn forward(&mut self, batch: &ForwardBatch<'_>, lora: &[Segment]) -> Result<(), BackendError>;
    /// Samples one token per row of the last forward's logits (`rows[i]` for logits row `i`);
    /// scored rows may follow them.
    fn sample(&mut self, rows: &[RowSample]) -> Result<Vec<RowOutcome>, BackendError>;
    /// Prompt positions per step whose logits `forward` can keep after the sampled rows (prompt
    /// logprobs); 0, the default, where it cannot, and such requests are refused.
    fn max_scored_rows(&self) -> usize {
        0
    }
    /// Scores logits rows `first..first + targets.len()` of the last forward: row `first + i`
    /// against `targets[i]`, a `(token, number of top logprobs)`.
    fn score(
        &mut self,
        first: usize,
        targets: &[(u32, usize)],
    ) -> Result<Vec<PromptLogprob>, BackendError> {
        let _ = (first, targets);
        Err(BackendError::new(
            "engine",
            format!("{} does not score prompt positions", self.describe()),
        ))
    }
    /// Writes NaN into logits row `row` of the last forward (fault-injection tests). Backends
    /// outside this crate (benchmarks' stand-ins) need not have it: by default it fails.
    #[cfg(feature = "fault-injection")]
    fn poison_logits_row(&mut self, row: usize) -> Result<(), BackendError> {
        Err(BackendError::new(
            "test",
            format!("{} cannot poison logits row {row}", self.describe()),
        ))
    }
}

impl<B: Backend + ?Sized> Backend for Box<B> {
    fn config(&self) -> &LlamaConfig {
        (**self).config()
    }
    fn num_kv_blocks(&self) -> usize {
        (**self).num_kv_blocks()
    }
    fn block_size(&self) -> usize {
        (**self).block_size()
    }
    fn describe(&self) -> String {
        (**self).describe()
    }
    fn host_compute_threads(&self) -> usize {
        (**self).host_compute_threads()
    }
    fn init_adapter_slots(&mut self, spec: SlotSpec) -> Result<usize, BackendError> {
        (**self).init_adapter_slots(spec)
    }
    fn load_adapter(&mut self, slot: u32, adapter: &LoadedAdapter) -> Result<(), BackendError> {
        (**self).load_adapter(slot, adapter)
    }
    fn forward(&mut self, batch: &ForwardBatch<'_>, lora: &[Segment]) -> Result<(), BackendError> {
        (**self).forward(batch, lora)
    }
    fn sample(&mut self, rows: &[RowSample]) -> Result<Vec<RowOutcome>, BackendError> {
        (**self).sample(rows)
    }
    fn max_scored_rows(&self) -> usize {
        (**self).max_scored_rows()
    }
    fn score(
        &mut self,
        first: usize,
        targets: &[(u32, usize)],
    ) -> Result<Vec<PromptLogprob>, BackendError> {
        (**self).score(first, targets)
    }
    #[cfg(feature = "fault-injection")]
    fn poison_logits_row(&mut self, row: usize) -> Result<(), BackendError> {
        (**self).poison_logits_row(row)
    }
}
