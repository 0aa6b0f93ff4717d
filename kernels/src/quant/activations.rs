//! Activation quantizers: a matmul quantizes its f32 input rows once, then runs integer dot products.
//!
//! These follow the arithmetic of llama.cpp's CPU backend (its x86 SIMD `quantize_row_q8_0`/`q8_1`
//! and `quantize_row_q8_K_ref`), so products track llama.cpp's results. The blocks are kept in
//! convenient in-memory structs (scales already widened to f32), not ggml's byte layout.

use super::types::{QK, QK_K};
use half::f16;

/// One quantized block of 32 activations: the Q8_0 (`d`) and Q8_1 (`s`) views share it.
#[derive(Clone, Copy, Debug, Default)]
#[repr(C, align(8))]
pub struct BlockQ8 {
    pub qs: [i8; QK],
    /// The scale, rounded through f16 as ggml stores it.
    pub d: f32,
    /// `d * sum(qs)` rounded through f16 (Q8_1's `s`), used by Q4_1's min term.
    pub s: f32,
}

/// One quantized super-block of 256 activations (ggml's `block_q8_K`).
#[derive(Clone, Copy, Debug)]
#[repr(C)]
pub struct BlockQ8K {
    pub d: f32,
    pub qs: [i8; QK_K],
    /// Sums of each group of 16 `qs`, for the K-quant min terms.
    pub bsums: [i16; QK_K / 16],
}

impl Default for BlockQ8K {
    fn default() -> Self {
        BlockQ8K {
            d: 0.0,
            qs: [0; QK_K],
            bsums: [0; QK_K / 16],
        }
    }
}

/// `v.round_ties_even()` for |v| < 2^22, without the libm call that costs as much as the whole quantizer
/// on targets lacking SSE4.1: adding and removing 1.5 * 2^23 leaves the rounding to IEEE's default
/// round-half-to-even mode (only the sign of a zero result may differ, which the integer cast drops).
#[inline(always)]
fn round_even_small(v: f32) -> f32 {
    const MAGIC: f32 = 12_582_912.0;
    (v + MAGIC) - MAGIC
}

fn round_f16(v: f32) -> f32 {
    f16::from_f32(v).to_f32()
}

/// Quantizes `x` (a multiple of 32 long) to Q8_0/Q8_1 blocks: d = amax / 127, q = round-half-even(x * 127 / amax).
/// Uses the AVX2 quantizer where the CPU has it (bit-identical to [`quantize_q8_scalar`]).
pub fn quantize_q8(x: &[f32], out: &mut [BlockQ8]) {
    let mut sums = vec![0i32; out.len()];
    quantize_q8_with_sums(x, out, &mut sums);
}

/// [`quantize_q8`], also writing each block's exact integer sum of `qs` to `sums`.
fn quantize_q8_with_sums(x: &[f32], out: &mut [BlockQ8], sums: &mut [i32]) {
    #[cfg(target_arch = "x86_64")]
    if super::quantize_x86::available() {
        return super::quantize_x86::quantize_q8(x, out, sums);
    }
    quantize_q8_scalar(x, out);
    for (s, b) in sums.iter_mut().zip(out.iter()) {
        *s = b.qs.iter().map(|&q| q as i32).sum();
    }
}

/// The portable [`quantize_q8`] (the arithmetic every other build must reproduce bit for bit).
pub fn quantize_q8_scalar(x: &[f32], out: &mut [BlockQ8]) {
    assert_eq!(
        x.len(),
        out.len() * QK,
        "activation length must be blocks * 32"
    );
    for (blk, y) in x.chunks_exact(QK).zip(out.iter_mut()) {
        // Eight running maxima so the compiler can keep them in one vector.
        let mut lanes = [0f32; 8];
        for c in blk.chunks_exact(8) {
            for (m, v) in lanes.iter_mut().zip(c) {
                *m = if v.abs() > *m { v.abs() } else { *m };
            }
        }
        let amax = lanes.iter().fold(0f32, |a, &v| a.max(v));
        let d = amax / 127.0;
        let id = if amax != 0.0 { 127.0 / amax } else { 0.0 };
        let mut sum = 0i32;
        for (q, &v) in y.qs.iter_mut().zip(blk) {
            // |v * id| <= 127 (up to rounding of id, which the clamp absorbs exactly like cvtps + packs).
            let r = round_even_small(v * id).clamp(-128.0, 127.0) as i8;
            *q = r;
            sum += r as i32;
        }
        y.d = round_f16(d);
        y.s = round_f16(d * sum as f32);
    }
}

