//! x86 kernels over row-interleaved weights ([`super::packed`]): micro-kernels of 16 rows x N tokens.
//!
//! Per block and token, 8 byte dot-product steps (4 weights of each of 16 rows against 4 broadcast
//! activation bytes) leave the 16 rows' exact integer block sums in 16 lanes; one convert, one
//! multiply by `d_w[16] * d_a` and one fma fold them into per-row float accumulators (one more fma
//! adds Q4_1's `m * s` term). Each weight block is unpacked once per tile and reused for its N
//! tokens; each activation word is broadcast once and reused for 16 rows. There are no horizontal
//! sums, and each token's float operations are the same sequence whatever the tile it lands in, so
//! a token's result does not depend on its batch.
//!
//! Two builds: AVX-512 VNNI (`vpdpbusd` on 512-bit vectors, one whole group per register) and
//! plain AVX2 (two 256-bit halves of 8 rows, `maddubs` + `madd`, for Q4_0/Q4_1 only, whose nibble
//! products cannot saturate 16 bits). The integer sums are exact and every lane sees the same float
//! operations in both, so both builds give bit-identical results.

use super::activations::Q8Acts;
use super::packed::{group_bytes, GROUP};
use super::types::GgmlType;
use std::sync::OnceLock;

/// Whether this CPU has AVX2, FMA and F16C (checked once).
pub fn avx2_available() -> bool {
    super::dot_avx2::available()
}

/// Whether this CPU also has AVX-512 F/BW and VNNI (checked once).
pub fn vnni_available() -> bool {
    static AVAILABLE: OnceLock<bool> = OnceLock::new();
    *AVAILABLE.get_or_init(|| {
        avx2_available()
            && is_x86_feature_detected!("avx512f")
            && is_x86_feature_detected!("avx512bw")
            && is_x86_feature_detected!("avx512vnni")
    })
}

/// Runs the tiles of module-local `tile_q4`/`tile_q8_0` over every group and token: tiles of
/// `$q4_wide` (Q4) or `$q8_wide` (Q8_0) tokens, as wide as the build's registers allow (4 or 8),
/// then one narrower tile for the remainder. Results go to `$out[t * $ld + r]` for the first
/// `$valid` rows; a group holding padding rows is staged and only its real rows copied out.
macro_rules! tile_loop {
    ($q8:expr, $min:expr, $w:expr, $gb:expr, $a:expr, $nb:expr, $num_tokens:expr, $out:expr,
     $ld:expr, $valid:expr, $q4_wide:literal, $q8_wide:literal) => {{
        const G: usize = super::GROUP;
        let groups = $w.len() / $gb;
        let out = $out.as_mut_ptr();
        let mut stage = [0f32; G * 8];
        for i in 0..groups {
            let g = $w.as_ptr().add(i * $gb);
            let next: *const u8 = if i + 1 < groups {
                g.add($gb)
            } else {
                std::ptr::null()
            };
            let here = ($valid - i * G).min(G);
            macro_rules! tile {
                ($n:literal, $t:expr) => {{
                    // The first tile of a group may prefetch the next group: the weights stream
                    // from L3 or memory once per call. Only the Q8_0 tiles do (the output head's
                    // big groups gained ~25% at 16 tokens; the Q4 ones measured slower with it).
                    let pf = if $t == 0 { next } else { std::ptr::null() };
                    let (o, ld) = if here == G {
                        (out.add(i * G + $t * $ld), $ld)
                    } else {
                        (stage.as_mut_ptr(), G)
                    };
                    if $q8 {
                        tile_q8_0::<$n>(g, pf, $a, $t, $nb, o, ld)
                    } else if $min {
                        tile_q4::<$n, true>(g, pf, $a, $t, $nb, o, ld)
                    } else {
                        tile_q4::<$n, false>(g, pf, $a, $t, $nb, o, ld)
                    }
                    if here < G {
                        for j in 0..$n {
                            let dst = out.add(($t + j) * $ld + i * G);
                            std::ptr::copy_nonoverlapping(stage.as_ptr().add(j * G), dst, here);
                        }
                    }
                }};
            }
            let wide: usize = if $q8 { $q8_wide } else { $q4_wide };
            let mut t = 0;
            while t + wide <= $num_tokens {
                if wide == 8 {
                    tile!(8, t);
                } else {
                    tile!(4, t);
                }
                t += wide;
            }
            match $num_tokens - t {
                1 => tile!(1, t),
                2 => tile!(2, t),
                3 => tile!(3, t),
                4 => tile!(4, t),
                5 => tile!(5, t),
                6 => tile!(6, t),
                7 => tile!(7, t),
                _ => {}
            }
        }
    }};
}

