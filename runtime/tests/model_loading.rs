//! Model-file loading: GGUF round trips and corruption, the default SmolLM2 GGUF, the tiny HF
//! reference model and config.json variants.

#[path = "support/fetched.rs"]
mod fetched;
#[path = "model_loading/gguf_format.rs"]
mod gguf_format;
#[path = "model_loading/hf.rs"]
mod hf;

use std::path::{Path, PathBuf};

use caduceus_kernels::quant::Matrix;
use caduceus_runtime::model::config::{LlamaConfig, WeightSource};
use caduceus_runtime::model::error::ModelError;
use caduceus_runtime::model::gguf::{GgufFile, GgufValue};
use caduceus_runtime::model::gguf_writer::GgufWriter;
use caduceus_runtime::model::weights::TensorStore;

const TINY_LLAMA: &str = concat!(
    env!("CARGO_MANIFEST_DIR"),
    "/../../shared/reference/tiny-llama/model"
);

/// A fresh scratch directory per test (no tempfile crate in the workspace).
fn scratch_dir(name: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("caduceus-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    dir
}
fn tiny_config(arch: &str) -> LlamaConfig {
    LlamaConfig {
        architecture: arch.into(),
        vocab_size: 40,
        hidden_size: 32,
        intermediate_size: 48,
        num_layers: 2,
        num_heads: 4,
        num_kv_heads: 2,
        head_dim: 8,
        rms_norm_eps: 1e-6,
        rope_theta: 500_000.0,
        rope_scaling: None,
        max_position_embeddings: 128,
        tie_word_embeddings: arch == "llama",
        attention_bias: arch == "qwen2",
        rope_neox: arch == "qwen2",
        source: WeightSource::Gguf,
    }
}

/// Takes every canonical tensor the forward pass needs, checking shapes, and returns leftovers.
fn take_all(store: &mut TensorStore, c: &LlamaConfig) -> Vec<String> {
    let (h, q, kv) = (
        c.hidden_size,
        c.num_heads * c.head_dim,
        c.num_kv_heads * c.head_dim,
    );
    store
        .take_matrix("token_embd.weight", c.vocab_size, h)
        .unwrap();
    let output = store
        .take_optional_matrix("output.weight", c.vocab_size, h)
        .unwrap();
    assert_eq!(output.is_none(), c.tie_word_embeddings);
    store.take_vector("output_norm.weight", h).unwrap();
    for i in 0..c.num_layers {
        let n = |s: &str| format!("blk.{i}.{s}");
        store.take_vector(&n("attn_norm.weight"), h).unwrap();
        store.take_vector(&n("ffn_norm.weight"), h).unwrap();
        store.take_matrix(&n("attn_q.weight"), q, h).unwrap();
        store.take_matrix(&n("attn_k.weight"), kv, h).unwrap();
        store.take_matrix(&n("attn_v.weight"), kv, h).unwrap();
        for (b, len) in [("attn_q.bias", q), ("attn_k.bias", kv), ("attn_v.bias", kv)] {
            let bias = store.take_optional_vector(&n(b), len).unwrap();
            assert_eq!(bias.is_some(), c.attention_bias, "{}", n(b));
        }
        store.take_matrix(&n("attn_output.weight"), h, q).unwrap();
        store
            .take_matrix(&n("ffn_gate.weight"), c.intermediate_size, h)
            .unwrap();
        store
            .take_matrix(&n("ffn_up.weight"), c.intermediate_size, h)
            .unwrap();
        store
            .take_matrix(&n("ffn_down.weight"), h, c.intermediate_size)
            .unwrap();
    }
    store.names()
}

#[test]
fn tiny_gguf_models_round_trip_config_and_weights() {
    for arch in ["llama", "qwen2", "mistral"] {
        let cfg = tiny_config(arch);
        let f =
            GgufFile::from_bytes(GgufWriter::tiny_llama(&cfg, 7).to_bytes(), "tiny.gguf").unwrap();
        assert_eq!(LlamaConfig::from_gguf(&f).unwrap(), cfg, "{arch}");
        let mut store = TensorStore::from_gguf(&f).unwrap();
        assert_eq!(take_all(&mut store, &cfg), Vec::<String>::new(), "{arch}");
    }
}

#[test]
fn gguf_config_errors_name_what_is_missing() {
    let cfg = tiny_config("llama");
    let mut w = GgufWriter::tiny_llama(&cfg, 1);
    w.add_metadata("general.architecture", GgufValue::String("gpt2".into()));
    let err = GgufFile::from_bytes(w.to_bytes(), "x.gguf").unwrap_err();
    assert!(
        err.to_string().contains("general.architecture"),
        "duplicate key: {err}"
    );

    let mut w = GgufWriter::new();
    w.add_metadata("general.architecture", GgufValue::String("gpt2".into()));
    let f = GgufFile::from_bytes(w.to_bytes(), "gpt2.gguf").unwrap();
    let err = LlamaConfig::from_gguf(&f).unwrap_err();
    assert!(
        matches!(&err, ModelError::UnsupportedArchitecture(a) if a == "gpt2"),
        "{err}"
    );

    let mut w = GgufWriter::new();
    w.add_metadata("general.architecture", GgufValue::String("llama".into()));
    w.add_metadata("llama.embedding_length", GgufValue::U32(64));
    w.add_metadata("llama.attention.head_count", GgufValue::U32(4));
    w.add_metadata("llama.vocab_size", GgufValue::U32(10));
    let f = GgufFile::from_bytes(w.to_bytes(), "partial.gguf").unwrap();
    let err = LlamaConfig::from_gguf(&f).unwrap_err();
    assert!(
        matches!(&err, ModelError::MissingMetadata(k) if k == "llama.feed_forward_length"),
        "{err}"
    );
}

#[test]
fn take_checks_shapes_and_presence() {
    let mut store = TensorStore::default();
    store.insert_matrix("m", Matrix::from_f32(2, 3, &[0.0; 6]));
    store.insert_vector("v", vec![1.0; 4]);
    let err = store.take_matrix("m", 3, 2).unwrap_err();
    assert!(
        matches!(&err, ModelError::Shape { tensor, expected, actual } if tensor == "m" && *expected == [3, 2] && *actual == [2, 3]),
        "{err}"
    );
    let err = store.take_vector("v", 5).unwrap_err();
    assert!(
        err.to_string().contains("expected shape [5], found [4]"),
        "{err}"
    );
    let err = store.take_matrix("gone", 1, 1).unwrap_err();
    assert!(
        matches!(&err, ModelError::MissingTensor(n) if n == "gone"),
        "{err}"
    );
    assert!(store.take_optional_vector("gone", 1).unwrap().is_none());
}

#[test]
fn default_smollm2_gguf_matches_its_published_facts() {
    let Some(path) = fetched::default_model() else {
        return;
    };
    let f = GgufFile::open(&path).unwrap();
    let cfg = LlamaConfig::from_gguf(&f).unwrap();
    let expected = LlamaConfig {
        architecture: "llama".into(),
        vocab_size: 49152,
        hidden_size: 576,
        intermediate_size: 1536,
        num_layers: 30,
        num_heads: 9,
        num_kv_heads: 3,
        head_dim: 64,
        rms_norm_eps: 1e-5,
        rope_theta: 100_000.0,
        rope_scaling: None,
        max_position_embeddings: 8192,
        tie_word_embeddings: true,
        attention_bias: false,
        rope_neox: false,
        source: WeightSource::Gguf,
    };
    assert_eq!(cfg, expected);
    assert_eq!(
        f.get_str_array("tokenizer.ggml.tokens").map(|t| t.len()),
        Some(49152)
    );
    assert_eq!(
        f.get_str_array("tokenizer.ggml.merges").map(|t| t.len()),
        Some(48900)
    );
    assert_eq!(f.get_str("tokenizer.ggml.model"), Some("gpt2"));
    assert_eq!(f.get_u64("tokenizer.ggml.bos_token_id"), Some(1));
    assert_eq!(f.get_u64("tokenizer.ggml.eos_token_id"), Some(2));

    let mut store = TensorStore::from_gguf(&f).unwrap();
    let summary: Vec<_> = store.type_summary().into_iter().collect();
    assert_eq!(
        summary,
        [("F32".into(), 61), ("Q4_1".into(), 210), ("Q8_0".into(), 1)]
    );
    assert_eq!(take_all(&mut store, &cfg), Vec::<String>::new());
}

#[test]
fn tiny_hf_reference_model_loads_every_tensor() {
    let dir = Path::new(TINY_LLAMA);
    assert!(
        dir.join("config.json").exists(),
        "{TINY_LLAMA} is missing: the shared reference material must be at ../shared"
    );
    let cfg = LlamaConfig::from_hf_json(&std::fs::read_to_string(dir.join("config.json")).unwrap())
        .unwrap();
    let expected = LlamaConfig {
        architecture: "llama".into(),
        vocab_size: 258,
        hidden_size: 64,
        intermediate_size: 160,
        num_layers: 2,
        num_heads: 4,
        num_kv_heads: 2,
        head_dim: 16,
        rms_norm_eps: 1e-5,
        rope_theta: 10_000.0,
        rope_scaling: None,
        max_position_embeddings: 256,
        tie_word_embeddings: false,
        attention_bias: false,
        rope_neox: true,
        source: WeightSource::HuggingFace,
    };
    assert_eq!(cfg, expected);
    let mut store = TensorStore::from_hf_dir(dir).unwrap();
    assert_eq!(
        store.type_summary().into_iter().collect::<Vec<_>>(),
        [("F32".into(), 2 + 1 + 9 * 2)]
    );
    // The README promises RMSNorm weights that are not all ones: a real decode, not defaults.
    let norm = store.take_vector("blk.0.attn_norm.weight", 64).unwrap();
    assert!(norm.iter().any(|&w| (w - 1.0).abs() > 1e-3));
    store.insert_vector("blk.0.attn_norm.weight", norm);
    assert_eq!(take_all(&mut store, &cfg), Vec::<String>::new());
}
