//! AVX2/FMA/F16C kernels: one weight row against a tile of up to 4 tokens, so each weight block is
//! loaded and unpacked once and reused for every token of the tile.
//!
//! The integer block dot products are llama.cpp's AVX2 ones (`maddubs`/`madd`, the sign trick for
//! signed weights) and equal the scalar kernels' exactly. The float part scales each block by
//! `(d_weight * d_act)` and accumulates with fma like llama.cpp, except that Q4_0/Q4_1/Q8_0 reduce
//! 4 blocks' integer sums together first (one convert + one fma per 4 blocks per token instead of
//! 4): this halves the per-token work of batched calls and differs from llama.cpp only in float
//! summation order.

// Tiles index several per-token register arrays in step; ranges read better than zipped iterators.
#![allow(clippy::needless_range_loop)]

use super::activations::{BlockQ8K, F32x4, Q8Acts};
use super::blocks::scale_min_k4;
use super::types::GgmlType;
use std::arch::x86_64::*;
use std::sync::OnceLock;

/// Whether this CPU has AVX2, FMA and F16C (checked once; every kernel here needs all three).
pub fn available() -> bool {
    static AVAILABLE: OnceLock<bool> = OnceLock::new();
    *AVAILABLE.get_or_init(|| {
        is_x86_feature_detected!("avx2")
            && is_x86_feature_detected!("fma")
            && is_x86_feature_detected!("f16c")
    })
}

#[target_feature(enable = "avx2,fma,f16c")]
#[inline]
fn hsum_f32x8(x: __m256) -> f32 {
    let mut r = _mm_add_ps(_mm256_extractf128_ps(x, 1), _mm256_castps256_ps128(x));
    r = _mm_add_ps(r, _mm_movehl_ps(r, r));
    r = _mm_add_ss(r, _mm_movehdup_ps(r));
    _mm_cvtss_f32(r)
}

/// Unsigned x signed byte products summed in groups of 4 into 8 float lanes (ggml's `mul_sum_us8_pairs_float`).
#[target_feature(enable = "avx2,fma,f16c")]
#[inline]
fn mul_sum_us8(ax: __m256i, sy: __m256i) -> __m256 {
    let dot = _mm256_maddubs_epi16(ax, sy);
    _mm256_cvtepi32_ps(_mm256_madd_epi16(_mm256_set1_epi16(1), dot))
}

/// The f16 at `p` as f32.
#[target_feature(enable = "avx2,fma,f16c")]
#[inline]
unsafe fn f16_at(p: *const u8) -> f32 {
    let bits = std::ptr::read_unaligned(p as *const u16);
    _mm_cvtss_f32(_mm_cvtph_ps(_mm_cvtsi32_si128(bits as i32)))
}

/// 16 packed bytes to 32 nibbles: low nibbles are elements 0..16, high nibbles 16..32.
#[target_feature(enable = "avx2,fma,f16c")]
#[inline]
unsafe fn nibbles(p: *const u8) -> __m256i {
    let tmp = _mm_loadu_si128(p as *const __m128i);
    let bytes = _mm256_set_m128i(_mm_srli_epi16(tmp, 4), tmp);
    _mm256_and_si256(bytes, _mm256_set1_epi8(0xF))
}

#[target_feature(enable = "avx2,fma,f16c")]
#[inline]
unsafe fn load256(p: *const i8) -> __m256i {
    _mm256_loadu_si256(p as *const __m256i)
}

/// Sums each of 4 blocks' 8 lanes of products down to 2 lanes: [b0 b1 b2 b3 | b0 b1 b2 b3] as f32.
#[target_feature(enable = "avx2,fma,f16c")]
#[inline]
fn reduce4(p: [__m256i; 4]) -> __m256 {
    _mm256_cvtepi32_ps(_mm256_hadd_epi32(
        _mm256_hadd_epi32(p[0], p[1]),
        _mm256_hadd_epi32(p[2], p[3]),
    ))
}

