//! Entry points: check a batch against its slot stores, cut its segments into work units (one token
//! each on the BGMV path, up to [`SGMV_CHUNK`] tokens on the SGMV path), and run the units, across
//! the rayon pool when there is enough work to pay for it. A fused call ([`add_lora_fused`]) runs
//! every projection that reads the same input (q, k and v; gate and up) in one pass: one parallel
//! dispatch instead of one per projection, and each token's input quantized once.

use super::q8;
use super::scalar;
use super::slots::{LoraSlots, SlotWeights};
use super::weight::{LoraWeight, WeightKind, Q8};
use super::{LoraError, LoraKernel, LoraStrategy, OutputRows, Segment};
use rayon::prelude::*;
use std::cell::RefCell;

/// Estimated nanoseconds below which a call stays on the calling thread: waking the pool and
/// joining costs several microseconds, more on a busy machine.
const SERIAL_NS: usize = 10_000;
/// Rough single-core rates for that estimate: f32 multiply-accumulates per ns (AVX2 tiles) and
/// weight bytes streamed per ns from L3/memory. Decode with many distinct adapters is bound by the
/// bytes (and so gains from a second core's bandwidth); tokens sharing an adapter by the MACs.
const MACS_PER_NS: usize = 20;
const BYTES_PER_NS: usize = 25;
/// Tokens per work unit on the SGMV path: long prefill segments split into units of this many
/// tokens, so they spread over threads while each unit still reuses its weights 16 times.
const SGMV_CHUNK: usize = 16;

thread_local! {
    /// A unit's `v` (grows to the largest `tokens x rank` seen on this thread): no allocation or
    /// zeroing per unit, which a decode batch of distinct adapters would pay for every token.
    static V_SCRATCH: RefCell<Vec<f32>> = const { RefCell::new(Vec::new()) };
}

/// Adds the LoRA delta of every token covered by `segments` to `y` with the best kernel, choosing
/// BGMV or SGMV per segment. `x` is `[num_tokens, in_dim]`.
pub fn add_lora<W: LoraWeight>(
    slots: &LoraSlots<W>,
    x: &[f32],
    segments: &[Segment],
    y: OutputRows<'_>,
) -> Result<(), LoraError> {
    add_lora_with(
        slots,
        x,
        segments,
        y,
        LoraStrategy::Auto,
        LoraKernel::best(),
    )
}

/// [`add_lora`] with a chosen strategy and kernel (for tests and benches).
pub fn add_lora_with<W: LoraWeight>(
    slots: &LoraSlots<W>,
    x: &[f32],
    segments: &[Segment],
    y: OutputRows<'_>,
    strategy: LoraStrategy,
    kernel: LoraKernel,
) -> Result<(), LoraError> {
    let num_tokens = check_inputs(slots, x, kernel)?;
    check_output(slots, &y, num_tokens)?;
    let parts = [FusedPart {
        slots,
        offset: y.offset,
    }];
    let units = plan(&parts, num_tokens, segments, strategy, Empty::Refuse)?;
    run_fused(&parts, x, &units, y.data, y.stride, kernel);
    Ok(())
}

/// One projection of a fused call: its slots, and the column of the output rows where its
/// `out_dim` deltas start.
#[derive(Clone, Copy)]
pub struct FusedPart<'a, W: LoraWeight> {
    pub slots: &'a LoraSlots<W>,
    pub offset: usize,
}

