//! AVX-512 VNNI kernels for the [`super::Q8`] kind: `q8`'s computation with `vpdpbusd` (64
//! byte products per instruction). The integer sums are exact and the float steps are the same
//! operations as `q8`'s, so the results match the portable kernels bit for bit.

// Tiles index several register arrays in step; ranges read better than zipped iterators.
#![allow(clippy::needless_range_loop)]

use super::q8::{expand_correction, K_GROUP, OUT_BLOCK, V_OFFSET};
use super::slots::SlotWeights;
use super::weight::Q8;
use std::arch::x86_64::*;
use std::sync::OnceLock;

/// Whether this CPU has AVX-512 F/BW and VNNI (checked once).
pub fn available() -> bool {
    static AVAILABLE: OnceLock<bool> = OnceLock::new();
    *AVAILABLE.get_or_init(|| {
        is_x86_feature_detected!("avx512f")
            && is_x86_feature_detected!("avx512bw")
            && is_x86_feature_detected!("avx512vnni")
    })
}

/// How far ahead of its reads a kernel hints the stream it walks (a slot's A rows and B panels
/// are each contiguous): the hardware streamer stops at every 4 KiB page, and a decode step with
/// distinct adapters is all short streams.
const PF_DIST: usize = 1024;

/// Hints the line at `p` into L1 (a hint never faults, wherever `p` points).
#[inline(always)]
fn pf(p: *const i8) {
    // SAFETY: prefetching has no architectural effect and cannot fault.
    unsafe { _mm_prefetch::<_MM_HINT_T0>(p) }
}

/// Lanes for `n <= 16` values.
fn tail_mask(n: usize) -> __mmask16 {
    ((1u32 << n) - 1) as __mmask16
}

/// `q8::quantize_act` (`out` holds the padded row, `x.len() <= out.len()`).
///
/// # Safety
/// The CPU must support AVX-512 F and BW.
#[target_feature(enable = "avx512f,avx512bw")]
pub(super) unsafe fn quantize_act(x: &[f32], out: &mut [u8], offset: u8) -> f32 {
    let n = x.len();
    let (n64, n16) = (n / 64 * 64, n / 16 * 16);
    let xp = x.as_ptr();
    // Four running maxima: the max is exact in any order, and one chain would wait on latency.
    let mut vmax = [_mm512_setzero_ps(); 4];
    // SAFETY: every load reads inside `x` (the tail through a mask).
    unsafe {
        for c in (0..n64).step_by(64) {
            for (j, m) in vmax.iter_mut().enumerate() {
                *m = _mm512_max_ps(*m, _mm512_abs_ps(_mm512_loadu_ps(xp.add(c + 16 * j))));
            }
        }
        for c in (n64..n16).step_by(16) {
            vmax[0] = _mm512_max_ps(vmax[0], _mm512_abs_ps(_mm512_loadu_ps(xp.add(c))));
        }
        if n16 < n {
            let v = _mm512_maskz_loadu_ps(tail_mask(n - n16), xp.add(n16));
            vmax[1] = _mm512_max_ps(vmax[1], _mm512_abs_ps(v));
        }
    }
    let m = _mm512_max_ps(
        _mm512_max_ps(vmax[0], vmax[1]),
        _mm512_max_ps(vmax[2], vmax[3]),
    );
    let amax = _mm512_reduce_max_ps(m);
    let op = out.as_mut_ptr();
    if amax == 0.0 {
        out.fill(offset);
        return 0.0;
    }
    let id = _mm512_set1_ps(127.0 / amax);
    let bias = _mm512_set1_epi32(offset as i32);
    // SAFETY: as above, and every store writes inside `out` (at least `n` bytes).
    unsafe {
        for c in (0..n16).step_by(16) {
            let q = _mm512_cvtps_epi32(_mm512_mul_ps(_mm512_loadu_ps(xp.add(c)), id));
            let b = _mm512_cvtepi32_epi8(_mm512_add_epi32(q, bias));
            _mm_storeu_si128(op.add(c).cast(), b);
        }
        if n16 < n {
            let m = tail_mask(n - n16);
            let q = _mm512_cvtps_epi32(_mm512_mul_ps(_mm512_maskz_loadu_ps(m, xp.add(n16)), id));
            _mm512_mask_cvtepi32_storeu_epi8(op.add(n16).cast(), m, _mm512_add_epi32(q, bias));
        }
    }
    out[n..].fill(offset);
    amax / 127.0
}

