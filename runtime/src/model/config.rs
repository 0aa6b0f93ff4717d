//! Llama-family hyper-parameters, read from GGUF metadata or a Hugging Face `config.json`.
//!
//! Both sources describe the same decoder (RMSNorm, RoPE, GQA attention, SwiGLU MLP); the one
//! real difference the forward pass must know is the RoPE pairing (`rope_neox`), because
//! llama.cpp's converter permutes the q/k rows of llama/mistral models.

use serde::Deserialize;
use serde_json::Value;

use super::error::ModelError;
use super::gguf::{GgufFile, GgufValue};

const SUPPORTED: [&str; 3] = ["llama", "mistral", "qwen2"];

/// Llama 3's frequency-dependent RoPE rescaling (`rope_type: "llama3"`).
#[derive(Clone, Debug, PartialEq)]
pub struct Llama3RopeScaling {
    pub factor: f32,
    pub low_freq_factor: f32,
    pub high_freq_factor: f32,
    pub original_max_position_embeddings: usize,
}

/// Where the weights came from; decides tensor naming and RoPE pairing conventions.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum WeightSource {
    Gguf,
    HuggingFace,
}

/// Shape and numerics of a Llama-family decoder.
#[derive(Clone, Debug, PartialEq)]
pub struct LlamaConfig {
    /// "llama", "mistral" or "qwen2" (GGUF `general.architecture` or HF `model_type`).
    pub architecture: String,
    pub vocab_size: usize,
    pub hidden_size: usize,
    pub intermediate_size: usize,
    pub num_layers: usize,
    pub num_heads: usize,
    pub num_kv_heads: usize,
    pub head_dim: usize,
    pub rms_norm_eps: f32,
    pub rope_theta: f32,
    pub rope_scaling: Option<Llama3RopeScaling>,
    pub max_position_embeddings: usize,
    /// The output projection reuses `token_embd.weight`.
    pub tie_word_embeddings: bool,
    /// q/k/v projections carry biases (qwen2, or HF `attention_bias: true`).
    pub attention_bias: bool,
    /// true: rotate_half pairs (i, i + d/2) as in HF weights and GGUF qwen2; false: adjacent
    /// pairs (GGUF llama/mistral, whose q/k rows llama.cpp's converter permuted).
    pub rope_neox: bool,
    pub source: WeightSource,
}

impl LlamaConfig {
    /// Reads `{arch}.*` hyper-parameters; the tensor directory decides tying and biases.
    pub fn from_gguf(f: &GgufFile) -> Result<LlamaConfig, ModelError> {
        let arch = f.architecture()?.to_owned();
        if !SUPPORTED.contains(&arch.as_str()) {
            return Err(ModelError::UnsupportedArchitecture(arch));
        }
        let key = |suffix: &str| format!("{arch}.{suffix}");
        let required = |suffix: &str| -> Result<usize, ModelError> {
            let k = key(suffix);
            let v = f.get_u64(&k).ok_or(ModelError::MissingMetadata(k))?;
            usize::try_from(v)
                .map_err(|_| ModelError::Config(format!("{arch}.{suffix} = {v} is too large")))
        };
        let optional = |suffix: &str| {
            f.get_u64(&key(suffix))
                .and_then(|v| usize::try_from(v).ok())
        };

        let hidden_size = required("embedding_length")?;
        let num_heads = required("attention.head_count")?;
        let vocab_size = match optional("vocab_size") {
            Some(v) => v,
            None => gguf_vocab_size(f, &arch)?,
        };
        check_gguf_rope_scaling(f, &arch)?;
        let cfg = LlamaConfig {
            vocab_size,
            hidden_size,
            intermediate_size: required("feed_forward_length")?,
            num_layers: required("block_count")?,
            num_heads,
            num_kv_heads: optional("attention.head_count_kv").unwrap_or(num_heads),
            head_dim: match optional("attention.key_length") {
                Some(d) => d,
                None => default_head_dim(hidden_size, num_heads)?,
            },
            rms_norm_eps: f
                .get_f32(&key("attention.layer_norm_rms_epsilon"))
                .ok_or_else(|| {
                    ModelError::MissingMetadata(key("attention.layer_norm_rms_epsilon"))
                })?,
            // llama.cpp's default when a file omits it.
            rope_theta: f.get_f32(&key("rope.freq_base")).unwrap_or(10_000.0),
            // Llama 3 GGUFs carry their RoPE rescaling as the `rope_freqs.weight` tensor instead.
            rope_scaling: None,
            max_position_embeddings: required("context_length")?,
            tie_word_embeddings: f.tensor("output.weight").is_none(),
            attention_bias: f.tensor("blk.0.attn_q.bias").is_some(),
            rope_neox: arch == "qwen2",
            source: WeightSource::Gguf,
            architecture: arch,
        };
        cfg.validate()?;
        Ok(cfg)
    }

