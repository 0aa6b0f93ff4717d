//! Launcher of `cuda/attention_decode.cu`: paged attention for decode tokens, GQA-aware, with
//! split-K over the context and a log-sum-exp merge when the batch alone cannot fill the GPU.

use super::head_dims::{decode_tc_shared_bytes, DECODE_TC_MAX_GROUP};
use super::{AttentionKernel, AttnShape, PagedAttnArgs, PagedAttnParams, PagedBatch};
use crate::gpu::attention_prefill::launch_tensor_cores;
use crate::gpu::device::{DType, Device, DeviceBuffer, GpuError};
use crate::gpu::kernel::{kernel_fn, kernel_params, KernelFn, LaunchDims};
use crate::gpu::ops::{by_dtype, dim32, need};

/// `CadDecodeParams` in `cuda/params/attention.h`: the decode kernel's, and the tensor-core
/// kernel's (`attention_prefill_tc.cu`).
#[repr(C)]
#[derive(Clone, Copy, Debug)]
pub(crate) struct DecodeParams {
    pub attn: PagedAttnParams,
    partial_out: u64,
    partial_lse: u64,
    pub num_splits: u32,
    tokens_per_split: u32,
}

impl DecodeParams {
    /// One partition covering every context: no workspace, no merge.
    pub(crate) fn unsplit(attn: PagedAttnParams) -> DecodeParams {
        DecodeParams {
            attn,
            partial_out: 0,
            partial_lse: 0,
            num_splits: 1,
            tokens_per_split: u32::MAX,
        }
    }

    /// The parameters of a launch under `plan`, checked against the batch (the plan covers its
    /// longest context, and fits the grid) and the workspace (present and large enough when the
    /// plan splits).
    fn new(
        a: &PagedAttnArgs<'_>,
        dtype: DType,
        plan: &DecodePlan,
        workspace: Option<&DeviceBuffer>,
    ) -> Result<DecodeParams, GpuError> {
        let attn = a.params(dtype)?;
        let s = &a.shape;
        if plan.tokens_per_split == 0 || !plan.tokens_per_split.is_multiple_of(TILE) {
            return Err(GpuError::Shape(format!(
                "decode: tokens_per_split {} must be a positive multiple of {TILE}",
                plan.tokens_per_split
            )));
        }
        if plan.num_splits == 0 || plan.num_splits * plan.tokens_per_split < a.batch.max_context_len
        {
            return Err(GpuError::Shape(format!(
                "decode: {} splits of {} tokens do not cover a context of {}",
                plan.num_splits, plan.tokens_per_split, a.batch.max_context_len
            )));
        }
        if a.batch.num_seqs > MAX_GRID_YZ || plan.num_splits > MAX_GRID_YZ {
            return Err(GpuError::Shape(format!(
                "decode: {} sequences x {} splits exceed the grid",
                a.batch.num_seqs, plan.num_splits
            )));
        }
        let (partial_out, partial_lse) = match (plan.num_splits > 1, workspace) {
            (false, _) => (0, 0),
            (true, None) => {
                return Err(GpuError::Shape(
                    "decode: a split plan needs a workspace".into(),
                ))
            }
            (true, Some(ws)) => {
                let bytes = plan.workspace_bytes(a.batch.num_tokens, s);
                need("decode workspace", ws, bytes, 1)?;
                let out_bytes = a.batch.num_tokens * s.num_heads * plan.num_splits * s.head_dim * 4;
                (ws.ptr(), ws.ptr_at(out_bytes)?)
            }
        };
        Ok(DecodeParams {
            attn,
            partial_out,
            partial_lse,
            num_splits: dim32("num_splits", plan.num_splits)?,
            tokens_per_split: dim32("tokens_per_split", plan.tokens_per_split)?,
        })
    }
}

kernel_params!(DecodeParams);

const MERGE: [KernelFn; 2] = [
    kernel_fn!(cad_paged_decode_merge_bf16),
    kernel_fn!(cad_paged_decode_merge_f16),
];

/// Threads per decode CTA and tokens per shared-memory tile (as in the kernel).
const THREADS: usize = 128;
const TILE: usize = 32;
/// SMs of an H100/H200 SXM.
const NUM_SMS: usize = 132;
/// CTAs wanted in flight: a few per SM, so each SM has enough loads outstanding to stream
/// the KV cache at full bandwidth (a decode CTA holds ~20 KB of shared memory and 128 threads).
const TARGET_CTAS: usize = 4 * NUM_SMS;
/// Shortest split Auto makes (two tiles): below this the merge and the per-CTA setup outweigh the
/// gain. At batch 1 and a 1k context on an 8-KV-head model it gives 16 splits, 128 CTAs: about
/// one per SM, each with both its tiles' loads in flight at once (256 gave 32 CTAs, a quarter of
/// the SMs streaming the cache).
const MIN_SPLIT_TOKENS: usize = 64;
/// CUDA's limit on grid y and z.
const MAX_GRID_YZ: usize = 65_535;

