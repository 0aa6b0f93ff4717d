//! [`SlotTable`]: the per-slot ranks and scales of many slot stores in one device buffer.

use super::slots::DeviceLoraSlots;
use super::LoraGpuError;
use crate::gpu::copy_stream::Upload;
use crate::gpu::ops::dim32;
use crate::gpu::{Device, DeviceBuffer, GpuError};
use crate::lora::LoraError;

/// Where a store's per-slot ranks and scales lie.
pub(crate) enum Table {
    /// The store's own `[num_slots]` arrays, written with each fill.
    Own {
        ranks: DeviceBuffer,
        scales: DeviceBuffer,
    },
    /// Column `column` of a [`SlotTable`] (at these addresses, `stride` entries per slot),
    /// written when the table uploads a slot's row.
    Shared {
        ranks: u64,
        scales: u64,
        stride: usize,
        column: usize,
    },
}

impl Table {
    pub(super) fn ranks_ptr(&self) -> u64 {
        match self {
            Table::Own { ranks, .. } => ranks.ptr(),
            Table::Shared { ranks, .. } => *ranks,
        }
    }

    pub(super) fn scales_ptr(&self) -> u64 {
        match self {
            Table::Own { scales, .. } => scales.ptr(),
            Table::Shared { scales, .. } => *scales,
        }
    }

    /// Entries between one slot's and the next's.
    pub(super) fn stride(&self) -> usize {
        match self {
            Table::Own { .. } => 1,
            Table::Shared { stride, .. } => *stride,
        }
    }
}

/// The ranks and scales of many stores' slots in one device buffer, slot-major (`[slot][store]`
/// u32 ranks, then `[slot][store]` f32 scales), so filling one slot of every store (every
/// projection of every layer: 224 stores for a Llama-3-8B) uploads two rows, where stores with
/// their own arrays take two copies each. Stores join with [`DeviceLoraSlots::new_in_table`],
/// one column each, and must not outlive the table.
pub struct SlotTable {
    buf: DeviceBuffer,
    pub(super) num_slots: usize,
    pub(super) num_stores: usize,
}

impl SlotTable {
    /// A zeroed table (every slot empty) for `num_stores` stores of `num_slots` slots.
    pub fn new(dev: &Device, num_slots: usize, num_stores: usize) -> Result<Self, LoraGpuError> {
        let words = num_slots
            .checked_mul(num_stores)
            .and_then(|n| n.checked_mul(2))
            .filter(|&n| n > 0)
            .ok_or_else(|| {
                GpuError::Shape(format!(
                    "slot table of {num_slots} slots for {num_stores} stores"
                ))
            })?;
        dim32("slot table stores", num_stores)?;
        Ok(SlotTable {
            buf: dev.alloc_zeroed(words * 4)?,
            num_slots,
            num_stores,
        })
    }

    /// Device bytes held.
    pub fn nbytes(&self) -> usize {
        self.buf.len_bytes()
    }

    /// Uploads `slot`'s row through `up` from the host values of `stores`, which must be this
    /// table's columns in order (one value each); after the fill of every store's weights, so
    /// the row lands behind them on the same stream.
    pub fn upload_row<'a>(
        &self,
        up: &mut impl Upload,
        slot: usize,
        stores: impl IntoIterator<Item = &'a DeviceLoraSlots>,
    ) -> Result<(), LoraGpuError> {
        if slot >= self.num_slots {
            return Err(GpuError::Shape(format!(
                "slot {slot} of a table of {} slots",
                self.num_slots
            ))
            .into());
        }
        let mut ranks = Vec::with_capacity(self.num_stores);
        let mut scales = Vec::with_capacity(self.num_stores);
        for (column, store) in stores.into_iter().enumerate() {
            let joined = matches!(store.table, Table::Shared { column: c, ranks, .. }
                if c == column && ranks == self.column_ptr(0, column));
            if !joined {
                return Err(GpuError::Shape(format!(
                    "store {column} is not column {column} of this slot table"
                ))
                .into());
            }
            let (rank, scale) = store.slot_entry(slot);
            ranks.push(rank);
            scales.push(scale);
        }
        if ranks.len() != self.num_stores {
            return Err(LoraError::LengthMismatch {
                what: "slot table stores",
                expected: self.num_stores,
                actual: ranks.len(),
            }
            .into());
        }
        let row = slot * self.num_stores * 4;
        up.upload(&self.buf, row, &ranks)?;
        up.upload(
            &self.buf,
            self.num_slots * self.num_stores * 4 + row,
            &scales,
        )?;
        Ok(())
    }

    /// The address of `column`'s entry for slot 0 in half `half` (0: ranks, 1: scales).
    pub(super) fn column_ptr(&self, half: usize, column: usize) -> u64 {
        self.buf.ptr() + ((half * self.num_slots * self.num_stores + column) * 4) as u64
    }
}
