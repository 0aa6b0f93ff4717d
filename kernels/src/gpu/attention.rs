//! Paged attention on the device: the batch description shared by the decode and prefill
//! kernels (`cuda/params/attention.h`), and the decode launcher (`cuda/attention_decode.cu`).
//!
//! The layout is the CPU one (`crate::attention`): one layer's K and V caches are
//! `[num_blocks, block_size, num_kv_heads, head_dim]`, a sequence's tokens live in the blocks
//! its block table names, and `q`/`out` are `[num_tokens, num_heads, head_dim]`.

use super::device::{DType, Device, DeviceBuffer, GpuError};
use super::kernel::kernel_params;
use super::ops::{dim32, need};
use crate::attention::SeqAttention;

/// The sequences of one batch, on the device (u32 buffers).
///
/// Sequence `s` owns query rows `query_start[s]..query_start[s + 1]` (`num_seqs + 1` entries),
/// has `context_len[s]` tokens in its cache including this step's (already written), and its
/// block `j` is `block_tables[s * max_blocks_per_seq + j]`. The kernels trust these contents
/// (they are not read back to check): the runtime validates them as the CPU path does.
#[derive(Clone, Copy)]
pub struct PagedBatch<'a> {
    pub query_start: &'a DeviceBuffer,
    pub context_len: &'a DeviceBuffer,
    pub block_tables: &'a DeviceBuffer,
    pub num_seqs: usize,
    pub num_tokens: usize,
    pub max_blocks_per_seq: usize,
    /// The largest `context_len`: launchers size grids and splits from it.
    pub max_context_len: usize,
}

/// Head layout, cache geometry and softmax scale of an attention layer.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct AttnShape {
    pub num_heads: usize,
    pub num_kv_heads: usize,
    /// One of [`SUPPORTED_HEAD_DIMS`] (the kernels are instantiated for these).
    pub head_dim: usize,
    pub block_size: usize,
    pub num_blocks: usize,
    pub scale: f32,
}

impl AttnShape {
    /// Query heads sharing one KV head (GQA group).
    pub fn group(&self) -> usize {
        self.num_heads / self.num_kv_heads.max(1)
    }

    /// Elements in each of the K and V caches.
    pub fn cache_elems(&self) -> usize {
        self.num_blocks * self.block_size * self.num_kv_heads * self.head_dim
    }

    fn check(&self) -> Result<(), GpuError> {
        if self.num_kv_heads == 0 || !self.num_heads.is_multiple_of(self.num_kv_heads) {
            return Err(GpuError::Shape(format!(
                "num_heads ({}) must be a positive multiple of num_kv_heads ({})",
                self.num_heads, self.num_kv_heads
            )));
        }
        head_dims::kernels_for(self.head_dim)?;
        if self.block_size == 0 {
            return Err(GpuError::Shape("block_size must be positive".into()));
        }
        Ok(())
    }
}

/// Which cores run attention. On tensor cores, prefill runs `cuda/attention_prefill_tc.cu`
/// (same grid and query tiles as the CUDA-core kernel) and so do decode-only batches, split as
/// their plan says ([`paged_attention_decode_only`]); it rounds the softmax weights to the dtype
/// before their product with V (as FlashAttention does), which moves an output by at most the
/// dtype's unit roundoff times max |v|.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum AttentionKernel {
    /// f32 FMAs on CUDA cores, every supported head dim.
    CudaCores,
    /// mma.sync on tensor cores for head dims up to 128; larger ones run on CUDA cores. The
    /// default: on the H200 it ran prefill attention 5.7x and batch-256 decode attention 1.5x
    /// faster than the CUDA-core kernels (docs/benchmarking.md).
    #[default]
    TensorCores,
}

impl AttentionKernel {
    /// Every kernel, in the order of their names.
    pub const ALL: [AttentionKernel; 2] =
        [AttentionKernel::CudaCores, AttentionKernel::TensorCores];

