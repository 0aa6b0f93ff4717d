//! The adapter slots of one projection of one layer: stacked A and B of every loaded adapter.

use super::scalar::PANEL;
use super::weight::LoraWeight;
use super::{LoraError, MAX_LORA_RANK};

/// Dimensions of a slot store: `num_slots` adapters of rank up to `max_rank` for a projection
/// `in_dim -> out_dim`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct LoraShape {
    pub num_slots: usize,
    pub in_dim: usize,
    pub out_dim: usize,
    pub max_rank: usize,
}

/// `num_slots` adapters for one projection, stored as `W` (f32, f16 or bf16: see `weight`), each
/// slot sized for `max_rank` and remembering its own rank and scale.
///
/// Ranks are stored, not padded away: a rank-8 adapter in a 128 slot reads 8 rows, so mixing ranks
/// costs memory but no bandwidth or compute. Layouts (both chosen so a kernel streams memory front
/// to back):
/// - A as PEFT's `lora_A.weight` `[rank, in_dim]`: the shrink is `rank` dot products along `in_dim`.
/// - B transposed into panels `[out_dim / 64][rank][64]`: the expand adds `rank` scaled rows of 64
///   outputs into accumulators, so it needs no horizontal sums and each panel is contiguous.
#[derive(Clone, Debug)]
pub struct LoraSlots<W: LoraWeight = f32> {
    shape: LoraShape,
    /// `[slot][max_rank][in_dim]`; rows past the slot's rank are unused.
    a: Vec<W>,
    /// `[slot][panel][max_rank][PANEL]`; columns past `out_dim` stay zero.
    b_panels: Vec<W>,
    /// 0 for an empty slot.
    ranks: Vec<usize>,
    scales: Vec<f32>,
}

impl<W: LoraWeight> LoraSlots<W> {
    /// Empty slots of the given shape (memory for all of them is allocated up front, as on a GPU).
    pub fn new(shape: LoraShape) -> Result<LoraSlots<W>, LoraError> {
        let LoraShape {
            num_slots,
            in_dim,
            out_dim,
            max_rank,
        } = shape;
        if num_slots == 0 || in_dim == 0 || out_dim == 0 || !(1..=MAX_LORA_RANK).contains(&max_rank)
        {
            return Err(LoraError::BadShape(shape));
        }
        let a_len = num_slots
            .checked_mul(max_rank * in_dim)
            .ok_or(LoraError::BadShape(shape))?;
        let b_len = num_slots
            .checked_mul(max_rank * out_dim.div_ceil(PANEL) * PANEL)
            .ok_or(LoraError::BadShape(shape))?;
        Ok(LoraSlots {
            shape,
            a: vec![W::default(); a_len],
            b_panels: vec![W::default(); b_len],
            ranks: vec![0; num_slots],
            scales: vec![0.0; num_slots],
        })
    }

    pub fn shape(&self) -> LoraShape {
        self.shape
    }

    pub fn num_slots(&self) -> usize {
        self.shape.num_slots
    }

    pub fn in_dim(&self) -> usize {
        self.shape.in_dim
    }

    pub fn out_dim(&self) -> usize {
        self.shape.out_dim
    }

    pub fn max_rank(&self) -> usize {
        self.shape.max_rank
    }

    /// Bytes held for adapter weights (all slots, loaded or not).
    pub fn nbytes(&self) -> usize {
        (self.a.len() + self.b_panels.len()) * std::mem::size_of::<W>()
    }

    /// Stores an adapter in `slot`, replacing what was there. `a` is PEFT's `lora_A.weight`
    /// `[rank, in_dim]`, `b` its `lora_B.weight` `[out_dim, rank]`, both row-major (rounded to `W`);
    /// `scale` is usually [`super::lora_scale`]`(alpha, rank, use_rslora)`.
    pub fn load_slot(
        &mut self,
        slot: usize,
        a: &[f32],
        b: &[f32],
        rank: usize,
        scale: f32,
    ) -> Result<(), LoraError> {
        let LoraShape {
            in_dim,
            out_dim,
            max_rank,
            ..
        } = self.shape;
        self.check_slot(slot)?;
        if !(1..=max_rank).contains(&rank) {
            return Err(LoraError::BadRank { rank, max_rank });
        }
        for (what, expected, actual) in [
            ("lora_A", rank * in_dim, a.len()),
            ("lora_B", out_dim * rank, b.len()),
        ] {
            if actual != expected {
                return Err(LoraError::LengthMismatch {
                    what,
                    expected,
                    actual,
                });
            }
        }
        let a_slot = max_rank * in_dim;
        for (dst, &v) in self.a[slot * a_slot..][..rank * in_dim].iter_mut().zip(a) {
            *dst = W::from_f32(v);
        }
        let panel_len = max_rank * PANEL;
        let slot_panels = &mut self.b_panels[slot * panel_len * out_dim.div_ceil(PANEL)..];
        for (o, b_row) in b.chunks_exact(rank).enumerate() {
            let panel = &mut slot_panels[(o / PANEL) * panel_len..];
            for (k, &w) in b_row.iter().enumerate() {
                panel[k * PANEL + o % PANEL] = W::from_f32(w);
            }
        }
        self.ranks[slot] = rank;
        self.scales[slot] = scale;
        Ok(())
    }

    /// Marks `slot` empty; batches that name it are then rejected.
    pub fn clear_slot(&mut self, slot: usize) -> Result<(), LoraError> {
        self.check_slot(slot)?;
        self.ranks[slot] = 0;
        self.scales[slot] = 0.0;
        Ok(())
    }

    /// The rank of the adapter in `slot`, `None` if it is empty or out of range.
    pub fn rank(&self, slot: usize) -> Option<usize> {
        self.ranks.get(slot).copied().filter(|&r| r > 0)
    }

    /// The scale of the adapter in `slot`, `None` if it is empty or out of range.
    pub fn scale(&self, slot: usize) -> Option<f32> {
        self.rank(slot).map(|_| self.scales[slot])
    }

    fn check_slot(&self, slot: usize) -> Result<(), LoraError> {
        if slot >= self.shape.num_slots {
            return Err(LoraError::SlotOutOfRange {
                slot,
                num_slots: self.shape.num_slots,
            });
        }
        Ok(())
    }

    /// The loaded adapter in `slot` as the kernels read it, or why there is none.
    pub(super) fn weights(&self, slot: usize) -> Result<SlotWeights<'_, W>, LoraError> {
        self.check_slot(slot)?;
        let rank = self.rank(slot).ok_or(LoraError::EmptySlot { slot })?;
        let LoraShape {
            in_dim,
            out_dim,
            max_rank,
            ..
        } = self.shape;
        let panels_len = max_rank * PANEL * out_dim.div_ceil(PANEL);
        Ok(SlotWeights {
            a: &self.a[slot * max_rank * in_dim..][..rank * in_dim],
            b_panels: &self.b_panels[slot * panels_len..][..panels_len],
            panel_stride: max_rank * PANEL,
            rank,
            scale: self.scales[slot],
            in_dim,
            out_dim,
        })
    }
}

/// One loaded adapter, borrowed from its slot store.
#[derive(Clone, Copy, Debug)]
pub(super) struct SlotWeights<'a, W> {
    /// `[rank, in_dim]`.
    pub a: &'a [W],
    /// `[panel][panel_stride]`, the first `rank * PANEL` values of each panel in use.
    pub b_panels: &'a [W],
    pub panel_stride: usize,
    pub rank: usize,
    pub scale: f32,
    pub in_dim: usize,
    pub out_dim: usize,
}
