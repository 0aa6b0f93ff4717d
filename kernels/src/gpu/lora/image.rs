//! [`SlotImage`]: one projection of one adapter as a device slot holds it, built on the host.

use std::borrow::Cow;
use std::sync::Arc;

use crate::gpu::copy_stream::Upload;
use crate::gpu::pinned_pool::{PinnedBytes, PinnedPool, Span};
use crate::gpu::{as_bytes, DType, DeviceBuffer, GpuError};
use crate::lora::{LoraError, LoraShape, MAX_LORA_RANK};

/// Rows padded to 8 values (16 bytes), so every row starts aligned for vector loads.
pub(super) fn padded(dim: usize) -> usize {
    dim.div_ceil(8) * 8
}

/// `half::bf16::from_f32(x).to_bits()` (round to nearest even; a NaN stays a quiet NaN) without
/// a branch, so a loop of it vectorises (half's scalar conversion held an 8B adapter's image at
/// ~4 ns a value).
#[inline]
fn bf16_bits(x: f32) -> u16 {
    let b = x.to_bits();
    let rounded = (b.wrapping_add(0x7fff + ((b >> 16) & 1)) >> 16) as u16;
    let quiet_nan = ((b >> 16) as u16) | 0x0040;
    if b & 0x7fff_ffff > 0x7f80_0000 {
        quiet_nan
    } else {
        rounded
    }
}

/// A's rows and B transposed (PEFT's `a` `[rank, in_dim]`, `b` `[out_dim, rank]`) as `[rank][is]`
/// and `[rank][os]` rows of `bits` values, zero-padded.
fn slot_rows(
    (a, b): (&[f32], &[f32]),
    rank: usize,
    in_dim: usize,
    (is, os): (usize, usize),
    bits: impl Fn(f32) -> u16,
) -> (Vec<u16>, Vec<u16>) {
    let mut a_rows = vec![0u16; rank * is];
    for (row, src) in a_rows.chunks_exact_mut(is).zip(a.chunks_exact(in_dim)) {
        for (d, &x) in row.iter_mut().zip(src) {
            *d = bits(x);
        }
    }
    // Rank row k gathers column k of B's rows (one output's `rank` values each), written in
    // order.
    let mut b_rows = vec![0u16; rank * os];
    for (k, row) in b_rows.chunks_exact_mut(os).enumerate() {
        for (d, src) in row.iter_mut().zip(b.chunks_exact(rank)) {
            *d = bits(src[k]);
        }
    }
    (a_rows, b_rows)
}

/// Where an image's values lie: in ordinary memory, or in a pinned lease the device can copy
/// them from directly.
#[derive(Clone, Debug)]
pub(super) enum Values {
    Heap(Vec<u16>),
    Pinned(Arc<PinnedBytes>, Span),
}

impl Values {
    fn len(&self) -> usize {
        match self {
            Values::Heap(v) => v.len(),
            Values::Pinned(_, span) => span.len / 2,
        }
    }

    /// The values (read back from the lease when pinned: slow on write-combined memory, for
    /// tests and comparisons).
    fn bits(&self) -> Cow<'_, [u16]> {
        match self {
            Values::Heap(v) => Cow::Borrowed(v),
            Values::Pinned(bytes, span) => Cow::Owned(
                bytes
                    .read(*span)
                    .chunks_exact(2)
                    .map(|b| u16::from_ne_bytes([b[0], b[1]]))
                    .collect(),
            ),
        }
    }

    /// Copies the values into `buf` at byte `offset` through `up`.
    pub(super) fn upload_to(
        &self,
        up: &mut impl Upload,
        buf: &DeviceBuffer,
        offset: usize,
    ) -> Result<(), GpuError> {
        match self {
            Values::Heap(v) => up.upload(buf, offset, v),
            Values::Pinned(bytes, span) => up.upload_pinned(buf, offset, bytes, *span),
        }
    }
}

/// Equal when they hold the same values, wherever those lie.
impl PartialEq for Values {
    fn eq(&self, other: &Self) -> bool {
        self.bits() == other.bits()
    }
}

/// One projection of one adapter as a [`DeviceLoraSlots`] slot holds it: A's rows and B
/// transposed, zero-padded and rounded to the store's dtype, so filling a slot is a plain copy of
/// these bits. Built on the host (the adapter loader's thread), away from the engine's; pinned
/// ([`Self::pin_all`]), the copy is a DMA from where the bits lie.
#[derive(Clone, Debug, PartialEq)]
pub struct SlotImage {
    pub(super) dtype: DType,
    pub(super) in_dim: usize,
    pub(super) out_dim: usize,
    pub(super) rank: usize,
    pub(super) scale: f32,
    /// `[rank][padded(in_dim)]`.
    pub(super) a: Values,
    /// `[rank][padded(out_dim)]`.
    pub(super) b: Values,
}

