//! Reading a Hugging Face model directory: finding its safetensors shards and translating HF
//! tensor names to the GGUF-style names the rest of Caduceus uses.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};

use caduceus_kernels::quant::Floats;
use safetensors::tensor::TensorView;
use safetensors::{Dtype, SafeTensors};

use super::error::ModelError;
use super::gguf::map_read_only;

const SINGLE_FILE: &str = "model.safetensors";
const INDEX_FILE: &str = "model.safetensors.index.json";

/// One tensor of a shard, decoded to f32 (safetensors stores row-major, outermost dim first).
pub struct HfTensor {
    /// Canonical (GGUF-style) name.
    pub name: String,
    pub shape: Vec<usize>,
    /// The on-disk dtype: "F32", "F16" or "BF16".
    pub source_type: &'static str,
    pub values: Vec<f32>,
}

/// The safetensors files of `dir`: the shards listed by `model.safetensors.index.json`, or
/// `model.safetensors` alone.
pub fn shard_paths(dir: &Path) -> Result<Vec<PathBuf>, ModelError> {
    let index_path = dir.join(INDEX_FILE);
    if !index_path.is_file() {
        let single = dir.join(SINGLE_FILE);
        if !single.is_file() {
            return Err(ModelError::NotFound {
                path: single,
                hint: format!("an HF model directory needs {SINGLE_FILE} or {INDEX_FILE}"),
            });
        }
        return Ok(vec![single]);
    }
    let text = std::fs::read_to_string(&index_path).map_err(|source| ModelError::Io {
        path: index_path.clone(),
        source,
    })?;
    let corrupt = |what: String| ModelError::Corrupt {
        path: index_path.clone(),
        what,
    };
    let index: serde_json::Value =
        serde_json::from_str(&text).map_err(|e| corrupt(format!("invalid JSON: {e}")))?;
    let map = index
        .get("weight_map")
        .and_then(|m| m.as_object())
        .ok_or_else(|| corrupt("no weight_map object".into()))?;
    let mut files = BTreeSet::new();
    for (tensor, file) in map {
        let file = file
            .as_str()
            .ok_or_else(|| corrupt(format!("weight_map[{tensor}] is not a file name")))?;
        // Shards must sit next to the index: a path here could point anywhere on disk.
        if Path::new(file).file_name().and_then(|n| n.to_str()) != Some(file) {
            return Err(corrupt(format!(
                "shard name {file:?} is not a plain file name"
            )));
        }
        files.insert(file.to_owned());
    }
    if files.is_empty() {
        return Err(corrupt("weight_map is empty".into()));
    }
    Ok(files.into_iter().map(|f| dir.join(f)).collect())
}

/// Decodes every tensor of one shard that has a canonical name, in file order. Names Caduceus
/// does not use (e.g. `rotary_emb.inv_freq`) are skipped with a debug log.
pub fn read_shard(
    path: &Path,
    mut visit: impl FnMut(HfTensor) -> Result<(), ModelError>,
) -> Result<(), ModelError> {
    let map = map_read_only(path, "listed in the model's safetensors index")?;
    let st = SafeTensors::deserialize(&map).map_err(|e| ModelError::Corrupt {
        path: path.to_owned(),
        what: format!("invalid safetensors file: {e}"),
    })?;
    for (hf_name, view) in st.iter() {
        let Some(name) = canonical_name(hf_name) else {
            tracing::debug!(tensor = hf_name, file = %path.display(), "skipping unused tensor");
            continue;
        };
        let (source_type, values) = floats(&view).ok_or_else(|| ModelError::UnsupportedType {
            tensor: hf_name.to_owned(),
            ty: format!("{:?} (only F32, F16 and BF16 are supported)", view.dtype()),
        })?;
        visit(HfTensor {
            name,
            shape: view.shape().to_vec(),
            source_type,
            values: values.to_vec(),
        })?;
    }
    Ok(())
}

