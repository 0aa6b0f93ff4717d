//! The Llama-family decoder (Llama 2/3, Mistral, SmolLM2, Qwen2) over a paged KV cache.
//!
//! One [`LlamaModel::forward`] takes a flattened batch mixing prefill chunks and decode tokens of
//! many sequences; each sequence only ever reads its own blocks, so its results do not depend on
//! its batch neighbours.

use caduceus_kernels::attention::{paged_attention, write_kv, AttentionParams, KvCacheShape};
use caduceus_kernels::lora::LoraError;
use caduceus_kernels::ops::{add_inplace, rms_norm, silu_mul_fused, Rope, RopeStyle};
use caduceus_kernels::quant::{matmul, Matrix};
use std::collections::BTreeMap;

use super::batch::ForwardBatch;
use super::config::LlamaConfig;
use super::error::ModelError;
use super::linear::Linear;
use super::lora::LoraBatch;
use super::weights::TensorStore;
use crate::kv_cache::KvCache;

/// One transformer block's weights.
struct LayerWeights {
    attn_norm: Vec<f32>,
    ffn_norm: Vec<f32>,
    /// q, k and v projections fused row-wise: output `[q_dim | kv_dim | kv_dim]`.
    qkv: Linear,
    qkv_bias: Option<Vec<f32>>,
    o_proj: Linear,
    /// gate and up projections fused row-wise: output `[ffn | ffn]`.
    gate_up: Linear,
    down: Linear,
}

/// How weight matrices are held in memory.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum WeightFormat {
    /// Their storage type where a fast kernel exists (quantized GGUF blocks stay quantized and
    /// multiply 8-bit-quantized activations, as llama.cpp does); others are dequantized.
    #[default]
    Native,
    /// Everything dequantized to f32 with f32 activations: ~4x the memory of Q4 weights and slower,
    /// but the arithmetic of an f32 reference (Hugging Face transformers on the dequantized model).
    F32,
}

/// The model's rotary table: GGUF's `rope_freqs.weight` when present, else Llama-3 scaling from
/// the config, in the layout the weights were stored for (taken out of `store`).
pub(crate) fn build_rope(c: &LlamaConfig, store: &mut TensorStore) -> Result<Rope, ModelError> {
    let freq_factors = store.take_optional_vector("rope_freqs.weight", c.head_dim / 2)?;
    let freq_factors = freq_factors.or_else(|| {
        c.rope_scaling.as_ref().map(|s| {
            Rope::llama3_freq_factors(
                c.head_dim,
                c.rope_theta,
                s.factor,
                s.low_freq_factor,
                s.high_freq_factor,
                s.original_max_position_embeddings,
            )
        })
    });
    let style = if c.rope_neox {
        RopeStyle::Neox
    } else {
        RopeStyle::Interleaved
    };
    Ok(Rope::new(
        style,
        c.head_dim,
        c.rope_theta,
        freq_factors.as_deref(),
    ))
}

/// A loaded Llama-family model, ready to run forward passes.
pub struct LlamaModel {
    config: LlamaConfig,
    embed: Matrix,
    /// `None` when the output projection is tied to the embedding.
    lm_head: Option<Matrix>,
    final_norm: Vec<f32>,
    layers: Vec<LayerWeights>,
    rope: Rope,
}

impl LlamaModel {
    /// Builds the model from a tensor store, checking every shape against the config.
    pub fn from_tensors(config: LlamaConfig, store: &mut TensorStore) -> Result<Self, ModelError> {
        Self::from_tensors_with(config, store, WeightFormat::Native)
    }

