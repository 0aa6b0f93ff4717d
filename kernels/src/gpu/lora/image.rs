//! [`SlotImage`]: one projection of one adapter as a device slot holds it, built on the host.

use std::borrow::Cow;
use std::sync::Arc;

use crate::gpu::copy_stream::Upload;
use crate::gpu::pinned_pool::{PinnedBytes, Span};
use crate::gpu::{as_bytes, DType, DeviceBuffer, GpuError};
use crate::lora::{LoraError, LoraShape, MAX_LORA_RANK};
use crate::quant::Floats;

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

/// A's rows then B's transposed (PEFT's `a` `[rank, in_dim]`, `b` `[out_dim, rank]`) as `rank`
/// rows of `is` then `rank` rows of `os` `bits` values, zero-padded, handed to `emit` one at a
/// time; stops at the first `false` from `emit`, and returns it.
fn each_row(
    (a, b): (Floats<'_>, Floats<'_>),
    rank: usize,
    in_dim: usize,
    (is, os): (usize, usize),
    bits: impl Fn(f32) -> u16 + Copy,
    mut emit: impl FnMut(&[u16]) -> bool,
) -> bool {
    let mut row = vec![0u16; is];
    for k in 0..rank {
        let r = &mut row[..is];
        r[in_dim..].fill(0);
        a.map_into(k * in_dim, &mut r[..in_dim], bits);
        if !emit(r) {
            return false;
        }
    }
    // Rank row k gathers column k of B's rows (one output's `rank` values each), in order: B
    // is converted front to back, a block of rows at a time, and each block's columns copied
    // out.
    let out_dim = b.len() / rank;
    let mut bt = vec![0u16; rank * os];
    let mut block = vec![0u16; B_BLOCK_ROWS * rank];
    for first in (0..out_dim).step_by(B_BLOCK_ROWS) {
        let rows = B_BLOCK_ROWS.min(out_dim - first);
        let block = &mut block[..rows * rank];
        b.map_into(first * rank, block, bits);
        // Row by row of the result: its writes run on, its reads stay in the small block (a
        // scatter to all rank rows at once thrashed the cache: the rows lie 8 KiB apart and up).
        for (k, out) in bt.chunks_exact_mut(os).enumerate() {
            for (d, values) in out[first..first + rows]
                .iter_mut()
                .zip(block.chunks_exact(rank))
            {
                *d = values[k];
            }
        }
    }
    bt.chunks_exact(os).all(emit)
}

/// Rows of B converted at a time while transposing it.
const B_BLOCK_ROWS: usize = 256;

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
    /// comparisons).
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
/// these bits. Built on the host (the adapter loader's thread), away from the engine's; written
/// into a pinned lease ([`Self::write_pinned`]), the copy is a DMA from where the bits lie.
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

/// PEFT's layouts of one projection of one adapter, `a` `[rank, in_dim]` and `b` `[out_dim,
/// rank]`, for slots of `dtype` over `in_dim` inputs and `out_dim` outputs: what a
/// [`SlotImage`] is made from.
#[derive(Clone, Copy, Debug)]
pub struct PeftProjection<'a> {
    pub dtype: DType,
    pub in_dim: usize,
    pub out_dim: usize,
    pub a: Floats<'a>,
    pub b: Floats<'a>,
    pub rank: usize,
    pub scale: f32,
}

impl PeftProjection<'_> {
    /// The row strides, once the shapes are checked.
    fn strides(&self) -> Result<(usize, usize), LoraError> {
        let shape = LoraShape {
            num_slots: 1,
            in_dim: self.in_dim,
            out_dim: self.out_dim,
            max_rank: MAX_LORA_RANK,
        };
        if self.in_dim == 0 || self.out_dim == 0 {
            return Err(LoraError::BadShape(shape));
        }
        shape.check_load(0, self.rank, self.a.len(), self.b.len())?;
        Ok((padded(self.in_dim), padded(self.out_dim)))
    }

    /// [`each_row`] of this projection in its dtype, rows `strides` long.
    fn rows(&self, strides: (usize, usize), emit: impl FnMut(&[u16]) -> bool) -> bool {
        let (pair, rank, in_dim) = ((self.a, self.b), self.rank, self.in_dim);
        match self.dtype {
            DType::Bf16 => each_row(pair, rank, in_dim, strides, bf16_bits, emit),
            DType::F16 => each_row(
                pair,
                rank,
                in_dim,
                strides,
                |x| half::f16::from_f32(x).to_bits(),
                emit,
            ),
        }
    }

    /// Host bytes of its image.
    pub fn image_bytes(&self) -> usize {
        SlotImage::bytes_for(self.in_dim, self.out_dim, self.rank)
    }

    fn image(&self, a: Values, b: Values) -> SlotImage {
        SlotImage {
            dtype: self.dtype,
            in_dim: self.in_dim,
            out_dim: self.out_dim,
            rank: self.rank,
            scale: self.scale,
            a,
            b,
        }
    }
}

