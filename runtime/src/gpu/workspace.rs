//! The activation workspace: every device buffer a forward step uses, allocated once for the
//! largest step the server runs, so a step allocates nothing; and the step's one upload.
//!
//! All per-step host data (token ids, positions, slot mapping, query starts, context lengths,
//! logits rows, LoRA units, block tables) is written into one host staging buffer and goes up in
//! ONE host->device copy into a fixed device buffer; each kernel reads its sub-range of it at a
//! fixed address, which is also what lets a captured decode graph ([`super::decode_graph`]) be
//! replayed with nothing but that copy. Sampling rows still go up separately (`backend`).
//!
//! The staging buffer is page-locked on a GPU ([`HostStaging`]). None of this has run on a GPU:
//! CI runs it in the kernels' host emulation.

use caduceus_kernels::attention::PAD_SLOT;
use caduceus_kernels::gpu::attention::{AttnShape, DecodePlan, DecodeSplit};
use caduceus_kernels::gpu::lora::{LoraUnits, TILE_TOKENS};
use caduceus_kernels::gpu::{BufferView, DType, Device, DeviceBuffer, GpuError, HostStaging};
use caduceus_kernels::lora::Segment;

use crate::model::config::LlamaConfig;
use crate::model::ForwardBatch;

use super::model::GpuModelError;

/// The largest step a workspace serves (the scheduler's limits).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct StepLimits {
    /// Tokens per step (`scheduler.max_num_batched_tokens`).
    pub max_num_batched_tokens: usize,
    /// Sequences per step, and rows of logits (`scheduler.max_num_seqs`).
    pub max_num_seqs: usize,
    /// Longest sequence (`model.max_model_len`): the block-table row length and the decode
    /// attention splits.
    pub max_model_len: usize,
}

