//! [`Floats`]: float values where a loader holds them, f32 in memory or still in a weights
//! file's little-endian f32, f16 or bf16 bytes. The one place those bytes are decoded: GGUF rows
//! ([`super::blocks::dequantize_row`]), safetensors model tensors and PEFT adapter matrices.

/// Float values as f32 or as the little-endian bytes of a weights file (not necessarily
/// aligned), read as f32. Building a device form straight from the file's bytes (a GPU adapter
/// image) skips a widened f32 copy of the whole tensor.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum Floats<'a> {
    F32(&'a [f32]),
    /// Little-endian f32 bytes.
    LeF32(&'a [u8]),
    /// Little-endian f16 bytes.
    LeF16(&'a [u8]),
    /// Little-endian bf16 bytes.
    LeBf16(&'a [u8]),
}

impl<'a> From<&'a [f32]> for Floats<'a> {
    fn from(values: &'a [f32]) -> Self {
        Floats::F32(values)
    }
}

impl<'a> From<&'a Vec<f32>> for Floats<'a> {
    fn from(values: &'a Vec<f32>) -> Self {
        Floats::F32(values)
    }
}

impl Floats<'_> {
    /// Whole values held (a trailing partial value of the bytes is not one).
    pub fn len(&self) -> usize {
        match self {
            Floats::F32(v) => v.len(),
            Floats::LeF32(b) => b.len() / 4,
            Floats::LeF16(b) | Floats::LeBf16(b) => b.len() / 2,
        }
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// `f` of the values `start..start + out.len()` into `out`; the range must lie within
    /// [`Self::len`]. Bytes are decoded a block at a time into f32 first, so both loops
    /// vectorise (one loop doing both did not: its unaligned reads became byte shuffles).
    pub fn map_into<T>(&self, start: usize, out: &mut [T], f: impl Fn(f32) -> T) {
        let map = |values: &[f32], out: &mut [T]| {
            for (o, &x) in out.iter_mut().zip(values) {
                *o = f(x);
            }
        };
        if let Some(v) = self.as_f32() {
            return map(&v[start..start + out.len()], out);
        }
        let mut block = [0.0f32; DECODE_BLOCK];
        for (i, out) in out.chunks_mut(DECODE_BLOCK).enumerate() {
            let values = &mut block[..out.len()];
            self.decode(start + i * DECODE_BLOCK, values);
            map(values, out);
        }
    }

    /// The values `start..start + out.len()` into `out` (copied where they lie as f32, decoded
    /// where not); the range must lie within [`Self::len`].
    pub fn read_into(&self, start: usize, out: &mut [f32]) {
        match self.as_f32() {
            Some(v) => out.copy_from_slice(&v[start..start + out.len()]),
            None => self.decode(start, out),
        }
    }

    /// The values as f32 in place: f32 ones, and little-endian f32 bytes that lie aligned on a
    /// little-endian machine (a safetensors file's usually do).
    fn as_f32(&self) -> Option<&[f32]> {
        match self {
            Floats::F32(v) => Some(v),
            Floats::LeF32(b) if cfg!(target_endian = "little") => {
                let whole = &b[..b.len() / 4 * 4];
                bytemuck::try_cast_slice(whole).ok()
            }
            _ => None,
        }
    }

    /// The values `start..start + out.len()` into `out`, decoded from the bytes.
    fn decode(&self, start: usize, out: &mut [f32]) {
        let end = start + out.len();
        match self {
            Floats::F32(v) => out.copy_from_slice(&v[start..end]),
            Floats::LeF32(b) => {
                for (o, c) in out.iter_mut().zip(b[4 * start..4 * end].chunks_exact(4)) {
                    *o = le_f32(c);
                }
            }
            Floats::LeF16(b) => {
                for (o, c) in out.iter_mut().zip(b[2 * start..2 * end].chunks_exact(2)) {
                    *o = le_f16(c);
                }
            }
            Floats::LeBf16(b) => {
                for (o, c) in out.iter_mut().zip(b[2 * start..2 * end].chunks_exact(2)) {
                    *o = le_bf16(c);
                }
            }
        }
    }

    /// Every value as f32.
    pub fn to_vec(&self) -> Vec<f32> {
        let mut out = vec![0.0; self.len()];
        self.read_into(0, &mut out);
        out
    }
}

/// Values decoded at a time by [`Floats::map_into`] (4 KiB of f32, on the stack).
const DECODE_BLOCK: usize = 1024;

/// The value of 4 little-endian f32 bytes.
#[inline]
fn le_f32(c: &[u8]) -> f32 {
    let mut bytes = [0; 4];
    bytes.copy_from_slice(c);
    f32::from_le_bytes(bytes)
}

/// The value of 2 little-endian f16 bytes.
#[inline]
fn le_f16(c: &[u8]) -> f32 {
    let mut bytes = [0; 2];
    bytes.copy_from_slice(c);
    half::f16::from_le_bytes(bytes).to_f32()
}

/// The value of 2 little-endian bf16 bytes.
#[inline]
fn le_bf16(c: &[u8]) -> f32 {
    let mut bytes = [0; 2];
    bytes.copy_from_slice(c);
    half::bf16::from_le_bytes(bytes).to_f32()
}

#[cfg(test)]
mod tests {
    use super::*;

    /// `bytes` `offset` bytes past a 4-byte boundary in the returned words ([`at`] views them).
    fn placed(bytes: &[u8], offset: usize) -> Vec<u32> {
        let mut words = vec![0u32; bytes.len() / 4 + 2];
        bytemuck::cast_slice_mut::<u32, u8>(&mut words)[offset..offset + bytes.len()]
            .copy_from_slice(bytes);
        words
    }

    fn at(words: &[u32], offset: usize, len: usize) -> &[u8] {
        &bytemuck::cast_slice::<u32, u8>(words)[offset..offset + len]
    }

    #[test]
    fn every_storage_reads_the_values_it_was_written_from() {
        // Exactly representable in f16 and bf16.
        let values = [0.0f32, -1.5, 2.0, 0.25, -0.0, 96.0, 1.0 / 64.0];
        let f32_bytes: Vec<u8> = values.iter().flat_map(|x| x.to_le_bytes()).collect();
        let f16_bytes: Vec<u8> = values
            .iter()
            .flat_map(|&x| half::f16::from_f32(x).to_le_bytes())
            .collect();
        let bf16_bytes: Vec<u8> = values
            .iter()
            .flat_map(|&x| half::bf16::from_f32(x).to_le_bytes())
            .collect();
        // In place where aligned (offset 0), decoded where not (offset 1).
        let (aligned, unaligned) = (placed(&f32_bytes, 0), placed(&f32_bytes, 1));
        for m in [
            Floats::F32(&values),
            Floats::LeF32(at(&aligned, 0, f32_bytes.len())),
            Floats::LeF32(at(&unaligned, 1, f32_bytes.len())),
            Floats::LeF16(&f16_bytes),
            Floats::LeBf16(&bf16_bytes),
        ] {
            assert_eq!(m.len(), values.len(), "{m:?}");
            assert_eq!(m.to_vec(), values, "{m:?}");
            let mut mid = [0u32; 3];
            m.map_into(2, &mut mid, f32::to_bits);
            assert_eq!(mid, [2.0f32, 0.25, -0.0].map(f32::to_bits), "{m:?}");
            let mut tail = [0.0f32; 2];
            m.read_into(5, &mut tail);
            assert_eq!(tail, [96.0, 1.0 / 64.0], "{m:?}");
        }
        assert_eq!(Floats::LeF32(&f32_bytes[..9]).len(), 2);
        // Ranges over several decode blocks, starting and ending inside one.
        let long: Vec<f32> = (0..2 * DECODE_BLOCK + 300)
            .map(|i| i as f32 - 7.5)
            .collect();
        let bytes: Vec<u8> = long.iter().flat_map(|x| x.to_le_bytes()).collect();
        for offset in [0, 1] {
            let backing = placed(&bytes, offset);
            let m = Floats::LeF32(at(&backing, offset, bytes.len()));
            assert_eq!(m.as_f32().is_some(), offset == 0);
            let mut got = vec![0.0; DECODE_BLOCK + 300];
            m.map_into(DECODE_BLOCK - 200, &mut got, |x| x);
            assert_eq!(got, long[DECODE_BLOCK - 200..2 * DECODE_BLOCK + 100]);
            let mut read = vec![0.0; DECODE_BLOCK + 300];
            m.read_into(DECODE_BLOCK - 200, &mut read);
            assert_eq!(read, got);
        }
        assert!(Floats::LeBf16(&[1]).is_empty());
    }
}