/// `xq · A_k` in integers as 16 lane sums, the row read front to back into four accumulators
/// (integer sums are exact in any order).
///
/// # Safety
/// The CPU must support AVX-512 F/BW/VNNI; row `k` exists and `xq` holds `a_stride` bytes.
#[target_feature(enable = "avx512f,avx512bw,avx512vnni")]
#[inline]
unsafe fn dot_row(w: &SlotWeights<'_, Q8>, xq: &[u8], k: usize) -> __m512i {
    let stride = w.a_stride;
    // SAFETY: row `k` of `a_stride` bytes lies inside `w.a`, `xq` holds `a_stride` bytes.
    unsafe {
        let a = w.a.as_ptr().cast::<i8>().add(k * stride);
        let xp = xq.as_ptr();
        let mut acc = [_mm512_setzero_si512(); 4];
        let mut c = 0;
        while c + 256 <= stride {
            for j in 0..4 {
                pf(a.wrapping_add(c + 64 * j + PF_DIST));
                let xv = _mm512_loadu_si512(xp.add(c + 64 * j).cast());
                let av = _mm512_loadu_si512(a.add(c + 64 * j).cast());
                acc[j] = _mm512_dpbusd_epi32(acc[j], xv, av);
            }
            c += 256;
        }
        let mut j = 0;
        while c < stride {
            let xv = _mm512_loadu_si512(xp.add(c).cast());
            let av = _mm512_loadu_si512(a.add(c).cast());
            acc[j] = _mm512_dpbusd_epi32(acc[j], xv, av);
            c += 64;
            j += 1;
        }
        _mm512_add_epi32(
            _mm512_add_epi32(acc[0], acc[1]),
            _mm512_add_epi32(acc[2], acc[3]),
        )
    }
}

/// The lane sums of 16 vectors, as one vector (`out[i] = Σ v[i]`): a transposing tree of 15
/// additions instead of 16 separate horizontal sums.
#[target_feature(enable = "avx512f")]
#[inline]
fn reduce16(v: &[__m512i; 16]) -> __m512i {
    // Pairs: each 128-bit lane holds [v0, v1, v0, v1] partial sums.
    let mut s = [_mm512_setzero_si512(); 8];
    for i in 0..8 {
        let (a, b) = (v[2 * i], v[2 * i + 1]);
        s[i] = _mm512_add_epi32(_mm512_unpacklo_epi32(a, b), _mm512_unpackhi_epi32(a, b));
    }
    // Quads: each 128-bit lane holds [v0, v1, v2, v3] partial sums.
    let mut q = [_mm512_setzero_si512(); 4];
    for i in 0..4 {
        let (a, b) = (s[2 * i], s[2 * i + 1]);
        q[i] = _mm512_add_epi32(_mm512_unpacklo_epi64(a, b), _mm512_unpackhi_epi64(a, b));
    }
    // Fold the four 128-bit lanes: [q0 (L0+L1), q0 (L2+L3), q1 (L0+L1), q1 (L2+L3)], ...
    let fold = |a: __m512i, b: __m512i| {
        _mm512_add_epi32(
            _mm512_shuffle_i32x4::<0b10_00_10_00>(a, b),
            _mm512_shuffle_i32x4::<0b11_01_11_01>(a, b),
        )
    };
    fold(fold(q[0], q[1]), fold(q[2], q[3]))
}