/// Word offsets of the sections of the step upload (u32 words), and the buffer sizes.
#[derive(Clone, Copy, Debug)]
struct Layout {
    tokens: usize,
    seqs: usize,
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
        let max_blocks = limits.max_model_len.div_ceil(block_size.max(1)).max(1);
        // BGMV: a slot per token; SGMV: (start, len, slot) per tile of a sequence's run.
        let lora_words = t.max(3 * (t.div_ceil(TILE_TOKENS) + s));
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
        let logit_rows = section(s);
        let lora = section(lora_words);
        // Last, so a step uploads only the rows of the sequences it has.
        let tables = section(s * max_blocks);
        Layout {
            tokens: t,
            seqs: s,
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
    // The largest split workspace any decode step of up to `s` sequences can ask for.
    let decode = (1..=s)
        .map(|n| {
            DecodePlan::for_shape(n, max_ctx, &shape, DecodeSplit::Auto).workspace_bytes(n, &shape)
        })
        .max()
        .unwrap_or(0);
    [
        t * d.hidden * es,         // x
        t * d.hidden * es,         // residual
        t * d.hidden * es,         // h
        t * d.qkv * es,            // qkv
        t * d.q_dim * es,          // q
        t * d.q_dim * es,          // attn
        t * 2 * d.ffn * es,        // gate_up
        t * d.ffn * es,            // act
        s * d.hidden * es,         // picked rows
        s * d.vocab * es,          // logits
        decode,                    // decode attention splits
        t * 3 * max_lora_rank * 4, // LoRA shrink output (q, k and v fused)
        l.total_words * 4,         // the step upload
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

/// What [`Workspace::stage`] put into the upload: the shape of the step the kernels run.
#[derive(Clone, Debug)]
pub(crate) struct Step {
    pub tokens: usize,
    pub seqs: usize,
    pub logit_rows: usize,
    pub max_context_len: usize,
    pub decode_only: bool,
    /// Padded to a captured graph's size: the decode plan is the fixed one.
    pub fixed: bool,
    pub lora: Option<LoraUnits>,
}

/// The step's inputs as the kernels take them: ranges of the upload buffer.
pub(crate) struct StepInputs<'a> {
    pub ids: BufferView<'a>,
    pub positions: BufferView<'a>,
    pub slots: BufferView<'a>,
    pub query_start: BufferView<'a>,
    pub context_len: BufferView<'a>,
    pub block_tables: BufferView<'a>,
    pub logit_rows: BufferView<'a>,
    pub lora: BufferView<'a>,
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

    /// Writes `batch` (and its LoRA segments) into the staging buffer and copies it to the
    /// device in one write. With `pad_to`, a decode-only batch whose logits rows are its
    /// tokens in order is padded to that many sequences: padding tokens write to
    /// [`PAD_SLOT`], attend to one token of block 0, use no adapter and their logits are
    /// ignored; `segments` then means "adapters on" even when empty (a slot per token).
    pub(crate) fn stage(
        &mut self,
        dev: &Device,
        batch: &ForwardBatch<'_>,
        segments: Option<&[Segment]>,
        pad_to: Option<usize>,
    ) -> Result<Step, GpuModelError> {
        batch.check().map_err(GpuModelError::Batch)?;
        let bad = |m: String| Err(GpuModelError::Batch(m));
        let (t, n) = (batch.num_tokens(), batch.seqs.len());
        let decode_only = batch.seqs.iter().all(|s| s.query_len == 1);
        let (tokens, seqs, rows) = match pad_to {
            None => (t, n, batch.logits_indices.len()),
            Some(p) => {
                let in_order = batch.logits_indices.iter().copied().eq(0..t);
                if !decode_only || !in_order || p < n {
                    return bad(format!(
                        "only a decode batch with its logits in order pads (to {p} from {n})"
                    ));
                }
                (p, p, p)
            }
        };
        let l = self.layout;
        if tokens > l.tokens || seqs > l.seqs || rows > l.seqs {
            return bad(format!(
                "a step of {tokens} tokens, {seqs} sequences and {rows} logits rows exceeds the \
                 workspace ({} tokens, {} sequences)",
                l.tokens, l.seqs
            ));
        }
        let lora = match (pad_to, segments) {
            // A graph's units: a slot per (padded) token, whether or not any is named.
            (Some(p), Some(segs)) => {
                let mut slots = vec![None; p];
                for s in segs {
                    for x in slots.iter_mut().skip(s.start).take(s.len) {
                        *x = s.slot;
                    }
                }
                Some(LoraUnits::bgmv(&slots)?)
            }
            (Some(_), None) => None,
            (None, segs) => lora_units(segs, t)?,
        };
        if lora
            .as_ref()
            .is_some_and(|u| u.words().len() > l.lora_words)
        {
            return bad("LoRA units do not fit the step upload".into());
        }
        let st = self.staging.words_mut()?;
        let fill = |st: &mut [u32], at: usize, real: &[u32], len: usize, pad: u32| {
            st[at..at + real.len()].copy_from_slice(real);
            st[at + real.len()..at + len].fill(pad);
        };
        fill(st, l.ids, batch.token_ids, tokens, 0);
        fill(st, l.positions, batch.positions, tokens, 0);
        fill(st, l.slots, batch.slot_mapping, tokens, PAD_SLOT);
        let mut start = 0u32;
        let mut max_context_len = 0;
        for i in 0..seqs {
            st[l.query_start + i] = start;
            let (len, ctx, table) = match batch.seqs.get(i) {
                Some(s) => (s.query_len, s.context_len, s.block_table),
                None => (1, 1, &[][..]),
            };
            if table.len() > l.max_blocks {
                return bad(format!(
                    "sequence {i} has {} blocks, more than max_model_len allows ({})",
                    table.len(),
                    l.max_blocks
                ));
            }
            start += u32::try_from(len).map_err(|e| GpuModelError::Batch(e.to_string()))?;
            st[l.context_len + i] =
                u32::try_from(ctx).map_err(|e| GpuModelError::Batch(e.to_string()))?;
            max_context_len = max_context_len.max(ctx);
            fill(st, l.tables + i * l.max_blocks, table, l.max_blocks, 0);
        }
        st[l.query_start + seqs] = start;
        for r in 0..rows {
            st[l.logit_rows + r] = batch.logits_indices.get(r).map_or(r, |&x| x) as u32;
        }
        if let Some(u) = &lora {
            st[l.lora..l.lora + u.words().len()].copy_from_slice(u.words());
        }
        let words = l.tables + seqs * l.max_blocks;
        dev.upload_staged(&self.upload, &self.staging, words)?;
        Ok(Step {
            tokens,
            seqs,
            logit_rows: rows,
            max_context_len,
            decode_only,
            fixed: pad_to.is_some(),
            lora,
        })
    }

    /// The ranges of the upload buffer `step`'s kernels read.
    pub(crate) fn inputs(&self, step: &Step) -> Result<StepInputs<'_>, GpuError> {
        let l = &self.layout;
        let view = |at: usize, words: usize| self.upload.view(at * 4, words.max(1) * 4);
        Ok(StepInputs {
            ids: view(l.ids, step.tokens)?,
            positions: view(l.positions, step.tokens)?,
            slots: view(l.slots, step.tokens)?,
            query_start: view(l.query_start, step.seqs + 1)?,
            context_len: view(l.context_len, step.seqs)?,
            block_tables: view(l.tables, step.seqs * l.max_blocks)?,
            logit_rows: view(l.logit_rows, step.logit_rows)?,
            lora: view(l.lora, step.lora.as_ref().map_or(0, |u| u.words().len()))?,
        })
    }
}

/// The LoRA units of a step of `t` tokens: none when no segment names a slot; BGMV (a slot per
/// token) when every run is one token, SGMV tiles otherwise.
fn lora_units(segments: Option<&[Segment]>, t: usize) -> Result<Option<LoraUnits>, GpuModelError> {
    let Some(segs) = segments.filter(|s| s.iter().any(|s| s.slot.is_some())) else {
        return Ok(None);
    };
    let units = if segs.iter().all(|s| s.len == 1) {
        let mut slots = vec![None; t];
        for s in segs {
            if let Some(x) = slots.get_mut(s.start) {
                *x = s.slot;
            }
        }
        LoraUnits::bgmv(&slots)?
    } else {
        LoraUnits::sgmv(segs, t)?
    };
    Ok(Some(units))
}

#[cfg(all(test, feature = "gpu-emu"))]
pub(crate) mod tests;
