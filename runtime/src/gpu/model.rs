//! The Llama forward pass on a [`Device`] (a GPU, or the kernels' host emulation): bf16/f16
//! weights and paged KV cache on the device, the CUDA kernels of `caduceus_kernels::gpu` for
//! every op. Same batch contract as the CPU [`crate::model::LlamaModel::forward`]: a flattened
//! [`ForwardBatch`] mixing prefill chunks and decode tokens, logits for `logits_indices`.
//!
//! A step runs in a preallocated [`Workspace`] with one upload (`step`); decode steps can be
//! captured as graphs (`super::decode_graph`).

use caduceus_kernels::attention::KvCacheShape;
use caduceus_kernels::gpu::attention::AttentionKernel;
use caduceus_kernels::gpu::lora::LoraGpuError;
use caduceus_kernels::gpu::ops;
use caduceus_kernels::gpu::{DType, Device, DeviceBuffer, GpuError};
use caduceus_kernels::ops::RopeStyle;
use caduceus_kernels::quant::Matrix;
use half::{bf16, f16};
use rayon::prelude::*;

use crate::model::batch::ForwardBatch;
use crate::model::config::LlamaConfig;
use crate::model::error::ModelError;
use crate::model::llama::{build_rope, take_qkv_bias};
use crate::model::weights::TensorStore;

use super::lora::GpuLoraBatch;
use super::workspace::{StepLimits, Workspace};

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

    /// Layer `i`'s K and V pools (`None` past the last layer).
    pub fn layer(&self, i: usize) -> Option<(&DeviceBuffer, &DeviceBuffer)> {
        self.k.get(i).zip(self.v.get(i))
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
    /// The cores attention runs on (`model.attention_kernel`).
    attention_kernel: AttentionKernel,
}

/// Uploads f32 values converted to the dtype.
fn upload_as(dev: &Device, dtype: DType, v: &[f32]) -> Result<DeviceBuffer, GpuError> {
    match dtype {
        DType::Bf16 => dev.upload(&v.iter().map(|&x| bf16::from_f32(x)).collect::<Vec<_>>()),
        DType::F16 => dev.upload(&v.iter().map(|&x| f16::from_f32(x)).collect::<Vec<_>>()),
    }
}

/// Uploads the rows of `parts` (stacked, each `cols` wide) converted to the dtype. Rows are
/// dequantized and rounded in parallel straight into the dtype (an 8B model is 16 GB: one
/// thread and an f32 copy of each matrix made loading it minutes, not seconds).
fn upload_rows(
    dev: &Device,
    dtype: DType,
    parts: &[Matrix],
    cols: usize,
) -> Result<DeviceBuffer, GpuError> {
    fn convert<T: Copy + Default + Send>(
        parts: &[Matrix],
        cols: usize,
        round: fn(f32) -> T,
    ) -> Vec<T> {
        let rows: Vec<(&Matrix, usize)> = parts
            .iter()
            .flat_map(|m| (0..m.rows()).map(move |r| (m, r)))
            .collect();
        let mut out = vec![T::default(); rows.len() * cols];
        if cols == 0 {
            return out;
        }
        out.par_chunks_mut(cols).zip(rows.par_iter()).for_each_init(
            || vec![0f32; cols],
            |row, (dst, &(m, r))| {
                m.dequantize_row(r, row);
                for (d, &x) in dst.iter_mut().zip(row.iter()) {
                    *d = round(x);
                }
            },
        );
        out
    }
    match dtype {
        DType::Bf16 => dev.upload(&convert(parts, cols, bf16::from_f32)),
        DType::F16 => dev.upload(&convert(parts, cols, f16::from_f32)),
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
            let mut parts = Vec::with_capacity(names.len());
            for &(name, rows) in names {
                parts.push(store.take_matrix(name, rows, cols)?);
            }
            Ok::<_, GpuModelError>(upload_rows(&dev, dtype, &parts, cols)?)
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
            attention_kernel: AttentionKernel::default(),
            dev,
            dtype,
            config,
        })
    }

    /// Runs attention on `kernel`'s cores from now on (graphs captured before keep theirs).
    pub fn set_attention_kernel(&mut self, kernel: AttentionKernel) {
        self.attention_kernel = kernel;
    }

    /// The cores attention runs on.
    pub fn attention_kernel(&self) -> AttentionKernel {
        self.attention_kernel
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
    /// vocab]` in the model dtype (`None` when no row asks for logits). Allocates a
    /// [`Workspace`] sized for this batch alone: the engine keeps one and calls
    /// [`Self::forward_in`].
    pub fn forward_on_device(
        &self,
        batch: &ForwardBatch<'_>,
        kv: &GpuKvCache,
        lora: Option<&GpuLoraBatch<'_>>,
    ) -> Result<Option<DeviceBuffer>, GpuModelError> {
        batch.check().map_err(GpuModelError::Batch)?;
        if batch.num_tokens() == 0 {
            return Ok(None);
        }
        let bs = kv.shape.block_size;
        let longest = batch.seqs.iter().map(|s| s.block_table.len()).max();
        let limits = StepLimits {
            max_num_batched_tokens: batch.num_tokens(),
            max_num_seqs: batch.seqs.len().max(batch.logits_indices.len()),
            max_scored_rows: 0,
            max_model_len: longest.unwrap_or(1).max(1) * bs,
        };
        let rank = lora
            .and_then(|l| l.stack.layer(0).first())
            .map_or(0, |slots| slots.shape().max_rank);
        let mut ws = Workspace::new(&self.dev, &self.config, self.dtype, bs, limits, rank)?;
        let rows = self.forward_in(batch, kv, lora, &mut ws)?;
        Ok((rows > 0).then(|| ws.into_logits()))
    }
}

pub mod profile;
mod step;
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
