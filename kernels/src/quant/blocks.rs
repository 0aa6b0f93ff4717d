//! ggml block layouts (ggml-common.h), scalar dequantization and the reference weight quantizers.
//!
//! Blocks are read straight from the GGUF bytes (little-endian, unaligned), so a weight matrix never
//! has to be copied into Rust structs. Every formula follows ggml's reference code so the values
//! are bit-identical to ggml's and gguf-py's dequantization.

use super::floats::Floats;
use super::types::{GgmlType, QK, QK_K};
use half::f16;

/// Reads the little-endian f16 at `b[at..at + 2]` as f32.
#[inline(always)]
pub(crate) fn f16_at(b: &[u8], at: usize) -> f32 {
    f16::from_bits(u16::from_le_bytes([b[at], b[at + 1]])).to_f32()
}

/// Rounds through f16 the way ggml stores a block scale.
#[inline(always)]
pub(crate) fn f16_bits(v: f32) -> [u8; 2] {
    f16::from_f32(v).to_bits().to_le_bytes()
}

/// Unpacks the 6-bit scale and min of sub-block `j` of a Q4_K/Q5_K super-block (ggml's `get_scale_min_k4`).
#[inline(always)]
pub(crate) fn scale_min_k4(j: usize, q: &[u8]) -> (u8, u8) {
    if j < 4 {
        (q[j] & 63, q[j + 4] & 63)
    } else {
        (
            (q[j + 4] & 0xF) | ((q[j - 4] >> 6) << 4),
            (q[j + 4] >> 4) | ((q[j] >> 6) << 4),
        )
    }
}

fn dequant_q4_0(b: &[u8], y: &mut [f32]) {
    let d = f16_at(b, 0);
    for j in 0..QK / 2 {
        let q = b[2 + j];
        y[j] = ((q & 0xF) as i32 - 8) as f32 * d;
        y[j + QK / 2] = ((q >> 4) as i32 - 8) as f32 * d;
    }
}

fn dequant_q4_1(b: &[u8], y: &mut [f32]) {
    let (d, m) = (f16_at(b, 0), f16_at(b, 2));
    for j in 0..QK / 2 {
        let q = b[4 + j];
        y[j] = (q & 0xF) as f32 * d + m;
        y[j + QK / 2] = (q >> 4) as f32 * d + m;
    }
}

/// The 5th bits of Q5_0/Q5_1: bit `j` of the little-endian u32 `qh` belongs to element `j`.
fn q5_values(qh: &[u8], qs: &[u8]) -> [u8; QK] {
    let qh = u32::from_le_bytes([qh[0], qh[1], qh[2], qh[3]]);
    let mut q = [0u8; QK];
    for j in 0..QK / 2 {
        q[j] = (qs[j] & 0xF) | ((((qh >> j) & 1) as u8) << 4);
        q[j + QK / 2] = (qs[j] >> 4) | ((((qh >> (j + 16)) & 1) as u8) << 4);
    }
    q
}

fn dequant_q5_0(b: &[u8], y: &mut [f32]) {
    let d = f16_at(b, 0);
    for (o, q) in y.iter_mut().zip(q5_values(&b[2..6], &b[6..22])) {
        *o = d * (q as i32 - 16) as f32;
    }
}

fn dequant_q5_1(b: &[u8], y: &mut [f32]) {
    let (d, m) = (f16_at(b, 0), f16_at(b, 2));
    for (o, q) in y.iter_mut().zip(q5_values(&b[4..8], &b[8..24])) {
        *o = d * q as f32 + m;
    }
}

fn dequant_q8_0(b: &[u8], y: &mut [f32]) {
    let d = f16_at(b, 0);
    for (o, &q) in y.iter_mut().zip(&b[2..2 + QK]) {
        *o = q as i8 as f32 * d;
    }
}

fn dequant_q8_1(b: &[u8], y: &mut [f32]) {
    let d = f16_at(b, 0);
    for (o, &q) in y.iter_mut().zip(&b[4..4 + QK]) {
        *o = q as i8 as f32 * d;
    }
}

/// Q2_K: scales[16] (low nibble scale, high nibble min), qs[64] (2 bits), d, dmin.
fn dequant_q2_k(b: &[u8], y: &mut [f32]) {
    let (scales, qs) = (&b[0..16], &b[16..80]);
    let (d, dmin) = (f16_at(b, 80), f16_at(b, 82));
    let mut is = 0;
    for n in 0..2 {
        let q = &qs[32 * n..32 * n + 32];
        for shift in [0, 2, 4, 6] {
            for half in 0..2 {
                let sc = scales[is];
                is += 1;
                let (dl, ml) = (d * (sc & 0xF) as f32, dmin * (sc >> 4) as f32);
                let base = 128 * n + 16 * (shift / 2 * 2 + half);
                for l in 0..16 {
                    y[base + l] = dl * ((q[16 * half + l] >> shift) & 3) as f32 - ml;
                }
            }
        }
    }
}

