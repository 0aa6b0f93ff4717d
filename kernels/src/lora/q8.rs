//! The int8 weight kind ([`super::Q8`]): layouts, quantization and the portable kernels, which
//! define the computation the AVX-512 VNNI kernels (`avx512`) reproduce bit for bit.
//!
//! Storage: A row `k` as `round(a * 127 / max|a_k|)` (scale `sa_k`), rows zero-padded to 64
//! bytes; B column `k` (one rank, every output) as `round(b * 127 / max|b_k|)` (scale `sb_k`),
//! stored as `q + 128`, in VNNI panels `[out_dim / 64][rank / 4][64 outputs][4 ranks]`: one
//! 64-byte load feeds one `vpdpbusd` (16 outputs), and the kernels read every row and panel front
//! to back. Per rank the slot keeps `sa_k · sb_k` and `128 · Σ A_k`; nothing per output, so the
//! expand reads nothing but B's bytes. With distinct adapters per token the reads, not the
//! arithmetic, set the speed (see `benches/benches/lora.rs`).
//!
//! Per token (all integer sums are exact, so no order of operations needs fixing):
//! - `x` is quantized symmetrically to `q = round(x * 127 / max|x|)` (ties to even), stored as
//!   `q + 128` (VNNI multiplies unsigned by signed bytes); `sx = max|x| / 127`;
//! - shrink: `v_k = ((Σ (q+128)·a - 128·Σa) as f32 * sx) * (sa_k·sb_k)`: `v` carries B's column
//!   scales;
//! - `v` is quantized the same way to signed bytes `qv` (`sv`), then expand: `y_o = fma((Σ
//!   (b+128)·qv - 128·Σqv) as f32, scale * sv, y_o)`.
//!
//! The 8-bit activations and weights cost about 1% of the delta's magnitude (the delta is itself a
//! small correction of the base output, and the base weights are 4-bit), in exchange for a quarter
//! of f32's bytes: decode with many distinct adapters streams every adapter once per token.

use super::slots::{LoraShape, SlotWeights};
use super::weight::Q8;
use std::cell::RefCell;

/// Widest input a Q8 store takes: a row's integer dot product (`255 · 127` per element) must fit
/// an i32.
pub(super) const MAX_IN_DIM: usize = 65_536;
/// A rows are padded (with zeros) to a multiple of this many bytes: one 512-bit register.
const A_ALIGN: usize = 64;
/// Outputs per B panel (four registers of 16 i32 lanes).
pub(super) const OUT_BLOCK: usize = 64;
/// Ranks per `vpdpbusd` lane.
pub(super) const K_GROUP: usize = 4;

pub(super) fn a_stride(in_dim: usize) -> usize {
    in_dim.div_ceil(A_ALIGN) * A_ALIGN
}

fn out_pad(out_dim: usize) -> usize {
    out_dim.div_ceil(OUT_BLOCK) * OUT_BLOCK
}

/// Values of one 64-output panel of B (room for `max_rank` rounded up to 4).
pub(super) fn panel_stride(max_rank: usize) -> usize {
    max_rank.div_ceil(K_GROUP) * K_GROUP * OUT_BLOCK
}

pub(super) fn b_slot_len(out_dim: usize, max_rank: usize) -> usize {
    out_pad(out_dim) / OUT_BLOCK * panel_stride(max_rank)
}

/// Where B's `(o, k)` lives inside a slot's panels.
fn b_index(o: usize, k: usize, panel_stride: usize) -> usize {
    (o / OUT_BLOCK) * panel_stride
        + (k / K_GROUP) * OUT_BLOCK * K_GROUP
        + (o % OUT_BLOCK) * K_GROUP
        + k % K_GROUP
}

/// Round half to even of `x` for `|x| < 2^22`: equal to `x.round_ties_even()` there, without the
/// libm call that costs the adapter loader most of its time on CPUs built for baseline x86-64.
#[inline]
pub(super) fn round_small(x: f32) -> f32 {
    const MAGIC: f32 = 12_582_912.0; // 1.5 * 2^23: adding it leaves no fraction bits
    (x + MAGIC) - MAGIC
}

/// `round(w * 127 / max|w|)` for each weight, and the scale `max|w| / 127` (0 for a zero row).
fn quantize_weights(w: impl Iterator<Item = f32> + Clone) -> (Vec<i8>, f32) {
    let amax = w.clone().fold(0f32, |m, v| m.max(v.abs()));
    if amax == 0.0 {
        return (w.map(|_| 0).collect(), 0.0);
    }
    let id = 127.0 / amax;
    let q = w
        .map(|v| round_small((v * id).clamp(-127.0, 127.0)) as i8)
        .collect();
    (q, amax / 127.0)
}

/// Per-rank scales and zero-point corrections of every slot of a Q8 store.
#[derive(Clone, Debug, Default)]
pub(super) struct RowScales {
    /// `[slot][max_rank]`: `sa_k · sb_k`, A row `k`'s scale times B column `k`'s.
    scales: Vec<f32>,
    /// `[slot][max_rank]`: `128 · Σ A_k` (the shrink's zero-point correction).
    a_sums: Vec<i32>,
}