    /// The name configs and reports use.
    pub fn name(self) -> &'static str {
        match self {
            AttentionKernel::CudaCores => "cuda_cores",
            AttentionKernel::TensorCores => "tensor_cores",
        }
    }

    /// The kernel a [`AttentionKernel::name`] names.
    pub fn from_name(s: &str) -> Option<AttentionKernel> {
        Self::ALL.into_iter().find(|k| k.name() == s)
    }
}

/// Device buffers of a [`PagedBatch`] built from the CPU description of a batch.
pub struct PagedBatchBuffers {
    pub query_start: DeviceBuffer,
    pub context_len: DeviceBuffer,
    pub block_tables: DeviceBuffer,
    pub num_seqs: usize,
    pub num_tokens: usize,
    pub max_blocks_per_seq: usize,
    pub max_context_len: usize,
}

impl PagedBatchBuffers {
    /// Uploads `seqs` (the CPU kernels' batch). Their query rows must be consecutive in order
    /// (`seqs[s].query_start` = the sum of the earlier query lengths), as the device form stores
    /// cumulative offsets; block table rows are padded with block 0 to the longest.
    pub fn upload(dev: &Device, seqs: &[SeqAttention<'_>]) -> Result<Self, GpuError> {
        let mut starts = Vec::with_capacity(seqs.len() + 1);
        let mut next = 0usize;
        for (i, s) in seqs.iter().enumerate() {
            if s.query_start != next {
                return Err(GpuError::Shape(format!(
                    "sequence {i} starts at query row {}, expected {next} (rows must be consecutive)",
                    s.query_start
                )));
            }
            starts.push(dim32("query_start", next)?);
            next += s.query_len;
        }
        starts.push(dim32("num_tokens", next)?);
        let max_blocks = seqs.iter().map(|s| s.block_table.len()).max().unwrap_or(0);
        let mut tables = vec![0u32; seqs.len() * max_blocks];
        for (row, s) in tables.chunks_exact_mut(max_blocks.max(1)).zip(seqs) {
            row[..s.block_table.len()].copy_from_slice(s.block_table);
        }
        let context: Vec<u32> = seqs
            .iter()
            .map(|s| dim32("context_len", s.context_len))
            .collect::<Result<_, _>>()?;
        Ok(PagedBatchBuffers {
            query_start: dev.upload(&starts)?,
            context_len: dev.upload(&context)?,
            block_tables: dev.upload(&tables)?,
            num_seqs: seqs.len(),
            num_tokens: next,
            max_blocks_per_seq: max_blocks,
            max_context_len: seqs.iter().map(|s| s.context_len).max().unwrap_or(0),
        })
    }

    /// The batch the launchers take.
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

/// `CadPagedBatch` in `params/attention.h`.
#[repr(C)]
#[derive(Clone, Copy, Debug)]
pub(crate) struct PagedBatchParams {
    pub query_start: u64,
    pub context_len: u64,
    pub block_tables: u64,
    pub num_seqs: u32,
    pub num_tokens: u32,
    pub max_blocks_per_seq: u32,
    pub max_context_len: u32,
}

/// `CadAttnShape` in `params/attention.h`.
#[repr(C)]
#[derive(Clone, Copy, Debug)]
pub(crate) struct AttnShapeParams {
    pub num_heads: u32,
    pub num_kv_heads: u32,
    pub head_dim: u32,
    pub block_size: u32,
    pub num_blocks: u32,
    pub scale: f32,
}

/// `CadPagedAttnParams` in `params/attention.h`: one paged attention call.
#[repr(C)]
#[derive(Clone, Copy, Debug)]
pub(crate) struct PagedAttnParams {
    pub q: u64,
    pub k_cache: u64,
    pub v_cache: u64,
    pub out: u64,
    pub batch: PagedBatchParams,
    pub shape: AttnShapeParams,
}

kernel_params!(PagedAttnParams);

/// The buffers of one paged attention call.
#[derive(Clone, Copy)]
pub struct PagedAttnArgs<'a> {
    /// `[num_tokens, num_heads, head_dim]`.
    pub q: &'a DeviceBuffer,
    pub k_cache: &'a DeviceBuffer,
    pub v_cache: &'a DeviceBuffer,
    /// Same shape as `q`.
    pub out: &'a DeviceBuffer,
    pub batch: PagedBatch<'a>,
    pub shape: AttnShape,
}

impl PagedAttnArgs<'_> {
    /// Refuses a q, out or cache buffer that is not 16-byte aligned: `kernel` reads and writes
    /// them as 16-byte vectors.
    pub(crate) fn check_aligned(&self, kernel: &str) -> Result<(), GpuError> {
        for (what, b) in [
            ("q", self.q),
            ("out", self.out),
            ("k_cache", self.k_cache),
            ("v_cache", self.v_cache),
        ] {
            if b.ptr() % 16 != 0 {
                return Err(GpuError::Shape(format!(
                    "{kernel} {what}: the kernel reads 16-byte vectors, address is not 16-byte \
                     aligned"
                )));
            }
        }
        Ok(())
    }

