//! The Llama forward pass on a [`Device`] (a GPU, or the kernels' host emulation): bf16/f16
//! weights and paged KV cache on the device, the CUDA kernels of `caduceus_kernels::gpu` for
//! every op. Same batch contract as the CPU [`crate::model::LlamaModel::forward`]: a flattened
//! [`ForwardBatch`] mixing prefill chunks and decode tokens, logits for `logits_indices`.
//!
//! Not yet here (issue 17): one pinned upload per step and a preallocated workspace, CUDA
//! graphs; it has never run on a GPU.

use caduceus_kernels::attention::KvCacheShape;
use caduceus_kernels::gpu::attention::{
    paged_attention_decode, AttnShape, DecodePlan, DecodeSplit, PagedAttnArgs, PagedBatchBuffers,
};
use caduceus_kernels::gpu::attention_prefill::paged_attention_prefill;
use caduceus_kernels::gpu::gemm::{gemm, gemm_bias, GemmShape};
use caduceus_kernels::gpu::lora::{
    add_lora_fused, workspace_bytes, DeviceFusedPart, FusedLoraArgs, LoraBatch, LoraGpuError,
};
use caduceus_kernels::gpu::ops::{self, RmsNormArgs};
use caduceus_kernels::gpu::rope_cache::{rope_cache, RopeCacheArgs};
use caduceus_kernels::gpu::{DType, Device, DeviceBuffer, GpuError};
use caduceus_kernels::ops::RopeStyle;
use half::{bf16, f16};

use crate::model::batch::ForwardBatch;
use crate::model::config::LlamaConfig;
use crate::model::error::ModelError;
use crate::model::llama::{build_rope, take_qkv_bias};
use crate::model::weights::TensorStore;

use super::lora::{GpuLoraBatch, GpuLoraStack};