/// One slot's share of [`RowScales`].
#[derive(Clone, Copy, Debug, Default)]
pub(super) struct SlotScales<'a> {
    /// `[rank]`.
    pub scales: &'a [f32],
    pub a_sums: &'a [i32],
}

/// A B weight as stored: `q + 128` in a byte (VNNI multiplies unsigned by signed bytes, and with
/// the weights unsigned the correction depends only on the token, not on the output).
fn b_byte(q: i8) -> Q8 {
    Q8((q as u8 ^ 0x80) as i8)
}

/// The integer `q + 128` of a stored B weight.
#[inline(always)]
fn b_unsigned(w: Q8) -> i32 {
    w.0 as u8 as i32
}

impl RowScales {
    pub fn new(shape: LoraShape) -> RowScales {
        let len = shape.num_slots * shape.max_rank;
        RowScales {
            scales: vec![0.0; len],
            a_sums: vec![0; len],
        }
    }

    pub fn nbytes(&self) -> usize {
        (self.scales.len() + self.a_sums.len()) * 4
    }

    pub fn slot(&self, shape: LoraShape, slot: usize, rank: usize) -> SlotScales<'_> {
        if self.scales.is_empty() {
            return SlotScales::default();
        }
        let r0 = slot * shape.max_rank;
        SlotScales {
            scales: &self.scales[r0..][..rank],
            a_sums: &self.a_sums[r0..][..rank],
        }
    }

    /// Copies the first `rank` values of `src_slot` of `src` (shape `src_shape`) into `slot`
    /// (shape `shape`).
    pub fn copy_slot(
        &mut self,
        (shape, slot): (LoraShape, usize),
        src: &RowScales,
        (src_shape, src_slot): (LoraShape, usize),
        rank: usize,
    ) {
        if self.scales.is_empty() || src.scales.is_empty() {
            return;
        }
        let (r0, s0) = (slot * shape.max_rank, src_slot * src_shape.max_rank);
        self.scales[r0..][..rank].copy_from_slice(&src.scales[s0..][..rank]);
        self.a_sums[r0..][..rank].copy_from_slice(&src.a_sums[s0..][..rank]);
    }

    /// Quantizes PEFT's `a` `[rank, in_dim]` (per row) and `b` `[out_dim, rank]` (per column)
    /// into a slot's (whole, cleared first: padding must stay zero) A rows and B panels.
    pub fn load(
        &mut self,
        shape: LoraShape,
        slot: usize,
        (a_slot, a_stride): (&mut [Q8], usize),
        b_slot: &mut [Q8],
        (a, b, rank): (&[f32], &[f32], usize),
    ) {
        let LoraShape {
            in_dim,
            out_dim,
            max_rank,
            ..
        } = shape;
        a_slot.fill(Q8(0));
        b_slot.fill(b_byte(0));
        let (r0, ps) = (slot * max_rank, panel_stride(max_rank));
        for k in 0..rank {
            let (qb, sb) = quantize_weights((0..out_dim).map(|o| b[o * rank + k]));
            for (o, &q) in qb.iter().enumerate() {
                b_slot[b_index(o, k, ps)] = b_byte(q);
            }
            let (qa, sa) = quantize_weights(a[k * in_dim..][..in_dim].iter().copied());
            for (dst, &q) in a_slot[k * a_stride..].iter_mut().zip(&qa) {
                *dst = Q8(q);
            }
            self.scales[r0 + k] = sa * sb;
            self.a_sums[r0 + k] = 128 * qa.iter().map(|&v| v as i32).sum::<i32>();
        }
    }
}

/// Quantizes one token's activations into `out` as `q + offset` (wrapping; padded with `offset`,
/// i.e. zero, past `x.len()`); returns the scale `max|x| / 127` (0 for an all-zero token).
/// [`X_OFFSET`] gives the unsigned bytes the shrink needs, [`V_OFFSET`] the signed ones of the
/// expand.
pub(super) fn quantize_act(x: &[f32], out: &mut [u8], offset: u8) -> f32 {
    let amax = x.iter().fold(0f32, |m, v| m.max(v.abs()));
    out.fill(offset);
    if amax == 0.0 {
        return 0.0;
    }
    let id = 127.0 / amax;
    for (o, &v) in out.iter_mut().zip(x) {
        *o = (round_small(v * id) as i32 as u8).wrapping_add(offset);
    }
    amax / 127.0
}

/// The shrink's activations are unsigned (`q + 128`) against signed A rows.
pub(super) const X_OFFSET: u8 = 128;
/// The expand's are signed (two's complement bytes) against unsigned B weights.
pub(super) const V_OFFSET: u8 = 0;

/// The shrink's float step, shared by every kernel.
#[inline(always)]
pub(super) fn shrink_value(isum: i32, sx: f32, sa: f32) -> f32 {
    (isum as f32 * sx) * sa
}