    /// Parses a transformers `config.json` (v4 or v5 layout).
    pub fn from_hf_json(json: &str) -> Result<LlamaConfig, ModelError> {
        let hf: HfConfig = serde_json::from_str(json)
            .map_err(|e| ModelError::Config(format!("config.json: {e}")))?;
        let arch = hf_architecture(&hf)?;
        let need = |v: Option<usize>, name: &str| {
            v.ok_or_else(|| ModelError::Config(format!("config.json: missing {name}")))
        };
        if let Some(act) = hf.hidden_act.as_deref().filter(|a| *a != "silu") {
            return Err(ModelError::Config(format!(
                "config.json: hidden_act {act:?} is not supported (only silu)"
            )));
        }
        if let Some(window) = hf
            .sliding_window
            .filter(|_| arch != "qwen2" || hf.use_sliding_window)
        {
            tracing::warn!(
                window,
                "config.json sets sliding_window; Caduceus attends to the full context instead"
            );
        }
        let hidden_size = need(hf.hidden_size, "hidden_size")?;
        let num_heads = need(hf.num_attention_heads, "num_attention_heads")?;
        let params = hf.rope_parameters.as_ref().and_then(Value::as_object);
        let rope_theta = hf
            .rope_theta
            .or_else(|| {
                params
                    .and_then(|p| p.get("rope_theta"))
                    .and_then(Value::as_f64)
            })
            .unwrap_or(10_000.0) as f32;
        let scaling = hf
            .rope_scaling
            .as_ref()
            .filter(|v| !v.is_null())
            .or(hf.rope_parameters.as_ref());
        let cfg = LlamaConfig {
            vocab_size: need(hf.vocab_size, "vocab_size")?,
            hidden_size,
            intermediate_size: need(hf.intermediate_size, "intermediate_size")?,
            num_layers: need(hf.num_hidden_layers, "num_hidden_layers")?,
            num_heads,
            num_kv_heads: hf.num_key_value_heads.unwrap_or(num_heads),
            head_dim: match hf.head_dim {
                Some(d) => d,
                None => default_head_dim(hidden_size, num_heads)?,
            },
            // transformers' default for all three architectures.
            rms_norm_eps: hf.rms_norm_eps.unwrap_or(1e-6) as f32,
            rope_theta,
            rope_scaling: scaling.map(parse_rope_scaling).transpose()?.flatten(),
            max_position_embeddings: need(hf.max_position_embeddings, "max_position_embeddings")?,
            tie_word_embeddings: hf.tie_word_embeddings.unwrap_or(false),
            attention_bias: arch == "qwen2" || hf.attention_bias.unwrap_or(false),
            rope_neox: true,
            source: WeightSource::HuggingFace,
            architecture: arch,
        };
        cfg.validate()?;
        Ok(cfg)
    }

