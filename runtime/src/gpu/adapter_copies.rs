//! Adapter loads on the copy stream (issue 17): filling a device slot queues its bytes on a
//! [`CopyStream`] through pinned staging and records an event per slot; the compute stream
//! waits for that event only before the first forward whose batch reads the slot, so a load
//! never stalls a batch that does not use it.
//!
//! Slot safety: the executor's `DeviceSlots` never hands out a slot whose adapter a running
//! request uses, and each load first orders the copy stream after all compute work launched so
//! far (the last step that read the slot's previous adapter).
//!
//! The pinned staging ring ([`STAGING_CHUNKS`] x [`STAGING_CHUNK_BYTES`], 32 MiB) is host
//! memory: the memory plan divides device memory only, so it is not in the plan.
//!
//! Tested in the host emulation only; it has never run on a GPU.

use caduceus_kernels::gpu::copy_stream::{CopyEvent, CopyStream};
use caduceus_kernels::gpu::lora::LoraGpuError;
use caduceus_kernels::gpu::{Device, GpuError};
use caduceus_kernels::lora::Segment;

use super::lora::{GpuLoraLoadError, GpuLoraStack};
use crate::model::lora::LoraStack;

/// Pinned staging chunks of the adapter copy stream.
pub const STAGING_CHUNKS: usize = 8;
/// Bytes per staging chunk: a Llama-3-8B rank-16 adapter on all seven projections (~84 MB in
/// bf16) streams through the ring about three times; the host waits only for the copy stream.
pub const STAGING_CHUNK_BYTES: usize = 4 << 20;

/// The copy stream and, per adapter slot, the event its last load recorded that the compute
/// stream has not waited for yet.
pub struct AdapterCopies {
    stream: CopyStream,
    pending: Vec<Option<CopyEvent>>,
}

impl AdapterCopies {
    /// A copy stream on `dev` for `num_slots` slots.
    pub fn new(dev: &Device, num_slots: usize) -> Result<Self, GpuError> {
        Ok(AdapterCopies {
            stream: CopyStream::new(dev, STAGING_CHUNKS, STAGING_CHUNK_BYTES)?,
            pending: vec![None; num_slots],
        })
    }

    /// Queues `prepared` into `slot` of `stack` on the copy stream, after every compute launch
    /// so far; returns without waiting for the copy.
    pub fn load(
        &mut self,
        dev: &Device,
        stack: &mut GpuLoraStack,
        slot: usize,
        prepared: &LoraStack,
    ) -> Result<(), GpuLoraLoadError> {
        let gpu = |e: GpuError| GpuLoraLoadError::from(LoraGpuError::from(e));
        let pending = self
            .pending
            .get_mut(slot)
            .ok_or_else(|| gpu(GpuError::Shape(format!("adapter slot {slot} out of range"))))?;
        // A failed load leaves its slot unnamed by the executor, so no forward reads it.
        *pending = None;
        self.stream.after_compute(dev).map_err(gpu)?;
        stack.load_prepared_with(&mut self.stream, slot, prepared)?;
        self.pending[slot] = Some(self.stream.record().map_err(gpu)?);
        Ok(())
    }

    /// Makes the compute stream wait for the pending loads of the slots `segments` read, once
    /// each; slots the batch does not read are left to their copies.
    pub fn before_forward(&mut self, dev: &Device, segments: &[Segment]) -> Result<(), GpuError> {
        for slot in segments.iter().filter_map(|s| s.slot) {
            if let Some(event) = self.pending.get_mut(slot as usize).and_then(Option::take) {
                self.stream.compute_waits(dev, &event)?;
            }
        }
        Ok(())
    }

    /// The copy stream (tests read its op log).
    pub fn stream_mut(&mut self) -> &mut CopyStream {
        &mut self.stream
    }
}