/// The 4 activation scales (or sums) at `p` broadcast to both halves: [s0 s1 s2 s3 | s0 s1 s2 s3].
#[target_feature(enable = "avx2,fma,f16c")]
#[inline]
unsafe fn group4(p: *const F32x4) -> __m256 {
    // `p` points into a live `Vec<F32x4>`, whose elements are 16-byte aligned like `__m128`.
    _mm256_broadcast_ps(&*(p as *const __m128))
}

#[target_feature(enable = "avx2,fma,f16c")]
#[inline]
fn hsum_f32x4(x: __m128) -> f32 {
    let r = _mm_add_ps(x, _mm_movehl_ps(x, x));
    _mm_cvtss_f32(_mm_add_ss(r, _mm_movehdup_ps(r)))
}

#[target_feature(enable = "avx2,fma,f16c")]
#[inline]
unsafe fn rd_u16(p: *const u8) -> i32 {
    std::ptr::read_unaligned(p as *const u16) as i32
}

/// Signed-weight blocks (Q4_0 after the -8 offset, Q8_0) x Q8_0 activations for N tokens.
/// Four blocks at a time: per token, 4 integer dots are reduced together and scaled with one fma.
#[target_feature(enable = "avx2,fma,f16c")]
#[inline]
unsafe fn tile_signed<const N: usize, const Q4: bool>(
    row: *const u8,
    a: &Q8Acts,
    t0: usize,
    nb: usize,
) -> [f32; N] {
    let bb = if Q4 { GgmlType::Q4_0 } else { GgmlType::Q8_0 }.block_bytes();
    let groups = nb.div_ceil(4);
    let (blocks, d4) = (
        a.blocks.as_ptr().add(t0 * nb),
        a.d4.as_ptr().add(t0 * groups),
    );
    let ones = _mm256_set1_epi16(1);
    let weights = |wb: *const u8| {
        if Q4 {
            _mm256_sub_epi8(nibbles(wb.add(2)), _mm256_set1_epi8(8))
        } else {
            load256(wb.add(2) as *const i8)
        }
    };
    let mut acc = [_mm256_setzero_ps(); N];
    let mut b = 0;
    while b + 4 <= nb {
        let wb = row.add(b * bb);
        let h = |k: usize| rd_u16(wb.add(k * bb));
        let dw4 = _mm_cvtph_ps(_mm_setr_epi32(
            h(0) | (h(1) << 16),
            h(2) | (h(3) << 16),
            0,
            0,
        ));
        let dw8 = _mm256_set_m128(dw4, dw4);
        let qx = [
            weights(wb),
            weights(wb.add(bb)),
            weights(wb.add(2 * bb)),
            weights(wb.add(3 * bb)),
        ];
        let ax = qx.map(|q| _mm256_sign_epi8(q, q));
        for (j, acc) in acc.iter_mut().enumerate() {
            let ab = blocks.add(j * nb + b);
            let mut p = [_mm256_setzero_si256(); 4];
            for k in 0..4 {
                let sy = _mm256_sign_epi8(load256((*ab.add(k)).qs.as_ptr()), qx[k]);
                p[k] = _mm256_madd_epi16(ones, _mm256_maddubs_epi16(ax[k], sy));
            }
            let d = _mm256_mul_ps(dw8, group4(d4.add(j * groups + b / 4)));
            *acc = _mm256_fmadd_ps(d, reduce4(p), *acc);
        }
        b += 4;
    }
    while b < nb {
        let wb = row.add(b * bb);
        let dw = f16_at(wb);
        let qx = weights(wb);
        let ax = _mm256_sign_epi8(qx, qx);
        for (j, acc) in acc.iter_mut().enumerate() {
            let ab = &*blocks.add(j * nb + b);
            let sy = _mm256_sign_epi8(load256(ab.qs.as_ptr()), qx);
            *acc = _mm256_fmadd_ps(_mm256_set1_ps(dw * ab.d), mul_sum_us8(ax, sy), *acc);
        }
        b += 1;
    }
    acc.map(|a| hsum_f32x8(a))
}