    /// Rejects shapes the forward pass cannot run, so errors surface at load time.
    pub fn validate(&self) -> Result<(), ModelError> {
        let bad = |msg: String| Err(ModelError::Config(msg));
        for (name, v) in [
            ("vocab_size", self.vocab_size),
            ("hidden_size", self.hidden_size),
            ("intermediate_size", self.intermediate_size),
            ("num_layers", self.num_layers),
            ("num_heads", self.num_heads),
            ("num_kv_heads", self.num_kv_heads),
            ("head_dim", self.head_dim),
            ("max_position_embeddings", self.max_position_embeddings),
        ] {
            if v == 0 {
                return bad(format!("{name} must be positive"));
            }
        }
        if !self.num_heads.is_multiple_of(self.num_kv_heads) {
            return bad(format!(
                "num_heads {} is not a multiple of num_kv_heads {}",
                self.num_heads, self.num_kv_heads
            ));
        }
        if !self.head_dim.is_multiple_of(2) {
            return bad(format!("head_dim {} must be even for RoPE", self.head_dim));
        }
        if !(self.rms_norm_eps.is_finite() && self.rms_norm_eps > 0.0) {
            return bad(format!(
                "rms_norm_eps {} must be positive",
                self.rms_norm_eps
            ));
        }
        if !(self.rope_theta.is_finite() && self.rope_theta > 0.0) {
            return bad(format!("rope_theta {} must be positive", self.rope_theta));
        }
        if let Some(s) = &self.rope_scaling {
            if !(s.factor > 0.0
                && s.high_freq_factor > s.low_freq_factor
                && s.low_freq_factor > 0.0)
                || s.original_max_position_embeddings == 0
            {
                return bad(format!(
                    "llama3 rope scaling needs factor > 0, 0 < low_freq_factor < high_freq_factor and a positive original_max_position_embeddings, got {s:?}"
                ));
            }
        }
        Ok(())
    }
}

/// hidden / heads, for configs that leave head_dim implicit.
fn default_head_dim(hidden_size: usize, num_heads: usize) -> Result<usize, ModelError> {
    if num_heads == 0 || !hidden_size.is_multiple_of(num_heads) {
        return Err(ModelError::Config(format!(
            "hidden size {hidden_size} is not divisible by {num_heads} heads and no head_dim is given"
        )));
    }
    Ok(hidden_size / num_heads)
}

/// Vocabulary size for GGUF files without `{arch}.vocab_size`: the tokenizer's token count, or
/// the embedding's row count.
fn gguf_vocab_size(f: &GgufFile, arch: &str) -> Result<usize, ModelError> {
    if let Some(GgufValue::Array(tokens)) = f.get("tokenizer.ggml.tokens") {
        return Ok(tokens.len());
    }
    f.tensor("token_embd.weight")
        .and_then(|t| t.dims.get(1))
        .and_then(|&rows| usize::try_from(rows).ok())
        .ok_or_else(|| {
            ModelError::MissingMetadata(format!(
                "{arch}.vocab_size (and no tokenizer.ggml.tokens or token_embd.weight)"
            ))
        })
}

/// GGUF files may declare linear/YaRN context extension, which the forward pass does not do;
/// refusing them beats silently wrong output.
fn check_gguf_rope_scaling(f: &GgufFile, arch: &str) -> Result<(), ModelError> {
    let ty = f
        .get_str(&format!("{arch}.rope.scaling.type"))
        .unwrap_or("none");
    let factor = f
        .get_f32(&format!("{arch}.rope.scaling.factor"))
        .unwrap_or(1.0);
    if ty != "none" && factor != 1.0 {
        return Err(ModelError::Config(format!(
            "{arch}.rope.scaling.type {ty:?} with factor {factor} is not supported"
        )));
    }
    Ok(())
}

/// The fields of a transformers config that Caduceus reads; unknown fields are ignored.
#[derive(Deserialize)]
struct HfConfig {
    model_type: Option<String>,
    #[serde(default)]
    architectures: Vec<String>,
    vocab_size: Option<usize>,
    hidden_size: Option<usize>,
    intermediate_size: Option<usize>,
    num_hidden_layers: Option<usize>,
    num_attention_heads: Option<usize>,
    num_key_value_heads: Option<usize>,
    head_dim: Option<usize>,
    rms_norm_eps: Option<f64>,
    rope_theta: Option<f64>,
    rope_scaling: Option<Value>,
    rope_parameters: Option<Value>,
    max_position_embeddings: Option<usize>,
    tie_word_embeddings: Option<bool>,
    attention_bias: Option<bool>,
    hidden_act: Option<String>,
    sliding_window: Option<u64>,
    #[serde(default)]
    use_sliding_window: bool,
}

