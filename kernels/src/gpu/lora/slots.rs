//! [`DeviceLoraSlots`]: one projection's adapter slots in device memory, loaded from PEFT layouts.

use super::LoraGpuError;
use crate::gpu::copy_stream::Upload;
use crate::gpu::ops::dim32;
use crate::gpu::{DType, Device, DeviceBuffer};
use crate::lora::{LoraError, LoraShape, MAX_LORA_RANK};

/// Rows padded to 8 values (16 bytes), so every row starts aligned for vector loads.
fn padded(dim: usize) -> usize {
    dim.div_ceil(8) * 8
}

/// `v` rounded to `dtype`, as the bits the device stores.
fn to_bits(dtype: DType, v: impl Iterator<Item = f32>) -> Vec<u16> {
    match dtype {
        DType::Bf16 => v.map(|x| half::bf16::from_f32(x).to_bits()).collect(),
        DType::F16 => v.map(|x| half::f16::from_f32(x).to_bits()).collect(),
    }
}

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
    /// `[num_slots]` u32 ranks (0: empty) and f32 scales, read by the kernels.
    pub(super) ranks: DeviceBuffer,
    pub(super) scales: DeviceBuffer,
    /// The ranks as the host last wrote them.
    host_ranks: Vec<u32>,
}

impl DeviceLoraSlots {
    /// Empty slots of `shape` (all memory allocated up front), ranks up to [`MAX_LORA_RANK`].
    pub fn new(dev: &Device, dtype: DType, shape: LoraShape) -> Result<Self, LoraGpuError> {
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
            ranks: dev.alloc_zeroed(num_slots * 4)?,
            scales: dev.alloc_zeroed(num_slots * 4)?,
            host_ranks: vec![0; num_slots],
        })
    }

    pub fn shape(&self) -> LoraShape {
        self.shape
    }

    pub fn dtype(&self) -> DType {
        self.dtype
    }

    /// Device bytes held for this store (all slots, loaded or not).
    pub fn nbytes(&self) -> usize {
        self.a.len_bytes() + self.b.len_bytes() + self.ranks.len_bytes() + self.scales.len_bytes()
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
    /// stream must wait for an event recorded after this before it reads `slot`.
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
            in_dim,
            out_dim,
            max_rank,
            ..
        } = self.shape;
        self.shape.check_load(slot, rank, a.len(), b.len())?;
        let (is, os) = (self.in_stride, self.out_stride);
        let a_rows = (0..rank * is).map(|i| {
            let (k, c) = (i / is, i % is);
            if c < in_dim {
                a[k * in_dim + c]
            } else {
                0.0
            }
        });
        let b_rows = (0..rank * os).map(|i| {
            let (k, o) = (i / os, i % os);
            if o < out_dim {
                b[o * rank + k]
            } else {
                0.0
            }
        });
        let es = self.dtype.size();
        up.upload(
            &self.a,
            slot * max_rank * is * es,
            &to_bits(self.dtype, a_rows),
        )?;
        up.upload(
            &self.b,
            slot * max_rank * os * es,
            &to_bits(self.dtype, b_rows),
        )?;
        self.set_slot(up, slot, rank as u32, scale)
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

    fn set_slot(
        &mut self,
        up: &mut impl Upload,
        slot: usize,
        rank: u32,
        scale: f32,
    ) -> Result<(), LoraGpuError> {
        up.upload(&self.ranks, slot * 4, &[rank])?;
        up.upload(&self.scales, slot * 4, &[scale])?;
        self.host_ranks[slot] = rank;
        Ok(())
    }

    fn check_slot(&self, slot: usize) -> Result<(), LoraError> {
        self.shape.check_slot(slot)
    }
}
