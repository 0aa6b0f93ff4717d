//! Launcher of `cuda/attention_prefill.cu`: paged attention for prefill chunks, flash style.
//!
//! One launch attends every query token of a flattened batch (prefill chunks, prefix-cache hits
//! and decode rows alike) causally over its sequence's paged KV cache, which already holds this
//! step's keys and values. The CPU twin is [`crate::paged_attention`].

use super::device::{DType, Device, DeviceBuffer, GpuError};
use super::kernel::{kernel_fn, kernel_params, KernelFn, LaunchDims};
use super::ops::{by_dtype, dim32, need};

/// (token, query head) rows per CTA; `kRows` in the kernel.
const TILE_ROWS: usize = 64;
/// Threads per CTA; `kThreads` in the kernel.
const THREADS: u32 = 128;

#[repr(C)]
#[derive(Clone, Copy, Debug)]
struct PagedPrefillParams {
    q: u64,
    k_cache: u64,
    v_cache: u64,
    out: u64,
    query_start: u64,
    context_len: u64,
    block_tables: u64,
    num_seqs: u32,
    num_tokens: u32,
    max_blocks_per_seq: u32,
    num_heads: u32,
    num_kv_heads: u32,
    block_size: u32,
    num_blocks: u32,
    scale: f32,
}

kernel_params!(PagedPrefillParams);

const PREFILL_D64: [KernelFn; 2] = [
    kernel_fn!(cad_paged_attention_prefill_d64_bf16),
    kernel_fn!(cad_paged_attention_prefill_d64_f16),
];
const PREFILL_D128: [KernelFn; 2] = [
    kernel_fn!(cad_paged_attention_prefill_d128_bf16),
    kernel_fn!(cad_paged_attention_prefill_d128_f16),
];

/// The activations and the layer's KV cache of one [`paged_attention_prefill`] call.
pub struct PrefillBuffers<'a> {
    /// `[num_tokens, num_heads, head_dim]`.
    pub q: &'a DeviceBuffer,
    /// `[num_blocks, block_size, num_kv_heads, head_dim]`, this step's keys already written.
    pub k_cache: &'a DeviceBuffer,
    /// Same layout as `k_cache`.
    pub v_cache: &'a DeviceBuffer,
    /// `[num_tokens, num_heads, head_dim]`; rows of no sequence are left unchanged.
    pub out: &'a DeviceBuffer,
}

/// Query tokens per CTA for a GQA group of `group` heads (the rows of a tile are
/// tokens x heads of the group).
fn tile_tokens(group: usize) -> usize {
    TILE_ROWS / group
}

/// Causal paged attention of every query token in `batch` (any query_len >= 1, any number
/// of cached tokens before it); see the module doc. Checks every buffer against the shape; the
/// batch's contents (block ids, lengths) are the runtime's to validate, and a sequence whose
/// context exceeds its block table is skipped rather than read out of bounds.
pub fn paged_attention_prefill(
    dev: &Device,
    dtype: DType,
    bufs: &PrefillBuffers<'_>,
    batch: &PagedBatch<'_>,
    shape: &AttnShape,
) -> Result<(), GpuError> {
    let family = match shape.head_dim {
        64 => &PREFILL_D64,
        128 => &PREFILL_D128,
        d => {
            return Err(GpuError::Shape(format!(
                "paged_attention_prefill: head_dim {d} is not supported (64 or 128)"
            )))
        }
    };
    let nkv = shape.num_kv_heads;
    if nkv == 0 || !shape.num_heads.is_multiple_of(nkv) || shape.num_heads / nkv > TILE_ROWS {
        return Err(GpuError::Shape(format!(
            "paged_attention_prefill: num_heads {} must be a multiple of num_kv_heads {nkv}, \
             at most {TILE_ROWS} per KV head",
            shape.num_heads
        )));
    }
    if shape.block_size == 0 {
        return Err(GpuError::Shape(
            "paged_attention_prefill: block_size must be positive".into(),
        ));
    }
    if batch.num_seqs == 0 {
        return Ok(());
    }
    let es = dtype.size();
    let q_elems = batch.num_tokens * shape.num_heads * shape.head_dim;
    let cache_elems = shape.num_blocks * shape.block_size * nkv * shape.head_dim;
    need("paged_attention_prefill q", bufs.q, q_elems, es)?;
    need("paged_attention_prefill out", bufs.out, q_elems, es)?;
    need(
        "paged_attention_prefill k_cache",
        bufs.k_cache,
        cache_elems,
        es,
    )?;
    need(
        "paged_attention_prefill v_cache",
        bufs.v_cache,
        cache_elems,
        es,
    )?;
    need(
        "paged_attention_prefill query_start",
        batch.query_start,
        batch.num_seqs + 1,
        4,
    )?;
    need(
        "paged_attention_prefill context_len",
        batch.context_len,
        batch.num_seqs,
        4,
    )?;
    need(
        "paged_attention_prefill block_tables",
        batch.block_tables,
        batch.num_seqs * batch.max_blocks_per_seq,
        4,
    )?;
    for (what, b) in [
        ("q", bufs.q),
        ("out", bufs.out),
        ("k_cache", bufs.k_cache),
        ("v_cache", bufs.v_cache),
    ] {
        if b.ptr() % 16 != 0 {
            return Err(GpuError::Shape(format!(
                "paged_attention_prefill {what}: the kernel reads 16-byte vectors, address is not \
                 16-byte aligned"
            )));
        }
    }
    dim32(
        "max_blocks_per_seq * block_size",
        batch.max_blocks_per_seq * shape.block_size,
    )?;
    let group = shape.num_heads / nkv;
    // Each sequence gets `query_start / tile_tokens` .. the next one's start (see the kernel).
    let tiles = batch.num_tokens / tile_tokens(group) + batch.num_seqs;
    let p = PagedPrefillParams {
        q: bufs.q.ptr(),
        k_cache: bufs.k_cache.ptr(),
        v_cache: bufs.v_cache.ptr(),
        out: bufs.out.ptr(),
        query_start: batch.query_start.ptr(),
        context_len: batch.context_len.ptr(),
        block_tables: batch.block_tables.ptr(),
        num_seqs: dim32("num_seqs", batch.num_seqs)?,
        num_tokens: dim32("num_tokens", batch.num_tokens)?,
        max_blocks_per_seq: dim32("max_blocks_per_seq", batch.max_blocks_per_seq)?,
        num_heads: dim32("num_heads", shape.num_heads)?,
        num_kv_heads: dim32("num_kv_heads", nkv)?,
        block_size: dim32("block_size", shape.block_size)?,
        num_blocks: dim32("num_blocks", shape.num_blocks)?,
        scale: shape.scale,
    };
    if tiles > i32::MAX as usize || nkv > 65_535 {
        return Err(GpuError::Shape(format!(
            "paged_attention_prefill: grid of {tiles} x {nkv} CTAs is too large"
        )));
    }
    let dims = LaunchDims {
        grid: (tiles as u32, p.num_kv_heads, 1),
        block: (THREADS, 1, 1),
        shared_bytes: 0,
    };
    dev.launch(by_dtype(family, dtype), dims, &p)
}

