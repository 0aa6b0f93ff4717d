//! Random-weight models and adapters of any shape, for benchmarks where no weights can be
//! downloaded (the GPU machine has no network). Values come from a counter-based hash (SplitMix64
//! of seed, tensor and index), so every element is computed independently: all cores fill a
//! tensor at once and 16 GB of Llama-3-8B take seconds, not minutes. The numbers mean nothing;
//! they are scaled like an initialised network (|w| < 1/sqrt(fan_in)) so activations stay finite.

use caduceus_kernels::gpu::{DType, Device};
use caduceus_kernels::quant::{GgmlType, Matrix};
use half::bf16;
use rayon::prelude::*;

use super::model::{GpuModel, GpuModelError};
use super::roofline::ModelShape;
use crate::adapters::{AdapterWeights, LoraPair};
use crate::model::config::LlamaConfig;
use crate::model::error::ModelError;
use crate::model::lora::projection_dims;
use crate::model::weights::TensorStore;

/// The Hugging Face config of a Llama with `shape` (untied head, no biases, Llama-3 rope theta);
/// a shape the loader would refuse (e.g. zero heads) is an error naming it.
pub fn config_for(
    shape: &ModelShape,
    max_position_embeddings: usize,
) -> Result<LlamaConfig, ModelError> {
    let json = serde_json::json!({
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "vocab_size": shape.vocab,
        "hidden_size": shape.hidden,
        "intermediate_size": shape.ffn,
        "num_hidden_layers": shape.layers,
        "num_attention_heads": shape.heads,
        "num_key_value_heads": shape.kv_heads,
        "head_dim": shape.head_dim,
        "max_position_embeddings": max_position_embeddings,
        "rms_norm_eps": 1e-5,
        "rope_theta": 500000.0,
        "tie_word_embeddings": false,
    });
    let config = LlamaConfig::from_hf_json(&json.to_string())?;
    config.validate()?;
    Ok(config)
}