    /// Checks every buffer against the shapes and packs the kernel parameters.
    pub(crate) fn params(&self, dtype: DType) -> Result<PagedAttnParams, GpuError> {
        let (s, b) = (&self.shape, &self.batch);
        s.check()?;
        let es = dtype.size();
        let q_elems = b.num_tokens * s.num_heads * s.head_dim;
        need("attention q", self.q, q_elems, es)?;
        need("attention out", self.out, q_elems, es)?;
        need("attention k_cache", self.k_cache, s.cache_elems(), es)?;
        need("attention v_cache", self.v_cache, s.cache_elems(), es)?;
        need("attention query_start", b.query_start, b.num_seqs + 1, 4)?;
        need("attention context_len", b.context_len, b.num_seqs, 4)?;
        need(
            "attention block_tables",
            b.block_tables,
            b.num_seqs * b.max_blocks_per_seq,
            4,
        )?;
        if b.max_context_len > b.max_blocks_per_seq * s.block_size {
            return Err(GpuError::Shape(format!(
                "max_context_len {} needs more than {} blocks of {}",
                b.max_context_len, b.max_blocks_per_seq, s.block_size
            )));
        }
        Ok(PagedAttnParams {
            q: self.q.ptr(),
            k_cache: self.k_cache.ptr(),
            v_cache: self.v_cache.ptr(),
            out: self.out.ptr(),
            batch: PagedBatchParams {
                query_start: b.query_start.ptr(),
                context_len: b.context_len.ptr(),
                block_tables: b.block_tables.ptr(),
                num_seqs: dim32("num_seqs", b.num_seqs)?,
                num_tokens: dim32("num_tokens", b.num_tokens)?,
                max_blocks_per_seq: dim32("max_blocks_per_seq", b.max_blocks_per_seq)?,
                max_context_len: dim32("max_context_len", b.max_context_len)?,
            },
            shape: AttnShapeParams {
                num_heads: dim32("num_heads", s.num_heads)?,
                num_kv_heads: dim32("num_kv_heads", s.num_kv_heads)?,
                head_dim: dim32("head_dim", s.head_dim)?,
                block_size: dim32("block_size", s.block_size)?,
                num_blocks: dim32("num_blocks", s.num_blocks)?,
                scale: s.scale,
            },
        })
    }
}

// ---- decode (cuda/attention_decode.cu, cuda/attention_decode_tc.cu) ----
pub(crate) mod decode;
pub use decode::{
    paged_attention_decode, paged_attention_decode_only, paged_attention_decode_tc, DecodePlan,
    DecodeSplit, TensorCoreDecode,
};

pub(crate) mod head_dims;
pub use head_dims::SUPPORTED_HEAD_DIMS;