/// Q3_K: hmask[32], qs[64], scales[12] (6-bit, offset 32), d.
fn dequant_q3_k(b: &[u8], y: &mut [f32]) {
    let (hmask, qs, sc) = (&b[0..32], &b[32..96], &b[96..108]);
    let d = f16_at(b, 108);
    let mut scales = [0i8; 16];
    for (j, s) in scales.iter_mut().enumerate() {
        let low = (sc[j % 8] >> (4 * (j / 8))) & 0xF;
        let high = (sc[8 + j % 4] >> (2 * (j / 4))) & 3;
        *s = (low | (high << 4)) as i8 - 32;
    }
    for (sub, &s) in scales.iter().enumerate() {
        let dl = d * s as f32;
        let (n, shift, half) = (sub / 8, 2 * ((sub % 8) / 2), sub % 2);
        let bit = (sub / 2) as u32; // hmask bit: one per (n, shift) pair
        for l in 0..16 {
            let idx = 16 * half + l;
            let low = ((qs[32 * n + idx] >> shift) & 3) as i8;
            let high = if hmask[idx] & (1 << bit) != 0 { 0 } else { 4 };
            y[16 * sub + l] = dl * (low - high) as f32;
        }
    }
}

/// Q4_K: d, dmin, scales[12] (6-bit scale/min pairs), qs[128]; 64-element groups, low nibbles first.
fn dequant_q4_k(b: &[u8], y: &mut [f32]) {
    let (d, dmin) = (f16_at(b, 0), f16_at(b, 2));
    let (scales, qs) = (&b[4..16], &b[16..144]);
    for g in 0..4 {
        let (sc1, m1) = scale_min_k4(2 * g, scales);
        let (sc2, m2) = scale_min_k4(2 * g + 1, scales);
        let (d1, dm1, d2, dm2) = (
            d * sc1 as f32,
            dmin * m1 as f32,
            d * sc2 as f32,
            dmin * m2 as f32,
        );
        for l in 0..32 {
            let q = qs[32 * g + l];
            y[64 * g + l] = d1 * (q & 0xF) as f32 - dm1;
            y[64 * g + 32 + l] = d2 * (q >> 4) as f32 - dm2;
        }
    }
}

/// Q5_K: d, dmin, scales[12], qh[32], qs[128].
fn dequant_q5_k(b: &[u8], y: &mut [f32]) {
    let (d, dmin) = (f16_at(b, 0), f16_at(b, 2));
    let (scales, qh, qs) = (&b[4..16], &b[16..48], &b[48..176]);
    for g in 0..4 {
        let (sc1, m1) = scale_min_k4(2 * g, scales);
        let (sc2, m2) = scale_min_k4(2 * g + 1, scales);
        let (d1, dm1, d2, dm2) = (
            d * sc1 as f32,
            dmin * m1 as f32,
            d * sc2 as f32,
            dmin * m2 as f32,
        );
        for l in 0..32 {
            let q = qs[32 * g + l];
            let h1 = ((qh[l] >> (2 * g)) & 1) << 4;
            let h2 = ((qh[l] >> (2 * g + 1)) & 1) << 4;
            y[64 * g + l] = d1 * ((q & 0xF) | h1) as f32 - dm1;
            y[64 * g + 32 + l] = d2 * ((q >> 4) | h2) as f32 - dm2;
        }
    }
}

/// Q6_K: ql[128], qh[64], scales: i8[16], d; values are 6-bit with offset 32.
fn dequant_q6_k(b: &[u8], y: &mut [f32]) {
    let (ql, qh, sc) = (&b[0..128], &b[128..192], &b[192..208]);
    let d = f16_at(b, 208);
    for n in 0..2 {
        let (ql, qh, sc, y) = (
            &ql[64 * n..],
            &qh[32 * n..],
            &sc[8 * n..],
            &mut y[128 * n..],
        );
        for l in 0..32 {
            let is = l / 16;
            let q1 = ((ql[l] & 0xF) | ((qh[l] & 3) << 4)) as i32 - 32;
            let q2 = ((ql[l + 32] & 0xF) | (((qh[l] >> 2) & 3) << 4)) as i32 - 32;
            let q3 = ((ql[l] >> 4) | (((qh[l] >> 4) & 3) << 4)) as i32 - 32;
            let q4 = ((ql[l + 32] >> 4) | (((qh[l] >> 6) & 3) << 4)) as i32 - 32;
            y[l] = d * sc[is] as i8 as f32 * q1 as f32;
            y[l + 32] = d * sc[is + 2] as i8 as f32 * q2 as f32;
            y[l + 64] = d * sc[is + 4] as i8 as f32 * q3 as f32;
            y[l + 96] = d * sc[is + 6] as i8 as f32 * q4 as f32;
        }
    }
}

