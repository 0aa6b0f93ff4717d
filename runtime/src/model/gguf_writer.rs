//! A minimal GGUF v2/v3 writer, so tests can build tiny models (and corrupt them) without
//! fixture files. Layout follows the spec: header, metadata, tensor directory, then tensor data
//! with every tensor starting at a multiple of the alignment.

use std::path::Path;

use caduceus_kernels::quant::Matrix;

use super::config::LlamaConfig;
use super::gguf::GgufValue;

struct PendingTensor {
    name: String,
    dims: Vec<u64>,
    ggml_type: u32,
    data: Vec<u8>,
}

/// Collects metadata and tensors, then serialises them with [`GgufWriter::to_bytes`].
pub struct GgufWriter {
    version: u32,
    alignment: u64,
    metadata: Vec<(String, GgufValue)>,
    tensors: Vec<PendingTensor>,
}

impl Default for GgufWriter {
    fn default() -> Self {
        Self::new()
    }
}

impl GgufWriter {
    /// A version-3 file with the default 32-byte alignment.
    pub fn new() -> Self {
        GgufWriter {
            version: 3,
            alignment: 32,
            metadata: Vec::new(),
            tensors: Vec::new(),
        }
    }

    /// Sets the header version (2 and 3 share a layout).
    pub fn version(mut self, version: u32) -> Self {
        self.version = version;
        self
    }

    /// Sets the data alignment and records it as `general.alignment`.
    pub fn alignment(mut self, alignment: u32) -> Self {
        self.alignment = u64::from(alignment);
        self.metadata
            .push(("general.alignment".into(), GgufValue::U32(alignment)));
        self
    }

    /// Appends a key; arrays are written with their first element's type (U8 when empty).
    pub fn add_metadata(&mut self, key: &str, value: GgufValue) -> &mut Self {
        self.metadata.push((key.to_owned(), value));
        self
    }

    /// Appends a tensor from raw ggml bytes; `dims` in ggml order (contiguous dim first).
    pub fn add_tensor(
        &mut self,
        name: &str,
        dims: &[u64],
        ggml_type: u32,
        data: Vec<u8>,
    ) -> &mut Self {
        self.tensors.push(PendingTensor {
            name: name.to_owned(),
            dims: dims.to_vec(),
            ggml_type,
            data,
        });
        self
    }

    /// Appends an F32 tensor.
    pub fn add_f32(&mut self, name: &str, dims: &[u64], values: &[f32]) -> &mut Self {
        let data = values.iter().flat_map(|v| v.to_le_bytes()).collect();
        self.add_tensor(name, dims, 0, data)
    }

    /// Appends a matrix in its own storage type (dims = [cols, rows]).
    pub fn add_matrix(&mut self, name: &str, m: &Matrix) -> &mut Self {
        let dims = [m.cols() as u64, m.rows() as u64];
        self.add_tensor(name, &dims, m.ty().ggml_id(), m.data().to_vec())
    }

    /// Serialises the file.
    pub fn to_bytes(&self) -> Vec<u8> {
        let mut out = Vec::new();
        out.extend_from_slice(b"GGUF");
        out.extend_from_slice(&self.version.to_le_bytes());
        out.extend_from_slice(&(self.tensors.len() as u64).to_le_bytes());
        out.extend_from_slice(&(self.metadata.len() as u64).to_le_bytes());
        for (key, value) in &self.metadata {
            write_string(&mut out, key);
            out.extend_from_slice(&value.type_id().to_le_bytes());
            write_value(&mut out, value);
        }
        let mut offset = 0u64;
        for t in &self.tensors {
            write_string(&mut out, &t.name);
            out.extend_from_slice(&(t.dims.len() as u32).to_le_bytes());
            for d in &t.dims {
                out.extend_from_slice(&d.to_le_bytes());
            }
            out.extend_from_slice(&t.ggml_type.to_le_bytes());
            out.extend_from_slice(&offset.to_le_bytes());
            offset = (offset + t.data.len() as u64).div_ceil(self.alignment) * self.alignment;
        }
        for t in &self.tensors {
            pad_to(&mut out, self.alignment);
            out.extend_from_slice(&t.data);
        }
        out
    }

    /// Writes the file to `path`.
    pub fn write(&self, path: &Path) -> std::io::Result<()> {
        std::fs::write(path, self.to_bytes())
    }

