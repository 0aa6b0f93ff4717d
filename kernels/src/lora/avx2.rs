//! AVX2/FMA/F16C kernels: register tiles of tokens x weight rows (shrink) or tokens x output columns
//! (expand). Each output keeps its own accumulator and follows `scalar`'s order of operations
//! exactly, so the tile shape (1 token for BGMV, up to 4 for SGMV) changes speed, never bits.

// Tiles index several per-token register arrays in step; ranges read better than zipped iterators.
#![allow(clippy::needless_range_loop)]

use super::scalar::{finish_dot, LANES, PANEL};
use super::slots::SlotWeights;
use super::weight::{LoraWeight, WeightKind};
use std::arch::x86_64::*;
use std::sync::OnceLock;

/// Tokens per tile on the SGMV path: each weight vector loaded is used this many times.
pub(super) const SGMV_TOKENS: usize = 4;

/// Whether this CPU has AVX2, FMA and F16C (checked once).
pub fn available() -> bool {
    static AVAILABLE: OnceLock<bool> = OnceLock::new();
    *AVAILABLE.get_or_init(|| {
        is_x86_feature_detected!("avx2")
            && is_x86_feature_detected!("fma")
            && is_x86_feature_detected!("f16c")
    })
}

/// `scalar::lane_sum` on a register: high half onto low, then `movehl`, then `movehdup`.
#[target_feature(enable = "avx2,fma,f16c")]
#[inline]
fn lane_sum(x: __m256) -> f32 {
    let mut r = _mm_add_ps(_mm256_castps256_ps128(x), _mm256_extractf128_ps(x, 1));
    r = _mm_add_ps(r, _mm_movehl_ps(r, r));
    r = _mm_add_ss(r, _mm_movehdup_ps(r));
    _mm_cvtss_f32(r)
}

/// 8 weights at `p` widened (exactly) to f32.
///
/// # Safety
/// The CPU must support AVX2 and F16C, and `p` must point to 8 readable weights.
#[target_feature(enable = "avx2,fma,f16c")]
#[inline]
unsafe fn load8<W: LoraWeight>(p: *const W) -> __m256 {
    // SAFETY: the caller guarantees 8 readable weights (32 bytes of f32 or 16 of f16/bf16).
    unsafe {
        match W::KIND {
            WeightKind::F32 => _mm256_loadu_ps(p.cast()),
            WeightKind::F16 => _mm256_cvtph_ps(_mm_loadu_si128(p.cast())),
            WeightKind::Bf16 => {
                let bits = _mm256_cvtepu16_epi32(_mm_loadu_si128(p.cast()));
                _mm256_castsi256_ps(_mm256_slli_epi32::<16>(bits))
            }
            WeightKind::Q8 => unreachable!("Q8 stores run the q8 kernels"),
        }
    }
}

/// `scalar::shrink`, tokens in tiles of `tile_tokens` (1 or [`SGMV_TOKENS`]).
///
/// # Safety
/// The CPU must support AVX2, FMA and F16C.
#[target_feature(enable = "avx2,fma,f16c")]
pub(super) unsafe fn shrink<W: LoraWeight>(
    w: &SlotWeights<'_, W>,
    x: &[f32],
    v: &mut [f32],
    v_stride: usize,
    tile_tokens: usize,
) {
    let num_tokens = x.len() / w.in_dim;
    let mut t0 = 0;
    while t0 < num_tokens {
        let tt = (num_tokens - t0).min(tile_tokens.clamp(1, SGMV_TOKENS));
        // 8 or 9 accumulators plus the loaded vectors fit the 16 registers; each weight vector is
        // used by every token of the tile, each activation vector by every row.
        match tt {
            1 => shrink_tokens::<W, 1, 8>(w, x, t0, v, v_stride),
            2 => shrink_tokens::<W, 2, 4>(w, x, t0, v, v_stride),
            3 => shrink_tokens::<W, 3, 3>(w, x, t0, v, v_stride),
            _ => shrink_tokens::<W, 4, 2>(w, x, t0, v, v_stride),
        }
        t0 += tt;
    }
}

/// Tokens `t0..t0 + TT` against all rank rows, `TR` rows at a time.
#[target_feature(enable = "avx2,fma,f16c")]
fn shrink_tokens<W: LoraWeight, const TT: usize, const TR: usize>(
    w: &SlotWeights<'_, W>,
    x: &[f32],
    t0: usize,
    v: &mut [f32],
    v_stride: usize,
) {
    let d = w.in_dim;
    let xs: [&[f32]; TT] = std::array::from_fn(|t| &x[(t0 + t) * d..][..d]);
    let mut k = 0;
    while k < w.rank {
        if w.rank - k >= TR {
            let rows: [&[W]; TR] = std::array::from_fn(|r| &w.a[(k + r) * d..][..d]);
            // SAFETY: every slice holds `in_dim` values; AVX2/FMA/F16C are enabled here.
            let dots = unsafe { dot_tile(xs, rows) };
            for t in 0..TT {
                v[(t0 + t) * v_stride + k..][..TR].copy_from_slice(&dots[t]);
            }
            k += TR;
        } else {
            let rows = [&w.a[k * d..][..d]];
            // SAFETY: as above.
            let dots = unsafe { dot_tile(xs, rows) };
            for t in 0..TT {
                v[(t0 + t) * v_stride + k] = dots[t][0];
            }
            k += 1;
        }
    }
}

