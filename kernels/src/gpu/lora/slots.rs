//! [`DeviceLoraSlots`]: one projection's adapter slots in device memory, loaded from PEFT layouts.

use super::image::{padded, SlotImage};
use super::table::{SlotTable, Table};
use super::LoraGpuError;
use crate::gpu::copy_stream::Upload;
use crate::gpu::ops::dim32;
use crate::gpu::{DType, Device, DeviceBuffer, GpuError};
use crate::lora::{LoraError, LoraShape, MAX_LORA_RANK};

/// The adapter slots of one projection of one layer in device memory (vLLM's `max_loras` slots).
///
/// Layouts, each chosen so a warp streams contiguous 16-byte vectors:
/// - A as PEFT's `lora_A.weight`, `[num_slots][max_rank][in_stride]`: the shrink is dot products
///   along `in_dim`, lanes reading consecutive columns of one row.
/// - B transposed, `[num_slots][max_rank][out_stride]`: the expand gives each thread consecutive
///   outputs, so for each rank row k a warp reads one contiguous stretch of `B[.., k]` (PEFT's
///   `[out_dim, rank]` rows would leave each thread striding by `rank`).
///
/// Rows are zero-padded to a multiple of 8. A rank-8 adapter in a rank-128 slot reads 8 rows: mixed
/// ranks cost memory, not bandwidth.
pub struct DeviceLoraSlots {
    pub(super) dtype: DType,
    pub(super) shape: LoraShape,
    pub(super) in_stride: usize,
    pub(super) out_stride: usize,
    pub(super) a: DeviceBuffer,
    pub(super) b: DeviceBuffer,
    /// The u32 ranks (0: empty) and f32 scales per slot, read by the kernels.
    pub(crate) table: Table,
    /// The ranks and scales as the host last set them.
    host_ranks: Vec<u32>,
    host_scales: Vec<f32>,
}

impl DeviceLoraSlots {
    /// Empty slots of `shape` (all memory allocated up front), ranks up to [`MAX_LORA_RANK`].
    pub fn new(dev: &Device, dtype: DType, shape: LoraShape) -> Result<Self, LoraGpuError> {
        let table = Table::Own {
            ranks: dev.alloc_zeroed(shape.num_slots * 4)?,
            scales: dev.alloc_zeroed(shape.num_slots * 4)?,
        };
        Self::with_table(dev, dtype, shape, table)
    }

    /// [`Self::new`] with the ranks and scales in column `column` of `table` (of as many slots):
    /// a fill writes the weights, and the table's [`SlotTable::upload_row`] the rank and scale.
    pub fn new_in_table(
        dev: &Device,
        dtype: DType,
        shape: LoraShape,
        table: &SlotTable,
        column: usize,
    ) -> Result<Self, LoraGpuError> {
        if shape.num_slots != table.num_slots || column >= table.num_stores {
            return Err(GpuError::Shape(format!(
                "column {column} of a slot table of {} stores and {} slots, for {} slots",
                table.num_stores, table.num_slots, shape.num_slots
            ))
            .into());
        }
        let shared = Table::Shared {
            ranks: table.column_ptr(0, column),
            scales: table.column_ptr(1, column),
            stride: table.num_stores,
            column,
        };
        Self::with_table(dev, dtype, shape, shared)
    }

    fn with_table(
        dev: &Device,
        dtype: DType,
        shape: LoraShape,
        table: Table,
    ) -> Result<Self, LoraGpuError> {
        let LoraShape {
            num_slots,
            in_dim,
            out_dim,
            max_rank,
        } = shape;
        let bad = || LoraError::BadShape(shape);
        if num_slots == 0 || in_dim == 0 || out_dim == 0 || !(1..=MAX_LORA_RANK).contains(&max_rank)
        {
            return Err(bad().into());
        }
        let (in_stride, out_stride) = (padded(in_dim), padded(out_dim));
        dim32("in_dim", in_stride)?;
        dim32("out_dim", out_stride)?;
        let bytes = |stride: usize| {
            num_slots
                .checked_mul(max_rank)
                .and_then(|n| n.checked_mul(stride))
                .and_then(|n| n.checked_mul(dtype.size()))
                .ok_or_else(bad)
        };
        Ok(DeviceLoraSlots {
            dtype,
            shape,
            in_stride,
            out_stride,
            a: dev.alloc_zeroed(bytes(in_stride)?)?,
            b: dev.alloc_zeroed(bytes(out_stride)?)?,
            table,
            host_ranks: vec![0; num_slots],
            host_scales: vec![0.0; num_slots],
        })
    }

    pub fn shape(&self) -> LoraShape {
        self.shape
    }

    pub fn dtype(&self) -> DType {
        self.dtype
    }

    /// Device bytes held for this store (all slots, loaded or not; a shared table counts
    /// itself).
    pub fn nbytes(&self) -> usize {
        let table = match &self.table {
            Table::Own { ranks, scales } => ranks.len_bytes() + scales.len_bytes(),
            Table::Shared { .. } => 0,
        };
        self.a.len_bytes() + self.b.len_bytes() + table
    }