impl SlotImage {
    /// The image of PEFT's layouts, `a` `[rank, in_dim]` and `b` `[out_dim, rank]`, for slots of
    /// `dtype` over `in_dim` inputs and `out_dim` outputs.
    pub fn new(
        dtype: DType,
        in_dim: usize,
        out_dim: usize,
        a: &[f32],
        b: &[f32],
        rank: usize,
        scale: f32,
    ) -> Result<SlotImage, LoraError> {
        let shape = LoraShape {
            num_slots: 1,
            in_dim,
            out_dim,
            max_rank: MAX_LORA_RANK,
        };
        if in_dim == 0 || out_dim == 0 {
            return Err(LoraError::BadShape(shape));
        }
        shape.check_load(0, rank, a.len(), b.len())?;
        let strides = (padded(in_dim), padded(out_dim));
        let (a_rows, b_rows) = match dtype {
            DType::Bf16 => slot_rows((a, b), rank, in_dim, strides, bf16_bits),
            DType::F16 => slot_rows((a, b), rank, in_dim, strides, |x| {
                half::f16::from_f32(x).to_bits()
            }),
        };
        Ok(SlotImage {
            dtype,
            in_dim,
            out_dim,
            rank,
            scale,
            a: Values::Heap(a_rows),
            b: Values::Heap(b_rows),
        })
    }

    /// Host bytes held.
    pub fn nbytes(&self) -> usize {
        (self.a.len() + self.b.len()) * 2
    }

    /// Whether the values lie in a pinned lease.
    pub fn is_pinned(&self) -> bool {
        matches!(self.a, Values::Pinned(..))
    }

    /// Moves the values of `images` not yet pinned into one lease of `pool`, which they then
    /// share (and free together, with the last of them); `None`, leaving them as they were,
    /// when the pool has too few free pages.
    pub fn pin_all(images: &mut [&mut SlotImage], pool: &PinnedPool) -> Option<Arc<PinnedBytes>> {
        let heap = |i: &SlotImage| !i.is_pinned();
        let bytes = images.iter().filter(|i| heap(i)).map(|i| i.nbytes()).sum();
        let mut lease = pool.lease(bytes)?;
        let mut spans = Vec::with_capacity(images.len());
        for image in images.iter().filter(|i| heap(i)) {
            let mut append = |v: &Values| lease.append(as_bytes(&v.bits()));
            spans.push((append(&image.a)?, append(&image.b)?));
        }
        let lease = Arc::new(lease);
        for (image, (a, b)) in images.iter_mut().filter(|i| heap(i)).zip(spans) {
            image.a = Values::Pinned(lease.clone(), a);
            image.b = Values::Pinned(lease.clone(), b);
        }
        Some(lease)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bf16_bits_round_as_half_does() {
        // Every 127th bit pattern (all exponents, signs and NaN payloads; every rounding case
        // of the low 16 bits), and the boundaries.
        let special = [
            0u32,
            0x8000_0000,
            0x7f80_0000,
            0xff80_0000,
            0x7f7f_ffff,
            0xff7f_ffff,
            0x7f80_0001,
            0x7fc0_0000,
            0xffff_ffff,
            0x3f80_8000,
            0x3f81_8000,
            0x3f80_8001,
            0x0000_8000,
        ];
        for b in (0..=u32::MAX).step_by(127).chain(special) {
            let x = f32::from_bits(b);
            assert_eq!(bf16_bits(x), half::bf16::from_f32(x).to_bits(), "{b:#010x}");
        }
    }

    #[test]
    fn an_image_holds_a_rows_and_b_transposed_padded() {
        // in 3 (stride 8), out 2 (stride 8), rank 2.
        let a = [1.0, 2.0, 3.0, 4.0, 5.0, 6.0];
        let b = [0.5, -0.5, 0.25, -0.25]; // [out][rank]
        let i = SlotImage::new(DType::Bf16, 3, 2, &a, &b, 2, 0.5).unwrap();
        let bits = |v: &[f32]| v.iter().map(|&x| bf16_bits(x)).collect::<Vec<u16>>();
        let z = [0.0; 5];
        assert_eq!(*i.a.bits(), bits(&[&a[..3], &z, &a[3..], &z].concat()));
        let z = [0.0; 6];
        assert_eq!(
            *i.b.bits(),
            bits(&[&[0.5, 0.25][..], &z, &[-0.5, -0.25], &z].concat())
        );
        assert_eq!((i.rank, i.nbytes()), (2, 64));
        let e = SlotImage::new(DType::F16, 3, 2, &a[..5], &b, 2, 0.5).unwrap_err();
        assert!(e.to_string().contains("lora_A"), "{e}");
        assert!(SlotImage::new(DType::F16, 0, 2, &[], &b, 2, 0.5).is_err());
    }
}
