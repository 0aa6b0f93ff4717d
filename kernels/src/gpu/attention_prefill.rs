//! Launcher of `cuda/attention_prefill.cu`: paged attention for prefill chunks, flash style.
//!
//! One launch attends every query token of a flattened batch (prefill chunks, prefix-cache hits
//! and decode rows alike) causally over its sequence's paged KV cache, which already holds this
//! step's keys and values. The CPU twin is [`crate::paged_attention`].
//!
//! The grid is (query tiles, KV heads): a tile is 64 (token, query head) rows of one sequence,
//! i.e. `64 / group` tokens with all heads of their GQA group, so it fills the GPU when the batch
//! has a few hundred query tokens. A short chunk over a long cached prefix gives few CTAs that
//! each walk the whole context; decode-only batches belong to the decode kernel (split-K), and
//! this kernel has no split over the context yet.

use super::attention::PagedAttnArgs;
use super::device::{DType, Device, GpuError};
use super::kernel::{kernel_fn, KernelFn, LaunchDims};
use super::ops::{by_dtype, dim32};

/// (token, query head) rows per CTA; `kRows` in the kernel.
const TILE_ROWS: usize = 64;
/// Threads per CTA; `kThreads` in the kernel.
const THREADS: u32 = 128;

const PREFILL_D64: [KernelFn; 2] = [
    kernel_fn!(cad_paged_attention_prefill_d64_bf16),
    kernel_fn!(cad_paged_attention_prefill_d64_f16),
];
const PREFILL_D128: [KernelFn; 2] = [
    kernel_fn!(cad_paged_attention_prefill_d128_bf16),
    kernel_fn!(cad_paged_attention_prefill_d128_f16),
];

/// Query tokens per CTA for a GQA group of `group` heads (the rows of a tile are
/// tokens x heads of the group).
fn tile_tokens(group: usize) -> usize {
    TILE_ROWS / group
}

/// Causal paged attention of every query token in `args.batch` (any query_len >= 1, any number
/// of cached tokens before it); see the module doc. Checks every buffer against the shape; the
/// batch's contents (block ids, lengths) are the runtime's to validate, and a sequence whose
/// context exceeds its block table is skipped rather than read out of bounds.
pub fn paged_attention_prefill(
    dev: &Device,
    dtype: DType,
    args: &PagedAttnArgs<'_>,
) -> Result<(), GpuError> {
    let p = args.params(dtype)?;
    let shape = &args.shape;
    let group = shape.group();
    if group > TILE_ROWS {
        return Err(GpuError::Shape(format!(
            "paged_attention_prefill: {group} query heads per KV head, at most {TILE_ROWS}"
        )));
    }
    for (what, b) in [
        ("q", args.q),
        ("out", args.out),
        ("k_cache", args.k_cache),
        ("v_cache", args.v_cache),
    ] {
        if b.ptr() % 16 != 0 {
            return Err(GpuError::Shape(format!(
                "paged_attention_prefill {what}: the kernel reads 16-byte vectors, address is not \
                 16-byte aligned"
            )));
        }
    }
    // The kernel bounds each context by the block table in u32.
    dim32(
        "max_blocks_per_seq * block_size",
        args.batch.max_blocks_per_seq * shape.block_size,
    )?;
    let family = if shape.head_dim == 64 {
        &PREFILL_D64
    } else {
        &PREFILL_D128
    };
    let batch = &args.batch;
    if batch.num_seqs == 0 {
        return Ok(());
    }
    // Sequence s owns tiles query_start[s] / tile_tokens + s up to the next sequence's first.
    let tiles = batch.num_tokens / tile_tokens(group) + batch.num_seqs;
    let tiles = u32::try_from(tiles)
        .ok()
        .filter(|&t| t <= i32::MAX as u32)
        .ok_or_else(|| GpuError::Shape(format!("paged_attention_prefill: {tiles} query tiles")))?;
    if shape.num_kv_heads > 65_535 {
        return Err(GpuError::Shape(format!(
            "paged_attention_prefill: {} KV heads exceed the grid's y",
            shape.num_kv_heads
        )));
    }
    let dims = LaunchDims {
        grid: (tiles, p.shape.num_kv_heads, 1),
        block: (THREADS, 1, 1),
        shared_bytes: 0,
    };
    dev.launch(by_dtype(family, dtype), dims, &p)
}
