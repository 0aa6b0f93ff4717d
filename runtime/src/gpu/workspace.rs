//! The activation workspace: every device buffer a forward step uses, allocated once for the
//! largest step the server runs, so a step allocates nothing; and the step's one upload.
//!
//! All per-step host data (token ids, positions, slot mapping, query starts, context lengths,
//! logits rows, LoRA units, block tables) is written into one host staging buffer and goes up in
//! ONE host->device copy into a fixed device buffer; each kernel reads its sub-range of it at a
//! fixed address, which is also what lets a captured decode graph ([`super::decode_graph`]) be
//! replayed with nothing but that copy. The sampler's inputs go up in one copy of their own
//! (`device_sampler`), after the forward's launches.
//!
//! The staging buffer is page-locked on a GPU ([`HostStaging`]) and the copy is queued without a
//! host wait. None of this has run on a GPU: CI runs it in the kernels' host emulation.

use caduceus_kernels::gpu::attention::{AttnShape, DecodePlan, DecodeSplit};
use caduceus_kernels::gpu::lora::{shrink_splits, TILE_TOKENS};
use caduceus_kernels::gpu::{DType, Device, DeviceBuffer, GpuError, HostStaging};

use crate::model::config::LlamaConfig;

/// The largest step a workspace serves (the scheduler's limits).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct StepLimits {
    /// Tokens per step (`scheduler.max_num_batched_tokens`).
    pub max_num_batched_tokens: usize,
    /// Sequences per step, and rows of sampled logits (`scheduler.max_num_seqs`).
    pub max_num_seqs: usize,
    /// Rows of logits a step keeps after the sampled ones, for prompt positions it scores
    /// (prompt logprobs; 0: none, and such requests are refused).
    pub max_scored_rows: usize,
    /// Longest sequence (`model.max_model_len`): the block-table row length and the decode
    /// attention splits.
    pub max_model_len: usize,
}

/// Word offsets of the sections of the step upload (u32 words), and the buffer sizes.
#[derive(Clone, Copy, Debug)]
struct Layout {
    tokens: usize,
    seqs: usize,
    /// Rows of logits: the sampled ones and the scored ones after them.
    rows: usize,
    max_blocks: usize,
    ids: usize,
    positions: usize,
    slots: usize,
    query_start: usize,
    context_len: usize,
    logit_rows: usize,
    lora: usize,
    lora_words: usize,
    tables: usize,
    total_words: usize,
}

/// Sections start at multiples of 4 words (16 bytes).
fn align4(words: usize) -> usize {
    words.div_ceil(4) * 4
}

impl Layout {
    fn new(limits: &StepLimits, block_size: usize) -> Layout {
        let (t, s) = (
            limits.max_num_batched_tokens.max(1),
            limits.max_num_seqs.max(1),
        );
        let rows = s + limits.max_scored_rows;
        let max_blocks = limits.max_model_len.div_ceil(block_size.max(1)).max(1);
        // BGMV: a slot per token. SGMV: (first, len, slot) per tile of the sequences' runs (at
        // most one partial tile each), or, for a decode batch grouped by adapter, per tile (a
        // unit per token in a graph) followed by a row per token.
        let lora_words = t + 3 * t.max(t.div_ceil(TILE_TOKENS) + s);
        let mut at = 0;
        let mut section = |words: usize| {
            let start = at;
            at = align4(at + words);
            start
        };
        let ids = section(t);
        let positions = section(t);
        let slots = section(t);
        let query_start = section(s + 1);
        let context_len = section(s);
        let logit_rows = section(rows);
        let lora = section(lora_words);
        // Last, so a step uploads only the rows of the sequences it has.
        let tables = section(s * max_blocks);
        Layout {
            tokens: t,
            seqs: s,
            rows,
            max_blocks,
            ids,
            positions,
            slots,
            query_start,
            context_len,
            logit_rows,
            lora,
            lora_words,
            tables,
            total_words: at,
        }
    }
}