/// Four f32 lanes aligned for one vector load.
#[derive(Clone, Copy, Debug, Default, PartialEq)]
#[repr(C, align(16))]
pub struct F32x4(pub [f32; 4]);

/// A matrix of activation rows quantized to [`BlockQ8`], with the block scales `d` and sums `s` also
/// packed 4 blocks per [`F32x4`] ([token][group], each token's row padded to whole groups) so kernels
/// load four blocks' scales with one instruction. `isum` holds each block's exact integer sum of `qs`
/// (the packed kernels use it to undo the offsets of unsigned weights).
#[derive(Clone, Debug, Default)]
pub struct Q8Acts {
    pub blocks: Vec<BlockQ8>,
    pub d4: Vec<F32x4>,
    pub s4: Vec<F32x4>,
    pub isum: Vec<i32>,
}

impl Q8Acts {
    /// Quantizes `x` (rows of `cols`, a multiple of 32); rows are spread over the rayon pool if `parallel`.
    pub fn quantize(x: &[f32], cols: usize, parallel: bool) -> Q8Acts {
        use rayon::prelude::*;
        let mut blocks = vec![BlockQ8::default(); x.len() / QK];
        let mut isum = vec![0i32; blocks.len()];
        if parallel {
            blocks
                .par_chunks_mut(cols / QK)
                .zip(isum.par_chunks_mut(cols / QK))
                .zip(x.par_chunks(cols))
                .for_each(|((a, s), xt)| quantize_q8_with_sums(xt, a, s));
        } else {
            quantize_q8_with_sums(x, &mut blocks, &mut isum);
        }
        let groups = (cols / QK).div_ceil(4);
        let num_tokens = x.len().checked_div(cols).unwrap_or(0);
        let (mut d4, mut s4) = (
            vec![F32x4::default(); num_tokens * groups],
            vec![F32x4::default(); num_tokens * groups],
        );
        for (t, row) in blocks.chunks_exact(cols / QK).enumerate() {
            for (b, blk) in row.iter().enumerate() {
                d4[t * groups + b / 4].0[b % 4] = blk.d;
                s4[t * groups + b / 4].0[b % 4] = blk.s;
            }
        }
        Q8Acts {
            blocks,
            d4,
            s4,
            isum,
        }
    }
}

/// Quantizes `x` (a multiple of 256 long) to Q8_K blocks as ggml's `quantize_row_q8_K_ref`:
/// the scale is set by the value of largest magnitude so that it maps to -127.
pub fn quantize_q8_k(x: &[f32], out: &mut [BlockQ8K]) {
    assert_eq!(
        x.len(),
        out.len() * QK_K,
        "activation length must be blocks * 256"
    );
    for (blk, y) in x.chunks_exact(QK_K).zip(out.iter_mut()) {
        let (mut amax, mut max) = (0f32, 0f32);
        for &v in blk {
            if v.abs() > amax {
                amax = v.abs();
                max = v;
            }
        }
        if amax == 0.0 {
            *y = BlockQ8K::default();
            continue;
        }
        let iscale = -127.0 / max;
        for (q, &v) in y.qs.iter_mut().zip(blk) {
            *q = (round_even_small(iscale * v) as i32).min(127) as i8;
        }
        for (s, g) in y.bsums.iter_mut().zip(y.qs.chunks_exact(16)) {
            *s = g.iter().map(|&q| q as i16).sum();
        }
        y.d = 1.0 / iscale;
    }
}