/// Q4_1 x Q8_1 for N tokens: (dw * da) * sum(q * a) + m * s per block, four blocks at a time.
#[target_feature(enable = "avx2,fma,f16c")]
#[inline]
unsafe fn tile_q4_1<const N: usize>(row: *const u8, a: &Q8Acts, t0: usize, nb: usize) -> [f32; N] {
    let groups = nb.div_ceil(4);
    let (blocks, d4, s4) = (
        a.blocks.as_ptr().add(t0 * nb),
        a.d4.as_ptr().add(t0 * groups),
        a.s4.as_ptr().add(t0 * groups),
    );
    let ones = _mm256_set1_epi16(1);
    let split = _mm256_setr_epi32(0, 2, 4, 6, 1, 3, 5, 7);
    let mut acc = [_mm256_setzero_ps(); N];
    let mut summ = [_mm256_setzero_ps(); N];
    let mut b = 0;
    while b + 4 <= nb {
        let wb = row.add(b * 20);
        let rd = |k: usize| std::ptr::read_unaligned(wb.add(20 * k) as *const i32);
        // [d0 m0 d1 m1 d2 m2 d3 m3] -> [d0 d1 d2 d3 | m0 m1 m2 m3]
        let dm = _mm256_permutevar8x32_ps(
            _mm256_cvtph_ps(_mm_setr_epi32(rd(0), rd(1), rd(2), rd(3))),
            split,
        );
        let dw8 = _mm256_permute2f128_ps(dm, dm, 0x00);
        let mw8 = _mm256_permute2f128_ps(dm, dm, 0x11);
        let qx = [
            nibbles(wb.add(4)),
            nibbles(wb.add(24)),
            nibbles(wb.add(44)),
            nibbles(wb.add(64)),
        ];
        for j in 0..N {
            let ab = blocks.add(j * nb + b);
            let mut p = [_mm256_setzero_si256(); 4];
            for k in 0..4 {
                p[k] = _mm256_madd_epi16(
                    ones,
                    _mm256_maddubs_epi16(qx[k], load256((*ab.add(k)).qs.as_ptr())),
                );
            }
            let g = j * groups + b / 4;
            acc[j] = _mm256_fmadd_ps(_mm256_mul_ps(dw8, group4(d4.add(g))), reduce4(p), acc[j]);
            // Both halves hold the same 4 products; the final sum takes one half.
            summ[j] = _mm256_fmadd_ps(mw8, group4(s4.add(g)), summ[j]);
        }
        b += 4;
    }
    let mut summs = [0f32; N];
    while b < nb {
        let wb = row.add(b * 20);
        let dm = _mm_cvtph_ps(_mm_cvtsi32_si128(std::ptr::read_unaligned(
            wb as *const i32,
        )));
        let dw = _mm256_broadcastss_ps(dm);
        let m = _mm_cvtss_f32(_mm_movehdup_ps(dm));
        let qx = nibbles(wb.add(4));
        for j in 0..N {
            let ab = &*blocks.add(j * nb + b);
            let d = _mm256_mul_ps(dw, _mm256_set1_ps(ab.d));
            acc[j] = _mm256_fmadd_ps(d, mul_sum_us8(qx, load256(ab.qs.as_ptr())), acc[j]);
            summs[j] = m.mul_add(ab.s, summs[j]);
        }
        b += 1;
    }
    let mut out = [0f32; N];
    for j in 0..N {
        out[j] = hsum_f32x8(acc[j]) + (hsum_f32x4(_mm256_castps256_ps128(summ[j])) + summs[j]);
    }
    out
}

