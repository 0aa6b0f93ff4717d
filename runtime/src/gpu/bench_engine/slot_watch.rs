//! A [`Backend`] wrapper that watches the adapter slots: which adapter each device slot holds
//! and how many slot fills (host-to-device adapter copies) the engine asked for. The bench uses
//! it to show that a warm run starts with every adapter device-resident and fills no slot while
//! the clock runs. It also times the `forward` and `sample` calls, so the step profile can tell
//! the device's share of a step from the host's, and the slot fills, which stall the engine
//! thread; everything else is passed straight through.

use std::time::{Duration, Instant};

use caduceus_kernels::lora::Segment;
use caduceus_scheduler::AdapterKey;

use crate::adapters::LoadedAdapter;
use crate::engine::{Backend, BackendError, RowOutcome, SlotSpec};
use crate::model::config::LlamaConfig;
use crate::model::ForwardBatch;
use crate::sampling::RowSample;

/// `inner` with a record of its adapter slots.
pub struct SlotWatch<B> {
    inner: B,
    /// The adapter each slot holds (`None`: empty, or its last copy failed).
    slots: Vec<Option<AdapterKey>>,
    fills: u64,
    /// Time the engine thread spent in slot fills.
    fill_time: Duration,
    calls: BackendCalls,
}

/// Time spent inside the wrapped backend's calls so far.
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct BackendCalls {
    /// In `forward`: queueing the step's work (a graph replay, or every kernel of an eager step).
    pub forward: Duration,
    /// In `sample`: waiting for the device to finish the step, sampling there, reading back.
    pub sample: Duration,
}

impl<B: Backend> SlotWatch<B> {
    /// Watches `inner`'s slots from now on (none are filled yet).
    pub fn new(inner: B) -> Self {
        SlotWatch {
            inner,
            slots: Vec::new(),
            fills: 0,
            fill_time: Duration::ZERO,
            calls: BackendCalls::default(),
        }
    }

    /// Time spent in `forward` and `sample` so far.
    pub fn calls(&self) -> BackendCalls {
        self.calls
    }

    /// Slot fills so far (each one an adapter copied into a device slot).
    pub fn fills(&self) -> u64 {
        self.fills
    }

    /// Time spent in the slot fills so far (on the engine thread, which steps nothing meanwhile).
    pub fn fill_time(&self) -> Duration {
        self.fill_time
    }

    /// Distinct adapters resident in the device slots now.
    pub fn num_resident(&self) -> usize {
        let mut keys: Vec<(u32, u64)> = self
            .slots
            .iter()
            .flatten()
            .map(|k| (k.id, k.generation))
            .collect();
        keys.sort_unstable();
        keys.dedup();
        keys.len()
    }
}

impl<B: Backend> Backend for SlotWatch<B> {
    fn config(&self) -> &LlamaConfig {
        self.inner.config()
    }
    fn num_kv_blocks(&self) -> usize {
        self.inner.num_kv_blocks()
    }
    fn block_size(&self) -> usize {
        self.inner.block_size()
    }
    fn describe(&self) -> String {
        self.inner.describe()
    }
    fn host_compute_threads(&self) -> usize {
        self.inner.host_compute_threads()
    }
    fn init_adapter_slots(&mut self, spec: SlotSpec) -> Result<usize, BackendError> {
        let num_slots = spec.num_slots;
        let bytes = self.inner.init_adapter_slots(spec)?;
        self.slots = vec![None; num_slots];
        Ok(bytes)
    }
    fn load_adapter(&mut self, slot: u32, adapter: &LoadedAdapter) -> Result<(), BackendError> {
        let entry = self.slots.get_mut(slot as usize);
        let start = Instant::now();
        let result = self.inner.load_adapter(slot, adapter);
        self.fill_time += start.elapsed();
        if let Some(entry) = entry {
            *entry = result.is_ok().then_some(adapter.key);
        }
        self.fills += 1;
        result
    }
    fn forward(&mut self, batch: &ForwardBatch<'_>, lora: &[Segment]) -> Result<(), BackendError> {
        let start = Instant::now();
        let result = self.inner.forward(batch, lora);
        self.calls.forward += start.elapsed();
        result
    }
    fn sample(&mut self, rows: &[RowSample]) -> Result<Vec<RowOutcome>, BackendError> {
        let start = Instant::now();
        let result = self.inner.sample(rows);
        self.calls.sample += start.elapsed();
        result
    }
    #[cfg(feature = "fault-injection")]
    fn poison_logits_row(&mut self, row: usize) -> Result<(), BackendError> {
        self.inner.poison_logits_row(row)
    }
}
