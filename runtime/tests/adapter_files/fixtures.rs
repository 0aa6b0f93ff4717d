//! Hand-built PEFT adapters for the loader tests: a tiny base config, a valid adapter for it, and
//! helpers to write any config and tensor set.

use std::path::{Path, PathBuf};

use caduceus_runtime::adapters::peft::{load_adapter, AdapterLimits};
use caduceus_runtime::adapters::{AdapterWeights, Projection};
use caduceus_runtime::model::config::{LlamaConfig, WeightSource};
use safetensors::tensor::{Dtype, TensorView};
use serde_json::{json, Value};

pub const LIMITS: AdapterLimits = AdapterLimits {
    max_rank: 64,
    max_file_bytes: 1 << 30,
};

pub use crate::support::{default_model, shared};

/// The tiny-llama reference model's config (HF layout, so `rope_neox`).
pub fn tiny_llama() -> LlamaConfig {
    let json = std::fs::read_to_string(shared("reference/tiny-llama/model/config.json")).unwrap();
    LlamaConfig::from_hf_json(&json).unwrap()
}

/// A very small base: hidden 8, 2 heads and 1 KV head of dim 4, MLP 12, 2 layers.
pub fn small_base(rope_neox: bool) -> LlamaConfig {
    LlamaConfig {
        architecture: "llama".into(),
        vocab_size: 16,
        hidden_size: 8,
        intermediate_size: 12,
        num_layers: 2,
        num_heads: 2,
        num_kv_heads: 1,
        head_dim: 4,
        rms_norm_eps: 1e-5,
        rope_theta: 10_000.0,
        rope_scaling: None,
        max_position_embeddings: 64,
        tie_word_embeddings: true,
        attention_bias: false,
        rope_neox,
        source: if rope_neox {
            WeightSource::HuggingFace
        } else {
            WeightSource::Gguf
        },
    }
}

/// `(in_dim, out_dim)` of `p` in [`small_base`].
pub fn small_dims(p: Projection) -> (usize, usize) {
    match p {
        Projection::Q => (8, 8),
        Projection::K | Projection::V => (8, 4),
        Projection::O => (8, 8),
        Projection::Gate | Projection::Up => (8, 12),
        Projection::Down => (12, 8),
    }
}

/// A config as PEFT writes it.
pub fn peft_config(rank: usize, alpha: f64, targets: &[&str]) -> Value {
    json!({
        "alpha_pattern": {},
        "base_model_name_or_path": "small",
        "bias": "none",
        "fan_in_fan_out": false,
        "layers_to_transform": null,
        "lora_alpha": alpha,
        "modules_to_save": null,
        "peft_type": "LORA",
        "r": rank,
        "rank_pattern": {},
        "target_modules": targets,
        "use_dora": false,
        "use_rslora": false
    })
}

/// One tensor to write: name, dtype, shape, raw little-endian bytes.
pub struct RawTensor {
    pub name: String,
    pub dtype: Dtype,
    pub shape: Vec<usize>,
    pub data: Vec<u8>,
}

impl RawTensor {
    pub fn f32(name: impl Into<String>, shape: Vec<usize>, values: &[f32]) -> RawTensor {
        RawTensor {
            name: name.into(),
            dtype: Dtype::F32,
            shape,
            data: values.iter().flat_map(|v| v.to_le_bytes()).collect(),
        }
    }
}

/// PEFT's tensor name for `p` of `layer`.
pub fn tensor_name(layer: usize, p: Projection, half: &str) -> String {
    let block = if p.index() < 4 { "self_attn" } else { "mlp" };
    format!(
        "base_model.model.model.layers.{layer}.{block}.{}.lora_{half}.weight",
        p.module_name()
    )
}

/// Deterministic, distinct values: `A[i] = 0.01 * (i + 1) + layer + p/10`, B the negation.
pub fn pair_values(layer: usize, p: Projection, len: usize, half: &str) -> Vec<f32> {
    let sign = if half == "A" { 1.0 } else { -1.0 };
    (0..len)
        .map(|i| sign * (0.01 * (i as f32 + 1.0) + layer as f32 + p.index() as f32 / 10.0))
        .collect()
}

/// Valid lora_A/lora_B tensors of every layer of [`small_base`] for `targets`.
pub fn small_tensors(rank: usize, targets: &[Projection]) -> Vec<RawTensor> {
    let mut out = Vec::new();
    for layer in 0..2 {
        for &p in targets {
            let (i, o) = small_dims(p);
            let a = pair_values(layer, p, rank * i, "A");
            let b = pair_values(layer, p, o * rank, "B");
            out.push(RawTensor::f32(
                tensor_name(layer, p, "A"),
                vec![rank, i],
                &a,
            ));
            out.push(RawTensor::f32(
                tensor_name(layer, p, "B"),
                vec![o, rank],
                &b,
            ));
        }
    }
    out
}

/// Serializes tensors to a safetensors image.
pub fn safetensors_bytes(tensors: &[RawTensor]) -> Vec<u8> {
    let views: Vec<(&str, TensorView<'_>)> = tensors
        .iter()
        .map(|t| {
            let view = TensorView::new(t.dtype, t.shape.clone(), &t.data).unwrap();
            (t.name.as_str(), view)
        })
        .collect();
    safetensors::serialize(views, None).unwrap()
}

/// Writes an adapter directory `root/name` and returns it.
pub fn write_adapter(root: &Path, name: &str, config: &Value, tensors: &[RawTensor]) -> PathBuf {
    let dir = root.join(name);
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::write(dir.join("adapter_config.json"), config.to_string()).unwrap();
    std::fs::write(
        dir.join("adapter_model.safetensors"),
        safetensors_bytes(tensors),
    )
    .unwrap();
    dir
}

/// Loads `dir` against [`small_base`] (HF row order) and returns the error message.
pub fn load_err(dir: &Path) -> String {
    load_err_with(dir, &LIMITS)
}

pub fn load_err_with(dir: &Path, limits: &AdapterLimits) -> String {
    match load_adapter(dir, &small_base(true), limits) {
        Ok(w) => panic!(
            "{} loaded (rank {}), expected an error",
            dir.display(),
            w.rank
        ),
        Err(e) => e.to_string(),
    }
}

/// Asserts `message` names the adapter directory and contains every needle.
pub fn assert_names(message: &str, dir: &Path, needles: &[&str]) {
    assert!(
        message.contains(&dir.display().to_string()),
        "error does not name the adapter dir: {message}"
    );
    for needle in needles {
        assert!(
            message.contains(needle),
            "expected {needle:?} in: {message}"
        );
    }
}

/// Loads a valid small adapter.
pub fn load_small(dir: &Path, rope_neox: bool) -> AdapterWeights {
    load_adapter(dir, &small_base(rope_neox), &LIMITS).unwrap()
}

/// Reads one tensor of a safetensors file as f32 (F32 only).
pub fn raw_f32(file: &Path, name: &str) -> (Vec<usize>, Vec<f32>) {
    let bytes = std::fs::read(file).unwrap();
    let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
    let t = st.tensor(name).unwrap();
    assert_eq!(t.dtype(), Dtype::F32);
    let values = t
        .data()
        .chunks_exact(4)
        .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
        .collect();
    (t.shape().to_vec(), values)
}
