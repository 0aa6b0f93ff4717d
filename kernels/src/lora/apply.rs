//! Entry points: check a batch against its slot store, cut its segments into work units (one token
//! each on the BGMV path, up to [`SGMV_CHUNK`] tokens on the SGMV path), and run the units, across
//! the rayon pool when there is enough work to pay for it.

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
    let units = plan(slots, num_tokens, segments, strategy)?;
    let (in_dim, out_dim) = (slots.in_dim(), slots.out_dim());
    let ys = carve(y.data, y.stride, y.offset, out_dim, &units);
    run(&units, ys, |u, yu| {
        let w = &u.weights;
        let xu = &x[u.start * in_dim..][..u.len * in_dim];
        V_SCRATCH.with(|cell| {
            let mut buf = cell.borrow_mut();
            let n = u.len * w.rank;
            if buf.len() < n {
                buf.resize(n, 0.0);
            }
            // Every value is written by the shrink before the expand reads it.
            shrink(kernel, u, xu, &mut buf[..n], w.rank);
            expand(kernel, u, &buf[..n], w.rank, yu, y.stride);
        });
    });
    Ok(())
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
    let units = plan(slots, num_tokens, segments, strategy)?;
    let in_dim = slots.in_dim();
    let vs = carve(v, max_rank, 0, max_rank, &units);
    run(&units, vs, |u, vu| {
        let xu = &x[u.start * in_dim..][..u.len * in_dim];
        shrink(kernel, u, xu, vu, max_rank)
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
    let units = plan(slots, num_tokens, segments, strategy)?;
    let ys = carve(y.data, y.stride, y.offset, slots.out_dim(), &units);
    run(&units, ys, |u, yu| {
        expand(kernel, u, &v[u.start * max_rank..], max_rank, yu, y.stride)
    });
    Ok(())
}

/// Consecutive tokens computed together against one adapter.
struct Unit<'a, W> {
    start: usize,
    len: usize,
    weights: SlotWeights<'a, W>,
    /// BGMV (tiles of one token) rather than SGMV.
    per_token: bool,
}

impl<W> Unit<'_, W> {
    fn tile_tokens(&self) -> usize {
        if self.per_token {
            1
        } else {
            usize::MAX
        }
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

/// Validates `segments` (sorted, disjoint, inside the batch, naming loaded slots) and cuts the
/// ones with an adapter into work units.
fn plan<'a, W: LoraWeight>(
    slots: &'a LoraSlots<W>,
    num_tokens: usize,
    segments: &[Segment],
    strategy: LoraStrategy,
) -> Result<Vec<Unit<'a, W>>, LoraError> {
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
        let Some(slot) = s.slot else { continue };
        let weights = slots.weights(slot as usize)?;
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
                weights,
                per_token,
            });
        }
    }
    Ok(units)
}

/// Splits `data` (rows of `stride`) into each unit's rows, from `offset` of its first token to
/// `offset + width` of its last, so units can be computed in parallel.
fn carve<'d, W>(
    mut data: &'d mut [f32],
    stride: usize,
    offset: usize,
    width: usize,
    units: &[Unit<'_, W>],
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
fn run<W: LoraWeight, F>(units: &[Unit<'_, W>], parts: Vec<&mut [f32]>, f: F)
where
    F: Fn(&Unit<'_, W>, &mut [f32]) + Sync,
{
    let cost_ns: usize = units
        .iter()
        .map(|u| {
            let elems = u.weights.rank * (u.weights.in_dim + u.weights.out_dim);
            u.len * elems / MACS_PER_NS + elems * std::mem::size_of::<W>() / BYTES_PER_NS
        })
        .sum();
    if cost_ns < SERIAL_NS || units.len() < 2 || rayon::current_num_threads() < 2 {
        units.iter().zip(parts).for_each(|(u, p)| f(u, p));
    } else {
        units
            .par_iter()
            .zip(parts)
            .with_max_len(1)
            .for_each(|(u, p)| f(u, p));
    }
}

fn shrink<W: LoraWeight>(
    kernel: LoraKernel,
    u: &Unit<'_, W>,
    x: &[f32],
    v: &mut [f32],
    v_stride: usize,
) {
    if let Some(w) = as_q8(&u.weights) {
        return q8::shrink(kernel, w, x, v, v_stride);
    }
    #[cfg(target_arch = "x86_64")]
    if matches!(kernel, LoraKernel::Avx2 | LoraKernel::Avx512) {
        // SAFETY: callers checked `kernel.is_available()`: the CPU has AVX2, FMA and F16C
        // (Avx512 includes them).
        return unsafe { super::avx2::shrink(&u.weights, x, v, v_stride, u.tile_tokens()) };
    }
    let _ = kernel;
    scalar::shrink(&u.weights, x, v, v_stride);
}

fn expand<W: LoraWeight>(
    kernel: LoraKernel,
    u: &Unit<'_, W>,
    v: &[f32],
    v_stride: usize,
    y: &mut [f32],
    y_stride: usize,
) {
    if let Some(w) = as_q8(&u.weights) {
        return q8::expand(kernel, w, (v, v_stride), u.len, y, y_stride);
    }
    #[cfg(target_arch = "x86_64")]
    if matches!(kernel, LoraKernel::Avx2 | LoraKernel::Avx512) {
        // SAFETY: callers checked `kernel.is_available()`: the CPU has AVX2, FMA and F16C
        // (Avx512 includes them).
        let tile = u.tile_tokens();
        return unsafe { super::avx2::expand(&u.weights, v, v_stride, u.len, y, y_stride, tile) };
    }
    let _ = kernel;
    scalar::expand(&u.weights, v, v_stride, u.len, y, y_stride);
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