    /// A random-weight Llama-family model shaped by `cfg` (F32 tensors, values in [-0.5, 0.5)),
    /// for forward-pass tests. Writes `output.weight` unless tied, and q/k/v biases when
    /// `cfg.attention_bias`; no tokenizer metadata.
    pub fn tiny_llama(cfg: &LlamaConfig, seed: u64) -> GgufWriter {
        let mut w = GgufWriter::new();
        let arch = cfg.architecture.as_str();
        let int = |v: usize| GgufValue::U32(v as u32);
        w.add_metadata("general.architecture", GgufValue::String(arch.into()));
        for (k, v) in [
            ("vocab_size", int(cfg.vocab_size)),
            ("embedding_length", int(cfg.hidden_size)),
            ("feed_forward_length", int(cfg.intermediate_size)),
            ("block_count", int(cfg.num_layers)),
            ("attention.head_count", int(cfg.num_heads)),
            ("attention.head_count_kv", int(cfg.num_kv_heads)),
            ("attention.key_length", int(cfg.head_dim)),
            ("attention.value_length", int(cfg.head_dim)),
            (
                "attention.layer_norm_rms_epsilon",
                GgufValue::F32(cfg.rms_norm_eps),
            ),
            ("rope.freq_base", GgufValue::F32(cfg.rope_theta)),
            ("rope.dimension_count", int(cfg.head_dim)),
            ("context_length", int(cfg.max_position_embeddings)),
        ] {
            w.add_metadata(&format!("{arch}.{k}"), v);
        }
        let mut rng = XorShift(seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1);
        let mut add = |w: &mut GgufWriter, name: &str, dims: &[u64]| {
            let n = dims.iter().product::<u64>() as usize;
            let values: Vec<f32> = (0..n).map(|_| rng.next_f32() - 0.5).collect();
            w.add_f32(name, dims, &values);
        };
        let (hidden, ffn) = (cfg.hidden_size as u64, cfg.intermediate_size as u64);
        let q_dim = (cfg.num_heads * cfg.head_dim) as u64;
        let kv_dim = (cfg.num_kv_heads * cfg.head_dim) as u64;
        add(
            &mut w,
            "token_embd.weight",
            &[hidden, cfg.vocab_size as u64],
        );
        add(&mut w, "output_norm.weight", &[hidden]);
        if !cfg.tie_word_embeddings {
            add(&mut w, "output.weight", &[hidden, cfg.vocab_size as u64]);
        }
        for i in 0..cfg.num_layers {
            let name = |s: &str| format!("blk.{i}.{s}");
            add(&mut w, &name("attn_norm.weight"), &[hidden]);
            add(&mut w, &name("ffn_norm.weight"), &[hidden]);
            add(&mut w, &name("attn_q.weight"), &[hidden, q_dim]);
            add(&mut w, &name("attn_k.weight"), &[hidden, kv_dim]);
            add(&mut w, &name("attn_v.weight"), &[hidden, kv_dim]);
            if cfg.attention_bias {
                add(&mut w, &name("attn_q.bias"), &[q_dim]);
                add(&mut w, &name("attn_k.bias"), &[kv_dim]);
                add(&mut w, &name("attn_v.bias"), &[kv_dim]);
            }
            add(&mut w, &name("attn_output.weight"), &[q_dim, hidden]);
            add(&mut w, &name("ffn_gate.weight"), &[hidden, ffn]);
            add(&mut w, &name("ffn_up.weight"), &[hidden, ffn]);
            add(&mut w, &name("ffn_down.weight"), &[ffn, hidden]);
        }
        w
    }
}

fn pad_to(out: &mut Vec<u8>, alignment: u64) {
    let len = out.len() as u64;
    out.resize((len.div_ceil(alignment) * alignment) as usize, 0);
}

fn write_string(out: &mut Vec<u8>, s: &str) {
    out.extend_from_slice(&(s.len() as u64).to_le_bytes());
    out.extend_from_slice(s.as_bytes());
}

fn write_value(out: &mut Vec<u8>, value: &GgufValue) {
    match value {
        GgufValue::U8(v) => out.push(*v),
        GgufValue::I8(v) => out.extend_from_slice(&v.to_le_bytes()),
        GgufValue::U16(v) => out.extend_from_slice(&v.to_le_bytes()),
        GgufValue::I16(v) => out.extend_from_slice(&v.to_le_bytes()),
        GgufValue::U32(v) => out.extend_from_slice(&v.to_le_bytes()),
        GgufValue::I32(v) => out.extend_from_slice(&v.to_le_bytes()),
        GgufValue::U64(v) => out.extend_from_slice(&v.to_le_bytes()),
        GgufValue::I64(v) => out.extend_from_slice(&v.to_le_bytes()),
        GgufValue::F32(v) => out.extend_from_slice(&v.to_le_bytes()),
        GgufValue::F64(v) => out.extend_from_slice(&v.to_le_bytes()),
        GgufValue::Bool(v) => out.push(u8::from(*v)),
        GgufValue::String(s) => write_string(out, s),
        GgufValue::Array(items) => {
            let elem_ty = items.first().map_or(0, GgufValue::type_id);
            out.extend_from_slice(&elem_ty.to_le_bytes());
            out.extend_from_slice(&(items.len() as u64).to_le_bytes());
            for item in items {
                write_value(out, item);
            }
        }
    }
}

/// Tiny deterministic PRNG, so test models need no extra dependency and never change.
struct XorShift(u64);

impl XorShift {
    fn next_f32(&mut self) -> f32 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        (self.0 >> 40) as f32 / (1u64 << 24) as f32
    }
}