    /// [`Self::from_tensors`] holding the weights in `format`.
    pub fn from_tensors_with(
        config: LlamaConfig,
        store: &mut TensorStore,
        format: WeightFormat,
    ) -> Result<Self, ModelError> {
        config.validate()?;
        let mut dq = Dequantized {
            counts: BTreeMap::new(),
            all_to_f32: format == WeightFormat::F32,
        };
        let c = &config;
        let (hidden, q_dim, kv_dim) = (
            c.hidden_size,
            c.num_heads * c.head_dim,
            c.num_kv_heads * c.head_dim,
        );
        let embed = store.take_matrix("token_embd.weight", c.vocab_size, hidden)?;
        let lm_head = store.take_optional_matrix("output.weight", c.vocab_size, hidden)?;
        if lm_head.is_none() && !c.tie_word_embeddings {
            return Err(ModelError::MissingTensor("output.weight".into()));
        }
        let final_norm = store.take_vector("output_norm.weight", hidden)?;
        let rope = build_rope(c, store)?;

        let mut layers = Vec::with_capacity(c.num_layers);
        for i in 0..c.num_layers {
            let name = |t: &str| format!("blk.{i}.{t}");
            let q = store.take_matrix(&name("attn_q.weight"), q_dim, hidden)?;
            let k = store.take_matrix(&name("attn_k.weight"), kv_dim, hidden)?;
            let v = store.take_matrix(&name("attn_v.weight"), kv_dim, hidden)?;
            let qkv_bias = take_qkv_bias(store, i, q_dim, kv_dim)?;
            let gate = store.take_matrix(&name("ffn_gate.weight"), c.intermediate_size, hidden)?;
            let up = store.take_matrix(&name("ffn_up.weight"), c.intermediate_size, hidden)?;
            layers.push(LayerWeights {
                attn_norm: store.take_vector(&name("attn_norm.weight"), hidden)?,
                ffn_norm: store.take_vector(&name("ffn_norm.weight"), hidden)?,
                qkv: Linear::fused(vec![dq.fast(q), dq.fast(k), dq.fast(v)])?,
                qkv_bias,
                o_proj: Linear::single(dq.fast(store.take_matrix(
                    &name("attn_output.weight"),
                    hidden,
                    q_dim,
                )?)),
                gate_up: Linear::fused(vec![dq.fast(gate), dq.fast(up)])?,
                down: Linear::single(dq.fast(store.take_matrix(
                    &name("ffn_down.weight"),
                    hidden,
                    c.intermediate_size,
                )?)),
            });
        }
        let embed = dq.fast(embed);
        let lm_head = lm_head.map(|m| dq.fast(m));
        if dq.counts.is_empty() {
            tracing::info!("all weight matrices kept in their storage types");
        } else if dq.all_to_f32 {
            tracing::info!(dequantized_to_f32 = ?dq.counts, "weights dequantized to f32 (weights = f32)");
        } else {
            tracing::info!(dequantized_to_f32 = ?dq.counts, "weight types without a fast kernel were dequantized");
        }
        Ok(Self {
            config,
            embed,
            lm_head,
            final_norm,
            layers,
            rope,
        })
    }

    /// The model's hyper-parameters.
    pub fn config(&self) -> &LlamaConfig {
        &self.config
    }

    /// Shape of one layer's KV cache with `num_blocks` blocks of `block_size` tokens.
    pub fn kv_cache_shape(&self, num_blocks: usize, block_size: usize) -> KvCacheShape {
        KvCacheShape {
            num_blocks,
            block_size,
            num_kv_heads: self.config.num_kv_heads,
            head_dim: self.config.head_dim,
        }
    }

    /// Bytes of KV cache one token occupies across all layers (f32 K and V).
    pub fn kv_bytes_per_token(&self) -> usize {
        2 * self.config.num_layers * self.config.num_kv_heads * self.config.head_dim * 4
    }

    /// Bytes held by the weights.
    pub fn weight_bytes(&self) -> usize {
        let mut n = self.embed.nbytes() + self.lm_head.as_ref().map_or(0, Matrix::nbytes);
        for l in &self.layers {
            n += l.qkv.nbytes() + l.o_proj.nbytes() + l.gate_up.nbytes() + l.down.nbytes();
        }
        n
    }

    /// Runs one forward pass: writes the batch's K/V into `kv`, and returns the logits of the rows
    /// named by `batch.logits_indices`, `[logits_indices.len(), vocab]` row-major.
    pub fn forward(&self, batch: &ForwardBatch<'_>, kv: &mut KvCache) -> Vec<f32> {
        match self.forward_with_lora(batch, kv, None) {
            Ok(logits) => logits,
            Err(_) => unreachable!("a forward pass without adapters has no LoRA errors"),
        }
    }

