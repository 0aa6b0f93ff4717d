//! Gathering a step's host data into the staging buffer, its one upload, and the ranges of the
//! upload buffer each kernel reads.

use caduceus_kernels::attention::PAD_SLOT;
use caduceus_kernels::gpu::lora::{DecodeLoraMapping, LoraUnits};
use caduceus_kernels::gpu::{BufferView, Device, GpuError};
use caduceus_kernels::lora::Segment;

use super::Workspace;
use crate::gpu::model::GpuModelError;
use crate::model::ForwardBatch;

/// How a captured graph lays out its steps: the padded batch size, and how its LoRA launches
/// map tokens to blocks for a stack of `lora_slots` slots.
#[derive(Clone, Copy, Debug)]
pub(crate) struct GraphLayout {
    pub size: usize,
    pub mapping: DecodeLoraMapping,
    pub lora_slots: usize,
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

impl Workspace {
    /// Writes `batch` (and its LoRA segments) into the staging buffer and copies it to the
    /// device in one write. With `pad_to` (a graph's layout), a decode-only batch
    /// whose logits rows are its tokens in order is padded to that many sequences: padding
    /// tokens write to [`PAD_SLOT`], attend to one token of block 0, use no adapter and their
    /// logits are ignored; `segments` then means "adapters on" even when empty (units laid out
    /// for the padded size whatever the slots).
    pub(crate) fn stage(
        &mut self,
        dev: &Device,
        batch: &ForwardBatch<'_>,
        segments: Option<&[Segment]>,
        pad_to: Option<GraphLayout>,
    ) -> Result<Step, GpuModelError> {
        batch.check().map_err(GpuModelError::Batch)?;
        let bad = |m: String| Err(GpuModelError::Batch(m));
        let (t, n) = (batch.num_tokens(), batch.seqs.len());
        let decode_only = batch.seqs.iter().all(|s| s.query_len == 1);
        let (tokens, seqs, rows) = match pad_to {
            None => (t, n, batch.logits_indices.len()),
            Some(GraphLayout { size: p, .. }) => {
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
        if tokens > l.tokens || seqs > l.seqs || rows > l.rows {
            return bad(format!(
                "a step of {tokens} tokens, {seqs} sequences and {rows} logits rows exceeds the \
                 workspace ({} tokens, {} sequences, {} logits rows)",
                l.tokens, l.seqs, l.rows
            ));
        }
        let lora = match (pad_to, segments) {
            // A graph's units: laid out for every (padded) token, whether or not any is named.
            (Some(g), Some(segs)) => {
                let mut slots = vec![None; g.size];
                for s in segs {
                    for x in slots.iter_mut().skip(s.start).take(s.len) {
                        *x = s.slot;
                    }
                }
                Some(LoraUnits::for_graph(&slots, g.mapping, g.lora_slots)?)
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
        dev.upload_staged(&self.upload, &mut self.staging, words)?;
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
