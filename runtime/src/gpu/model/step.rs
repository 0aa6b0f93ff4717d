//! One forward step over a preallocated [`Workspace`]: the batch goes up in one copy
//! ([`Workspace::stage`]), then [`GpuModel::launch`] issues every kernel reading only workspace,
//! weight and cache addresses, so the same launches can be captured as a graph
//! ([`crate::gpu::decode_graph`]) and replayed after the next step's upload.

use caduceus_kernels::gpu::attention::{paged_attention_decode_only, PagedAttnArgs, PagedBatch};
use caduceus_kernels::gpu::attention_prefill::paged_attention_prefill;
use caduceus_kernels::gpu::gemm::{gemm, gemm_bias, GemmShape};
use caduceus_kernels::gpu::lora::{add_lora_fused, DeviceFusedPart, FusedLoraArgs};
use caduceus_kernels::gpu::ops::{self, RmsNormArgs};
use caduceus_kernels::gpu::rope_cache::{rope_cache, RopeCacheArgs};
use caduceus_kernels::gpu::DeviceBuffer;

use super::profile::{Op, OpClock};
use super::{GpuKvCache, GpuModel, GpuModelError};
use crate::gpu::lora::{GpuLoraBatch, GpuLoraStack};
use crate::gpu::workspace::{attn_shape, Step, Workspace};
use crate::model::ForwardBatch;

impl GpuModel {
    /// One forward pass in `ws` (see the module docs): K/V of the batch into `kv`, the logits of
    /// `batch.logits_indices` into [`Workspace::logits`]; returns their row count (0: none).
    /// Allocates nothing and makes one host->device copy.
    pub fn forward_in(
        &self,
        batch: &ForwardBatch<'_>,
        kv: &GpuKvCache,
        lora: Option<&GpuLoraBatch<'_>>,
        ws: &mut Workspace,
    ) -> Result<usize, GpuModelError> {
        self.forward_in_timed(batch, kv, lora, ws, None)
    }

    /// [`Self::forward_in`] with the end of every op marked on `clock` (a profile: see
    /// [`super::profile`]).
    pub fn forward_in_timed(
        &self,
        batch: &ForwardBatch<'_>,
        kv: &GpuKvCache,
        lora: Option<&GpuLoraBatch<'_>>,
        ws: &mut Workspace,
        clock: Option<&OpClock<'_>>,
    ) -> Result<usize, GpuModelError> {
        if batch.num_tokens() == 0 {
            batch.check().map_err(GpuModelError::Batch)?;
            return Ok(0);
        }
        let step = ws.stage(&self.dev, batch, lora.map(|l| l.segments), None)?;
        self.launch(kv, ws, &step, lora.map(|l| l.stack), clock)?;
        Ok(step.logit_rows)
    }

