//! [`LoraBatch`]: which tokens of a step use which adapter slot, as the kernels read it.

use super::{LoraGpuError, TILE_TOKENS};
use crate::gpu::ops::{dim32, need};
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

/// Which tokens of a step use which adapter slot, on the host: the words the kernels read and
/// what sizes their grids. [`LoraUnits::placed`] names where on the device those words are (a
/// range of a step's one upload); [`LoraBatch::bgmv`] / [`LoraBatch::sgmv`] upload them alone.
#[derive(Clone, Debug)]
pub struct LoraUnits {
    mapping: Mapping,
    /// BGMV: `[num_tokens]` u32 slots; SGMV: `[num_units][3]` u32 (start, len, slot).
    words: Vec<u32>,
    num_units: usize,
    num_tokens: usize,
    slots_used: Vec<u32>,
}

impl LoraUnits {
    /// Decode tokens: `token_slots[t]` is token t's slot (`None`: base model only).
    pub fn bgmv(token_slots: &[Option<u32>]) -> Result<LoraUnits, LoraGpuError> {
        let slots: Vec<u32> = token_slots.iter().map(|s| s.unwrap_or(NO_SLOT)).collect();
        dim32("num_tokens", slots.len())?;
        Ok(LoraUnits {
            mapping: Mapping::Bgmv,
            num_units: slots.len(),
            num_tokens: slots.len(),
            words: slots,
            slots_used: distinct(token_slots.iter().flatten().copied()),
        })
    }

    /// Runs of tokens sharing an adapter (prefill chunks, or decode tokens of requests on one
    /// adapter), as [`crate::lora::add_lora_fused`] takes them: sorted, disjoint, inside
    /// `num_tokens`. Segments without a slot add nothing.
    pub fn sgmv(segments: &[Segment], num_tokens: usize) -> Result<LoraUnits, LoraGpuError> {
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
        Ok(LoraUnits {
            mapping: Mapping::Sgmv,
            num_units: tiles.len() / 3,
            words: tiles,
            num_tokens,
            slots_used: distinct(segments.iter().filter_map(|s| s.slot)),
        })
    }

    /// The u32 words the kernels read.
    pub fn words(&self) -> &[u32] {
        &self.words
    }

    /// The batch whose kernels read these units from `buf`, which the caller has filled with
    /// [`Self::words`].
    pub fn placed(self, buf: &DeviceBuffer) -> Result<LoraBatch<'_>, LoraGpuError> {
        need("lora units", buf, self.words.len(), 4)?;
        Ok(self.into_batch(Units::At(buf), false))
    }

    /// [`Self::placed`] with grids sized for every slot's largest rank rather than the ranks
    /// these units use, so the launches stay valid for any BGMV units of the same length written
    /// to `buf` later (a captured graph). Those slots are then not checked at launch: the caller
    /// checks them against the stores' slot count before each upload.
    pub fn placed_fixed(self, buf: &DeviceBuffer) -> Result<LoraBatch<'_>, LoraGpuError> {
        need("lora units", buf, self.words.len(), 4)?;
        Ok(self.into_batch(Units::At(buf), true))
    }

    fn into_batch(self, units: Units<'_>, fixed_grid: bool) -> LoraBatch<'_> {
        LoraBatch {
            mapping: self.mapping,
            units,
            num_units: self.num_units,
            num_tokens: self.num_tokens,
            slots_used: self.slots_used,
            fixed_grid,
        }
    }
}

/// Where a batch's units live on the device.
enum Units<'a> {
    Owned(DeviceBuffer),
    At(&'a DeviceBuffer),
}

/// Which tokens of a step use which adapter slot, on the device and shared by every fused call
/// of the step (all layers and projections).
pub struct LoraBatch<'a> {
    pub(super) mapping: Mapping,
    units: Units<'a>,
    pub(super) num_units: usize,
    pub(super) num_tokens: usize,
    /// The distinct slots named, ascending: checked against each store's `num_slots` at launch,
    /// and their ranks size the grids (no blocks for ranks no token of the batch uses).
    pub(super) slots_used: Vec<u32>,
    /// Grids sized by the stores' `max_rank` ([`LoraUnits::placed_fixed`]).
    pub(super) fixed_grid: bool,
}

impl LoraBatch<'static> {
    /// [`LoraUnits::bgmv`], uploaded into a buffer of its own.
    pub fn bgmv(dev: &Device, token_slots: &[Option<u32>]) -> Result<Self, LoraGpuError> {
        Self::upload(dev, LoraUnits::bgmv(token_slots)?)
    }

    /// [`LoraUnits::sgmv`], uploaded into a buffer of its own.
    pub fn sgmv(
        dev: &Device,
        segments: &[Segment],
        num_tokens: usize,
    ) -> Result<Self, LoraGpuError> {
        Self::upload(dev, LoraUnits::sgmv(segments, num_tokens)?)
    }

    fn upload(dev: &Device, units: LoraUnits) -> Result<Self, LoraGpuError> {
        let buf = dev.upload(&units.words)?;
        Ok(units.into_batch(Units::Owned(buf), false))
    }
}

impl LoraBatch<'_> {
    pub fn num_tokens(&self) -> usize {
        self.num_tokens
    }

    /// The units' device address.
    pub(super) fn units_ptr(&self) -> u64 {
        match &self.units {
            Units::Owned(b) => b.ptr(),
            Units::At(b) => b.ptr(),
        }
    }
}

fn distinct(slots: impl Iterator<Item = u32>) -> Vec<u32> {
    let mut v: Vec<u32> = slots.collect();
    v.sort_unstable();
    v.dedup();
    v
}