/// Maps an HF Llama/Mistral/Qwen2 tensor name to its GGUF-style name.
pub fn canonical_name(hf: &str) -> Option<String> {
    let fixed = match hf {
        "model.embed_tokens.weight" => Some("token_embd.weight"),
        "model.norm.weight" => Some("output_norm.weight"),
        "lm_head.weight" => Some("output.weight"),
        _ => None,
    };
    if let Some(name) = fixed {
        return Some(name.to_owned());
    }
    let rest = hf.strip_prefix("model.layers.")?;
    let (layer, rest) = rest.split_once('.')?;
    let layer: usize = layer.parse().ok()?;
    let (module, suffix) = rest.rsplit_once('.')?;
    if suffix != "weight" && suffix != "bias" {
        return None;
    }
    let gguf = match module {
        "self_attn.q_proj" => "attn_q",
        "self_attn.k_proj" => "attn_k",
        "self_attn.v_proj" => "attn_v",
        "self_attn.o_proj" => "attn_output",
        "mlp.gate_proj" => "ffn_gate",
        "mlp.up_proj" => "ffn_up",
        "mlp.down_proj" => "ffn_down",
        "input_layernorm" => "attn_norm",
        "post_attention_layernorm" => "ffn_norm",
        _ => return None,
    };
    Some(format!("blk.{layer}.{gguf}.{suffix}"))
}

/// A safetensors tensor's values and its dtype's name, as stored; `None` for a dtype other than
/// F32, F16 and BF16.
pub fn floats<'a>(view: &TensorView<'a>) -> Option<(&'static str, Floats<'a>)> {
    let data = view.data();
    Some(match view.dtype() {
        Dtype::F32 => ("F32", Floats::LeF32(data)),
        Dtype::F16 => ("F16", Floats::LeF16(data)),
        Dtype::BF16 => ("BF16", Floats::LeBf16(data)),
        _ => return None,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn maps_hf_names_to_gguf_names() {
        let cases = [
            ("model.embed_tokens.weight", Some("token_embd.weight")),
            ("lm_head.weight", Some("output.weight")),
            ("model.norm.weight", Some("output_norm.weight")),
            (
                "model.layers.0.self_attn.q_proj.weight",
                Some("blk.0.attn_q.weight"),
            ),
            (
                "model.layers.11.self_attn.k_proj.bias",
                Some("blk.11.attn_k.bias"),
            ),
            (
                "model.layers.3.self_attn.o_proj.weight",
                Some("blk.3.attn_output.weight"),
            ),
            (
                "model.layers.2.mlp.down_proj.weight",
                Some("blk.2.ffn_down.weight"),
            ),
            (
                "model.layers.2.input_layernorm.weight",
                Some("blk.2.attn_norm.weight"),
            ),
            (
                "model.layers.2.post_attention_layernorm.weight",
                Some("blk.2.ffn_norm.weight"),
            ),
            ("model.layers.0.self_attn.rotary_emb.inv_freq", None),
            ("model.layers.x.mlp.up_proj.weight", None),
            ("model.layers.0.mlp.up_proj.lora_A", None),
        ];
        for (hf, want) in cases {
            assert_eq!(canonical_name(hf).as_deref(), want, "{hf}");
        }
    }

    #[test]
    fn reads_every_float_dtype_and_refuses_others() {
        let f32 = (-0.75f32).to_le_bytes();
        let f16 = half::f16::from_f32(-1.5).to_le_bytes();
        let bf16 = half::bf16::from_f32(3.0).to_le_bytes();
        let read = |dtype, bytes: &[u8]| {
            let view = TensorView::new(dtype, vec![1], bytes).expect("a one-value view");
            floats(&view).map(|(name, values)| (name, values.to_vec()))
        };
        assert_eq!(read(Dtype::F32, &f32), Some(("F32", vec![-0.75])));
        assert_eq!(read(Dtype::F16, &f16), Some(("F16", vec![-1.5])));
        assert_eq!(read(Dtype::BF16, &bf16), Some(("BF16", vec![3.0])));
        assert_eq!(read(Dtype::I64, &[0; 8]), None);
    }
}
