//! AVX2 Q8_0/Q8_1 activation quantizer: the same arithmetic as the scalar
//! [`super::activations::quantize_q8_scalar`] (max of |x|, one f32 multiply by `127 / amax`,
//! round-half-even, saturate to i8), eight lanes at a time, so it gives bit-identical blocks. Batched
//! matmuls quantize every input row, and the scalar loop (whose saturating float-to-i8 casts do not
//! vectorize) cost as much as a third of a batched Q4_1 product.

use super::activations::BlockQ8;
use super::types::QK;
use std::arch::x86_64::*;

/// Whether this CPU can run [`quantize_q8`] (AVX2; checked once).
pub fn available() -> bool {
    super::dot_avx2::available()
}

/// Quantizes `x` (`out.len() * 32` values) into `out`, writing each block's exact integer sum of
/// `qs` to `sums`. Panics if the lengths disagree or the CPU lacks AVX2.
pub fn quantize_q8(x: &[f32], out: &mut [BlockQ8], sums: &mut [i32]) {
    assert!(available(), "AVX2 quantizer called on a CPU without AVX2");
    assert!(x.len() == out.len() * QK && sums.len() == out.len());
    // SAFETY: AVX2 was checked above; each block reads its own 32 values of `x` (bounded by the
    // length check) and writes only through the `&mut` references it is given.
    unsafe { quantize_q8_avx2(x, out, sums) }
}

#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn quantize_q8_avx2(x: &[f32], out: &mut [BlockQ8], sums: &mut [i32]) {
    let abs_mask = _mm256_castsi256_ps(_mm256_set1_epi32(0x7fff_ffff));
    // packs interleave 128-bit lanes; this restores element order.
    let order = _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7);
    for ((blk, y), sum) in x.chunks_exact(QK).zip(out.iter_mut()).zip(sums.iter_mut()) {
        let p = blk.as_ptr();
        let v = [0, 8, 16, 24].map(|k| _mm256_loadu_ps(p.add(k)));
        let m = v.map(|v| _mm256_and_ps(v, abs_mask));
        let m = _mm256_max_ps(_mm256_max_ps(m[0], m[1]), _mm256_max_ps(m[2], m[3]));
        let mut h = _mm_max_ps(_mm256_extractf128_ps(m, 1), _mm256_castps256_ps128(m));
        h = _mm_max_ps(h, _mm_movehl_ps(h, h));
        h = _mm_max_ss(h, _mm_movehdup_ps(h));
        let amax = _mm_cvtss_f32(h);
        let d = amax / 127.0;
        let id = _mm256_set1_ps(if amax != 0.0 { 127.0 / amax } else { 0.0 });
        // cvtps rounds half to even under the default MXCSR, as the scalar quantizer does.
        let q = v.map(|v| _mm256_cvtps_epi32(_mm256_mul_ps(v, id)));
        let s = _mm256_add_epi32(_mm256_add_epi32(q[0], q[1]), _mm256_add_epi32(q[2], q[3]));
        let s4 = _mm_add_epi32(_mm256_extracti128_si256(s, 1), _mm256_castsi256_si128(s));
        let s2 = _mm_add_epi32(s4, _mm_unpackhi_epi64(s4, s4));
        let total = _mm_cvtsi128_si32(_mm_add_epi32(s2, _mm_shuffle_epi32(s2, 1)));
        let packed = _mm256_packs_epi16(
            _mm256_packs_epi32(q[0], q[1]),
            _mm256_packs_epi32(q[2], q[3]),
        );
        let bytes = _mm256_permutevar8x32_epi32(packed, order);
        _mm256_storeu_si256(y.qs.as_mut_ptr() as *mut __m256i, bytes);
        y.d = half::f16::from_f32(d).to_f32();
        y.s = half::f16::from_f32(d * total as f32).to_f32();
        *sum = total;
    }
}