    /// [`Self::forward`] with per-token LoRA deltas: each token adds the delta of the adapter slot
    /// `lora` assigns it. Fails only if `lora` names a slot outside its stack.
    ///
    /// Runs on a thread of the current rayon pool (moving there once if called from outside
    /// it), so that each of its hundreds of parallel kernels forks and joins inside the pool:
    /// called from outside, each one would cost two cross-thread wake-ups.
    pub fn forward_with_lora(
        &self,
        batch: &ForwardBatch<'_>,
        kv: &mut KvCache,
        lora: Option<&LoraBatch<'_>>,
    ) -> Result<Vec<f32>, LoraError> {
        rayon::scope(|_| self.forward_in_pool(batch, kv, lora))
    }

    fn forward_in_pool(
        &self,
        batch: &ForwardBatch<'_>,
        kv: &mut KvCache,
        lora: Option<&LoraBatch<'_>>,
    ) -> Result<Vec<f32>, LoraError> {
        use crate::adapters::Projection as P;
        let c = &self.config;
        let n = batch.num_tokens();
        let hidden = c.hidden_size;
        let (q_dim, kv_dim) = (c.num_heads * c.head_dim, c.num_kv_heads * c.head_dim);
        let ffn = c.intermediate_size;
        let attn_params = AttentionParams {
            num_heads: c.num_heads,
            num_kv_heads: c.num_kv_heads,
            head_dim: c.head_dim,
            scale: 1.0 / (c.head_dim as f32).sqrt(),
        };

        let mut x = vec![0f32; n * hidden];
        for (row, &tok) in x.chunks_exact_mut(hidden).zip(batch.token_ids) {
            self.embed.dequantize_row(tok as usize, row);
        }
        let mut normed = vec![0f32; n * hidden];
        let mut qkv = vec![0f32; n * (q_dim + 2 * kv_dim)];
        let (mut q, mut k, mut v) = (
            vec![0f32; n * q_dim],
            vec![0f32; n * kv_dim],
            vec![0f32; n * kv_dim],
        );
        let mut attn = vec![0f32; n * q_dim];
        let mut proj = vec![0f32; n * hidden];
        let mut gate_up = vec![0f32; n * 2 * ffn];
        let mut act = vec![0f32; n * ffn];

        let qkv_width = q_dim + 2 * kv_dim;
        for (i, (layer, cache)) in self.layers.iter().zip(kv.layers_mut()).enumerate() {
            // Adds layer i's deltas of projections sharing the input `x` (each with the column of
            // `y`'s rows where its outputs start) in one pass.
            let delta = |parts: &[(P, usize)], x: &[f32], y: &mut [f32], stride: usize| {
                lora.map_or(Ok(()), |l| l.stack.apply(l, i, parts, x, (y, stride)))
            };
            rms_norm(&x, &layer.attn_norm, c.rms_norm_eps, &mut normed);
            layer.qkv.forward(&normed, &mut qkv);
            let qkv_parts = [(P::Q, 0), (P::K, q_dim), (P::V, q_dim + kv_dim)];
            delta(&qkv_parts, &normed, &mut qkv, qkv_width)?;
            split_qkv(
                &qkv,
                layer.qkv_bias.as_deref(),
                [q_dim, kv_dim],
                (&mut q, &mut k, &mut v),
            );
            self.rope.apply(&mut q, c.num_heads, batch.positions);
            self.rope.apply(&mut k, c.num_kv_heads, batch.positions);
            write_kv(cache, &k, &v, batch.slot_mapping);
            paged_attention(&q, cache, batch.seqs, &attn_params, &mut attn);
            layer.o_proj.forward(&attn, &mut proj);
            delta(&[(P::O, 0)], &attn, &mut proj, hidden)?;
            add_inplace(&mut x, &proj);

            rms_norm(&x, &layer.ffn_norm, c.rms_norm_eps, &mut normed);
            layer.gate_up.forward(&normed, &mut gate_up);
            delta(
                &[(P::Gate, 0), (P::Up, ffn)],
                &normed,
                &mut gate_up,
                2 * ffn,
            )?;
            silu_mul_fused(&gate_up, ffn, &mut act);
            layer.down.forward(&act, &mut proj);
            delta(&[(P::Down, 0)], &act, &mut proj, hidden)?;
            add_inplace(&mut x, &proj);
        }

        let m = batch.logits_indices.len();
        let mut last = vec![0f32; m * hidden];
        for (dst, &row) in last.chunks_exact_mut(hidden).zip(batch.logits_indices) {
            dst.copy_from_slice(&x[row * hidden..(row + 1) * hidden]);
        }
        let mut last_normed = vec![0f32; m * hidden];
        rms_norm(&last, &self.final_norm, c.rms_norm_eps, &mut last_normed);
        let head = self.lm_head.as_ref().unwrap_or(&self.embed);
        let mut logits = vec![0f32; m * c.vocab_size];
        matmul(&last_normed, head, &mut logits);
        Ok(logits)
    }
}

