//! Hugging Face directories (sharded, half precision) and config.json variants.

use std::path::Path;

use caduceus_runtime::model::config::{Llama3RopeScaling, LlamaConfig};
use caduceus_runtime::model::error::ModelError;
use caduceus_runtime::model::weights::TensorStore;

use super::scratch_dir;

/// Writes a safetensors file of (HF name, shape, dtype, raw bytes).
fn write_safetensors(path: &Path, tensors: &[(&str, Vec<usize>, safetensors::Dtype, Vec<u8>)]) {
    let views: Vec<(String, safetensors::tensor::TensorView<'_>)> = tensors
        .iter()
        .map(|(n, shape, dt, data)| {
            (
                n.to_string(),
                safetensors::tensor::TensorView::new(*dt, shape.clone(), data).unwrap(),
            )
        })
        .collect();
    safetensors::serialize_to_file(views, None, path).unwrap();
}

#[test]
fn sharded_hf_dirs_with_half_precision_load() {
    use safetensors::Dtype;
    let dir = scratch_dir("hf-sharded");
    let bf16: Vec<u8> = [1.0f32, -2.0, 0.5, 4.0, 8.0, -0.125]
        .iter()
        .flat_map(|v| half::bf16::from_f32(*v).to_le_bytes())
        .collect();
    let f16: Vec<u8> = [0.5f32, 0.25, -1.0]
        .iter()
        .flat_map(|v| half::f16::from_f32(*v).to_le_bytes())
        .collect();
    write_safetensors(
        &dir.join("model-00001-of-00002.safetensors"),
        &[
            (
                "model.layers.0.self_attn.q_proj.weight",
                vec![2, 3],
                Dtype::BF16,
                bf16,
            ),
            (
                "model.layers.0.self_attn.rotary_emb.inv_freq",
                vec![3],
                Dtype::F16,
                f16.clone(),
            ),
        ],
    );
    write_safetensors(
        &dir.join("model-00002-of-00002.safetensors"),
        &[("model.norm.weight", vec![3], Dtype::F16, f16)],
    );
    let index = r#"{"metadata": {}, "weight_map": {
        "model.layers.0.self_attn.q_proj.weight": "model-00001-of-00002.safetensors",
        "model.norm.weight": "model-00002-of-00002.safetensors"}}"#;
    std::fs::write(dir.join("model.safetensors.index.json"), index).unwrap();

    let mut store = TensorStore::from_hf_dir(&dir).unwrap();
    assert_eq!(store.names(), ["blk.0.attn_q.weight", "output_norm.weight"]);
    let summary: Vec<_> = store.type_summary().into_iter().collect();
    assert_eq!(summary, [("BF16".into(), 1), ("F16".into(), 1)]);
    let q = store.take_matrix("blk.0.attn_q.weight", 2, 3).unwrap();
    assert_eq!(q.to_f32(), [1.0, -2.0, 0.5, 4.0, 8.0, -0.125]);
    assert_eq!(
        store.take_vector("output_norm.weight", 3).unwrap(),
        [0.5, 0.25, -1.0]
    );

    let evil = r#"{"weight_map": {"model.norm.weight": "../model.safetensors"}}"#;
    std::fs::write(dir.join("model.safetensors.index.json"), evil).unwrap();
    let err = TensorStore::from_hf_dir(&dir).unwrap_err().to_string();
    assert!(err.contains("not a plain file name"), "{err}");
    std::fs::remove_dir_all(&dir).unwrap();

    let empty = scratch_dir("hf-empty");
    let err = TensorStore::from_hf_dir(&empty).unwrap_err();
    assert!(matches!(err, ModelError::NotFound { .. }), "{err}");
    std::fs::remove_dir_all(empty).unwrap();
}

const HF_BASE: &str = r#""hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2,
    "num_attention_heads": 4, "vocab_size": 100, "max_position_embeddings": 512"#;

fn hf(extra: &str) -> Result<LlamaConfig, ModelError> {
    LlamaConfig::from_hf_json(&format!("{{{HF_BASE}, {extra}}}"))
}

#[test]
fn hf_llama3_rope_scaling_in_both_layouts() {
    let want = Some(Llama3RopeScaling {
        factor: 32.0,
        low_freq_factor: 1.0,
        high_freq_factor: 4.0,
        original_max_position_embeddings: 8192,
    });
    let scaling = r#""factor": 32.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
        "original_max_position_embeddings": 8192, "rope_type": "llama3""#;
    let v4 = hf(&format!(
        r#""model_type": "llama", "rope_theta": 500000.0, "rope_scaling": {{{scaling}}}"#
    ))
    .unwrap();
    let v5 = hf(&format!(
        r#""model_type": "llama", "rope_parameters": {{"rope_theta": 500000.0, {scaling}}}"#
    ))
    .unwrap();
    for c in [&v4, &v5] {
        assert_eq!(c.rope_scaling, want);
        assert_eq!(c.rope_theta, 500_000.0);
        assert_eq!((c.num_kv_heads, c.head_dim, c.rms_norm_eps), (4, 16, 1e-6));
        assert!(!c.tie_word_embeddings && c.rope_neox && !c.attention_bias);
    }
    let err = hf(r#""model_type": "llama", "rope_scaling": {"rope_type": "yarn", "factor": 4.0}"#)
        .unwrap_err();
    assert!(err.to_string().contains("yarn"), "{err}");
    let err =
        hf(r#""model_type": "llama", "rope_scaling": {"rope_type": "llama3", "factor": 8.0}"#)
            .unwrap_err();
    assert!(err.to_string().contains("low_freq_factor"), "{err}");
}

#[test]
fn hf_qwen2_mistral_and_unsupported_types() {
    let q = hf(r#""model_type": "qwen2", "num_key_value_heads": 2, "tie_word_embeddings": true,
        "rope_theta": 1000000.0, "rms_norm_eps": 1e-6, "sliding_window": 4096, "use_sliding_window": false"#)
    .unwrap();
    assert_eq!(q.architecture, "qwen2");
    assert!(q.attention_bias && q.tie_word_embeddings && q.rope_neox);
    assert_eq!((q.num_kv_heads, q.rope_theta), (2, 1e6));

    let m =
        hf(r#""architectures": ["MistralForCausalLM"], "sliding_window": 4096, "head_dim": 32"#)
            .unwrap();
    assert_eq!(
        (m.architecture.as_str(), m.head_dim, m.attention_bias),
        ("mistral", 32, false)
    );
    let biased = hf(r#""model_type": "llama", "attention_bias": true"#).unwrap();
    assert!(biased.attention_bias);

    let err = hf(r#""model_type": "gpt_neox""#).unwrap_err();
    assert!(
        matches!(&err, ModelError::UnsupportedArchitecture(a) if a == "gpt_neox"),
        "{err}"
    );
    let err = hf(r#""architectures": ["GPT2LMHeadModel"]"#).unwrap_err();
    assert!(err.to_string().contains("GPT2LMHeadModel"), "{err}");
    let err = hf(r#""model_type": "llama", "num_key_value_heads": 3"#).unwrap_err();
    assert!(err.to_string().contains("num_kv_heads 3"), "{err}");
    let err = hf(r#""model_type": "llama", "hidden_act": "gelu""#).unwrap_err();
    assert!(err.to_string().contains("gelu"), "{err}");
    let err =
        LlamaConfig::from_hf_json(r#"{"model_type": "llama", "hidden_size": 64}"#).unwrap_err();
    assert!(err.to_string().contains("missing"), "{err}");
}