/// Q4_K x Q8_K for N tokens (llama.cpp's AVX2 `ggml_vec_dot_q4_K_q8_K`).
#[target_feature(enable = "avx2,fma,f16c")]
#[inline]
unsafe fn tile_q4_k<const N: usize>(
    row: *const u8,
    acts: &[BlockQ8K],
    t0: usize,
    nb: usize,
) -> [f32; N] {
    let acts = acts.as_ptr().add(t0 * nb);
    let m4 = _mm256_set1_epi8(0xF);
    let mut acc = [_mm256_setzero_ps(); N];
    let mut acc_m = [_mm_setzero_ps(); N];
    for b in 0..nb {
        let wb = row.add(b * 144);
        let (dx, dminx) = (f16_at(wb), f16_at(wb.add(2)));
        let packed = std::slice::from_raw_parts(wb.add(4), 12);
        let (mut sc, mut mn) = ([0i16; 8], [0i16; 8]);
        for k in 0..8 {
            let (s, m) = scale_min_k4(k, packed);
            (sc[k], mn[k]) = (s as i16, m as i16);
        }
        let mins = _mm_loadu_si128(mn.as_ptr() as *const __m128i);
        let mut sumi = [_mm256_setzero_si256(); N];
        for g in 0..4 {
            let (scale_l, scale_h) = (
                _mm256_set1_epi16(sc[2 * g]),
                _mm256_set1_epi16(sc[2 * g + 1]),
            );
            let q4bits = _mm256_loadu_si256(wb.add(16 + 32 * g) as *const __m256i);
            let q4l = _mm256_and_si256(q4bits, m4);
            let q4h = _mm256_and_si256(_mm256_srli_epi16(q4bits, 4), m4);
            for (j, sumi) in sumi.iter_mut().enumerate() {
                let q8 = (*acts.add(j * nb + b)).qs.as_ptr().add(64 * g);
                let p16l = _mm256_madd_epi16(scale_l, _mm256_maddubs_epi16(q4l, load256(q8)));
                let p16h =
                    _mm256_madd_epi16(scale_h, _mm256_maddubs_epi16(q4h, load256(q8.add(32))));
                *sumi = _mm256_add_epi32(*sumi, _mm256_add_epi32(p16l, p16h));
            }
        }
        for j in 0..N {
            let a = &*acts.add(j * nb + b);
            let q8sums = _mm256_loadu_si256(a.bsums.as_ptr() as *const __m256i);
            let q8s = _mm_hadd_epi16(
                _mm256_castsi256_si128(q8sums),
                _mm256_extracti128_si256(q8sums, 1),
            );
            let prod = _mm_madd_epi16(mins, q8s);
            acc_m[j] = _mm_fmadd_ps(_mm_set1_ps(-a.d * dminx), _mm_cvtepi32_ps(prod), acc_m[j]);
            acc[j] = _mm256_fmadd_ps(
                _mm256_set1_ps(a.d * dx),
                _mm256_cvtepi32_ps(sumi[j]),
                acc[j],
            );
        }
    }
    let mut out = [0f32; N];
    for j in 0..N {
        let m = _mm_add_ps(acc_m[j], _mm_movehl_ps(acc_m[j], acc_m[j]));
        let m = _mm_add_ss(m, _mm_movehdup_ps(m));
        out[j] = hsum_f32x8(acc[j]) + _mm_cvtss_f32(m);
    }
    out
}