/// Prefetches the cache lines of `pf[at..at + len]` into L1 (nothing if `pf` is null).
///
/// # Safety
/// A non-null `pf` must point into an allocation holding at least `at + len` bytes.
#[inline(always)]
unsafe fn prefetch(pf: *const u8, at: usize, len: usize) {
    use std::arch::x86_64::{_mm_prefetch, _MM_HINT_T0};
    if !pf.is_null() {
        for line in (0..len).step_by(64) {
            _mm_prefetch::<_MM_HINT_T0>(pf.add(at + line) as *const i8);
        }
    }
}

/// The AVX-512 VNNI build: one 512-bit register holds one value of each of a group's 16 rows.
mod zmm {
    use super::super::activations::Q8Acts;
    use super::prefetch;
    use std::arch::x86_64::*;

    /// 4 activation bytes (word `word` of the block at `p`) in every lane.
    #[target_feature(enable = "avx2,fma,f16c,avx512f,avx512bw,avx512vnni")]
    #[inline]
    unsafe fn bcast(p: *const i8, word: usize) -> __m512i {
        _mm512_set1_epi32(std::ptr::read_unaligned((p as *const i32).add(word)))
    }

    #[target_feature(enable = "avx2,fma,f16c,avx512f,avx512bw,avx512vnni")]
    #[inline]
    unsafe fn load(p: *const u8) -> __m512i {
        _mm512_loadu_si512(p as *const __m512i)
    }

    /// 16 f16 at `p` as f32.
    #[target_feature(enable = "avx2,fma,f16c,avx512f,avx512bw,avx512vnni")]
    #[inline]
    unsafe fn f16x16(p: *const u8) -> __m512 {
        _mm512_cvtph_ps(_mm256_loadu_si256(p as *const __m256i))
    }

    /// One group of Q4_0 (`MIN == false`) or Q4_1 (`MIN == true`) against tokens `t0..t0 + N`;
    /// writes [token][row] to `out`.
    #[target_feature(enable = "avx2,fma,f16c,avx512f,avx512bw,avx512vnni")]
    #[inline]
    pub unsafe fn tile_q4<const N: usize, const MIN: bool>(
        grp: *const u8,
        _pf: *const u8,
        a: &Q8Acts,
        t0: usize,
        nb: usize,
        out: *mut f32,
        ld: usize,
    ) {
        let (hb, bb) = if MIN { (4usize, 20usize) } else { (2, 18) };
        let m4 = _mm512_set1_epi8(0xF);
        // Q4_1's `m * s` terms go to their own sums, added last as llama.cpp does; wide tiles
        // take them in a second pass to keep the main loop's registers.
        let (mut acc, mut summ) = ([_mm512_setzero_ps(); N], [_mm512_setzero_ps(); N]);
        let inline_min = MIN && N <= 4;
        for b in 0..nb {
            let blk = grp.add(b * 16 * bb);
            let dw = f16x16(blk);
            let mw = if inline_min { f16x16(blk.add(32)) } else { dw };
            let q = blk.add(16 * hb);
            let qv = [load(q), load(q.add(64)), load(q.add(128)), load(q.add(192))];
            let lo = qv.map(|v| _mm512_and_si512(v, m4));
            let hi = qv.map(|v| _mm512_and_si512(_mm512_srli_epi16(v, 4), m4));
            for j in 0..N {
                let i = (t0 + j) * nb + b;
                let ab = &*a.blocks.as_ptr().add(i);
                let ap = ab.qs.as_ptr();
                let mut s = if MIN {
                    _mm512_setzero_si512()
                } else {
                    _mm512_set1_epi32(-8 * *a.isum.as_ptr().add(i))
                };
                for v in 0..4 {
                    s = _mm512_dpbusd_epi32(s, lo[v], bcast(ap, v));
                    s = _mm512_dpbusd_epi32(s, hi[v], bcast(ap, 4 + v));
                }
                let d = _mm512_mul_ps(dw, _mm512_set1_ps(ab.d));
                acc[j] = _mm512_fmadd_ps(d, _mm512_cvtepi32_ps(s), acc[j]);
                if inline_min {
                    summ[j] = _mm512_fmadd_ps(mw, _mm512_set1_ps(ab.s), summ[j]);
                }
            }
        }
        if MIN && !inline_min {
            for b in 0..nb {
                let m = f16x16(grp.add(b * 16 * bb + 32));
                for (j, summ) in summ.iter_mut().enumerate() {
                    let s = (*a.blocks.as_ptr().add((t0 + j) * nb + b)).s;
                    *summ = _mm512_fmadd_ps(m, _mm512_set1_ps(s), *summ);
                }
            }
        }
        if MIN {
            for (acc, summ) in acc.iter_mut().zip(summ) {
                *acc = _mm512_add_ps(*acc, summ);
            }
        }
        for (j, acc) in acc.iter().enumerate() {
            _mm512_storeu_ps(out.add(ld * j), *acc);
        }
    }