/// How the context of each sequence is partitioned among CTAs.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum DecodeSplit {
    /// Split only when sequences × KV heads leave the GPU's SMs idle.
    Auto,
    /// One partition per sequence (no merge kernel).
    Off,
    /// Partitions of this many tokens (rounded up to the 32-token tile).
    Tokens(usize),
}

/// The partition of a decode launch, and the workspace it needs.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct DecodePlan {
    pub num_splits: usize,
    pub tokens_per_split: usize,
}

impl DecodePlan {
    /// Picks the partition for `batch` (from its `max_context_len`).
    pub fn new(batch: &PagedBatch<'_>, shape: &AttnShape, split: DecodeSplit) -> DecodePlan {
        Self::for_shape(batch.num_seqs, batch.max_context_len, shape, split)
    }

    /// The partition for `num_seqs` sequences of at most `max_context_len` tokens, without
    /// device buffers: what sizes a preallocated workspace, and the fixed plan a captured graph
    /// uses for every context up to that length.
    pub fn for_shape(
        num_seqs: usize,
        max_context_len: usize,
        shape: &AttnShape,
        split: DecodeSplit,
    ) -> DecodePlan {
        let max_ctx = max_context_len.max(1);
        let tokens = match split {
            DecodeSplit::Off => max_ctx,
            DecodeSplit::Tokens(n) => n.max(1),
            DecodeSplit::Auto => {
                let ctas = num_seqs * shape.num_kv_heads * head_chunks(shape);
                if ctas >= TARGET_CTAS {
                    max_ctx
                } else {
                    let want = TARGET_CTAS.div_ceil(ctas.max(1));
                    max_ctx.div_ceil(want).max(MIN_SPLIT_TOKENS)
                }
            }
        };
        let tokens_per_split = tokens.div_ceil(TILE) * TILE;
        DecodePlan {
            num_splits: max_ctx.div_ceil(tokens_per_split),
            tokens_per_split,
        }
    }

    /// Bytes of f32 workspace [`paged_attention_decode`] needs for `num_tokens` query rows
    /// (0 without splits): partial outputs, then log-sum-exps.
    pub fn workspace_bytes(&self, num_tokens: usize, shape: &AttnShape) -> usize {
        if self.num_splits <= 1 {
            return 0;
        }
        num_tokens * shape.num_heads * self.num_splits * (shape.head_dim + 1) * 4
    }
}

/// Query heads a decode CTA handles at once: at most one per row of 8 threads.
fn heads_per_cta(shape: &AttnShape) -> usize {
    shape.group().clamp(1, THREADS / 8)
}

/// CTAs per KV head (more than one only for GQA groups wider than a CTA's rows).
fn head_chunks(shape: &AttnShape) -> usize {
    shape.group().div_ceil(heads_per_cta(shape)).max(1)
}

/// Attention of every decode sequence (query_len 1) of `a.batch` over its paged context,
/// written to `a.out`; rows of other sequences are left alone. `workspace` must hold
/// [`DecodePlan::workspace_bytes`] when the plan splits.
pub fn paged_attention_decode(
    dev: &Device,
    dtype: DType,
    a: &PagedAttnArgs<'_>,
    plan: &DecodePlan,
    workspace: Option<&DeviceBuffer>,
) -> Result<(), GpuError> {
    let p = DecodeParams::new(a, dtype, plan, workspace)?;
    let s = &a.shape;
    let family = &super::head_dims::kernels_for(s.head_dim)?.decode;
    let seqs = a.batch.num_seqs as u32;
    let decode = LaunchDims {
        grid: (
            dim32("kv heads x chunks", s.num_kv_heads * head_chunks(s))?,
            seqs,
            p.num_splits,
        ),
        block: (THREADS as u32, 1, 1),
        shared_bytes: 0,
    };
    dev.launch(by_dtype(family, dtype), decode, &p)?;
    merge_splits(dev, dtype, a, &p)
}

/// Combines the partitions of a split launch into `a.out` (nothing to do unsplit).
fn merge_splits(
    dev: &Device,
    dtype: DType,
    a: &PagedAttnArgs<'_>,
    p: &DecodeParams,
) -> Result<(), GpuError> {
    if p.num_splits <= 1 {
        return Ok(());
    }
    let merge = LaunchDims {
        grid: (
            p.attn.batch.num_seqs,
            dim32("num_heads", a.shape.num_heads)?,
            1,
        ),
        block: (a.shape.head_dim.min(THREADS) as u32, 1, 1),
        shared_bytes: 0,
    };
    dev.launch(by_dtype(&MERGE, dtype), merge, p)
}

