//! Launcher of the prefill attention kernels: paged attention for prefill chunks, flash style,
//! on CUDA cores (`cuda/attention_prefill.cu`) or tensor cores (`cuda/attention_prefill_tc.cu`).
//!
//! One launch attends every query token of a flattened batch (prefill chunks, prefix-cache hits
//! and decode rows alike) causally over its sequence's paged KV cache, which already holds this
//! step's keys and values. The CPU twin is [`crate::paged_attention`].
//!
//! The grid is (query tiles, KV heads): a tile is 64 (token, query head) rows of one sequence
//! (32 for head_dim 256), i.e. `rows / group` tokens with all heads of their GQA group, so it
//! fills the GPU when the batch has a few hundred query tokens. A short chunk over a long cached
//! prefix gives few CTAs that each walk the whole context: prefill has no split over the context
//! yet. The tensor-core kernel also runs decode-only batches, split over the context by the
//! decode plan (grid z, [`super::attention::paged_attention_decode_only`]).

use super::attention::decode::DecodeParams;
use super::attention::head_dims::{prefill_tc_shared_bytes, PREFILL_TC_ROWS};
use super::attention::{head_dims, AttentionKernel, PagedAttnArgs};
use super::device::{DType, Device, GpuError};
use super::kernel::{KernelFn, LaunchDims};
use super::ops::{by_dtype, dim32};

/// Threads per CTA; `kThreads` in both kernels.
const THREADS: u32 = 128;

/// Causal paged attention of every query token in `args.batch` (any query_len >= 1, any number
/// of cached tokens before it) with `kernel`; see the module doc. Checks every buffer against the
/// shape; the batch's contents (block ids, lengths) are the runtime's to validate, and a sequence
/// whose context exceeds its block table is skipped rather than read out of bounds.
pub fn paged_attention_prefill(
    dev: &Device,
    dtype: DType,
    args: &PagedAttnArgs<'_>,
    kernel: AttentionKernel,
) -> Result<(), GpuError> {
    let p = args.params(dtype)?;
    let kernels = head_dims::kernels_for(args.shape.head_dim)?;
    match (kernel, &kernels.prefill_tc) {
        (AttentionKernel::TensorCores, Some(tc)) => {
            launch_tensor_cores(dev, dtype, args, tc, &DecodeParams::unsplit(p))
        }
        _ => {
            let Some(grid) = query_grid(args, kernels.prefill_rows, 1)? else {
                return Ok(());
            };
            dev.launch(by_dtype(&kernels.prefill, dtype), grid, &p)
        }
    }
}

/// Launches the tensor-core kernel `family` with `p` (its grid z = `p.num_splits`).
pub(crate) fn launch_tensor_cores(
    dev: &Device,
    dtype: DType,
    args: &PagedAttnArgs<'_>,
    family: &[KernelFn; 2],
    p: &DecodeParams,
) -> Result<(), GpuError> {
    let Some(mut dims) = query_grid(args, PREFILL_TC_ROWS, p.num_splits)? else {
        return Ok(());
    };
    dims.shared_bytes = prefill_tc_shared_bytes(args.shape.head_dim, dtype);
    dev.launch(by_dtype(family, dtype), dims, p)
}

/// The grid of a kernel with `tile_rows` (token, query head) rows per CTA: (query tiles, KV
/// heads, `splits`), after the checks both kernels need; `None` for an empty batch.
fn query_grid(
    args: &PagedAttnArgs<'_>,
    tile_rows: usize,
    splits: u32,
) -> Result<Option<LaunchDims>, GpuError> {
    let shape = &args.shape;
    let group = shape.group();
    if group > tile_rows {
        return Err(GpuError::Shape(format!(
            "paged_attention_prefill: {group} query heads per KV head, at most {tile_rows} \
             with head_dim {}",
            shape.head_dim
        )));
    }
    args.check_aligned("paged_attention_prefill")?;
    // The kernel bounds each context by the block table in u32.
    dim32(
        "max_blocks_per_seq * block_size",
        args.batch.max_blocks_per_seq * shape.block_size,
    )?;
    let batch = &args.batch;
    if batch.num_seqs == 0 {
        return Ok(None);
    }
    // Sequence s owns tiles query_start[s] / (tile_rows / group) + s up to the next sequence's first.
    let tiles = batch.num_tokens / (tile_rows / group) + batch.num_seqs;
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
    Ok(Some(LaunchDims {
        grid: (tiles, dim32("num_kv_heads", shape.num_kv_heads)?, splits),
        block: (THREADS, 1, 1),
        shared_bytes: 0,
    }))
}
