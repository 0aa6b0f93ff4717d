//! The adapter slots of one projection of one layer: stacked A and B of every loaded adapter.

use super::q8;
use super::scalar::PANEL;
use super::weight::{LoraWeight, WeightKind, Q8};
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

impl LoraShape {
    /// Fails unless `slot` exists.
    pub(crate) fn check_slot(&self, slot: usize) -> Result<(), LoraError> {
        if slot >= self.num_slots {
            return Err(LoraError::SlotOutOfRange {
                slot,
                num_slots: self.num_slots,
            });
        }
        Ok(())
    }

    /// Fails unless `slot` can take an adapter of `rank` whose PEFT `lora_A` has `a_len` values
    /// (`[rank, in_dim]`) and `lora_B` `b_len` (`[out_dim, rank]`): the one check every slot
    /// store (CPU or device) makes before writing anything.
    pub(crate) fn check_load(
        &self,
        slot: usize,
        rank: usize,
        a_len: usize,
        b_len: usize,
    ) -> Result<(), LoraError> {
        self.check_slot(slot)?;
        if !(1..=self.max_rank).contains(&rank) {
            return Err(LoraError::BadRank {
                rank,
                max_rank: self.max_rank,
            });
        }
        for (what, expected, actual) in [
            ("lora_A", rank * self.in_dim, a_len),
            ("lora_B", self.out_dim * rank, b_len),
        ] {
            if actual != expected {
                return Err(LoraError::LengthMismatch {
                    what,
                    expected,
                    actual,
                });
            }
        }
        Ok(())
    }
}

/// One adapter read back from a slot by [`LoraSlots::read_slot`].
#[derive(Clone, Debug, PartialEq)]
pub struct PeftSlot {
    pub a: Vec<f32>,
    pub b: Vec<f32>,
    pub rank: usize,
    pub scale: f32,
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
///
/// [`super::Q8`] stores differ (see `q8`): A rows are padded to 64 bytes, B is in VNNI panels
/// `[out_dim / 64][rank / 4][64][4]`, and each row carries a scale and a zero-point correction.
#[derive(Clone, Debug)]
pub struct LoraSlots<W: LoraWeight = f32> {
    shape: LoraShape,
    /// `[slot][max_rank][a_stride]`; rows past the slot's rank are unused.
    a: Vec<W>,
    /// `in_dim` (Q8: rounded up to 64, zero-padded).
    a_stride: usize,
    /// `[slot][panel][max_rank][PANEL]`; columns past `out_dim` stay zero.
    b_panels: Vec<W>,
    /// Q8 only: `[slot][max_rank]` scales and zero-point corrections (empty for float kinds).
    q8: q8::RowScales,
    /// 0 for an empty slot.
    ranks: Vec<usize>,
    scales: Vec<f32>,
}

impl<W: LoraWeight> LoraSlots<W> {
    /// Empty slots of the given shape (memory for all of them is allocated up front, as on a GPU).
    /// A [`super::Q8`] store also rejects `in_dim` above 65536 (its integer sums must fit an i32).
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
        let is_q8 = W::KIND == WeightKind::Q8;
        if is_q8 && in_dim > q8::MAX_IN_DIM {
            return Err(LoraError::BadShape(shape));
        }
        let a_stride = if is_q8 { q8::a_stride(in_dim) } else { in_dim };
        let a_len = num_slots
            .checked_mul(max_rank * a_stride)
            .ok_or(LoraError::BadShape(shape))?;
        let b_len = num_slots
            .checked_mul(Self::b_slot_len(shape))
            .ok_or(LoraError::BadShape(shape))?;
        Ok(LoraSlots {
            shape,
            a: vec![W::default(); a_len],
            a_stride,
            b_panels: vec![W::default(); b_len],
            q8: if is_q8 {
                q8::RowScales::new(shape)
            } else {
                q8::RowScales::default()
            },
            ranks: vec![0; num_slots],
            scales: vec![0.0; num_slots],
        })
    }

    /// Values of one slot's B panels.
    fn b_slot_len(shape: LoraShape) -> usize {
        if W::KIND == WeightKind::Q8 {
            q8::b_slot_len(shape.out_dim, shape.max_rank)
        } else {
            shape.max_rank * shape.out_dim.div_ceil(PANEL) * PANEL
        }
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
        (self.a.len() + self.b_panels.len()) * std::mem::size_of::<W>() + self.q8.nbytes()
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
        let max_rank = self.shape.max_rank;
        self.shape.check_load(slot, rank, a.len(), b.len())?;
        if W::KIND == WeightKind::Q8 {
            let a_slot = &mut self.a[slot * max_rank * self.a_stride..][..max_rank * self.a_stride];
            let b_slot = &mut self.b_panels[slot * Self::b_slot_len(self.shape)..]
                [..Self::b_slot_len(self.shape)];
            self.q8.load(
                self.shape,
                slot,
                (as_q8_mut(a_slot), self.a_stride),
                as_q8_mut(b_slot),
                (a, b, rank),
            );
        } else {
            self.store_float(slot, a, b, rank);
        }
        self.ranks[slot] = rank;
        self.scales[slot] = scale;
        Ok(())
    }

    /// `load_slot` for f32, f16 and bf16: each weight rounded to `W`.
    fn store_float(&mut self, slot: usize, a: &[f32], b: &[f32], rank: usize) {
        let LoraShape {
            in_dim,
            out_dim,
            max_rank,
            ..
        } = self.shape;
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
    }