/// Layer `layer`'s q/k/v biases (Qwen2-style `attention_bias`) fused as `[q | k | v]`, zeros
/// for a missing part; `None` when the layer has none.
pub(crate) fn take_qkv_bias(
    store: &mut TensorStore,
    layer: usize,
    q_dim: usize,
    kv_dim: usize,
) -> Result<Option<Vec<f32>>, ModelError> {
    let name = |t: &str| format!("blk.{layer}.{t}");
    let biases = [
        store.take_optional_vector(&name("attn_q.bias"), q_dim)?,
        store.take_optional_vector(&name("attn_k.bias"), kv_dim)?,
        store.take_optional_vector(&name("attn_v.bias"), kv_dim)?,
    ];
    if biases.iter().all(Option::is_none) {
        return Ok(None);
    }
    let mut b = Vec::with_capacity(q_dim + 2 * kv_dim);
    for (part, len) in biases.into_iter().zip([q_dim, kv_dim, kv_dim]) {
        b.extend(part.unwrap_or_else(|| vec![0.0; len]));
    }
    Ok(Some(b))
}

/// Splits fused `[q | k | v]` rows into separate buffers, adding the optional fused bias.
fn split_qkv(
    qkv: &[f32],
    bias: Option<&[f32]>,
    [q_dim, kv_dim]: [usize; 2],
    (q, k, v): (&mut [f32], &mut [f32], &mut [f32]),
) {
    let width = q_dim + 2 * kv_dim;
    for (t, row) in qkv.chunks_exact(width).enumerate() {
        let parts = [
            (&mut q[t * q_dim..(t + 1) * q_dim], 0),
            (&mut k[t * kv_dim..(t + 1) * kv_dim], q_dim),
            (&mut v[t * kv_dim..(t + 1) * kv_dim], q_dim + kv_dim),
        ];
        for (dst, start) in parts {
            let src = &row[start..start + dst.len()];
            match bias {
                Some(b) => {
                    let b = &b[start..start + dst.len()];
                    for ((d, s), b) in dst.iter_mut().zip(src).zip(b) {
                        *d = s + b;
                    }
                }
                None => dst.copy_from_slice(src),
            }
        }
    }
}

/// Records which weight types had no fast kernel and were dequantized, for the load log line.
#[derive(Default)]
struct Dequantized {
    /// Matrices dequantized, by storage type.
    counts: BTreeMap<&'static str, usize>,
    /// Dequantize every non-f32 matrix ([`WeightFormat::F32`]).
    all_to_f32: bool,
}

impl Dequantized {
    fn fast(&mut self, m: Matrix) -> Matrix {
        let name = m.ty().name();
        if self.all_to_f32 && name != "F32" {
            *self.counts.entry(name).or_default() += 1;
            return Matrix::from_f32(m.rows(), m.cols(), &m.to_f32());
        }
        if !m.ty().has_fast_matmul() {
            *self.counts.entry(name).or_default() += 1;
        }
        m.into_fast()
    }
}