/// SplitMix64: a full-period 64-bit mix, the standard seeder of xorshift generators.
fn mix(mut z: u64) -> u64 {
    z = z.wrapping_add(0x9e37_79b9_7f4a_7c15);
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

/// Element `i` of stream `stream`, uniform in `[-scale, scale)`.
fn value(stream: u64, i: u64, scale: f32) -> f32 {
    let bits = mix(stream ^ mix(i));
    // 24 random bits -> [0, 1).
    let u = (bits >> 40) as f32 / (1u64 << 24) as f32;
    (2.0 * u - 1.0) * scale
}

/// `n` values of stream `stream` in `[-scale, scale)`, filled in parallel.
pub fn random_f32(stream: u64, n: usize, scale: f32) -> Vec<f32> {
    let mut v = vec![0f32; n];
    v.par_chunks_mut(1 << 16).enumerate().for_each(|(c, out)| {
        let base = (c << 16) as u64;
        for (j, x) in out.iter_mut().enumerate() {
            *x = value(stream, base + j as u64, scale);
        }
    });
    v
}

/// A `rows x cols` BF16 matrix of stream `stream`, filled in parallel.
fn random_bf16_matrix(stream: u64, rows: usize, cols: usize, scale: f32) -> Matrix {
    let mut bytes = vec![0u8; rows * cols * 2];
    bytes
        .par_chunks_mut(1 << 17)
        .enumerate()
        .for_each(|(c, out)| {
            let base = (c << 16) as u64;
            for (j, pair) in out.chunks_exact_mut(2).enumerate() {
                let x = bf16::from_f32(value(stream, base + j as u64, scale));
                pair.copy_from_slice(&x.to_le_bytes());
            }
        });
    // The byte count is rows * cols * 2 by construction, which is what BF16 rows hold.
    Matrix::new(GgmlType::BF16, rows, cols, bytes)
        .unwrap_or_else(|e| unreachable!("a BF16 buffer of rows * cols * 2 bytes: {e}"))
}

/// Every tensor of a Llama with `config` (GGUF names, as [`GpuModel::from_tensors`] reads them),
/// projections in BF16, norms 1.
pub fn random_store(config: &LlamaConfig, seed: u64) -> TensorStore {
    let c = config;
    let (h, q, kv, f) = (
        c.hidden_size,
        c.num_heads * c.head_dim,
        c.num_kv_heads * c.head_dim,
        c.intermediate_size,
    );
    let mut s = TensorStore::default();
    let mut stream = mix(seed);
    let mut mat = |s: &mut TensorStore, name: String, rows: usize, cols: usize, scale: f32| {
        stream = mix(stream);
        s.insert_matrix(name, random_bf16_matrix(stream, rows, cols, scale));
    };
    let fan_in = |n: usize| 1.0 / (n as f32).sqrt();
    mat(&mut s, "token_embd.weight".into(), c.vocab_size, h, 1.0);
    mat(&mut s, "output.weight".into(), c.vocab_size, h, fan_in(h));
    for i in 0..c.num_layers {
        let n = |t: &str| format!("blk.{i}.{t}");
        mat(&mut s, n("attn_q.weight"), q, h, fan_in(h));
        mat(&mut s, n("attn_k.weight"), kv, h, fan_in(h));
        mat(&mut s, n("attn_v.weight"), kv, h, fan_in(h));
        mat(&mut s, n("attn_output.weight"), h, q, fan_in(q));
        mat(&mut s, n("ffn_gate.weight"), f, h, fan_in(h));
        mat(&mut s, n("ffn_up.weight"), f, h, fan_in(h));
        mat(&mut s, n("ffn_down.weight"), h, f, fan_in(f));
        s.insert_vector(n("attn_norm.weight"), vec![1.0; h]);
        s.insert_vector(n("ffn_norm.weight"), vec![1.0; h]);
    }
    s.insert_vector("output_norm.weight", vec![1.0; h]);
    s
}

/// A random model of `shape` on `dev` in `dtype`.
pub fn random_gpu_model(
    shape: &ModelShape,
    max_model_len: usize,
    dev: Device,
    dtype: DType,
    seed: u64,
) -> Result<GpuModel, GpuModelError> {
    let config = config_for(shape, max_model_len)?;
    let mut store = random_store(&config, seed);
    let model = GpuModel::from_tensors(config, &mut store, dev, dtype)?;
    if let Some(left) = store.names().first() {
        return Err(ModelError::Config(format!("random store left {left} unused")).into());
    }
    Ok(model)
}

/// A random rank-`rank` adapter on all seven projections of every layer (B nonzero, so it
/// changes the output), scale 2 as PEFT's `lora_alpha = 2 r`.
pub fn random_adapter(config: &LlamaConfig, rank: usize, seed: u64) -> AdapterWeights {
    let dims = projection_dims(config);
    let mut stream = mix(seed ^ 0x10a4);
    let layers = (0..config.num_layers)
        .map(|_| {
            std::array::from_fn(|p| {
                let (i, o) = dims[p];
                stream = mix(stream);
                let a = random_f32(stream, rank * i, 1.0 / (i as f32).sqrt());
                stream = mix(stream);
                let b = random_f32(stream, o * rank, 0.05);
                Some(LoraPair { a, b })
            })
        })
        .collect();
    AdapterWeights {
        rank,
        scale: 2.0,
        layers,
        generation: seed,
        source: "random".into(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn values_are_deterministic_bounded_and_spread() {
        let a = random_f32(3, 10_000, 0.5);
        assert_eq!(a, random_f32(3, 10_000, 0.5));
        assert_ne!(a, random_f32(4, 10_000, 0.5));
        assert!(a.iter().all(|x| (-0.5..0.5).contains(x)));
        let mean = a.iter().sum::<f32>() / a.len() as f32;
        let var = a.iter().map(|x| (x - mean).powi(2)).sum::<f32>() / a.len() as f32;
        // Uniform on [-0.5, 0.5): mean 0, variance 1/12.
        assert!(mean.abs() < 0.01, "{mean}");
        assert!((var - 1.0 / 12.0).abs() < 0.003, "{var}");
    }

    #[test]
    fn bf16_matrix_holds_the_same_stream_as_f32() {
        let m = random_bf16_matrix(9, 3, 70_000, 1.0);
        let want = random_f32(9, 3 * 70_000, 1.0);
        let got = m.to_f32();
        assert!(got
            .iter()
            .zip(&want)
            .all(|(g, w)| *g == bf16::from_f32(*w).to_f32()));
    }
}