    /// Copies the adapter in `src_slot` of `src` into `slot`: plain copies of weights already
    /// converted and laid out, so an adapter can be prepared (`new` + `load_slot` on a one-slot
    /// store, on any thread) and later put in place cheaply on the thread that runs the kernels.
    /// `src` must have this store's `in_dim` and `out_dim` and a `max_rank` no larger.
    pub fn copy_slot_from(
        &mut self,
        slot: usize,
        src: &LoraSlots<W>,
        src_slot: usize,
    ) -> Result<(), LoraError> {
        self.check_slot(slot)?;
        let rank = src.weights(src_slot)?.rank;
        let (dst, from) = (self.shape, src.shape);
        if from.in_dim != dst.in_dim || from.out_dim != dst.out_dim || from.max_rank > dst.max_rank
        {
            return Err(LoraError::BadShape(from));
        }
        let a_len = rank * self.a_stride;
        self.a[slot * dst.max_rank * self.a_stride..][..a_len]
            .copy_from_slice(&src.a[src_slot * from.max_rank * src.a_stride..][..a_len]);
        let (dst_panel, src_panel) = (self.panel_stride(), src.panel_stride());
        let (dst_b, src_b) = (
            &mut self.b_panels[slot * Self::b_slot_len(dst)..][..Self::b_slot_len(dst)],
            &src.b_panels[src_slot * Self::b_slot_len(from)..][..Self::b_slot_len(from)],
        );
        for (d, s) in dst_b
            .chunks_exact_mut(dst_panel)
            .zip(src_b.chunks_exact(src_panel))
        {
            d[..src_panel].copy_from_slice(s);
        }
        self.q8
            .copy_slot((dst, slot), &src.q8, (from, src_slot), rank);
        self.ranks[slot] = rank;
        self.scales[slot] = src.scales[src_slot];
        Ok(())
    }

    /// Values of one B panel.
    fn panel_stride(&self) -> usize {
        if W::KIND == WeightKind::Q8 {
            q8::panel_stride(self.shape.max_rank)
        } else {
            self.shape.max_rank * PANEL
        }
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

    /// The adapter in `slot` back in PEFT's layouts as f32 (`a` `[rank, in_dim]`, `b`
    /// `[out_dim, rank]`) with its scale: what another device's store is filled from. `None` for
    /// an empty slot and for [`super::Q8`] stores, whose rounding is not invertible.
    pub fn read_slot(&self, slot: usize) -> Option<PeftSlot> {
        let rank = self.rank(slot)?;
        if W::KIND == WeightKind::Q8 {
            return None;
        }
        let LoraShape {
            in_dim,
            out_dim,
            max_rank,
            ..
        } = self.shape;
        let a = self.a[slot * max_rank * in_dim..][..rank * in_dim]
            .iter()
            .map(|w| w.to_f32())
            .collect();
        let panel_len = max_rank * PANEL;
        let panels = &self.b_panels[slot * panel_len * out_dim.div_ceil(PANEL)..];
        let mut b = Vec::with_capacity(out_dim * rank);
        for o in 0..out_dim {
            let panel = &panels[(o / PANEL) * panel_len..];
            b.extend((0..rank).map(|k| panel[k * PANEL + o % PANEL].to_f32()));
        }
        Some(PeftSlot {
            a,
            b,
            rank,
            scale: self.scales[slot],
        })
    }

    fn check_slot(&self, slot: usize) -> Result<(), LoraError> {
        self.shape.check_slot(slot)
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
        let panels_len = Self::b_slot_len(self.shape);
        let panel_stride = if W::KIND == WeightKind::Q8 {
            q8::panel_stride(max_rank)
        } else {
            max_rank * PANEL
        };
        Ok(SlotWeights {
            a: &self.a[slot * max_rank * self.a_stride..][..rank * self.a_stride],
            a_stride: self.a_stride,
            b_panels: &self.b_panels[slot * panels_len..][..panels_len],
            panel_stride,
            q8: self.q8.slot(self.shape, slot, rank),
            rank,
            scale: self.scales[slot],
            in_dim,
            out_dim,
        })
    }
}

/// `s` as the [`Q8`] values it holds (for `W::KIND == Q8`).
fn as_q8_mut<W: LoraWeight>(s: &mut [W]) -> &mut [Q8] {
    assert_eq!(W::KIND, WeightKind::Q8, "not a Q8 store");
    // SAFETY: `W::KIND` is `Q8` only for `W = Q8` (the trait is sealed), so the types are equal.
    unsafe { std::slice::from_raw_parts_mut(s.as_mut_ptr().cast::<Q8>(), s.len()) }
}

/// One loaded adapter, borrowed from its slot store.
#[derive(Clone, Copy, Debug)]
pub(super) struct SlotWeights<'a, W> {
    /// `[rank, a_stride]`, the first `in_dim` values of each row in use.
    pub a: &'a [W],
    pub a_stride: usize,
    /// `[panel][panel_stride]`, the first `rank * PANEL` values of each panel in use (Q8: see `q8`).
    pub b_panels: &'a [W],
    pub panel_stride: usize,
    /// Q8 scales and corrections of this slot (empty slices for float kinds).
    pub q8: q8::SlotScales<'a>,
    pub rank: usize,
    pub scale: f32,
    pub in_dim: usize,
    pub out_dim: usize,
}