/// Q6_K x Q8_K for N tokens (llama.cpp's AVX2 `ggml_vec_dot_q6_K_q8_K`).
#[target_feature(enable = "avx2,fma,f16c")]
#[inline]
unsafe fn tile_q6_k<const N: usize>(
    row: *const u8,
    acts: &[BlockQ8K],
    t0: usize,
    nb: usize,
) -> [f32; N] {
    let acts = acts.as_ptr().add(t0 * nb);
    let (m4, m2, m32s) = (
        _mm256_set1_epi8(0xF),
        _mm256_set1_epi8(3),
        _mm256_set1_epi8(32),
    );
    let mut acc = [_mm256_setzero_ps(); N];
    for b in 0..nb {
        let wb = row.add(b * 210);
        let dx = f16_at(wb.add(208));
        let mut sumi = [_mm256_setzero_si256(); N];
        for h in 0..2 {
            let (ql, qh, sc) = (
                wb.add(64 * h),
                wb.add(128 + 32 * h),
                wb.add(192 + 8 * h) as *const i8,
            );
            let scale = |k: usize| {
                _mm256_set_m128i(
                    _mm_set1_epi16(*sc.add(2 * k + 1) as i16),
                    _mm_set1_epi16(*sc.add(2 * k) as i16),
                )
            };
            let scales = [scale(0), scale(1), scale(2), scale(3)];
            let bits1 = _mm256_loadu_si256(ql as *const __m256i);
            let bits2 = _mm256_loadu_si256(ql.add(32) as *const __m256i);
            let bits_h = _mm256_loadu_si256(qh as *const __m256i);
            let high = |shift: i32| {
                let v = match shift {
                    0 => bits_h,
                    2 => _mm256_srli_epi16(bits_h, 2),
                    4 => _mm256_srli_epi16(bits_h, 4),
                    _ => _mm256_srli_epi16(bits_h, 6),
                };
                _mm256_slli_epi16(_mm256_and_si256(v, m2), 4)
            };
            let q6 = [
                _mm256_or_si256(_mm256_and_si256(bits1, m4), high(0)),
                _mm256_or_si256(_mm256_and_si256(bits2, m4), high(2)),
                _mm256_or_si256(_mm256_and_si256(_mm256_srli_epi16(bits1, 4), m4), high(4)),
                _mm256_or_si256(_mm256_and_si256(_mm256_srli_epi16(bits2, 4), m4), high(6)),
            ];
            for (j, sumi) in sumi.iter_mut().enumerate() {
                let q8 = (*acts.add(j * nb + b)).qs.as_ptr().add(128 * h);
                let mut p = [_mm256_setzero_si256(); 4];
                for k in 0..4 {
                    let a = load256(q8.add(32 * k));
                    let p16 = _mm256_sub_epi16(
                        _mm256_maddubs_epi16(q6[k], a),
                        _mm256_maddubs_epi16(m32s, a),
                    );
                    p[k] = _mm256_madd_epi16(scales[k], p16);
                }
                *sumi = _mm256_add_epi32(*sumi, _mm256_add_epi32(p[0], p[1]));
                *sumi = _mm256_add_epi32(*sumi, _mm256_add_epi32(p[2], p[3]));
            }
        }
        for j in 0..N {
            let d = (*acts.add(j * nb + b)).d * dx;
            acc[j] = _mm256_fmadd_ps(_mm256_set1_ps(d), _mm256_cvtepi32_ps(sumi[j]), acc[j]);
        }
    }
    acc.map(|a| hsum_f32x8(a))
}

/// F32 or F16 weights x f32 activations for N tokens; `nb` is the column count.
#[target_feature(enable = "avx2,fma,f16c")]
#[inline]
unsafe fn tile_float<const N: usize, const F16: bool>(
    row: *const u8,
    x: &[f32],
    t0: usize,
    cols: usize,
) -> [f32; N] {
    let x = x.as_ptr().add(t0 * cols);
    let load_w = |c: usize| {
        if F16 {
            _mm256_cvtph_ps(_mm_loadu_si128(row.add(2 * c) as *const __m128i))
        } else {
            _mm256_loadu_ps(row.add(4 * c) as *const f32)
        }
    };
    let (mut acc0, mut acc1) = ([_mm256_setzero_ps(); N], [_mm256_setzero_ps(); N]);
    let mut c = 0;
    while c + 16 <= cols {
        let (w0, w1) = (load_w(c), load_w(c + 8));
        for j in 0..N {
            let xj = x.add(j * cols + c);
            acc0[j] = _mm256_fmadd_ps(w0, _mm256_loadu_ps(xj), acc0[j]);
            acc1[j] = _mm256_fmadd_ps(w1, _mm256_loadu_ps(xj.add(8)), acc1[j]);
        }
        c += 16;
    }
    if c + 8 <= cols {
        let w0 = load_w(c);
        for j in 0..N {
            acc0[j] = _mm256_fmadd_ps(w0, _mm256_loadu_ps(x.add(j * cols + c)), acc0[j]);
        }
        c += 8;
    }
    let mut out = [0f32; N];
    for j in 0..N {
        out[j] = hsum_f32x8(_mm256_add_ps(acc0[j], acc1[j]));
        for k in c..cols {
            let w = if F16 {
                f16_at(row.add(2 * k))
            } else {
                std::ptr::read_unaligned(row.add(4 * k) as *const f32)
            };
            out[j] += w * *x.add(j * cols + k);
        }
    }
    out
}