    /// `slot`'s rank and scale as the host last set them (0 and 0.0: empty).
    pub(super) fn slot_entry(&self, slot: usize) -> (u32, f32) {
        (self.host_ranks[slot], self.host_scales[slot])
    }

    /// The rank of the adapter in `slot`, `None` if it is empty or out of range.
    pub fn rank(&self, slot: usize) -> Option<usize> {
        self.host_ranks
            .get(slot)
            .map(|&r| r as usize)
            .filter(|&r| r > 0)
    }

    /// Stores an adapter in `slot` (replacing what was there), from PEFT's layouts as
    /// [`crate::lora::LoraSlots::load_slot`] takes them: `a` `[rank, in_dim]`, `b` `[out_dim, rank]`,
    /// rounded to the store's dtype. Ordered after earlier launches on `dev` (one stream).
    pub fn load_slot(
        &mut self,
        dev: &Device,
        slot: usize,
        a: &[f32],
        b: &[f32],
        rank: usize,
        scale: f32,
    ) -> Result<(), LoraGpuError> {
        let mut up = dev;
        self.load_slot_with(&mut up, slot, a, b, rank, scale)
    }

    /// [`Self::load_slot`] through `up`: on a [`crate::gpu::copy_stream::CopyStream`] the
    /// slot's bytes (weights, rank, scale) land when the copy stream gets there, so the compute
    /// stream must wait for an event recorded after this before it reads `slot`. A store in a
    /// [`SlotTable`] gets its rank and scale with the table's next row upload for `slot`.
    pub fn load_slot_with(
        &mut self,
        up: &mut impl Upload,
        slot: usize,
        a: &[f32],
        b: &[f32],
        rank: usize,
        scale: f32,
    ) -> Result<(), LoraGpuError> {
        let LoraShape {
            in_dim, out_dim, ..
        } = self.shape;
        // Checked against these slots first (their rank limit, not the image's).
        self.shape.check_load(slot, rank, a.len(), b.len())?;
        let image = SlotImage::new(self.dtype, in_dim, out_dim, a, b, rank, scale)?;
        self.load_image_with(up, slot, &image)
    }

    /// Stores `image` in `slot` through `up` (see [`Self::load_slot_with`]): a copy of its bits.
    /// It must be of this store's dtype and projection, its rank at most the slots'.
    pub fn load_image_with(
        &mut self,
        up: &mut impl Upload,
        slot: usize,
        image: &SlotImage,
    ) -> Result<(), LoraGpuError> {
        let LoraShape {
            in_dim,
            out_dim,
            max_rank,
            ..
        } = self.shape;
        if image.dtype != self.dtype {
            return Err(LoraGpuError::DtypeMismatch {
                expected: self.dtype,
                actual: image.dtype,
            });
        }
        for (what, expected, actual) in [
            ("in_dim", in_dim, image.in_dim),
            ("out_dim", out_dim, image.out_dim),
        ] {
            if actual != expected {
                return Err(LoraError::LengthMismatch {
                    what,
                    expected,
                    actual,
                }
                .into());
            }
        }
        let rank = image.rank;
        self.shape
            .check_load(slot, rank, rank * in_dim, out_dim * rank)?;
        let es = self.dtype.size();
        let at = |stride: usize| slot * max_rank * stride * es;
        image.a.upload_to(up, &self.a, at(self.in_stride))?;
        image.b.upload_to(up, &self.b, at(self.out_stride))?;
        self.set_slot(up, slot, rank as u32, image.scale)
    }

    /// Marks `slot` empty: tokens naming it get no delta from this projection.
    pub fn clear_slot(&mut self, dev: &Device, slot: usize) -> Result<(), LoraGpuError> {
        let mut up = dev;
        self.clear_slot_with(&mut up, slot)
    }

    /// [`Self::clear_slot`] through `up` (see [`Self::load_slot_with`]).
    pub fn clear_slot_with(
        &mut self,
        up: &mut impl Upload,
        slot: usize,
    ) -> Result<(), LoraGpuError> {
        self.check_slot(slot)?;
        self.set_slot(up, slot, 0, 0.0)
    }

    /// Sets `slot`'s rank and scale: uploaded now into the store's own arrays, or by the
    /// shared table's next [`SlotTable::upload_row`].
    fn set_slot(
        &mut self,
        up: &mut impl Upload,
        slot: usize,
        rank: u32,
        scale: f32,
    ) -> Result<(), LoraGpuError> {
        if let Table::Own { ranks, scales } = &self.table {
            up.upload(ranks, slot * 4, &[rank])?;
            up.upload(scales, slot * 4, &[scale])?;
        }
        self.host_ranks[slot] = rank;
        self.host_scales[slot] = scale;
        Ok(())
    }

    fn check_slot(&self, slot: usize) -> Result<(), LoraError> {
        self.shape.check_slot(slot)
    }
}
