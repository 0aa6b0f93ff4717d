//! [`LoraBatch`]: which tokens of a step use which adapter slot, as the kernels read it.

use super::{LoraGpuError, TILE_TOKENS};
use crate::gpu::ops::dim32;
use crate::gpu::{Device, DeviceBuffer};
use crate::lora::{LoraError, Segment};

/// A base-only token in a BGMV slot list.
const NO_SLOT: u32 = u32::MAX;

/// How a batch's tokens map to kernel blocks.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum Mapping {
    /// One block per token, slots per token.
    Bgmv,
    /// One block per tile of a segment.
    Sgmv,
}

/// Which tokens of a step use which adapter slot, uploaded once and shared by every fused call of
/// the step (all layers and projections).
pub struct LoraBatch {
    pub(super) mapping: Mapping,
    /// BGMV: `[num_tokens]` u32 slots; SGMV: `[num_units][3]` u32 (start, len, slot).
    pub(super) units: DeviceBuffer,
    pub(super) num_units: usize,
    pub(super) num_tokens: usize,
    /// The distinct slots named, ascending: checked against each store's `num_slots` at launch,
    /// and their ranks size the grids (no blocks for ranks no token of the batch uses).
    pub(super) slots_used: Vec<u32>,
}

impl LoraBatch {
    /// Decode tokens: `token_slots[t]` is token t's slot (`None`: base model only).
    pub fn bgmv(dev: &Device, token_slots: &[Option<u32>]) -> Result<LoraBatch, LoraGpuError> {
        let slots: Vec<u32> = token_slots.iter().map(|s| s.unwrap_or(NO_SLOT)).collect();
        dim32("num_tokens", slots.len())?;
        Ok(LoraBatch {
            mapping: Mapping::Bgmv,
            units: dev.upload(&slots)?,
            num_units: slots.len(),
            num_tokens: slots.len(),
            slots_used: distinct(token_slots.iter().flatten().copied()),
        })
    }

    /// Runs of tokens sharing an adapter (prefill chunks, or decode tokens of requests on one
    /// adapter), as [`crate::lora::add_lora_fused`] takes them: sorted, disjoint, inside
    /// `num_tokens`. Segments without a slot add nothing.
    pub fn sgmv(
        dev: &Device,
        segments: &[Segment],
        num_tokens: usize,
    ) -> Result<LoraBatch, LoraGpuError> {
        dim32("num_tokens", num_tokens)?;
        let mut tiles: Vec<u32> = Vec::new();
        let mut covered = 0;
        for (index, s) in segments.iter().enumerate() {
            let end = s.start.saturating_add(s.len);
            if s.start < covered || end > num_tokens {
                let e = LoraError::BadSegment {
                    index,
                    start: s.start,
                    end,
                    num_tokens,
                };
                return Err(e.into());
            }
            covered = end;
            let Some(slot) = s.slot else { continue };
            for start in (s.start..end).step_by(TILE_TOKENS) {
                let len = TILE_TOKENS.min(end - start);
                tiles.extend([start as u32, len as u32, slot]);
            }
        }
        Ok(LoraBatch {
            mapping: Mapping::Sgmv,
            num_units: tiles.len() / 3,
            units: dev.upload(&tiles)?,
            num_tokens,
            slots_used: distinct(segments.iter().filter_map(|s| s.slot)),
        })
    }

    pub fn num_tokens(&self) -> usize {
        self.num_tokens
    }
}

fn distinct(slots: impl Iterator<Item = u32>) -> Vec<u32> {
    let mut v: Vec<u32> = slots.collect();
    v.sort_unstable();
    v.dedup();
    v
}