/// [`add_lora`] for several projections that read the same input `x`, adding into one fused
/// output (`y`'s rows are `stride` wide; part p writes columns `offset_p..offset_p + out_dim_p`):
/// the deltas of q, k and v into a fused QKV product, or of gate and up. The results are those of
/// one [`add_lora`] call per part. A slot that holds no adapter in some part (an adapter that does
/// not target that projection) adds nothing there.
pub fn add_lora_fused<W: LoraWeight>(
    parts: &[FusedPart<'_, W>],
    x: &[f32],
    segments: &[Segment],
    y: &mut [f32],
    stride: usize,
) -> Result<(), LoraError> {
    add_lora_fused_with(parts, x, segments, y, stride, LoraKernel::best())
}

/// [`add_lora_fused`] with a chosen kernel (for tests and benches).
pub fn add_lora_fused_with<W: LoraWeight>(
    parts: &[FusedPart<'_, W>],
    x: &[f32],
    segments: &[Segment],
    y: &mut [f32],
    stride: usize,
    kernel: LoraKernel,
) -> Result<(), LoraError> {
    let Some(first) = parts.first() else {
        return Ok(());
    };
    let num_tokens = check_inputs(first.slots, x, kernel)?;
    for part in parts {
        if part.slots.in_dim() != first.slots.in_dim() {
            return Err(LoraError::LengthMismatch {
                what: "fused part in_dim",
                expected: first.slots.in_dim(),
                actual: part.slots.in_dim(),
            });
        }
        let rows = OutputRows {
            data: &mut [],
            stride,
            offset: part.offset,
        };
        check_output(part.slots, &rows, 0)?;
    }
    check_len("y", num_tokens * stride, y.len())?;
    let units = plan(parts, num_tokens, segments, LoraStrategy::Auto, Empty::Skip)?;
    run_fused(parts, x, &units, y, stride, kernel);
    Ok(())
}

/// Runs every unit of every part: each unit quantizes its tokens' inputs once (Q8), then per part
/// computes `v` and adds its expansion into the unit's rows of `y`.
fn run_fused<W: LoraWeight>(
    parts: &[FusedPart<'_, W>],
    x: &[f32],
    units: &[Unit],
    y: &mut [f32],
    stride: usize,
    kernel: LoraKernel,
) {
    let in_dim = parts[0].slots.in_dim();
    let ys = carve(y, stride, 0, stride, units);
    run(parts, units, ys, |u, yu| {
        let xu = &x[u.start * in_dim..][..u.len * in_dim];
        with_unit_input::<W, _>(kernel, parts[0].slots, xu, |input| {
            for part in parts {
                let Ok(w) = part.slots.weights(u.slot) else {
                    continue;
                };
                V_SCRATCH.with(|cell| {
                    let mut buf = cell.borrow_mut();
                    let n = u.len * w.rank;
                    if buf.len() < n {
                        buf.resize(n, 0.0);
                    }
                    // Every value is written by the shrink before the expand reads it.
                    shrink(kernel, u, &w, input, &mut buf[..n], w.rank);
                    let yp = &mut yu[part.offset..];
                    expand(kernel, u, &w, &buf[..n], w.rank, yp, stride);
                });
            }
        })
    });
}

/// The first half alone: `v[t * max_rank + k] = x_t · A_k` for `k` below the rank of token t's
/// adapter. `v` is `[num_tokens, max_rank]`; values of uncovered tokens and of `k >= rank` are left.
pub fn lora_shrink<W: LoraWeight>(
    slots: &LoraSlots<W>,
    x: &[f32],
    segments: &[Segment],
    v: &mut [f32],
    strategy: LoraStrategy,
    kernel: LoraKernel,
) -> Result<(), LoraError> {
    let num_tokens = check_inputs(slots, x, kernel)?;
    let max_rank = slots.max_rank();
    check_len("v", num_tokens * max_rank, v.len())?;
    let parts = [FusedPart { slots, offset: 0 }];
    let units = plan(&parts, num_tokens, segments, strategy, Empty::Refuse)?;
    let in_dim = slots.in_dim();
    let vs = carve(v, max_rank, 0, max_rank, &units);
    run(&parts, &units, vs, |u, vu| {
        let xu = &x[u.start * in_dim..][..u.len * in_dim];
        if let Ok(w) = slots.weights(u.slot) {
            with_unit_input::<W, _>(kernel, slots, xu, |input| {
                shrink(kernel, u, &w, input, vu, max_rank)
            })
        }
    });
    Ok(())
}

/// The second half alone: `y_t += scale · v_t Bᵀ` with `v` as [`lora_shrink`] leaves it.
pub fn lora_expand<W: LoraWeight>(
    slots: &LoraSlots<W>,
    v: &[f32],
    segments: &[Segment],
    y: OutputRows<'_>,
    strategy: LoraStrategy,
    kernel: LoraKernel,
) -> Result<(), LoraError> {
    if !kernel.is_available() {
        return Err(LoraError::KernelUnavailable(kernel));
    }
    let max_rank = slots.max_rank();
    check_multiple("v", v.len(), max_rank)?;
    let num_tokens = v.len() / max_rank;
    check_output(slots, &y, num_tokens)?;
    let parts = [FusedPart { slots, offset: 0 }];
    let units = plan(&parts, num_tokens, segments, strategy, Empty::Refuse)?;
    let ys = carve(y.data, y.stride, y.offset, slots.out_dim(), &units);
    run(&parts, &units, ys, |u, yu| {
        if let Ok(w) = slots.weights(u.slot) {
            let vu = &v[u.start * max_rank..];
            expand(kernel, u, &w, vu, max_rank, yu, y.stride)
        }
    });
    Ok(())
}

/// Consecutive tokens computed together against one adapter slot.
struct Unit {
    start: usize,
    len: usize,
    slot: usize,
    /// BGMV (tiles of one token) rather than SGMV.
    per_token: bool,
}

impl Unit {
    fn tile_tokens(&self) -> usize {
        if self.per_token {
            1
        } else {
            usize::MAX
        }
    }
}

/// What a segment naming an empty slot means.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Empty {
    /// An error: the caller named a slot with nothing in it.
    Refuse,
    /// No delta from that part (a fused call's adapter need not target every projection).
    Skip,
}

/// A unit's inputs as the kernels of `W` take them.
#[derive(Clone, Copy)]
enum UnitInput<'a> {
    Float(&'a [f32]),
    /// Each token quantized once for every part: `a_stride` bytes and a scale per token.
    Q8 {
        bytes: &'a [u8],
        scales: &'a [f32],
    },
}

/// Runs `f` with the unit's input `x` in the form `W`'s kernels read.
fn with_unit_input<W: LoraWeight, R>(
    kernel: LoraKernel,
    slots: &LoraSlots<W>,
    x: &[f32],
    f: impl FnOnce(UnitInput<'_>) -> R,
) -> R {
    if W::KIND == WeightKind::Q8 {
        q8::with_quantized(kernel, x, slots.in_dim(), |bytes, scales| {
            f(UnitInput::Q8 { bytes, scales })
        })
    } else {
        f(UnitInput::Float(x))
    }
}

fn check_len(what: &'static str, expected: usize, actual: usize) -> Result<(), LoraError> {
    if expected != actual {
        return Err(LoraError::LengthMismatch {
            what,
            expected,
            actual,
        });
    }
    Ok(())
}

fn check_multiple(what: &'static str, len: usize, dim: usize) -> Result<(), LoraError> {
    check_len(what, len.div_ceil(dim) * dim, len)
}

/// Kernel availability and `x`'s shape; returns the number of tokens.
fn check_inputs<W: LoraWeight>(
    slots: &LoraSlots<W>,
    x: &[f32],
    kernel: LoraKernel,
) -> Result<usize, LoraError> {
    if !kernel.is_available() {
        return Err(LoraError::KernelUnavailable(kernel));
    }
    check_multiple("x", x.len(), slots.in_dim())?;
    Ok(x.len() / slots.in_dim())
}

fn check_output<W: LoraWeight>(
    slots: &LoraSlots<W>,
    y: &OutputRows<'_>,
    num_tokens: usize,
) -> Result<(), LoraError> {
    let out_dim = slots.out_dim();
    if y.offset + out_dim > y.stride {
        return Err(LoraError::BadOutputRows {
            stride: y.stride,
            offset: y.offset,
            out_dim,
        });
    }
    check_len("y", num_tokens * y.stride, y.data.len())
}

/// Validates `segments` (sorted, disjoint, inside the batch, naming slots of every part; loaded
/// ones unless `empty` skips them) and cuts the ones with an adapter in some part into work units.
fn plan<W: LoraWeight>(
    parts: &[FusedPart<'_, W>],
    num_tokens: usize,
    segments: &[Segment],
    strategy: LoraStrategy,
    empty: Empty,
) -> Result<Vec<Unit>, LoraError> {
    let mut units = Vec::new();
    let mut covered = 0;
    for (index, s) in segments.iter().enumerate() {
        let end = s.start.saturating_add(s.len);
        if s.start < covered || end > num_tokens {
            return Err(LoraError::BadSegment {
                index,
                start: s.start,
                end,
                num_tokens,
            });
        }
        covered = end;
        let Some(slot) = s.slot.map(|k| k as usize) else {
            continue;
        };
        let mut any = false;
        for part in parts {
            match part.slots.weights(slot) {
                Ok(_) => any = true,
                Err(LoraError::EmptySlot { .. }) if empty == Empty::Skip => {}
                Err(e) => return Err(e),
            }
        }
        if !any {
            continue;
        }
        let per_token = match strategy {
            LoraStrategy::Bgmv => true,
            LoraStrategy::Sgmv => false,
            LoraStrategy::Auto => s.len == 1,
        };
        let chunk = if per_token { 1 } else { SGMV_CHUNK };
        for start in (s.start..end).step_by(chunk) {
            units.push(Unit {
                start,
                len: chunk.min(end - start),
                slot,
                per_token,
            });
        }
    }
    Ok(units)
}

/// Splits `data` (rows of `stride`) into each unit's rows, from `offset` of its first token to
/// `offset + width` of its last, so units can be computed in parallel.
fn carve<'d>(
    mut data: &'d mut [f32],
    stride: usize,
    offset: usize,
    width: usize,
    units: &[Unit],
) -> Vec<&'d mut [f32]> {
    let mut consumed = 0;
    let mut parts = Vec::with_capacity(units.len());
    for u in units {
        let from = u.start * stride + offset;
        let to = (u.start + u.len - 1) * stride + offset + width;
        let (_, rest) = std::mem::take(&mut data).split_at_mut(from - consumed);
        let (part, rest) = rest.split_at_mut(to - from);
        parts.push(part);
        data = rest;
        consumed = to;
    }
    parts
}

/// Runs `f` on every unit with its slice, in parallel when the batch's work is large enough.
fn run<W: LoraWeight, F>(parts: &[FusedPart<'_, W>], units: &[Unit], slices: Vec<&mut [f32]>, f: F)
where
    F: Fn(&Unit, &mut [f32]) + Sync,
{
    let cost_ns: usize = units
        .iter()
        .flat_map(|u| parts.iter().map(move |p| (u, p.slots)))
        .map(|(u, slots)| {
            let rank = slots.rank(u.slot).unwrap_or(0);
            let elems = rank * (slots.in_dim() + slots.out_dim());
            u.len * elems / MACS_PER_NS + elems * std::mem::size_of::<W>() / BYTES_PER_NS
        })
        .sum();
    if cost_ns < SERIAL_NS || units.len() < 2 || rayon::current_num_threads() < 2 {
        units.iter().zip(slices).for_each(|(u, p)| f(u, p));
    } else {
        units
            .par_iter()
            .zip(slices)
            .with_max_len(1)
            .for_each(|(u, p)| f(u, p));
    }
}

fn shrink<W: LoraWeight>(
    kernel: LoraKernel,
    u: &Unit,
    w: &SlotWeights<'_, W>,
    input: UnitInput<'_>,
    v: &mut [f32],
    v_stride: usize,
) {
    let x = match input {
        UnitInput::Q8 { bytes, scales } => {
            if let Some(w) = as_q8(w) {
                q8::shrink(kernel, w, (bytes, scales), v, v_stride);
            }
            return;
        }
        UnitInput::Float(x) => x,
    };
    #[cfg(target_arch = "x86_64")]
    if matches!(kernel, LoraKernel::Avx2 | LoraKernel::Avx512) {
        // SAFETY: callers checked `kernel.is_available()`: the CPU has AVX2, FMA and F16C
        // (Avx512 includes them).
        return unsafe { super::avx2::shrink(w, x, v, v_stride, u.tile_tokens()) };
    }
    let _ = (kernel, u);
    scalar::shrink(w, x, v, v_stride);
}

fn expand<W: LoraWeight>(
    kernel: LoraKernel,
    u: &Unit,
    w: &SlotWeights<'_, W>,
    v: &[f32],
    v_stride: usize,
    y: &mut [f32],
    y_stride: usize,
) {
    if let Some(w) = as_q8(w) {
        return q8::expand(kernel, w, (v, v_stride), u.len, y, y_stride);
    }
    #[cfg(target_arch = "x86_64")]
    if matches!(kernel, LoraKernel::Avx2 | LoraKernel::Avx512) {
        // SAFETY: callers checked `kernel.is_available()`: the CPU has AVX2, FMA and F16C
        // (Avx512 includes them).
        let tile = u.tile_tokens();
        return unsafe { super::avx2::expand(w, v, v_stride, u.len, y, y_stride, tile) };
    }
    let _ = kernel;
    scalar::expand(w, v, v_stride, u.len, y, y_stride);
}

/// The weights of a [`Q8`] store, `None` for float kinds.
fn as_q8<'a, 'w, W: LoraWeight>(w: &'a SlotWeights<'w, W>) -> Option<&'a SlotWeights<'w, Q8>> {
    if W::KIND == WeightKind::Q8 {
        // SAFETY: `W::KIND` is `Q8` only for `W = Q8` (the trait is sealed), so the types are equal.
        Some(unsafe { &*(w as *const SlotWeights<'w, W>).cast::<SlotWeights<'w, Q8>>() })
    } else {
        None
    }
}