/// Defines `$name(w, row_bytes, acts, nb, num_tokens, out)`: every row of `w` (whole rows of
/// `row_bytes`) against every token, out laid out [row][token]; tokens go through `$tile` 4 at a time.
macro_rules! rows_kernel {
    ($name:ident, $inner:ident, $act:ty, $tile:ident $(, $extra:expr)*) => {
        pub fn $name(w: &[u8], row_bytes: usize, acts: &$act, nb: usize, num_tokens: usize, out: &mut [f32]) {
            assert!(available(), "AVX2 kernel called on a CPU without AVX2/FMA/F16C");
            assert!(w.len() % row_bytes == 0 && out.len() == w.len() / row_bytes * num_tokens);
            assert!(ActLen::covers(acts, nb, num_tokens));
            // SAFETY: the CPU features were checked above; the asserts bound every pointer the tiles
            // read (each row holds `nb` blocks, each of `num_tokens` tokens holds `nb` activation blocks).
            unsafe { $inner(w, row_bytes, acts, nb, num_tokens, out) }
        }

        #[target_feature(enable = "avx2,fma,f16c")]
        unsafe fn $inner(w: &[u8], row_bytes: usize, acts: &$act, nb: usize, num_tokens: usize, out: &mut [f32]) {
            for (row, o) in w.chunks_exact(row_bytes).zip(out.chunks_exact_mut(num_tokens)) {
                let rp = row.as_ptr();
                let mut t = 0;
                while t + 4 <= num_tokens {
                    o[t..t + 4].copy_from_slice(&$tile::<4 $(, $extra)*>(rp, acts, t, nb));
                    t += 4;
                }
                match num_tokens - t {
                    1 => o[t..].copy_from_slice(&$tile::<1 $(, $extra)*>(rp, acts, t, nb)),
                    2 => o[t..].copy_from_slice(&$tile::<2 $(, $extra)*>(rp, acts, t, nb)),
                    3 => o[t..].copy_from_slice(&$tile::<3 $(, $extra)*>(rp, acts, t, nb)),
                    _ => {}
                }
            }
        }
    };
}

/// Whether activations hold `num_tokens` rows of `nb` blocks (elements for f32), as the tiles read them.
trait ActLen {
    fn covers(&self, nb: usize, num_tokens: usize) -> bool;
}

impl ActLen for Q8Acts {
    fn covers(&self, nb: usize, num_tokens: usize) -> bool {
        self.blocks.len() >= nb * num_tokens
            && self.d4.len() >= nb.div_ceil(4) * num_tokens
            && self.s4.len() == self.d4.len()
    }
}

impl<T> ActLen for [T] {
    fn covers(&self, nb: usize, num_tokens: usize) -> bool {
        self.len() >= nb * num_tokens
    }
}

rows_kernel!(rows_q4_0, rows_q4_0_impl, Q8Acts, tile_signed, true);
rows_kernel!(rows_q8_0, rows_q8_0_impl, Q8Acts, tile_signed, false);
rows_kernel!(rows_q4_1, rows_q4_1_impl, Q8Acts, tile_q4_1);
rows_kernel!(rows_q4_k, rows_q4_k_impl, [BlockQ8K], tile_q4_k);
rows_kernel!(rows_q6_k, rows_q6_k_impl, [BlockQ8K], tile_q6_k);
rows_kernel!(rows_f32, rows_f32_impl, [f32], tile_float, false);
rows_kernel!(rows_f16, rows_f16_impl, [f32], tile_float, true);