    /// Launches the kernels of a staged `step` (nothing else: no copy, no allocation, no
    /// synchronisation), so a decode step's launches can be captured; with a `clock`, marks the
    /// end of each op (not while capturing).
    pub(crate) fn launch(
        &self,
        kv: &GpuKvCache,
        ws: &Workspace,
        step: &Step,
        stack: Option<&GpuLoraStack>,
        clock: Option<&OpClock<'_>>,
    ) -> Result<(), GpuModelError> {
        let lap = |op: Op| -> Result<(), GpuModelError> {
            clock.map_or(Ok(()), |c| c.lap(op))?;
            Ok(())
        };
        let (dev, dt, c) = (&self.dev, self.dtype, &self.config);
        let t = step.tokens;
        let (hidden, hd, ffn) = (c.hidden_size, c.head_dim, c.intermediate_size);
        let (q_dim, kv_dim) = (c.num_heads * hd, c.num_kv_heads * hd);
        let qkv_width = q_dim + 2 * kv_dim;
        let inputs = ws.inputs(step)?;
        let shape = attn_shape(c, kv.shape.block_size, kv.shape.num_blocks);
        let seqs = PagedBatch {
            query_start: &inputs.query_start,
            context_len: &inputs.context_len,
            block_tables: &inputs.block_tables,
            num_seqs: step.seqs,
            num_tokens: t,
            max_blocks_per_seq: ws.max_blocks_per_seq(),
            max_context_len: match step.fixed {
                true => ws.max_context_len(),
                false => step.max_context_len,
            },
        };
        let plan = ws.decode_plan(step, &shape);

        let lora = match (&step.lora, stack) {
            (Some(units), Some(stack)) => {
                let units = units.clone();
                let batch = match step.fixed {
                    true => units.placed_fixed(&inputs.lora)?,
                    false => units.placed(&inputs.lora)?,
                };
                Some((stack, batch))
            }
            (Some(_), None) => {
                return Err(GpuModelError::Batch(
                    "LoRA segments without adapter slots".into(),
                ))
            }
            _ => None,
        };
        // (projection indices, column offsets, output width) of the four fused calls.
        let calls: [(&[usize], [usize; 3], usize); 4] = [
            (&[0, 1, 2], [0, q_dim, q_dim + kv_dim], qkv_width),
            (&[3], [0, 0, 0], hidden),
            (&[4, 5], [0, ffn, 0], 2 * ffn),
            (&[6], [0, 0, 0], hidden),
        ];
        let add_lora = |layer: usize, call: usize, x: &DeviceBuffer, y: &DeviceBuffer| {
            let Some((stack, units)) = &lora else {
                return Ok(());
            };
            let (idx, offs, y_stride) = calls[call];
            let parts: Vec<DeviceFusedPart<'_>> = idx
                .iter()
                .zip(offs)
                .map(|(&p, offset)| DeviceFusedPart {
                    slots: &stack.layer(layer)[p],
                    offset,
                })
                .collect();
            let args = FusedLoraArgs {
                parts: &parts,
                x,
                batch: units,
                workspace: &ws.lora,
                y,
                y_stride,
            };
            add_lora_fused(dev, &args)?;
            lap(Op::Lora)
        };

        let (x, residual, h) = (&ws.x, &ws.residual, &ws.h);
        ops::embedding(
            dev,
            dt,
            &self.embed,
            c.vocab_size,
            hidden,
            &inputs.ids,
            t,
            x,
        )?;
        lap(Op::Embed)?;
        let norm = |x: &DeviceBuffer, first: bool, w: &DeviceBuffer, out: &DeviceBuffer| {
            ops::rms_norm(
                dev,
                dt,
                &RmsNormArgs {
                    x,
                    residual: (!first).then_some(residual),
                    residual_out: Some(residual),
                    weight: w,
                    out,
                    rows: t,
                    dim: hidden,
                    eps: c.rms_norm_eps,
                },
            )?;
            lap(Op::Norm)
        };
        let shape_of = |n: usize, k: usize| GemmShape {
            m: t,
            n,
            k,
            accumulate: false,
        };
        let proj = |x: &DeviceBuffer, w: &DeviceBuffer, y: &DeviceBuffer, n: usize, k: usize| {
            gemm(dev, dt, x, w, y, shape_of(n, k))
        };
        for (i, l) in self.layers.iter().enumerate() {
            norm(x, i == 0, &l.attn_norm, h)?;
            match &l.qkv_bias {
                Some(b) => gemm_bias(dev, dt, h, &l.qkv, b, &ws.qkv, shape_of(qkv_width, hidden))?,
                None => proj(h, &l.qkv, &ws.qkv, qkv_width, hidden)?,
            }
            lap(Op::QkvProj)?;
            add_lora(i, 0, h, &ws.qkv)?;
            rope_cache(
                dev,
                dt,
                &RopeCacheArgs {
                    qkv: &ws.qkv,
                    positions: &inputs.positions,
                    slot_mapping: &inputs.slots,
                    inv_freq: &self.inv_freq,
                    style: self.rope_style,
                    k_cache: &kv.k[i],
                    v_cache: &kv.v[i],
                    cache: kv.shape,
                    num_tokens: t,
                    num_heads: c.num_heads,
                    q_out: Some(&ws.q),
                },
            )?;
            lap(Op::RopeCache)?;
            let args = PagedAttnArgs {
                q: &ws.q,
                k_cache: &kv.k[i],
                v_cache: &kv.v[i],
                out: &ws.attn,
                batch: seqs,
                shape,
            };
            if step.decode_only {
                let (decode_ws, kernel) = (Some(&ws.decode), self.attention_kernel);
                paged_attention_decode_only(dev, dt, &args, &plan, decode_ws, kernel)?;
            } else {
                paged_attention_prefill(dev, dt, &args, self.attention_kernel)?;
            }
            lap(Op::Attention)?;
            proj(&ws.attn, &l.o_proj, x, hidden, q_dim)?;
            lap(Op::OProj)?;
            add_lora(i, 1, &ws.attn, x)?;
            norm(x, false, &l.ffn_norm, h)?;
            proj(h, &l.gate_up, &ws.gate_up, 2 * ffn, hidden)?;
            lap(Op::GateUpProj)?;
            add_lora(i, 2, h, &ws.gate_up)?;
            ops::silu_mul(dev, dt, &ws.gate_up, t, ffn, &ws.act)?;
            lap(Op::SiluMul)?;
            proj(&ws.act, &l.down, x, hidden, ffn)?;
            lap(Op::DownProj)?;
            add_lora(i, 3, &ws.act, x)?;
        }
        // Final norm of residual + last block's output, only for the rows that need logits.
        norm(x, self.layers.is_empty(), &self.final_norm, h)?;
        let n = step.logit_rows;
        if n == 0 {
            return Ok(());
        }
        // The embedding gather serves as a row gather: table = h, ids = the wanted rows.
        ops::embedding(dev, dt, h, t, hidden, &inputs.logit_rows, n, &ws.picked)?;
        let head = self.lm_head.as_ref().unwrap_or(&self.embed);
        gemm(
            dev,
            dt,
            &ws.picked,
            head,
            &ws.logits,
            GemmShape {
                m: n,
                n: c.vocab_size,
                k: hidden,
                accumulate: false,
            },
        )?;
        lap(Op::LmHead)?;
        Ok(())
    }
}
