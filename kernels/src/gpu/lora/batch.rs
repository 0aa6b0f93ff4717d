//! [`LoraBatch`]: which tokens of a step use which adapter slot, as the kernels read it.

use super::{DecodeLoraMapping, LoraGpuError, TILE_TOKENS};
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
/// range of a step's one upload); [`LoraBatch::bgmv`] / [`LoraBatch::sgmv`] /
/// [`LoraBatch::grouped`] upload them alone.
#[derive(Clone, Debug)]
pub struct LoraUnits {
    mapping: Mapping,
    /// BGMV: `[num_tokens]` u32 slots. SGMV: `[num_units][3]` u32 (first, len, slot); a tile
    /// holds tokens first..first + len, or, when the tokens are gathered (`rows_at`), the
    /// tokens rows[first..first + len] of the rows that follow the tiles from word `rows_at`.
    words: Vec<u32>,
    rows_at: Option<usize>,
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
            rows_at: None,
            words: slots,
            slots_used: distinct(token_slots.iter().flatten().copied()),
        })
    }

    /// The units of a captured decode graph's `token_slots` (one per padded token, each below
    /// `num_slots`) under `mapping`: the same layout and grid for any slots of that length.
    pub fn for_graph(
        token_slots: &[Option<u32>],
        mapping: DecodeLoraMapping,
        num_slots: usize,
    ) -> Result<LoraUnits, LoraGpuError> {
        match mapping {
            DecodeLoraMapping::Bgmv => LoraUnits::bgmv(token_slots),
            DecodeLoraMapping::Grouped => LoraUnits::grouped(token_slots, Some(num_slots)),
        }
    }

    /// The most SGMV tiles `tokens` tokens over at most `num_slots` adapters can make: each
    /// adapter's n tokens make ceil(n / [`TILE_TOKENS`]) <= (n + TILE_TOKENS - 1) / TILE_TOKENS
    /// tiles, so all of them at most (tokens + (TILE_TOKENS - 1) num_slots) / TILE_TOKENS, and
    /// never more than one per token.
    pub fn max_grouped_tiles(tokens: usize, num_slots: usize) -> usize {
        let bound =
            tokens.saturating_add((TILE_TOKENS - 1).saturating_mul(num_slots)) / TILE_TOKENS;
        bound.min(tokens)
    }

    /// Decode tokens grouped by adapter: `token_slots[t]` is token t's slot (`None`: base model
    /// only); the tokens of each slot, in batch order, are cut into SGMV tiles, so each adapter's
    /// weights are read once per tile rather than once per token (S-LoRA and Punica sort a batch
    /// by adapter for the same reason). With `fixed_for_slots` (a captured graph's stack of that
    /// many slots, which every slot must be below), there are always
    /// [`Self::max_grouped_tiles`] units (tiles past the real ones are empty), so the words'
    /// layout and the grid depend on the token and slot counts alone, as a captured graph needs:
    /// a unit per token would leave most of a large batch's blocks empty, and each still takes
    /// its place on an SM.
    pub fn grouped(
        token_slots: &[Option<u32>],
        fixed_for_slots: Option<usize>,
    ) -> Result<LoraUnits, LoraGpuError> {
        let t = token_slots.len();
        dim32("num_tokens", t)?;
        if let Some(num_slots) = fixed_for_slots {
            if let Some(&slot) = token_slots
                .iter()
                .flatten()
                .find(|&&s| s as usize >= num_slots)
            {
                let slot = slot as usize;
                return Err(LoraError::SlotOutOfRange { slot, num_slots }.into());
            }
        }
        // The named tokens by slot, each slot's in batch order (a stable sort).
        let mut rows: Vec<(u32, u32)> = token_slots
            .iter()
            .enumerate()
            .filter_map(|(i, s)| s.map(|s| (s, i as u32)))
            .collect();
        rows.sort_by_key(|&(slot, _)| slot);
        let mut tiles: Vec<u32> = Vec::new();
        let mut first = 0;
        for group in rows.chunk_by(|a, b| a.0 == b.0) {
            for tile in group.chunks(TILE_TOKENS) {
                tiles.extend([first as u32, tile.len() as u32, tile[0].0]);
                first += tile.len();
            }
        }
        let slots_used = distinct(rows.iter().map(|&(slot, _)| slot));
        let mut rows: Vec<u32> = rows.into_iter().map(|(_, i)| i).collect();
        let num_units = match fixed_for_slots {
            Some(num_slots) => LoraUnits::max_grouped_tiles(t, num_slots),
            None => tiles.len() / 3,
        };
        if tiles.len() / 3 > num_units {
            return Err(crate::gpu::GpuError::Shape(format!(
                "grouped LoRA: {} tiles exceed the graph's {num_units}",
                tiles.len() / 3
            ))
            .into());
        }
        while tiles.len() < 3 * num_units {
            tiles.extend([0, 0, NO_SLOT]);
        }
        rows.resize(t, 0);
        let rows_at = Some(tiles.len());
        tiles.extend(rows);
        Ok(LoraUnits {
            mapping: Mapping::Sgmv,
            num_units,
            words: tiles,
            rows_at,
            num_tokens: t,
            slots_used,
        })
    }

    /// Blocks per part of the grid: tokens (BGMV) or tiles (SGMV), empty ones included.
    pub fn num_units(&self) -> usize {
        self.num_units
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
        // The runs' tokens are consecutive: no rows.
        Ok(LoraUnits {
            mapping: Mapping::Sgmv,
            num_units: tiles.len() / 3,
            words: tiles,
            rows_at: None,
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
    /// these units use, so the launches stay valid for any units of the same kind and token
    /// count written to `buf` later (BGMV, or [`Self::grouped`] with `fixed`: a captured graph).
    /// Those slots are then not checked at launch: the caller checks them against the stores'
    /// slot count before each upload.
    pub fn placed_fixed(self, buf: &DeviceBuffer) -> Result<LoraBatch<'_>, LoraGpuError> {
        need("lora units", buf, self.words.len(), 4)?;
        Ok(self.into_batch(Units::At(buf), true))
    }

    fn into_batch(self, units: Units<'_>, fixed_grid: bool) -> LoraBatch<'_> {
        LoraBatch {
            mapping: self.mapping,
            rows_at: self.rows_at,
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
    /// SGMV with gathered tokens: the word where the tiles' rows start.
    rows_at: Option<usize>,
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

    /// [`LoraUnits::grouped`] (not fixed), uploaded into a buffer of its own.
    pub fn grouped(dev: &Device, token_slots: &[Option<u32>]) -> Result<Self, LoraGpuError> {
        Self::upload(dev, LoraUnits::grouped(token_slots, None)?)
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

    /// The device address of the tiles' rows; 0 (null) when each tile's tokens are consecutive.
    pub(super) fn rows_ptr(&self) -> u64 {
        self.rows_at
            .map_or(0, |at| self.units_ptr() + 4 * at as u64)
    }
}

fn distinct(slots: impl Iterator<Item = u32>) -> Vec<u32> {
    let mut v: Vec<u32> = slots.collect();
    v.sort_unstable();
    v.dedup();
    v
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn grouped_units_gather_each_slots_tokens_in_batch_order() {
        // Slot 1's token 2, then slot 2's tokens 0 and 3; token 1 uses no adapter.
        let slots = [Some(2), None, Some(1), Some(2)];
        let u = LoraUnits::grouped(&slots, None).unwrap();
        assert_eq!((u.num_units, u.rows_at), (2, Some(6)));
        assert_eq!(u.words(), [0, 1, 1, 1, 2, 2, 2, 0, 3, 0]);
        assert_eq!(u.slots_used, [1, 2]);
        // A graph's form for 3 slots: min(4 tokens, (4 + 15 x 3) / 16 = 3) units, the extra one
        // empty, the rows after all of them.
        let f = LoraUnits::grouped(&slots, Some(3)).unwrap();
        assert_eq!((f.num_units, f.rows_at), (3, Some(9)));
        assert_eq!(&f.words()[6..9], [0, 0, NO_SLOT]);
        assert_eq!(&f.words()[9..], [2, 0, 3, 0]);
        // With more slots than tokens, a unit per token; a slot past the stack is refused.
        let f = LoraUnits::grouped(&slots, Some(64)).unwrap();
        assert_eq!(f.num_units, 4);
        let err = LoraUnits::grouped(&slots, Some(2)).unwrap_err().to_string();
        assert!(err.contains("slot 2 out of range (2 slots)"), "{err}");
    }

    #[test]
    fn the_graph_bound_covers_every_assignment_of_tokens_to_slots() {
        // 256 tokens over 64 slots: 76 units, not 256.
        assert_eq!(LoraUnits::max_grouped_tiles(256, 64), 76);
        assert_eq!(LoraUnits::max_grouped_tiles(256, 1), 16);
        assert_eq!(LoraUnits::max_grouped_tiles(5, 1000), 5);
        // Exhaustive over small batches: the tiles of any assignment fit the bound, and some
        // assignment reaches it (the bound is tight).
        for tokens in 1..=40usize {
            for num_slots in 1..=3usize {
                let bound = LoraUnits::max_grouped_tiles(tokens, num_slots);
                let mut most = 0;
                // Every split of the tokens into num_slots counts (compositions).
                let mut counts = vec![0usize; num_slots];
                loop {
                    if counts.iter().sum::<usize>() == tokens {
                        let tiles: usize = counts.iter().map(|n| n.div_ceil(TILE_TOKENS)).sum();
                        most = most.max(tiles);
                        let slots: Vec<Option<u32>> = counts
                            .iter()
                            .enumerate()
                            .flat_map(|(s, &n)| std::iter::repeat_n(Some(s as u32), n))
                            .collect();
                        let u = LoraUnits::grouped(&slots, Some(num_slots)).unwrap();
                        assert_eq!(u.num_units, bound);
                    }
                    // Next composition (odometer over 0..=tokens).
                    let mut i = 0;
                    while i < num_slots && counts[i] == tokens {
                        counts[i] = 0;
                        i += 1;
                    }
                    if i == num_slots {
                        break;
                    }
                    counts[i] += 1;
                }
                assert_eq!(most, bound, "{tokens} tokens over {num_slots} slots");
            }
        }
    }

    #[test]
    fn grouped_units_cut_a_slots_tokens_into_tiles() {
        let slots = vec![Some(7); TILE_TOKENS + 3];
        let u = LoraUnits::grouped(&slots, None).unwrap();
        assert_eq!(u.num_units, 2);
        assert_eq!(
            &u.words()[..6],
            [0, TILE_TOKENS as u32, 7, TILE_TOKENS as u32, 3, 7]
        );
        let rows: Vec<u32> = (0..slots.len() as u32).collect();
        assert_eq!(&u.words()[6..], rows);
    }
}
