//! Adapter loads on the copy stream (issue 17): filling a device slot queues its bytes on a
//! [`CopyStream`] through pinned staging and records an event per slot; the compute stream
//! waits for that event only before the first forward whose batch reads the slot, so a load
//! never stalls a batch that does not use it.
//!
//! Slot safety: the executor's `DeviceSlots` never hands out a slot whose adapter a running
//! request uses, and each load first orders the copy stream after all compute work launched so
//! far (the last step that read the slot's previous adapter).
//!
//! The pinned staging ring holds one slot's bytes where it can ([`staging_chunks`]: 32 to 128
//! MiB): a load that fits it never waits on the host for its own copies. A bigger one (ranks
//! above ~24 on all seven projections of an 8B model) waits while the ring turns over, for the
//! copy stream, which itself runs after the compute work launched before the load; so such a
//! load can delay the next step's launch by that much. The ring is host memory: the memory plan
//! divides device memory only, so it is not in the plan.
//!
//! Tested in the host emulation in CI, and on a GPU under `scripts/gpu-check`.

use caduceus_kernels::gpu::copy_stream::{CopyEvent, CopyStream};
use caduceus_kernels::gpu::lora::LoraGpuError;
use caduceus_kernels::gpu::{Device, GpuError};
use caduceus_kernels::lora::Segment;

use super::lora::{GpuAdapterImage, GpuLoraStack};

/// Bytes per staging chunk.
pub const STAGING_CHUNK_BYTES: usize = 4 << 20;
/// Fewest and most staging chunks (32 and 128 MiB).
const MIN_CHUNKS: usize = 8;
const MAX_CHUNKS: usize = 32;

/// Staging chunks for slots of `slot_bytes` each: one slot's bytes and a chunk to spare, within
/// 32 to 128 MiB. A Llama-3-8B rank-16 adapter on all seven projections is ~84 MB in bf16.
pub fn staging_chunks(slot_bytes: usize) -> usize {
    (slot_bytes.div_ceil(STAGING_CHUNK_BYTES) + 1).clamp(MIN_CHUNKS, MAX_CHUNKS)
}

/// The copy stream and, per adapter slot, the event its last load recorded that the compute
/// stream has not waited for yet.
pub struct AdapterCopies {
    stream: CopyStream,
    pending: Vec<Option<CopyEvent>>,
}

impl AdapterCopies {
    /// A copy stream on `dev` for `num_slots` slots of `slot_bytes` device bytes each.
    pub fn new(dev: &Device, num_slots: usize, slot_bytes: usize) -> Result<Self, GpuError> {
        Ok(AdapterCopies {
            stream: CopyStream::new(dev, staging_chunks(slot_bytes), STAGING_CHUNK_BYTES)?,
            pending: vec![None; num_slots],
        })
    }

    /// Queues `image` into `slot` of `stack` on the copy stream, after every compute launch so
    /// far; returns without waiting for the copy (the host's work: copying its bits into the
    /// pinned staging ring).
    pub fn load(
        &mut self,
        dev: &Device,
        stack: &mut GpuLoraStack,
        slot: usize,
        image: &GpuAdapterImage,
    ) -> Result<(), LoraGpuError> {
        let gpu = LoraGpuError::from;
        let pending = self
            .pending
            .get_mut(slot)
            .ok_or_else(|| gpu(GpuError::Shape(format!("adapter slot {slot} out of range"))))?;
        // A failed load leaves its slot unnamed by the executor, so no forward reads it.
        *pending = None;
        self.stream.release_completed().map_err(gpu)?;
        self.stream.after_compute(dev).map_err(gpu)?;
        stack.load_image_with(&mut self.stream, slot, image)?;
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
        // Pinned images the host cache let go of return their pages once their copies ran.
        self.stream.release_completed()
    }

    /// The copy stream (tests read its op log).
    pub fn stream_mut(&mut self) -> &mut CopyStream {
        &mut self.stream
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_ring_holds_a_slot_within_its_bounds() {
        let mib = 1 << 20;
        assert_eq!(staging_chunks(0), MIN_CHUNKS);
        // 84 MB (an 8B rank-16 adapter): 21 chunks and one to spare.
        assert_eq!(staging_chunks(84_000_000), 22);
        assert!(staging_chunks(84_000_000) * STAGING_CHUNK_BYTES >= 84_000_000 + 4 * mib);
        assert_eq!(staging_chunks(335_000_000), MAX_CHUNKS);
    }
}