// ---- Stand-in for the shared batch description of `gpu::attention` (branch gpu-attn), written
// ---- to its spec; replaced by `use super::attention::{..}` once that lands.

/// A flattened batch of sequences on the device, as the attention kernels read it.
pub struct PagedBatch<'a> {
    /// `num_seqs + 1` u32 cumulative query token offsets.
    pub query_start: &'a DeviceBuffer,
    /// `num_seqs` u32: tokens in each sequence's cache, this step's included.
    pub context_len: &'a DeviceBuffer,
    /// `[num_seqs, max_blocks_per_seq]` u32 block ids.
    pub block_tables: &'a DeviceBuffer,
    pub num_seqs: usize,
    pub num_tokens: usize,
    pub max_blocks_per_seq: usize,
    pub max_context_len: usize,
}

/// Head layout, cache geometry and softmax scale of an attention layer on the device.
#[derive(Clone, Copy, Debug)]
pub struct AttnShape {
    pub num_heads: usize,
    pub num_kv_heads: usize,
    pub head_dim: usize,
    pub block_size: usize,
    pub num_blocks: usize,
    pub scale: f32,
}

/// The device buffers of a [`PagedBatch`], built from the CPU's [`crate::SeqAttention`] list.
pub struct PagedBatchBuffers {
    query_start: DeviceBuffer,
    context_len: DeviceBuffer,
    block_tables: DeviceBuffer,
    num_seqs: usize,
    num_tokens: usize,
    max_blocks_per_seq: usize,
    max_context_len: usize,
}

impl PagedBatchBuffers {
    /// Uploads `seqs` (consecutive query rows from 0, as the engine lays them out).
    pub fn upload(
        dev: &Device,
        seqs: &[crate::SeqAttention<'_>],
        block_size: usize,
    ) -> Result<PagedBatchBuffers, GpuError> {
        let mut query_start = vec![0u32];
        for (i, s) in seqs.iter().enumerate() {
            let start = query_start[i] as usize;
            if s.query_start != start {
                return Err(GpuError::Shape(format!(
                    "sequence {i}: query rows start at {}, expected {start}",
                    s.query_start
                )));
            }
            query_start.push(dim32("query_start", start + s.query_len)?);
        }
        let max_blocks = seqs
            .iter()
            .map(|s| s.context_len.div_ceil(block_size.max(1)))
            .max()
            .unwrap_or(0)
            .max(1);
        let mut tables = vec![0u32; seqs.len() * max_blocks];
        for (i, s) in seqs.iter().enumerate() {
            let n = s.context_len.div_ceil(block_size.max(1));
            let row = s.block_table.get(..n).ok_or_else(|| {
                GpuError::Shape(format!(
                    "sequence {i}: block table shorter than its context"
                ))
            })?;
            tables[i * max_blocks..i * max_blocks + n].copy_from_slice(row);
        }
        let context_len = seqs
            .iter()
            .map(|s| dim32("context_len", s.context_len))
            .collect::<Result<Vec<_>, _>>()?;
        Ok(PagedBatchBuffers {
            num_tokens: *query_start.last().unwrap_or(&0) as usize,
            query_start: dev.upload(&query_start)?,
            context_len: dev.upload(&context_len)?,
            block_tables: dev.upload(&tables)?,
            num_seqs: seqs.len(),
            max_blocks_per_seq: max_blocks,
            max_context_len: seqs.iter().map(|s| s.context_len).max().unwrap_or(0),
        })
    }

    /// The batch the kernels take.
    pub fn batch(&self) -> PagedBatch<'_> {
        PagedBatch {
            query_start: &self.query_start,
            context_len: &self.context_len,
            block_tables: &self.block_tables,
            num_seqs: self.num_seqs,
            num_tokens: self.num_tokens,
            max_blocks_per_seq: self.max_blocks_per_seq,
            max_context_len: self.max_context_len,
        }
    }
}