/// Q8_K: d: f32, qs: i8[256], bsums: i16[16].
fn dequant_q8_k(b: &[u8], y: &mut [f32]) {
    let d = f32::from_le_bytes([b[0], b[1], b[2], b[3]]);
    for (o, &q) in y.iter_mut().zip(&b[4..4 + QK_K]) {
        *o = d * q as i8 as f32;
    }
}

/// Dequantizes one row: `bytes` holds `out.len() / ty.block_len()` whole blocks of `ty`.
pub fn dequantize_row(ty: GgmlType, bytes: &[u8], out: &mut [f32]) {
    let (bl, bb) = (ty.block_len(), ty.block_bytes());
    assert_eq!(
        bytes.len() * bl,
        out.len() * bb,
        "{ty}: row bytes do not match element count"
    );
    let block_fn: fn(&[u8], &mut [f32]) = match ty {
        GgmlType::F32 => return Floats::LeF32(bytes).read_into(0, out),
        GgmlType::F16 => return Floats::LeF16(bytes).read_into(0, out),
        GgmlType::BF16 => return Floats::LeBf16(bytes).read_into(0, out),
        GgmlType::Q4_0 => dequant_q4_0,
        GgmlType::Q4_1 => dequant_q4_1,
        GgmlType::Q5_0 => dequant_q5_0,
        GgmlType::Q5_1 => dequant_q5_1,
        GgmlType::Q8_0 => dequant_q8_0,
        GgmlType::Q8_1 => dequant_q8_1,
        GgmlType::Q2_K => dequant_q2_k,
        GgmlType::Q3_K => dequant_q3_k,
        GgmlType::Q4_K => dequant_q4_k,
        GgmlType::Q5_K => dequant_q5_k,
        GgmlType::Q6_K => dequant_q6_k,
        GgmlType::Q8_K => dequant_q8_k,
    };
    for (b, y) in bytes.chunks_exact(bb).zip(out.chunks_exact_mut(bl)) {
        block_fn(b, y);
    }
}

/// ggml's `quantize_row_q8_0_ref`: d = amax / 127, q = round-half-away(x / d).
pub fn quantize_row_q8_0(x: &[f32], out: &mut Vec<u8>) {
    for blk in x.chunks_exact(QK) {
        let amax = blk.iter().fold(0f32, |a, v| a.max(v.abs()));
        let d = amax / 127.0;
        let id = if d != 0.0 { 1.0 / d } else { 0.0 };
        out.extend_from_slice(&f16_bits(d));
        out.extend(blk.iter().map(|v| (v * id).round() as i8 as u8));
    }
}

/// ggml's `quantize_row_q4_0_ref`: d = (value of largest magnitude) / -8, q = min(15, trunc(x / d + 8.5)).
pub fn quantize_row_q4_0(x: &[f32], out: &mut Vec<u8>) {
    for blk in x.chunks_exact(QK) {
        let (mut amax, mut max) = (0f32, 0f32);
        for &v in blk {
            if amax < v.abs() {
                amax = v.abs();
                max = v;
            }
        }
        let d = max / -8.0;
        let id = if d != 0.0 { 1.0 / d } else { 0.0 };
        let q = |v: f32| ((v * id + 8.5) as i8).clamp(0, 15) as u8;
        out.extend_from_slice(&f16_bits(d));
        out.extend((0..QK / 2).map(|j| q(blk[j]) | (q(blk[j + QK / 2]) << 4)));
    }
}

/// ggml's `quantize_row_q4_1_ref`: d = (max - min) / 15, m = min, q = min(15, trunc((x - min) / d + 0.5)).
pub fn quantize_row_q4_1(x: &[f32], out: &mut Vec<u8>) {
    for blk in x.chunks_exact(QK) {
        let min = blk.iter().fold(f32::MAX, |a, &v| a.min(v));
        let max = blk.iter().fold(-f32::MAX, |a, &v| a.max(v));
        let d = (max - min) / 15.0;
        let id = if d != 0.0 { 1.0 / d } else { 0.0 };
        let q = |v: f32| (((v - min) * id + 0.5) as i8).clamp(0, 15) as u8;
        out.extend_from_slice(&f16_bits(d));
        out.extend_from_slice(&f16_bits(min));
        out.extend((0..QK / 2).map(|j| q(blk[j]) | (q(blk[j + QK / 2]) << 4)));
    }
}