/// `q8::shrink_token`.
///
/// # Safety
/// The CPU must support AVX-512 F/BW/VNNI; `xq` holds `a_stride` bytes and `v` `rank` values.
#[target_feature(enable = "avx512f,avx512bw,avx512vnni")]
pub(super) unsafe fn shrink_token(w: &SlotWeights<'_, Q8>, xq: &[u8], sx: f32, v: &mut [f32]) {
    let sxv = _mm512_set1_ps(sx);
    for k0 in (0..w.rank).step_by(16) {
        let n = (w.rank - k0).min(16);
        let mut rows = [_mm512_setzero_si512(); 16];
        for (r, row) in rows[..n].iter_mut().enumerate() {
            // SAFETY: k0 + r < rank; the caller vouches for the rest.
            *row = unsafe { dot_row(w, xq, k0 + r) };
        }
        let m = tail_mask(n);
        // SAFETY: `a_sums`, `a_scales` and `v` hold `rank` values: lanes `k0..k0 + n` are inside.
        unsafe {
            let sums = _mm512_maskz_loadu_epi32(m, w.q8.a_sums.as_ptr().add(k0));
            let scales = _mm512_maskz_loadu_ps(m, w.q8.scales.as_ptr().add(k0));
            let isum = _mm512_sub_epi32(reduce16(&rows), sums);
            // `q8::shrink_value`: `(isum as f32 * sx) * sa`.
            let vv = _mm512_mul_ps(_mm512_mul_ps(_mm512_cvtepi32_ps(isum), sxv), scales);
            _mm512_mask_storeu_ps(v.as_mut_ptr().add(k0), m, vv);
        }
    }
}

/// `q8::expand_token`.
///
/// # Safety
/// The CPU must support AVX-512 F/BW/VNNI; `v` holds `rank` values and `y` `out_dim`.
#[target_feature(enable = "avx512f,avx512bw,avx512vnni")]
pub(super) unsafe fn expand_token(w: &SlotWeights<'_, Q8>, v: &[f32], y: &mut [f32]) {
    let mut vq = [V_OFFSET; super::MAX_LORA_RANK];
    let groups = w.rank.div_ceil(K_GROUP);
    // SAFETY: the caller vouches for the CPU; `vq` holds 512 >= 4 * groups bytes.
    let sv = unsafe { quantize_act(&v[..w.rank], &mut vq[..groups * K_GROUP], V_OFFSET) };
    let f = _mm512_set1_ps(w.scale * sv);
    let correction = _mm512_set1_epi32(expand_correction(&vq[..groups * K_GROUP]));
    let num_panels = w.out_dim.div_ceil(OUT_BLOCK);
    for p in 0..num_panels {
        // SAFETY: panel p exists; the caller vouches for the rest.
        unsafe { expand_panel(w, (&vq, correction, f), p, y) };
    }
}

/// The 64 outputs of panel `p`, read front to back: four accumulators of 16 outputs.
///
/// # Safety
/// The CPU must support AVX-512 F/BW/VNNI; panel `p` exists and `y` holds `out_dim` values.
#[target_feature(enable = "avx512f,avx512bw,avx512vnni")]
#[inline]
unsafe fn expand_panel(
    w: &SlotWeights<'_, Q8>,
    (vq, correction, f): (&[u8; super::MAX_LORA_RANK], __m512i, __m512),
    p: usize,
    y: &mut [f32],
) {
    let groups = w.rank.div_ceil(K_GROUP);
    // SAFETY: panel `p` holds `groups` groups of 4 registers; `vq` holds `4 * groups` bytes.
    unsafe {
        let b = w.b_panels.as_ptr().cast::<i8>().add(p * w.panel_stride);
        let vp = vq.as_ptr();
        let mut acc = [_mm512_setzero_si512(); 4];
        for g in 0..groups {
            let vg = _mm512_set1_epi32(vp.add(g * K_GROUP).cast::<i32>().read_unaligned());
            for j in 0..4 {
                pf(b.wrapping_add(g * 256 + j * 64 + PF_DIST));
                let bv = _mm512_loadu_si512(b.add(g * 256 + j * 64).cast());
                acc[j] = _mm512_dpbusd_epi32(acc[j], bv, vg);
            }
        }
        for j in 0..4 {
            let o = p * OUT_BLOCK + j * 16;
            if o >= w.out_dim {
                break;
            }
            let m = if o + 16 <= w.out_dim {
                0xFFFF
            } else {
                tail_mask(w.out_dim - o)
            };
            // `y` goes through the mask.
            let t = _mm512_cvtepi32_ps(_mm512_sub_epi32(acc[j], correction));
            let yp = y.as_mut_ptr().add(o);
            let yv = _mm512_maskz_loadu_ps(m, yp);
            _mm512_mask_storeu_ps(yp, m, _mm512_fmadd_ps(t, f, yv));
        }
    }
}