/// `v[k] = x · A_k` for one token whose activations `quantize_act` left in `xq` (`a_stride` bytes).
fn shrink_token(w: &SlotWeights<'_, Q8>, xq: &[u8], sx: f32, v: &mut [f32]) {
    for (k, row) in w.a.chunks_exact(w.a_stride).enumerate() {
        let isum: i32 = xq
            .iter()
            .zip(row)
            .map(|(&x, a)| x as i32 * a.0 as i32)
            .sum();
        v[k] = shrink_value(isum - w.q8.a_sums[k], sx, w.q8.scales[k]);
    }
}

/// `y += scale · v Bᵀ` for one token (`v` already carries B's column scales).
fn expand_token(w: &SlotWeights<'_, Q8>, v: &[f32], y: &mut [f32]) {
    let mut vq = [V_OFFSET; super::MAX_LORA_RANK];
    let rank4 = w.rank.div_ceil(K_GROUP) * K_GROUP;
    let f = w.scale * quantize_act(&v[..w.rank], &mut vq[..rank4], V_OFFSET);
    let correction = expand_correction(&vq[..rank4]);
    for (o, yo) in y[..w.out_dim].iter_mut().enumerate() {
        let idot: i32 = (0..rank4)
            .map(|k| b_unsigned(w.b_panels[b_index(o, k, w.panel_stride)]) * vq[k] as i8 as i32)
            .sum();
        *yo = ((idot - correction) as f32).mul_add(f, *yo);
    }
}

/// `128 · Σ qv`: what the B weights' offset adds to every output's dot product.
pub(super) fn expand_correction(vq: &[u8]) -> i32 {
    128 * vq.iter().map(|&q| q as i8 as i32).sum::<i32>()
}

thread_local! {
    /// A unit's quantized activations (grows to the widest unit seen) and their scales.
    static XQ: RefCell<(Vec<u8>, Vec<f32>)> = const { RefCell::new((Vec::new(), Vec::new())) };
}

/// Whether to use the VNNI kernels (else the portable ones).
#[cfg(target_arch = "x86_64")]
fn vnni(kernel: super::LoraKernel) -> bool {
    kernel == super::LoraKernel::Avx512
}

/// Runs `f` with each token of `x` (`[num_tokens, in_dim]`) quantized for the shrink: `f(bytes,
/// scales)` gets `a_stride(in_dim)` bytes and one scale per token, in buffers reused across calls
/// on this thread.
pub(super) fn with_quantized<R>(
    kernel: super::LoraKernel,
    x: &[f32],
    in_dim: usize,
    f: impl FnOnce(&[u8], &[f32]) -> R,
) -> R {
    let stride = a_stride(in_dim);
    let num_tokens = x.len() / in_dim;
    XQ.with(|cell| {
        let mut guard = cell.borrow_mut();
        let (bytes, scales) = &mut *guard;
        if bytes.len() < num_tokens * stride {
            bytes.resize(num_tokens * stride, 0);
        }
        scales.clear();
        for (xt, out) in x.chunks_exact(in_dim).zip(bytes.chunks_exact_mut(stride)) {
            #[cfg(target_arch = "x86_64")]
            if vnni(kernel) {
                // SAFETY: the Avx512 kernel is only passed in when it is available.
                scales.push(unsafe { super::avx512::quantize_act(xt, out, X_OFFSET) });
                continue;
            }
            let _ = kernel;
            scales.push(quantize_act(xt, out, X_OFFSET));
        }
        f(&bytes[..num_tokens * stride], scales)
    })
}

/// `v[t * v_stride..][..rank] = x_t · Aᵀ` for the tokens [`with_quantized`] prepared.
pub(super) fn shrink(
    kernel: super::LoraKernel,
    w: &SlotWeights<'_, Q8>,
    (xq, sx): (&[u8], &[f32]),
    v: &mut [f32],
    v_stride: usize,
) {
    for (t, (xt, &st)) in xq.chunks_exact(w.a_stride).zip(sx).enumerate() {
        let vt = &mut v[t * v_stride..][..w.rank];
        #[cfg(target_arch = "x86_64")]
        if vnni(kernel) {
            // SAFETY: the Avx512 kernel is only passed in when it is available.
            unsafe { super::avx512::shrink_token(w, xt, st, vt) };
            continue;
        }
        let _ = kernel;
        shrink_token(w, xt, st, vt);
    }
}

/// `y_t += scale · v_t Bᵀ` for `num_tokens` tokens.
pub(super) fn expand(
    kernel: super::LoraKernel,
    w: &SlotWeights<'_, Q8>,
    (v, v_stride): (&[f32], usize),
    num_tokens: usize,
    y: &mut [f32],
    y_stride: usize,
) {
    for t in 0..num_tokens {
        let vt = &v[t * v_stride..][..w.rank];
        let yt = &mut y[t * y_stride..][..w.out_dim];
        #[cfg(target_arch = "x86_64")]
        if vnni(kernel) {
            // SAFETY: the Avx512 kernel is only passed in when it is available.
            unsafe { super::avx512::expand_token(w, vt, yt) };
            continue;
        }
        let _ = kernel;
        expand_token(w, vt, yt);
    }
}
