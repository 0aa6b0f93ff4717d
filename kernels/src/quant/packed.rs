//! The row-interleaved ("repacked") layout of Q4_0/Q4_1/Q8_0 weights that the batched kernels read.
//!
//! Rows are taken [`GROUP`] at a time (the last group padded with zero rows). For each block column
//! a group stores the 16 rows' f16 header fields side by side (all `d`s, then all `m`s for Q4_1),
//! then the rows' payload in 4-byte words interleaved: word `v` of rows 0..16, then word `v + 1`, ...
//! One 512-bit load thus holds 4 consecutive weights of each of 16 rows (a 256-bit load those of 8
//! rows), and a dot-product instruction against 4 broadcast activation bytes yields 16 rows' partial
//! sums in 16 lanes: no horizontal sums, and the per-block scales apply across rows as one vector. Q8_0 payload bytes are stored XOR 0x80
//! (w + 128, unsigned) because the x86 byte dot products take one unsigned operand; kernels subtract
//! `128 * sum(a)` again. The packed bytes have the same size as ggml's (plus padding rows).

use super::types::GgmlType;

/// Rows interleaved per group (one i32/f32 lane each in a 512-bit register).
pub const GROUP: usize = 16;

/// Bytes of f16 header fields per row and block (`d`, plus `m` for Q4_1), `None` if `ty` has no packed form.
fn header_bytes(ty: GgmlType) -> Option<usize> {
    match ty {
        GgmlType::Q4_0 | GgmlType::Q8_0 => Some(2),
        GgmlType::Q4_1 => Some(4),
        _ => None,
    }
}

fn payload_xor(ty: GgmlType) -> u8 {
    if ty == GgmlType::Q8_0 {
        0x80
    } else {
        0
    }
}

/// Whether this machine has a fast kernel for packed `ty` weights, so packing them pays.
pub fn worth_packing(ty: GgmlType) -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        match ty {
            GgmlType::Q4_0 | GgmlType::Q4_1 => super::dot_packed::avx2_available(),
            GgmlType::Q8_0 => super::dot_packed::vnni_available(),
            _ => false,
        }
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        let _ = ty;
        false
    }
}

/// Bytes of one packed group (GROUP rows of `cols` elements).
pub fn group_bytes(ty: GgmlType, cols: usize) -> usize {
    GROUP * cols / ty.block_len() * ty.block_bytes()
}

/// Repacks `rows` ggml rows (`raw`, row-major) into groups; panics if `ty` has no packed form.
pub fn pack(ty: GgmlType, rows: usize, cols: usize, raw: &[u8]) -> Vec<u8> {
    let hb = header_bytes(ty).expect("pack: type has no packed layout");
    let (bb, nb) = (ty.block_bytes(), cols / ty.block_len());
    let row_bytes = nb * bb;
    let xor = payload_xor(ty);
    let groups = rows.div_ceil(GROUP);
    let mut out = vec![0u8; groups * group_bytes(ty, cols)];
    for (g, dst) in out.chunks_exact_mut(group_bytes(ty, cols)).enumerate() {
        for (b, blk) in dst.chunks_exact_mut(GROUP * bb).enumerate() {
            for r in 0..GROUP {
                let row = g * GROUP + r;
                let src: &[u8] = if row < rows {
                    &raw[row * row_bytes + b * bb..row * row_bytes + (b + 1) * bb]
                } else {
                    &[]
                };
                for f in 0..hb / 2 {
                    let at = f * 2 * GROUP + r * 2;
                    if !src.is_empty() {
                        blk[at..at + 2].copy_from_slice(&src[2 * f..2 * f + 2]);
                    }
                }
                for v in 0..(bb - hb) / 4 {
                    let at = hb * GROUP + v * 4 * GROUP + r * 4;
                    for k in 0..4 {
                        let byte = src.get(hb + 4 * v + k).copied().unwrap_or(0);
                        blk[at + k] = byte ^ xor;
                    }
                }
            }
        }
    }
    out
}

/// Restores the ggml bytes of one packed group's first `rows` rows (at most GROUP) into `out`.
pub fn unpack_group(ty: GgmlType, cols: usize, group: &[u8], rows: usize, out: &mut [u8]) {
    let hb = header_bytes(ty).expect("unpack: type has no packed layout");
    let (bb, nb) = (ty.block_bytes(), cols / ty.block_len());
    let row_bytes = nb * bb;
    let xor = payload_xor(ty);
    assert!(group.len() == group_bytes(ty, cols) && out.len() == rows * row_bytes);
    for (b, blk) in group.chunks_exact(GROUP * bb).enumerate() {
        for r in 0..rows {
            let dst = &mut out[r * row_bytes + b * bb..r * row_bytes + (b + 1) * bb];
            for f in 0..hb / 2 {
                let at = f * 2 * GROUP + r * 2;
                dst[2 * f..2 * f + 2].copy_from_slice(&blk[at..at + 2]);
            }
            for v in 0..(bb - hb) / 4 {
                let at = hb * GROUP + v * 4 * GROUP + r * 4;
                for k in 0..4 {
                    dst[hb + 4 * v + k] = blk[at + k] ^ xor;
                }
            }
        }
    }
}

/// Restores all `rows` ggml rows from packed groups.
pub fn unpack(ty: GgmlType, rows: usize, cols: usize, packed: &[u8]) -> Vec<u8> {
    let row_bytes = cols / ty.block_len() * ty.block_bytes();
    let mut out = vec![0u8; rows * row_bytes];
    if row_bytes == 0 {
        return out;
    }
    for (g, (grp, dst)) in packed
        .chunks_exact(group_bytes(ty, cols))
        .zip(out.chunks_mut(GROUP * row_bytes))
        .enumerate()
    {
        let n = (rows - g * GROUP).min(GROUP);
        unpack_group(ty, cols, grp, n, dst);
    }
    out
}