/// All `TT x TR` dot products of `xs` with `rows`, one accumulator each.
///
/// # Safety
/// The CPU must support AVX2, FMA and F16C, and all slices must have the same length.
#[target_feature(enable = "avx2,fma,f16c")]
#[inline]
unsafe fn dot_tile<W: LoraWeight, const TT: usize, const TR: usize>(
    xs: [&[f32]; TT],
    rows: [&[W]; TR],
) -> [[f32; TR]; TT] {
    let d = xs[0].len();
    let n8 = d / LANES * LANES;
    let mut xp = [std::ptr::null::<f32>(); TT];
    for t in 0..TT {
        xp[t] = xs[t].as_ptr();
    }
    let mut ap = [std::ptr::null::<W>(); TR];
    for r in 0..TR {
        ap[r] = rows[r].as_ptr();
    }
    let mut acc = [[_mm256_setzero_ps(); TR]; TT];
    let mut c = 0;
    while c < n8 {
        let mut xv = [_mm256_setzero_ps(); TT];
        for t in 0..TT {
            // SAFETY: c + 8 <= n8 <= d, the length of every slice.
            xv[t] = unsafe { _mm256_loadu_ps(xp[t].add(c)) };
        }
        for r in 0..TR {
            // SAFETY: as above.
            let av = unsafe { load8(ap[r].add(c)) };
            for t in 0..TT {
                acc[t][r] = _mm256_fmadd_ps(xv[t], av, acc[t][r]);
            }
        }
        c += LANES;
    }
    let mut out = [[0f32; TR]; TT];
    for t in 0..TT {
        for r in 0..TR {
            out[t][r] = finish_dot(lane_sum(acc[t][r]), &xs[t][n8..], &rows[r][n8..]);
        }
    }
    out
}

/// `scalar::expand`, tokens in tiles of `tile_tokens` (1 or [`SGMV_TOKENS`]).
///
/// # Safety
/// The CPU must support AVX2, FMA and F16C.
#[target_feature(enable = "avx2,fma,f16c")]
pub(super) unsafe fn expand<W: LoraWeight>(
    w: &SlotWeights<'_, W>,
    v: &[f32],
    v_stride: usize,
    num_tokens: usize,
    y: &mut [f32],
    y_stride: usize,
    tile_tokens: usize,
) {
    let mut t0 = 0;
    while t0 < num_tokens {
        let tt = (num_tokens - t0).min(tile_tokens.clamp(1, SGMV_TOKENS));
        let vs = (v, v_stride, t0);
        match tt {
            1 => expand_tokens::<W, 1, 8>(w, vs, y, y_stride),
            2 => expand_tokens::<W, 2, 4>(w, vs, y, y_stride),
            3 => expand_tokens::<W, 3, 4>(w, vs, y, y_stride),
            _ => expand_tokens::<W, 4, 2>(w, vs, y, y_stride),
        }
        t0 += tt;
    }
}

/// Tokens `t0..t0 + TT` of `v` against every panel of B, `TV` vectors of 8 outputs at a time.
#[target_feature(enable = "avx2,fma,f16c")]
fn expand_tokens<W: LoraWeight, const TT: usize, const TV: usize>(
    w: &SlotWeights<'_, W>,
    (v, v_stride, t0): (&[f32], usize, usize),
    y: &mut [f32],
    y_stride: usize,
) {
    let rank = w.rank;
    let mut vp = [std::ptr::null::<f32>(); TT];
    for t in 0..TT {
        vp[t] = v[(t0 + t) * v_stride..][..rank].as_ptr();
    }
    let scale = _mm256_set1_ps(w.scale);
    for (p, panel) in w.b_panels.chunks_exact(w.panel_stride).enumerate() {
        let pp = panel[..rank * PANEL].as_ptr();
        for col in (0..PANEL).step_by(TV * LANES) {
            let col0 = p * PANEL + col;
            if col0 >= w.out_dim {
                break;
            }
            let mut acc = [[_mm256_setzero_ps(); TV]; TT];
            for k in 0..rank {
                let mut b = [_mm256_setzero_ps(); TV];
                for j in 0..TV {
                    // SAFETY: k < rank and col + 8 * (j + 1) <= PANEL: inside the panel's rows.
                    b[j] = unsafe { load8(pp.add(k * PANEL + col + j * LANES)) };
                }
                for t in 0..TT {
                    // SAFETY: each `vp[t]` points to `rank` values.
                    let vk = unsafe { _mm256_broadcast_ss(&*vp[t].add(k)) };
                    for j in 0..TV {
                        acc[t][j] = _mm256_fmadd_ps(vk, b[j], acc[t][j]);
                    }
                }
            }
            for t in 0..TT {
                let yt = &mut y[(t0 + t) * y_stride..];
                for j in 0..TV {
                    let o = col0 + j * LANES;
                    if o + LANES <= w.out_dim {
                        let dst = &mut yt[o..o + LANES];
                        // SAFETY: `dst` holds 8 values.
                        unsafe {
                            let y8 = _mm256_loadu_ps(dst.as_ptr());
                            let sum = _mm256_fmadd_ps(scale, acc[t][j], y8);
                            _mm256_storeu_ps(dst.as_mut_ptr(), sum);
                        }
                    } else if o < w.out_dim {
                        let mut lanes = [0f32; LANES];
                        // SAFETY: `lanes` holds 8 values.
                        unsafe { _mm256_storeu_ps(lanes.as_mut_ptr(), acc[t][j]) };
                        for (yo, &a) in yt[o..w.out_dim].iter_mut().zip(&lanes) {
                            *yo = w.scale.mul_add(a, *yo);
                        }
                    }
                }
            }
        }
    }
}