/// The model dimensions a workspace is sized from.
#[derive(Clone, Copy, Debug)]
struct Dims {
    hidden: usize,
    q_dim: usize,
    qkv: usize,
    ffn: usize,
    vocab: usize,
}

impl Dims {
    fn of(c: &LlamaConfig) -> Dims {
        let q_dim = c.num_heads * c.head_dim;
        Dims {
            hidden: c.hidden_size,
            q_dim,
            qkv: q_dim + 2 * c.num_kv_heads * c.head_dim,
            ffn: c.intermediate_size,
            vocab: c.vocab_size,
        }
    }
}

/// The attention geometry of `c` over a pool of `block_size` blocks (the block count does not
/// change any size here).
pub(crate) fn attn_shape(c: &LlamaConfig, block_size: usize, num_blocks: usize) -> AttnShape {
    AttnShape {
        num_heads: c.num_heads,
        num_kv_heads: c.num_kv_heads,
        head_dim: c.head_dim,
        block_size,
        num_blocks,
        scale: 1.0 / (c.head_dim as f32).sqrt(),
    }
}

/// Bytes of every buffer of a workspace, in allocation order (see [`Workspace::new`]).
fn buffer_bytes(
    c: &LlamaConfig,
    dtype: DType,
    block_size: usize,
    limits: &StepLimits,
    max_lora_rank: usize,
) -> [usize; 13] {
    let l = Layout::new(limits, block_size);
    let d = Dims::of(c);
    let (t, s, es) = (l.tokens, l.seqs, dtype.size());
    let shape = attn_shape(c, block_size, 1);
    let max_ctx = l.max_blocks * block_size;
    // The LoRA shrink's partial sums, per token and rank: the widest of the fused calls (q/k/v
    // and gate/up read the hidden state, o the attention output, down the activation), each
    // split of its input keeping its own.
    let lora_per_rank = [
        3 * shrink_splits(d.hidden),
        2 * shrink_splits(d.hidden),
        shrink_splits(d.q_dim),
        shrink_splits(d.ffn),
    ]
    .into_iter()
    .max()
    .unwrap_or(0);
    // The largest split workspace any decode step of up to `s` sequences can ask for.
    let decode = (1..=s)
        .map(|n| {
            DecodePlan::for_shape(n, max_ctx, &shape, DecodeSplit::Auto).workspace_bytes(n, &shape)
        })
        .max()
        .unwrap_or(0);
    [
        t * d.hidden * es,                     // x
        t * d.hidden * es,                     // residual
        t * d.hidden * es,                     // h
        t * d.qkv * es,                        // qkv
        t * d.q_dim * es,                      // q
        t * d.q_dim * es,                      // attn
        t * 2 * d.ffn * es,                    // gate_up
        t * d.ffn * es,                        // act
        l.rows * d.hidden * es,                // picked rows
        l.rows * d.vocab * es,                 // logits
        decode,                                // decode attention splits
        t * lora_per_rank * max_lora_rank * 4, // LoRA shrink partial sums
        l.total_words * 4,                     // the step upload
    ]
}

/// Device bytes of a [`Workspace`] for these limits, exactly what [`Workspace::new`] allocates
/// (the memory plan reserves this).
pub fn workspace_bytes(
    c: &LlamaConfig,
    dtype: DType,
    block_size: usize,
    limits: &StepLimits,
    max_lora_rank: usize,
) -> u64 {
    buffer_bytes(c, dtype, block_size, limits, max_lora_rank)
        .iter()
        .map(|&b| b.max(1) as u64)
        .sum()
}