/// Why a GPU forward pass or load failed.
#[derive(Debug, thiserror::Error)]
pub enum GpuModelError {
    #[error(transparent)]
    Gpu(#[from] GpuError),
    #[error(transparent)]
    Model(#[from] ModelError),
    #[error("invalid batch: {0}")]
    Batch(String),
    #[error("LoRA: {0}")]
    Lora(#[from] LoraGpuError),
}

struct GpuLayer {
    attn_norm: DeviceBuffer,
    ffn_norm: DeviceBuffer,
    /// `[q | k | v]` rows fused, `[(num_heads + 2 num_kv_heads) head_dim, hidden]`.
    qkv: DeviceBuffer,
    /// Fused `[q | k | v]` bias (Qwen2's `attention_bias`), added in the projection's epilogue.
    qkv_bias: Option<DeviceBuffer>,
    o_proj: DeviceBuffer,
    /// `[gate | up]` rows fused, `[2 ffn, hidden]`.
    gate_up: DeviceBuffer,
    down: DeviceBuffer,
}

/// One layer's K and V pools on the device, `[num_blocks, block_size, num_kv_heads, head_dim]`.
pub struct GpuKvCache {
    shape: KvCacheShape,
    k: Vec<DeviceBuffer>,
    v: Vec<DeviceBuffer>,
}

impl GpuKvCache {
    /// Zeroed pools for every layer.
    pub fn new(
        dev: &Device,
        dtype: DType,
        num_layers: usize,
        shape: KvCacheShape,
    ) -> Result<Self, GpuError> {
        let bytes = shape.elems() * dtype.size();
        let mut k = Vec::with_capacity(num_layers);
        let mut v = Vec::with_capacity(num_layers);
        for _ in 0..num_layers {
            k.push(dev.alloc_zeroed(bytes)?);
            v.push(dev.alloc_zeroed(bytes)?);
        }
        Ok(GpuKvCache { shape, k, v })
    }

    pub fn shape(&self) -> KvCacheShape {
        self.shape
    }
}

/// A Llama-family model resident on a device.
pub struct GpuModel {
    dev: Device,
    dtype: DType,
    config: LlamaConfig,
    embed: DeviceBuffer,
    /// `None`: tied to `embed`.
    lm_head: Option<DeviceBuffer>,
    final_norm: DeviceBuffer,
    layers: Vec<GpuLayer>,
    inv_freq: DeviceBuffer,
    rope_style: RopeStyle,
}

/// Uploads f32 values converted to the dtype.
fn upload_as(dev: &Device, dtype: DType, v: &[f32]) -> Result<DeviceBuffer, GpuError> {
    match dtype {
        DType::Bf16 => dev.upload(&v.iter().map(|&x| bf16::from_f32(x)).collect::<Vec<_>>()),
        DType::F16 => dev.upload(&v.iter().map(|&x| f16::from_f32(x)).collect::<Vec<_>>()),
    }
}

impl GpuModel {
    /// Takes the weights out of `store` (the names and shapes the CPU model reads), converts them
    /// to `dtype` (quantized GGUF weights are dequantized first) and uploads them to `dev`.
    pub fn from_tensors(
        config: LlamaConfig,
        store: &mut TensorStore,
        dev: Device,
        dtype: DType,
    ) -> Result<GpuModel, GpuModelError> {
        config.validate()?;
        let c = &config;
        let (hidden, q_dim, kv_dim, ffn) = (
            c.hidden_size,
            c.num_heads * c.head_dim,
            c.num_kv_heads * c.head_dim,
            c.intermediate_size,
        );
        let matrix = |store: &mut TensorStore, names: &[(&str, usize)], cols: usize| {
            let mut values = Vec::new();
            for &(name, rows) in names {
                values.extend(store.take_matrix(name, rows, cols)?.to_f32());
            }
            Ok::<_, GpuModelError>(upload_as(&dev, dtype, &values)?)
        };
        let embed = matrix(store, &[("token_embd.weight", c.vocab_size)], hidden)?;
        let lm_head = if store.contains("output.weight") {
            Some(matrix(store, &[("output.weight", c.vocab_size)], hidden)?)
        } else if c.tie_word_embeddings {
            None
        } else {
            return Err(ModelError::MissingTensor("output.weight".into()).into());
        };
        let final_norm = upload_as(
            &dev,
            dtype,
            &store.take_vector("output_norm.weight", hidden)?,
        )?;
        let rope = build_rope(c, store)?;
        let mut layers = Vec::with_capacity(c.num_layers);
        for i in 0..c.num_layers {
            let n = |t: &str| format!("blk.{i}.{t}");
            let (q, k, v) = (n("attn_q.weight"), n("attn_k.weight"), n("attn_v.weight"));
            let (gate, up) = (n("ffn_gate.weight"), n("ffn_up.weight"));
            let qkv_bias = match take_qkv_bias(store, i, q_dim, kv_dim)? {
                Some(b) => Some(upload_as(&dev, dtype, &b)?),
                None => None,
            };
            layers.push(GpuLayer {
                qkv_bias,
                attn_norm: upload_as(
                    &dev,
                    dtype,
                    &store.take_vector(&n("attn_norm.weight"), hidden)?,
                )?,
                ffn_norm: upload_as(
                    &dev,
                    dtype,
                    &store.take_vector(&n("ffn_norm.weight"), hidden)?,
                )?,
                qkv: matrix(store, &[(&q, q_dim), (&k, kv_dim), (&v, kv_dim)], hidden)?,
                o_proj: matrix(store, &[(&n("attn_output.weight"), hidden)], q_dim)?,
                gate_up: matrix(store, &[(&gate, ffn), (&up, ffn)], hidden)?,
                down: matrix(store, &[(&n("ffn_down.weight"), hidden)], ffn)?,
            });
        }
        let inv_freq = dev.upload(rope.inv_freq())?;
        Ok(GpuModel {
            embed,
            lm_head,
            final_norm,
            layers,
            inv_freq,
            rope_style: rope.style(),
            dev,
            dtype,
            config,
        })
    }

    pub fn config(&self) -> &LlamaConfig {
        &self.config
    }

    pub fn device(&self) -> &Device {
        &self.dev
    }

    pub fn dtype(&self) -> DType {
        self.dtype
    }

    /// Device bytes of the weights.
    pub fn weight_bytes(&self) -> usize {
        let layers: usize = self
            .layers
            .iter()
            .map(|l| {
                [
                    &l.attn_norm,
                    &l.ffn_norm,
                    &l.qkv,
                    &l.o_proj,
                    &l.gate_up,
                    &l.down,
                ]
                .iter()
                .map(|b| b.len_bytes())
                .sum::<usize>()
            })
            .sum();
        layers
            + self.embed.len_bytes()
            + self.lm_head.as_ref().map_or(0, DeviceBuffer::len_bytes)
            + self.final_norm.len_bytes()
            + self.inv_freq.len_bytes()
    }

    /// A KV cache of `num_blocks` blocks of `block_size` tokens per layer.
    pub fn new_kv_cache(
        &self,
        num_blocks: usize,
        block_size: usize,
    ) -> Result<GpuKvCache, GpuError> {
        let shape = KvCacheShape {
            num_blocks,
            block_size,
            num_kv_heads: self.config.num_kv_heads,
            head_dim: self.config.head_dim,
        };
        GpuKvCache::new(&self.dev, self.dtype, self.config.num_layers, shape)
    }

    fn zeros(&self, elems: usize) -> Result<DeviceBuffer, GpuError> {
        self.dev.alloc_zeroed(elems * self.dtype.size())
    }

    /// One forward pass (see the module docs): writes the batch's K/V into `kv` and returns the
    /// logits of `batch.logits_indices`, `[logits_indices.len(), vocab]` f32 row-major.
    pub fn forward(
        &self,
        batch: &ForwardBatch<'_>,
        kv: &GpuKvCache,
    ) -> Result<Vec<f32>, GpuModelError> {
        self.forward_with_lora(batch, kv, None)
    }

    /// [`Self::forward`] with each token's adapter delta added after every projection: one fused
    /// call per input (q/k/v into the QKV output, gate/up into gate_up, o and down alone), BGMV
    /// when every run is one token, SGMV otherwise.
    pub fn forward_with_lora(
        &self,
        batch: &ForwardBatch<'_>,
        kv: &GpuKvCache,
        lora: Option<&GpuLoraBatch<'_>>,
    ) -> Result<Vec<f32>, GpuModelError> {
        let Some(logits) = self.forward_on_device(batch, kv, lora)? else {
            return Ok(Vec::new());
        };
        let f32_logits = self
            .dev
            .alloc_zeroed(logits.len_bytes() / self.dtype.size() * 4)?;
        let n = batch.logits_indices.len() * self.config.vocab_size;
        ops::to_f32(&self.dev, self.dtype, &logits, n, &f32_logits)?;
        Ok(self.dev.download::<f32>(&f32_logits)?)
    }

    /// [`Self::forward_with_lora`] leaving the logits on the device, `[logits_indices.len(),
    /// vocab]` in the model dtype (`None` when no row asks for logits).
    pub fn forward_on_device(
        &self,
        batch: &ForwardBatch<'_>,
        kv: &GpuKvCache,
        lora: Option<&GpuLoraBatch<'_>>,
    ) -> Result<Option<DeviceBuffer>, GpuModelError> {
        batch.check().map_err(GpuModelError::Batch)?;
        let (dev, dt, c) = (&self.dev, self.dtype, &self.config);
        let t = batch.num_tokens();
        if t == 0 {
            return Ok(None);
        }
        let (hidden, hd) = (c.hidden_size, c.head_dim);
        let (q_dim, kv_dim) = (c.num_heads * hd, c.num_kv_heads * hd);
        let qkv_width = q_dim + 2 * kv_dim;
        let ids = dev.upload(batch.token_ids)?;
        let positions = dev.upload(batch.positions)?;
        let slots = dev.upload(batch.slot_mapping)?;
        let seqs = PagedBatchBuffers::upload(dev, batch.seqs)?;
        let decode_only = batch.seqs.iter().all(|s| s.query_len == 1);
        let shape = AttnShape {
            num_heads: c.num_heads,
            num_kv_heads: c.num_kv_heads,
            head_dim: hd,
            block_size: kv.shape.block_size,
            num_blocks: kv.shape.num_blocks,
            scale: 1.0 / (hd as f32).sqrt(),
        };
        let plan = DecodePlan::new(&seqs.batch(), &shape, DecodeSplit::Auto);
        let decode_ws_bytes = plan.workspace_bytes(t, &shape);
        let workspace = if decode_only && decode_ws_bytes > 0 {
            Some(dev.alloc_zeroed(decode_ws_bytes)?)
        } else {
            None
        };

        let ffn = c.intermediate_size;
        let lora = match lora {
            Some(l) if l.segments.iter().any(|s| s.slot.is_some()) => {
                let units = if l.segments.iter().all(|s| s.len == 1) {
                    let mut slots = vec![None; t];
                    for s in l.segments {
                        if let Some(x) = slots.get_mut(s.start) {
                            *x = s.slot;
                        }
                    }
                    LoraBatch::bgmv(dev, &slots)?
                } else {
                    LoraBatch::sgmv(dev, l.segments, t)?
                };
                Some((l.stack, units))
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
        let lora_stack: Option<&GpuLoraStack> = lora.as_ref().map(|(s, _)| *s);
        let parts_of = move |layer: usize, call: usize| {
            let Some(stack) = lora_stack else {
                return Vec::new();
            };
            let (idx, offs, _) = calls[call];
            idx.iter()
                .zip(offs)
                .map(|(&p, offset)| DeviceFusedPart {
                    slots: &stack.layer(layer)[p],
                    offset,
                })
                .collect()
        };
        let lora_ws = match &lora {
            Some(_) => {
                let most = (0..4)
                    .map(|k| workspace_bytes(&parts_of(0, k), t))
                    .max()
                    .unwrap_or(0);
                Some(dev.alloc_zeroed(most)?)
            }
            None => None,
        };
        let add_lora = |layer: usize, call: usize, x: &DeviceBuffer, y: &DeviceBuffer| {
            let (Some((_, units)), Some(ws)) = (&lora, &lora_ws) else {
                return Ok(());
            };
            let parts = parts_of(layer, call);
            let args = FusedLoraArgs {
                parts: &parts,
                x,
                batch: units,
                workspace: ws,
                y,
                y_stride: calls[call].2,
            };
            add_lora_fused(dev, &args)
        };

        let x = self.zeros(t * hidden)?; // each block's output (the residual's next addend)
        let residual = self.zeros(t * hidden)?;
        let h = self.zeros(t * hidden)?;
        let qkv = self.zeros(t * qkv_width)?;
        let q = self.zeros(t * q_dim)?;
        let attn = self.zeros(t * q_dim)?;
        let gate_up = self.zeros(t * 2 * ffn)?;
        let act = self.zeros(t * ffn)?;
        ops::embedding(dev, dt, &self.embed, c.vocab_size, hidden, &ids, t, &x)?;
        let norm = |x: &DeviceBuffer, first: bool, w: &DeviceBuffer, out: &DeviceBuffer| {
            ops::rms_norm(
                dev,
                dt,
                &RmsNormArgs {
                    x,
                    residual: (!first).then_some(&residual),
                    residual_out: Some(&residual),
                    weight: w,
                    out,
                    rows: t,
                    dim: hidden,
                    eps: c.rms_norm_eps,
                },
            )
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
            norm(&x, i == 0, &l.attn_norm, &h)?;
            match &l.qkv_bias {
                Some(b) => gemm_bias(dev, dt, &h, &l.qkv, b, &qkv, shape_of(qkv_width, hidden))?,
                None => proj(&h, &l.qkv, &qkv, qkv_width, hidden)?,
            }
            add_lora(i, 0, &h, &qkv)?;
            rope_cache(
                dev,
                dt,
                &RopeCacheArgs {
                    qkv: &qkv,
                    positions: &positions,
                    slot_mapping: &slots,
                    inv_freq: &self.inv_freq,
                    style: self.rope_style,
                    k_cache: &kv.k[i],
                    v_cache: &kv.v[i],
                    cache: kv.shape,
                    num_tokens: t,
                    num_heads: c.num_heads,
                    q_out: Some(&q),
                },
            )?;
            let args = PagedAttnArgs {
                q: &q,
                k_cache: &kv.k[i],
                v_cache: &kv.v[i],
                out: &attn,
                batch: seqs.batch(),
                shape,
            };
            if decode_only {
                paged_attention_decode(dev, dt, &args, &plan, workspace.as_ref())?;
            } else {
                paged_attention_prefill(dev, dt, &args)?;
            }
            proj(&attn, &l.o_proj, &x, hidden, q_dim)?;
            add_lora(i, 1, &attn, &x)?;
            norm(&x, false, &l.ffn_norm, &h)?;
            proj(&h, &l.gate_up, &gate_up, 2 * ffn, hidden)?;
            add_lora(i, 2, &h, &gate_up)?;
            ops::silu_mul(dev, dt, &gate_up, t, ffn, &act)?;
            proj(&act, &l.down, &x, hidden, ffn)?;
            add_lora(i, 3, &act, &x)?;
        }
        // Final norm of residual + last block's output, only for the rows that need logits.
        norm(&x, self.layers.is_empty(), &self.final_norm, &h)?;
        let rows: Vec<u32> = batch.logits_indices.iter().map(|&r| r as u32).collect();
        let n = rows.len();
        if n == 0 {
            return Ok(None);
        }
        let picked = self.zeros(n * hidden)?;
        // The embedding gather serves as a row gather: table = h, ids = the wanted rows.
        ops::embedding(dev, dt, &h, t, hidden, &dev.upload(&rows)?, n, &picked)?;
        let logits = self.zeros(n * c.vocab_size)?;
        let head = self.lm_head.as_ref().unwrap_or(&self.embed);
        gemm(
            dev,
            dt,
            &picked,
            head,
            &logits,
            GemmShape {
                m: n,
                n: c.vocab_size,
                k: hidden,
                accumulate: false,
            },
        )?;
        Ok(Some(logits))
    }
}

#[cfg(all(test, feature = "gpu-emu"))]
pub(super) mod tests;

impl crate::model::Network for GpuModel {
    fn config(&self) -> &LlamaConfig {
        &self.config
    }
    fn weight_bytes(&self) -> usize {
        GpuModel::weight_bytes(self)
    }
}
