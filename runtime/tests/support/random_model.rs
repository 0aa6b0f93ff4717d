//! Tiny random Llama models written as Hugging Face directories (config.json + model.safetensors),
//! to cover what the shared reference model does not: attention bias, other GQA ratios, tied
//! embeddings.

use std::collections::HashMap;
use std::path::Path;

use safetensors::tensor::{Dtype, TensorView};

use super::reference_llama::RefModel;

/// Shape and options of a random model.
#[derive(Clone, Copy, Debug)]
pub struct RandomSpec {
    pub hidden: usize,
    pub ffn: usize,
    pub layers: usize,
    pub heads: usize,
    pub kv_heads: usize,
    pub vocab: usize,
    pub bias: bool,
    pub tied: bool,
    pub seed: u64,
}

/// Deterministic xorshift values in [-scale, scale).
struct Rng(u64);
impl Rng {
    fn next(&mut self, scale: f64) -> f64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        ((self.0 >> 11) as f64 / (1u64 << 53) as f64 * 2.0 - 1.0) * scale
    }
}

/// Writes the model into `dir` and returns the same weights as a dense reference model.
pub fn write_random_model(dir: &Path, s: RandomSpec) -> RefModel {
    let hd = s.hidden / s.heads;
    let mut rng = Rng(s.seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1);
    let mut w: HashMap<String, (Vec<usize>, Vec<f64>)> = HashMap::new();
    let mut add = |name: String, shape: Vec<usize>, scale: f64, offset: f64| {
        let n = shape.iter().product();
        // Round through f32 so the file and the reference hold identical values.
        let v = (0..n)
            .map(|_| (offset + rng.next(scale)) as f32 as f64)
            .collect();
        w.insert(name, (shape, v));
    };
    add(
        "model.embed_tokens.weight".into(),
        vec![s.vocab, s.hidden],
        1.0,
        0.0,
    );
    if !s.tied {
        add("lm_head.weight".into(), vec![s.vocab, s.hidden], 0.3, 0.0);
    }
    add("model.norm.weight".into(), vec![s.hidden], 0.2, 1.0);
    for l in 0..s.layers {
        let p = |n: &str| format!("model.layers.{l}.{n}");
        let ws = 1.0 / (s.hidden as f64).sqrt();
        add(p("input_layernorm.weight"), vec![s.hidden], 0.2, 1.0);
        add(
            p("post_attention_layernorm.weight"),
            vec![s.hidden],
            0.2,
            1.0,
        );
        add(
            p("self_attn.q_proj.weight"),
            vec![s.heads * hd, s.hidden],
            ws * 2.0,
            0.0,
        );
        add(
            p("self_attn.k_proj.weight"),
            vec![s.kv_heads * hd, s.hidden],
            ws * 2.0,
            0.0,
        );
        add(
            p("self_attn.v_proj.weight"),
            vec![s.kv_heads * hd, s.hidden],
            ws,
            0.0,
        );
        add(
            p("self_attn.o_proj.weight"),
            vec![s.hidden, s.heads * hd],
            ws,
            0.0,
        );
        add(p("mlp.gate_proj.weight"), vec![s.ffn, s.hidden], ws, 0.0);
        add(p("mlp.up_proj.weight"), vec![s.ffn, s.hidden], ws, 0.0);
        add(
            p("mlp.down_proj.weight"),
            vec![s.hidden, s.ffn],
            1.0 / (s.ffn as f64).sqrt(),
            0.0,
        );
        if s.bias {
            add(p("self_attn.q_proj.bias"), vec![s.heads * hd], 0.5, 0.0);
            add(p("self_attn.k_proj.bias"), vec![s.kv_heads * hd], 0.5, 0.0);
            add(p("self_attn.v_proj.bias"), vec![s.kv_heads * hd], 0.5, 0.0);
        }
    }
    let bytes: HashMap<String, (Vec<usize>, Vec<u8>)> = w
        .iter()
        .map(|(k, (shape, v))| {
            (
                k.clone(),
                (
                    shape.clone(),
                    v.iter().flat_map(|&x| (x as f32).to_le_bytes()).collect(),
                ),
            )
        })
        .collect();
    let views: Vec<(String, TensorView<'_>)> = bytes
        .iter()
        .map(|(k, (shape, b))| {
            (
                k.clone(),
                TensorView::new(Dtype::F32, shape.clone(), b).unwrap(),
            )
        })
        .collect();
    std::fs::create_dir_all(dir).unwrap();
    safetensors::tensor::serialize_to_file(views, None, &dir.join("model.safetensors")).unwrap();
    let model_type = if s.bias { "qwen2" } else { "llama" };
    let config = serde_json::json!({
        "architectures": [if s.bias { "Qwen2ForCausalLM" } else { "LlamaForCausalLM" }],
        "model_type": model_type,
        "hidden_size": s.hidden,
        "intermediate_size": s.ffn,
        "num_hidden_layers": s.layers,
        "num_attention_heads": s.heads,
        "num_key_value_heads": s.kv_heads,
        "vocab_size": s.vocab,
        "rms_norm_eps": 1e-6,
        "rope_theta": 10000.0,
        "max_position_embeddings": 512,
        "tie_word_embeddings": s.tied,
        "attention_bias": s.bias,
        "bos_token_id": 1,
        "eos_token_id": 2,
    });
    std::fs::write(dir.join("config.json"), config.to_string()).unwrap();
    RefModel {
        w,
        hidden: s.hidden,
        ffn: s.ffn,
        layers: s.layers,
        heads: s.heads,
        kv_heads: s.kv_heads,
        head_dim: hd,
        vocab: s.vocab,
        eps: 1e-6,
        theta: 10000.0,
        tied: s.tied,
    }
}