/// How a decode-only batch runs on tensor cores.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum TensorCoreDecode {
    /// `attention_decode_tc.cu`: one CTA per (KV head, sequence, split) whose four warps share
    /// the token's query heads (at most 16) and split each 64-key tile between them.
    KeysAcrossWarps,
    /// `attention_prefill_tc.cu`: the prefill kernel with one token's query heads as its tile,
    /// one warp computing per 16 heads; wider GQA groups need it.
    QueryTile,
}

impl TensorCoreDecode {
    /// Both, in the order of their names.
    pub const ALL: [TensorCoreDecode; 2] = [
        TensorCoreDecode::KeysAcrossWarps,
        TensorCoreDecode::QueryTile,
    ];

    /// The name reports use.
    pub fn name(self) -> &'static str {
        match self {
            TensorCoreDecode::KeysAcrossWarps => "keys_across_warps",
            TensorCoreDecode::QueryTile => "query_tile",
        }
    }

    /// Whether this layout has a kernel for `shape`: a head dim with tensor-core kernels (up to
    /// 128) and, across warps, a GQA group of at most 16.
    pub fn takes(self, shape: &AttnShape) -> bool {
        let has_tc = super::head_dims::kernels_for(shape.head_dim)
            .is_ok_and(|k| k.decode_tc.is_some() && k.prefill_tc.is_some());
        has_tc && (self == TensorCoreDecode::QueryTile || shape.group() <= DECODE_TC_MAX_GROUP)
    }

    /// What [`paged_attention_decode_only`] runs for `shape`: keys across warps where the GQA
    /// group fits its 16 rows, the query tile otherwise.
    pub fn for_shape(shape: &AttnShape) -> TensorCoreDecode {
        match shape.group() <= DECODE_TC_MAX_GROUP {
            true => TensorCoreDecode::KeysAcrossWarps,
            false => TensorCoreDecode::QueryTile,
        }
    }
}

/// Attention of a batch whose sequences all decode (query_len 1 each: the caller's guarantee,
/// the kernels do not read the batch back to check it) on `kernel`'s cores: with
/// [`AttentionKernel::TensorCores`] and a head dim that has the tensor-core kernels,
/// [`paged_attention_decode_tc`] in the layout [`TensorCoreDecode::for_shape`] picks; otherwise
/// [`paged_attention_decode`].
pub fn paged_attention_decode_only(
    dev: &Device,
    dtype: DType,
    a: &PagedAttnArgs<'_>,
    plan: &DecodePlan,
    workspace: Option<&DeviceBuffer>,
    kernel: AttentionKernel,
) -> Result<(), GpuError> {
    let layout = TensorCoreDecode::for_shape(&a.shape);
    match kernel {
        AttentionKernel::TensorCores if layout.takes(&a.shape) => {
            paged_attention_decode_tc(dev, dtype, a, plan, workspace, layout)
        }
        _ => paged_attention_decode(dev, dtype, a, plan, workspace),
    }
}

/// A decode-only batch (as [`paged_attention_decode_only`]) on tensor cores in `layout`, under
/// `plan` (split partitions go through the decode kernel's merge); an error where the head dim
/// has no tensor-core kernel or, for [`TensorCoreDecode::KeysAcrossWarps`], the GQA group is
/// wider than 16.
pub fn paged_attention_decode_tc(
    dev: &Device,
    dtype: DType,
    a: &PagedAttnArgs<'_>,
    plan: &DecodePlan,
    workspace: Option<&DeviceBuffer>,
    layout: TensorCoreDecode,
) -> Result<(), GpuError> {
    let s = &a.shape;
    let kernels = super::head_dims::kernels_for(s.head_dim)?;
    let (Some(query_tile), Some(keys_across_warps)) = (&kernels.prefill_tc, &kernels.decode_tc)
    else {
        return Err(GpuError::Shape(format!(
            "decode on tensor cores: no kernel for head_dim {} (at most 128)",
            s.head_dim
        )));
    };
    let p = DecodeParams::new(a, dtype, plan, workspace)?;
    match layout {
        TensorCoreDecode::QueryTile => launch_tensor_cores(dev, dtype, a, query_tile, &p)?,
        TensorCoreDecode::KeysAcrossWarps => {
            if s.group() > DECODE_TC_MAX_GROUP {
                return Err(GpuError::Shape(format!(
                    "decode on tensor cores, keys across warps: {} query heads per KV head, at \
                     most {DECODE_TC_MAX_GROUP}",
                    s.group()
                )));
            }
            a.check_aligned("decode on tensor cores")?;
            if a.batch.num_seqs == 0 {
                return Ok(());
            }
            let dims = LaunchDims {
                grid: (
                    dim32("num_kv_heads", s.num_kv_heads)?,
                    dim32("num_seqs", a.batch.num_seqs)?,
                    p.num_splits,
                ),
                block: (THREADS as u32, 1, 1),
                shared_bytes: decode_tc_shared_bytes(s.head_dim, dtype),
            };
            dev.launch(by_dtype(keys_across_warps, dtype), dims, &p)?;
        }
    }
    merge_splits(dev, dtype, a, &p)
}
