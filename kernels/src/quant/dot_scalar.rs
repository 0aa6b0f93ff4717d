//! Portable dot products of one weight row with quantized activations: the fallback when the CPU lacks
//! AVX2, and the plain-integer statement of each kernel (llama.cpp's generic order of operations).

use super::activations::{BlockQ8, BlockQ8K};
use super::blocks::{f16_at, scale_min_k4};
use super::types::{GgmlType, QK};

/// Q4_0 weights x Q8_0 activations: sum over blocks of sumi * dw * da.
pub fn dot_q4_0(row: &[u8], acts: &[BlockQ8]) -> f32 {
    let mut sumf = 0f32;
    for (b, a) in row.chunks_exact(GgmlType::Q4_0.block_bytes()).zip(acts) {
        let mut sumi = 0i32;
        for j in 0..QK / 2 {
            let q = b[2 + j];
            sumi += ((q & 0xF) as i32 - 8) * a.qs[j] as i32;
            sumi += ((q >> 4) as i32 - 8) * a.qs[j + QK / 2] as i32;
        }
        sumf += sumi as f32 * f16_at(b, 0) * a.d;
    }
    sumf
}

/// Q4_1 weights x Q8_1 activations: (dw * da) * sumi + m * s per block.
pub fn dot_q4_1(row: &[u8], acts: &[BlockQ8]) -> f32 {
    let mut sumf = 0f32;
    for (b, a) in row.chunks_exact(GgmlType::Q4_1.block_bytes()).zip(acts) {
        let mut sumi = 0i32;
        for j in 0..QK / 2 {
            let q = b[4 + j];
            sumi += (q & 0xF) as i32 * a.qs[j] as i32;
            sumi += (q >> 4) as i32 * a.qs[j + QK / 2] as i32;
        }
        sumf += (f16_at(b, 0) * a.d) * sumi as f32 + f16_at(b, 2) * a.s;
    }
    sumf
}

/// Q8_0 weights x Q8_0 activations.
pub fn dot_q8_0(row: &[u8], acts: &[BlockQ8]) -> f32 {
    let mut sumf = 0f32;
    for (b, a) in row.chunks_exact(GgmlType::Q8_0.block_bytes()).zip(acts) {
        let sumi: i32 = b[2..2 + QK]
            .iter()
            .zip(&a.qs)
            .map(|(&w, &x)| w as i8 as i32 * x as i32)
            .sum();
        sumf += sumi as f32 * (f16_at(b, 0) * a.d);
    }
    sumf
}

/// Q4_K weights x Q8_K activations: d * sum(scale * q.a) - dmin * sum(min * bsum) per super-block.
pub fn dot_q4_k(row: &[u8], acts: &[BlockQ8K]) -> f32 {
    let mut sumf = 0f32;
    for (b, a) in row.chunks_exact(GgmlType::Q4_K.block_bytes()).zip(acts) {
        let (scales, qs) = (&b[4..16], &b[16..144]);
        let (mut sumi, mut summ) = (0i32, 0i32);
        for sub in 0..8 {
            let (sc, m) = scale_min_k4(sub, scales);
            let (g, shift) = (sub / 2, 4 * (sub % 2));
            let q8 = &a.qs[32 * sub..32 * sub + 32];
            let dot: i32 = qs[32 * g..32 * g + 32]
                .iter()
                .zip(q8)
                .map(|(&q, &x)| ((q >> shift) & 0xF) as i32 * x as i32)
                .sum();
            sumi += sc as i32 * dot;
            summ += m as i32 * (a.bsums[2 * sub] as i32 + a.bsums[2 * sub + 1] as i32);
        }
        sumf += a.d * f16_at(b, 0) * sumi as f32 - a.d * f16_at(b, 2) * summ as f32;
    }
    sumf
}

/// Q6_K weights x Q8_K activations: d * sum(scale * (q - 32).a) per super-block.
pub fn dot_q6_k(row: &[u8], acts: &[BlockQ8K]) -> f32 {
    let mut sumf = 0f32;
    for (b, a) in row.chunks_exact(GgmlType::Q6_K.block_bytes()).zip(acts) {
        let (ql, qh, sc) = (&b[0..128], &b[128..192], &b[192..208]);
        let mut sumi = 0i32;
        for n in 0..2 {
            let (ql, qh, q8) = (&ql[64 * n..], &qh[32 * n..], &a.qs[128 * n..]);
            for l in 0..32 {
                let is = 8 * n + l / 16;
                let q1 = ((ql[l] & 0xF) | ((qh[l] & 3) << 4)) as i32 - 32;
                let q2 = ((ql[l + 32] & 0xF) | (((qh[l] >> 2) & 3) << 4)) as i32 - 32;
                let q3 = ((ql[l] >> 4) | (((qh[l] >> 4) & 3) << 4)) as i32 - 32;
                let q4 = ((ql[l + 32] >> 4) | (((qh[l] >> 6) & 3) << 4)) as i32 - 32;
                sumi += sc[is] as i8 as i32 * q1 * q8[l] as i32;
                sumi += sc[is + 2] as i8 as i32 * q2 * q8[l + 32] as i32;
                sumi += sc[is + 4] as i8 as i32 * q3 * q8[l + 64] as i32;
                sumi += sc[is + 6] as i8 as i32 * q4 * q8[l + 96] as i32;
            }
        }
        sumf += a.d * f16_at(b, 208) * sumi as f32;
    }
    sumf
}

/// F32 weights (little-endian bytes) x f32 activations.
pub fn dot_f32(row: &[u8], x: &[f32]) -> f32 {
    row.chunks_exact(4)
        .zip(x)
        .map(|(c, &v)| f32::from_le_bytes([c[0], c[1], c[2], c[3]]) * v)
        .sum()
}

/// F16 weights x f32 activations.
pub fn dot_f16(row: &[u8], x: &[f32]) -> f32 {
    row.chunks_exact(2)
        .zip(x)
        .map(|(c, &v)| f16_at(c, 0) * v)
        .sum()
}