/// A [`SlotImage`] written into a pinned lease that is not shared yet
/// ([`SlotImage::write_pinned`]).
pub struct PinnedParts {
    image: SlotImage,
    spans: (Span, Span),
}

impl PinnedParts {
    /// The image, its values in `lease` (the one it was written into, now shared).
    pub fn into_image(self, lease: &Arc<PinnedBytes>) -> SlotImage {
        let PinnedParts {
            mut image,
            spans: (a, b),
        } = self;
        image.a = Values::Pinned(lease.clone(), a);
        image.b = Values::Pinned(lease.clone(), b);
        image
    }
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
        SlotImage::of(&PeftProjection {
            dtype,
            in_dim,
            out_dim,
            a: a.into(),
            b: b.into(),
            rank,
            scale,
        })
    }

    /// The image of `p` in ordinary memory.
    pub fn of(p: &PeftProjection<'_>) -> Result<SlotImage, LoraError> {
        let (is, os) = p.strides()?;
        let (mut a_rows, mut b_rows) = (
            Vec::with_capacity(p.rank * is),
            Vec::with_capacity(p.rank * os),
        );
        p.rows((is, os), |row| {
            match a_rows.len() < p.rank * is {
                true => a_rows.extend_from_slice(row),
                false => b_rows.extend_from_slice(row),
            }
            true
        });
        Ok(p.image(Values::Heap(a_rows), Values::Heap(b_rows)))
    }

    /// The image of `p` written straight into `lease` (no copy in ordinary memory first);
    /// `Ok(None)` when the lease has no room left for it. Share the lease (`Arc`) once every
    /// image is in, then [`PinnedParts::into_image`].
    pub fn write_pinned(
        p: &PeftProjection<'_>,
        lease: &mut PinnedBytes,
    ) -> Result<Option<PinnedParts>, LoraError> {
        let (is, os) = p.strides()?;
        if lease.len() + p.image_bytes() > lease.capacity() {
            return Ok(None);
        }
        let (start, a_bytes) = (lease.len(), p.rank * is * 2);
        let fits = p.rows((is, os), |row| lease.append(as_bytes(row)).is_some());
        let (a, b) = (
            Span {
                start,
                len: a_bytes,
            },
            Span {
                start: start + a_bytes,
                len: p.rank * os * 2,
            },
        );
        Ok(fits.then(|| PinnedParts {
            image: p.image(Values::Heap(Vec::new()), Values::Heap(Vec::new())),
            spans: (a, b),
        }))
    }

    /// Host bytes of the image of a rank-`rank` projection from `in_dim` to `out_dim` (2-byte
    /// values, padded rows).
    pub fn bytes_for(in_dim: usize, out_dim: usize, rank: usize) -> usize {
        rank * (padded(in_dim) + padded(out_dim)) * 2
    }

    /// Host bytes held.
    pub fn nbytes(&self) -> usize {
        (self.a.len() + self.b.len()) * 2
    }

    /// Whether the values lie in a pinned lease.
    pub fn is_pinned(&self) -> bool {
        matches!(self.a, Values::Pinned(..))
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

    #[test]
    fn b_is_transposed_across_blocks_of_its_rows() {
        // out 600 (several blocks of rows, the last partial; stride 600), in 9 (stride 16).
        let (in_dim, out_dim, rank) = (9, 600, 3);
        let a: Vec<f32> = (0..rank * in_dim).map(|i| i as f32 * 0.25 - 3.0).collect();
        let b: Vec<f32> = (0..out_dim * rank).map(|i| (i as f32).sin()).collect();
        let i = SlotImage::new(DType::Bf16, in_dim, out_dim, &a, &b, rank, 1.0).unwrap();
        let mut expected = Vec::new();
        for k in 0..rank {
            expected.extend((0..out_dim).map(|o| bf16_bits(b[o * rank + k])));
        }
        assert_eq!(*i.b.bits(), expected);
        let mut expected = Vec::new();
        for row in a.chunks_exact(in_dim) {
            expected.extend(row.iter().map(|&x| bf16_bits(x)));
            expected.extend([0; 7]);
        }
        assert_eq!(*i.a.bits(), expected);
    }

    #[test]
    fn an_image_of_a_files_bytes_is_the_image_of_their_values() {
        // in 5 (stride 8), out 3 (stride 8), rank 2; values exact in f16 and bf16, so every
        // storage holds the same numbers.
        let a = [1.0f32, -2.0, 0.5, 0.25, 3.0, -0.125, 8.0, -1.0, 0.0, 1.5];
        let b = [0.5f32, -4.0, 2.0, 0.75, -0.0, 6.0]; // [out][rank]
        let le = |v: &[f32], to: fn(f32) -> Vec<u8>| v.iter().flat_map(|&x| to(x)).collect();
        let f32_le = |x: f32| x.to_le_bytes().to_vec();
        let f16_le = |x: f32| half::f16::from_f32(x).to_le_bytes().to_vec();
        let bf16_le = |x: f32| half::bf16::from_f32(x).to_le_bytes().to_vec();
        let (a32, b32): (Vec<u8>, Vec<u8>) = (le(&a, f32_le), le(&b, f32_le));
        let (a16, b16): (Vec<u8>, Vec<u8>) = (le(&a, f16_le), le(&b, f16_le));
        let (abf, bbf): (Vec<u8>, Vec<u8>) = (le(&a, bf16_le), le(&b, bf16_le));
        for dtype in [DType::Bf16, DType::F16] {
            let expected = SlotImage::new(dtype, 5, 3, &a, &b, 2, 0.5).unwrap();
            for (a, b) in [
                (Floats::LeF32(&a32), Floats::LeF32(&b32)),
                (Floats::LeF16(&a16), Floats::LeF16(&b16)),
                (Floats::LeBf16(&abf), Floats::LeBf16(&bbf)),
            ] {
                let p = PeftProjection {
                    dtype,
                    in_dim: 5,
                    out_dim: 3,
                    a,
                    b,
                    rank: 2,
                    scale: 0.5,
                };
                assert_eq!(SlotImage::of(&p).unwrap(), expected, "{dtype:?} {a:?}");
            }
        }
        // A matrix a value short is refused, whatever its storage.
        let short = PeftProjection {
            dtype: DType::Bf16,
            in_dim: 5,
            out_dim: 3,
            a: Floats::LeF32(&a32[..a32.len() - 1]),
            b: Floats::LeF32(&b32),
            rank: 2,
            scale: 0.5,
        };
        assert!(SlotImage::of(&short).is_err());
    }

    #[test]
    fn an_image_written_into_a_lease_holds_the_heap_images_bits() {
        use crate::gpu::pinned_pool::PinnedPool;
        use crate::gpu::Device;
        let (a, b) = ([0.5, -1.25, 3.0, 7.0, -0.0, 1e-3], [0.5, -0.5, 0.25, -0.25]);
        let p = PeftProjection {
            dtype: DType::F16,
            in_dim: 3,
            out_dim: 2,
            a: Floats::F32(&a),
            b: Floats::F32(&b),
            rank: 2,
            scale: 0.5,
        };
        let heap = SlotImage::new(p.dtype, 3, 2, &a, &b, 2, 0.5).unwrap();
        assert_eq!((p.image_bytes(), heap.nbytes()), (64, 64));
        // Pages of 24 bytes: rows cross page edges.
        let pool = PinnedPool::new(&Device::emulated(), 96, 24).unwrap();
        let mut lease = pool.lease(96).unwrap();
        lease.append(&[9; 8]).unwrap(); // something before it
        let parts = SlotImage::write_pinned(&p, &mut lease).unwrap().unwrap();
        assert!(
            SlotImage::write_pinned(&p, &mut lease).unwrap().is_none(),
            "no room for a second"
        );
        let image = parts.into_image(&Arc::new(lease));
        assert!(image.is_pinned());
        assert_eq!(image, heap);
        let bad = PeftProjection { rank: 3, ..p };
        let mut lease = pool.lease(0).unwrap();
        assert!(SlotImage::write_pinned(&bad, &mut lease).is_err());
    }
}