    /// One group of Q8_0 (payload stored as w + 128) against tokens `t0..t0 + N`.
    #[target_feature(enable = "avx2,fma,f16c,avx512f,avx512bw,avx512vnni")]
    #[inline]
    pub unsafe fn tile_q8_0<const N: usize>(
        grp: *const u8,
        pf: *const u8,
        a: &Q8Acts,
        t0: usize,
        nb: usize,
        out: *mut f32,
        ld: usize,
    ) {
        let mut acc = [_mm512_setzero_ps(); N];
        for b in 0..nb {
            let blk = grp.add(b * 16 * 34);
            prefetch(pf, b * 16 * 34, 16 * 34);
            let dw = f16x16(blk);
            let q = blk.add(32);
            let qv: [__m512i; 8] = std::array::from_fn(|v| load(q.add(64 * v)));
            for (j, acc) in acc.iter_mut().enumerate() {
                let i = (t0 + j) * nb + b;
                let ab = &*a.blocks.as_ptr().add(i);
                let ap = ab.qs.as_ptr();
                let mut s = _mm512_set1_epi32(-128 * *a.isum.as_ptr().add(i));
                for (v, w) in qv.iter().enumerate() {
                    s = _mm512_dpbusd_epi32(s, *w, bcast(ap, v));
                }
                let d = _mm512_mul_ps(dw, _mm512_set1_ps(ab.d));
                *acc = _mm512_fmadd_ps(d, _mm512_cvtepi32_ps(s), *acc);
            }
        }
        for (j, acc) in acc.iter().enumerate() {
            _mm512_storeu_ps(out.add(ld * j), *acc);
        }
    }

    /// Every group of `w` against every token into `out[t * ld + r]` (`r < valid`).
    #[target_feature(enable = "avx2,fma,f16c,avx512f,avx512bw,avx512vnni")]
    #[allow(clippy::too_many_arguments)]
    pub unsafe fn groups(
        q8: bool,
        min: bool,
        w: &[u8],
        gb: usize,
        a: &Q8Acts,
        nb: usize,
        num_tokens: usize,
        out: &mut [f32],
        ld: usize,
        valid: usize,
    ) {
        tile_loop!(q8, min, w, gb, a, nb, num_tokens, out, ld, valid, 8, 8);
    }
}

/// The AVX2 build: a group is two 8-row halves in 256-bit registers, each computed like the
/// 512-bit kernel's lanes (same float operations, so the same results).
mod ymm {
    use super::super::activations::Q8Acts;
    use std::arch::x86_64::*;

    /// `acc` plus each lane's 4 unsigned x signed byte products (exact for nibble weights).
    #[target_feature(enable = "avx2,fma,f16c")]
    #[inline]
    fn dot(acc: __m256i, w: __m256i, a: __m256i) -> __m256i {
        _mm256_add_epi32(
            acc,
            _mm256_madd_epi16(_mm256_maddubs_epi16(w, a), _mm256_set1_epi16(1)),
        )
    }

    #[target_feature(enable = "avx2,fma,f16c")]
    #[inline]
    unsafe fn bcast(p: *const i8, word: usize) -> __m256i {
        _mm256_set1_epi32(std::ptr::read_unaligned((p as *const i32).add(word)))
    }

    #[target_feature(enable = "avx2,fma,f16c")]
    #[inline]
    unsafe fn f16x8(p: *const u8) -> __m256 {
        _mm256_cvtph_ps(_mm_loadu_si128(p as *const __m128i))
    }