/// `model_type`, or failing that the `*ForCausalLM` class name.
fn hf_architecture(hf: &HfConfig) -> Result<String, ModelError> {
    if let Some(t) = &hf.model_type {
        return if SUPPORTED.contains(&t.as_str()) {
            Ok(t.clone())
        } else {
            Err(ModelError::UnsupportedArchitecture(t.clone()))
        };
    }
    let by_class = [
        ("LlamaForCausalLM", "llama"),
        ("MistralForCausalLM", "mistral"),
        ("Qwen2ForCausalLM", "qwen2"),
    ];
    match hf.architectures.first() {
        Some(class) => by_class
            .iter()
            .find(|(c, _)| c == class)
            .map(|(_, a)| a.to_string())
            .ok_or_else(|| ModelError::UnsupportedArchitecture(class.clone())),
        None => Err(ModelError::Config(
            "config.json: neither model_type nor architectures is set".into(),
        )),
    }
}

/// `rope_scaling` (transformers 4) or `rope_parameters` (5): `None` for default RoPE.
fn parse_rope_scaling(v: &Value) -> Result<Option<Llama3RopeScaling>, ModelError> {
    let Some(obj) = v.as_object() else {
        return Err(ModelError::Config(format!(
            "rope scaling must be an object, got {v}"
        )));
    };
    let ty = obj
        .get("rope_type")
        .or_else(|| obj.get("type"))
        .and_then(Value::as_str);
    match ty {
        None | Some("default") => Ok(None),
        Some("llama3") => {
            let num = |k: &str| {
                obj.get(k)
                    .and_then(Value::as_f64)
                    .ok_or_else(|| ModelError::Config(format!("llama3 rope scaling: missing {k}")))
            };
            Ok(Some(Llama3RopeScaling {
                factor: num("factor")? as f32,
                low_freq_factor: num("low_freq_factor")? as f32,
                high_freq_factor: num("high_freq_factor")? as f32,
                original_max_position_embeddings: num("original_max_position_embeddings")? as usize,
            }))
        }
        Some(other) => Err(ModelError::Config(format!(
            "rope_type {other:?} is not supported (only default and llama3)"
        ))),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn base() -> LlamaConfig {
        LlamaConfig {
            architecture: "llama".into(),
            vocab_size: 10,
            hidden_size: 16,
            intermediate_size: 32,
            num_layers: 1,
            num_heads: 4,
            num_kv_heads: 2,
            head_dim: 4,
            rms_norm_eps: 1e-5,
            rope_theta: 10_000.0,
            rope_scaling: None,
            max_position_embeddings: 64,
            tie_word_embeddings: false,
            attention_bias: false,
            rope_neox: true,
            source: WeightSource::HuggingFace,
        }
    }

    #[test]
    fn validate_rejects_unrunnable_shapes() {
        assert!(base().validate().is_ok());
        type Breakage = (fn(&mut LlamaConfig), &'static str);
        let broken: [Breakage; 6] = [
            (|c| c.num_layers = 0, "num_layers"),
            (|c| c.num_kv_heads = 3, "num_kv_heads 3"),
            (|c| c.head_dim = 5, "head_dim 5"),
            (|c| c.rms_norm_eps = 0.0, "rms_norm_eps"),
            (|c| c.rope_theta = f32::NAN, "rope_theta"),
            (
                |c| {
                    c.rope_scaling = Some(Llama3RopeScaling {
                        factor: 8.0,
                        low_freq_factor: 4.0,
                        high_freq_factor: 1.0,
                        original_max_position_embeddings: 8192,
                    })
                },
                "llama3",
            ),
        ];
        for (breakage, needle) in broken {
            let mut c = base();
            breakage(&mut c);
            let err = c.validate().unwrap_err().to_string();
            assert!(err.contains(needle), "{err}");
        }
    }

    #[test]
    fn implicit_head_dim_needs_divisible_hidden_size() {
        assert_eq!(default_head_dim(576, 9).unwrap(), 64);
        assert!(default_head_dim(100, 3).is_err());
        assert!(default_head_dim(100, 0).is_err());
    }
}