/// Every device buffer of a forward step (see the module docs).
pub struct Workspace {
    limits: StepLimits,
    block_size: usize,
    layout: Layout,
    pub(crate) x: DeviceBuffer,
    pub(crate) residual: DeviceBuffer,
    pub(crate) h: DeviceBuffer,
    pub(crate) qkv: DeviceBuffer,
    pub(crate) q: DeviceBuffer,
    pub(crate) attn: DeviceBuffer,
    pub(crate) gate_up: DeviceBuffer,
    pub(crate) act: DeviceBuffer,
    pub(crate) picked: DeviceBuffer,
    pub(crate) logits: DeviceBuffer,
    pub(crate) decode: DeviceBuffer,
    pub(crate) lora: DeviceBuffer,
    upload: DeviceBuffer,
    /// Pinned on a GPU.
    staging: HostStaging,
}

impl Workspace {
    /// Allocates the buffers for steps within `limits` over blocks of `block_size` tokens, with
    /// adapters of rank up to `max_lora_rank` (0: base model only).
    pub fn new(
        dev: &Device,
        c: &LlamaConfig,
        dtype: DType,
        block_size: usize,
        limits: StepLimits,
        max_lora_rank: usize,
    ) -> Result<Workspace, GpuError> {
        let layout = Layout::new(&limits, block_size);
        let sizes = buffer_bytes(c, dtype, block_size, &limits, max_lora_rank);
        let mut bufs = sizes
            .iter()
            .map(|&b| dev.alloc_zeroed(b.max(1)))
            .collect::<Result<Vec<_>, _>>()?
            .into_iter();
        let mut next = || {
            bufs.next()
                .ok_or_else(|| GpuError::Shape("workspace buffer missing".into()))
        };
        Ok(Workspace {
            limits,
            block_size,
            layout,
            x: next()?,
            residual: next()?,
            h: next()?,
            qkv: next()?,
            q: next()?,
            attn: next()?,
            gate_up: next()?,
            act: next()?,
            picked: next()?,
            logits: next()?,
            decode: next()?,
            lora: next()?,
            upload: next()?,
            staging: dev.host_staging(layout.total_words)?,
        })
    }

    pub fn limits(&self) -> StepLimits {
        self.limits
    }

    /// Device bytes held.
    pub fn nbytes(&self) -> usize {
        [
            &self.x,
            &self.residual,
            &self.h,
            &self.qkv,
            &self.q,
            &self.attn,
            &self.gate_up,
            &self.act,
            &self.picked,
            &self.logits,
            &self.decode,
            &self.lora,
            &self.upload,
        ]
        .iter()
        .map(|b| b.len_bytes().max(1))
        .sum()
    }

    /// Block-table row length: every sequence's table is padded to it.
    pub(crate) fn max_blocks_per_seq(&self) -> usize {
        self.layout.max_blocks
    }

    /// The longest context the block tables can describe (the fixed decode plan covers it).
    pub(crate) fn max_context_len(&self) -> usize {
        self.layout.max_blocks * self.block_size
    }

    /// The logits of the last step, `[rows, vocab]` in the model dtype (more rows may follow).
    pub fn logits(&self) -> &DeviceBuffer {
        &self.logits
    }

    /// Gives up the logits buffer (the workspace of a one-off forward pass).
    pub(crate) fn into_logits(self) -> DeviceBuffer {
        self.logits
    }

    /// The decode split plan of `step`: the batch's own, unless the step is padded for a graph
    /// (or the batch's plan would not fit the workspace), then the fixed plan for the longest
    /// context, which the same graph serves for every context.
    pub(crate) fn decode_plan(&self, step: &Step, shape: &AttnShape) -> DecodePlan {
        let fixed =
            DecodePlan::for_shape(step.seqs, self.max_context_len(), shape, DecodeSplit::Auto);
        if step.fixed {
            return fixed;
        }
        let own = DecodePlan::for_shape(step.seqs, step.max_context_len, shape, DecodeSplit::Auto);
        match own.workspace_bytes(step.tokens, shape) <= self.decode.len_bytes() {
            true => own,
            false => fixed,
        }
    }
}

mod stage;
pub(crate) use stage::{GraphLayout, Step};

#[cfg(all(test, feature = "gpu-emu"))]
pub(crate) mod tests;