    /// Q4_0/Q4_1 group against tokens `t0..t0 + N`, 8 rows at a time; writes [token][row].
    #[target_feature(enable = "avx2,fma,f16c")]
    #[inline]
    pub unsafe fn tile_q4<const N: usize, const MIN: bool>(
        grp: *const u8,
        _pf: *const u8,
        a: &Q8Acts,
        t0: usize,
        nb: usize,
        out: *mut f32,
        ld: usize,
    ) {
        let (hb, bb) = if MIN { (4usize, 20usize) } else { (2, 18) };
        let m4 = _mm256_set1_epi8(0xF);
        for h in 0..2 {
            let (mut acc, mut summ) = ([_mm256_setzero_ps(); N], [_mm256_setzero_ps(); N]);
            for b in 0..nb {
                let blk = grp.add(b * 16 * bb);
                let dw = f16x8(blk.add(16 * h));
                let mw = f16x8(blk.add(32 + 16 * h));
                let q = blk.add(16 * hb + 32 * h);
                let qv = [0, 1, 2, 3].map(|v| _mm256_loadu_si256(q.add(64 * v) as *const __m256i));
                let lo = qv.map(|v| _mm256_and_si256(v, m4));
                let hi = qv.map(|v| _mm256_and_si256(_mm256_srli_epi16(v, 4), m4));
                for j in 0..N {
                    let i = (t0 + j) * nb + b;
                    let ab = &*a.blocks.as_ptr().add(i);
                    let ap = ab.qs.as_ptr();
                    let mut s = if MIN {
                        _mm256_setzero_si256()
                    } else {
                        _mm256_set1_epi32(-8 * *a.isum.as_ptr().add(i))
                    };
                    for v in 0..4 {
                        s = dot(s, lo[v], bcast(ap, v));
                        s = dot(s, hi[v], bcast(ap, 4 + v));
                    }
                    let d = _mm256_mul_ps(dw, _mm256_set1_ps(ab.d));
                    acc[j] = _mm256_fmadd_ps(d, _mm256_cvtepi32_ps(s), acc[j]);
                    if MIN {
                        summ[j] = _mm256_fmadd_ps(mw, _mm256_set1_ps(ab.s), summ[j]);
                    }
                }
            }
            if MIN {
                for (acc, summ) in acc.iter_mut().zip(summ) {
                    *acc = _mm256_add_ps(*acc, summ);
                }
            }
            for (j, acc) in acc.iter().enumerate() {
                _mm256_storeu_ps(out.add(ld * j + 8 * h), *acc);
            }
        }
    }

    /// Q8_0 has no AVX2 packed kernel (its products can saturate `maddubs`); never called.
    #[target_feature(enable = "avx2,fma,f16c")]
    #[inline]
    pub unsafe fn tile_q8_0<const N: usize>(
        _grp: *const u8,
        _pf: *const u8,
        _a: &Q8Acts,
        _t0: usize,
        _nb: usize,
        _out: *mut f32,
        _ld: usize,
    ) {
        unreachable!("no AVX2 packed Q8_0 kernel")
    }

    /// Every group of `w` against every token into `out[t * ld + r]` (`r < valid`).
    #[target_feature(enable = "avx2,fma,f16c")]
    #[allow(clippy::too_many_arguments)]
    pub unsafe fn groups(
        q8: bool,
        min: bool,
        w: &[u8],
        gb: usize,
        a: &Q8Acts,
        nb: usize,
        num_tokens: usize,
        out: &mut [f32],
        ld: usize,
        valid: usize,
    ) {
        tile_loop!(q8, min, w, gb, a, nb, num_tokens, out, ld, valid, 4, 4);
    }
}

/// Packed `ty` groups against all tokens: `out[t * ld + r]` for the first `valid` rows (the rest
/// of the last group is padding); `vnni` picks the AVX-512 VNNI build. Returns false (computing
/// nothing) when that build has no kernel for `ty` or the CPU lacks it.
#[allow(clippy::too_many_arguments)]
pub fn groups(
    ty: GgmlType,
    vnni: bool,
    w: &[u8],
    cols: usize,
    acts: &Q8Acts,
    num_tokens: usize,
    out: &mut [f32],
    ld: usize,
    valid: usize,
) -> bool {
    let (q8, min) = match ty {
        GgmlType::Q4_0 => (false, false),
        GgmlType::Q4_1 => (false, true),
        GgmlType::Q8_0 => (true, false),
        _ => return false,
    };
    if !(if vnni {
        vnni_available()
    } else {
        avx2_available() && !q8
    }) {
        return false;
    }
    let (gb, nb) = (group_bytes(ty, cols), cols / ty.block_len());
    let groups = w.len() / gb;
    if groups == 0 || num_tokens == 0 {
        return true;
    }
    assert!(w.len() == groups * gb && acts.isum.len() == acts.blocks.len());
    assert!(acts.blocks.len() >= nb * num_tokens);
    assert!(valid > (groups - 1) * GROUP && valid <= groups * GROUP && ld >= valid);
    assert!(out.len() >= (num_tokens - 1) * ld + valid);
    // SAFETY: the CPU features of the chosen build were checked above; the asserts bound every
    // pointer the tiles touch: each group holds `nb` blocks of 16 rows, each token `nb` act
    // blocks; whole groups (all but possibly the last) end at row `valid` or before, so token
    // `t`'s 16 values of group `i` lie within `out[t * ld + 16 * i..][..16]`, inside `out`; the
    // last group, if partial, is staged and only its `valid` rows are copied.
    unsafe {
        if vnni {
            zmm::groups(q8, min, w, gb, acts, nb, num_tokens, out, ld, valid)
        } else {
            ymm::groups(q8, min, w, gb, acts, nb, num_tokens, out, ld, valid)
        }
    }
    true
}
