//! What a GPU could at best do with a Llama-shaped model: bytes moved and FLOPs of a decode step
//! or a prefill, against the card's HBM bandwidth and dense bf16 peak from a table keyed by GPU
//! name. `caduceus gpu-bench` prints every measured figure next to its roofline, so a number means
//! something without a second GPU to compare with (pure arithmetic, tested on any machine).

use serde::Serialize;

/// A GPU's datasheet figures (dense, no sparsity), as used for the roofline.
#[derive(Clone, Copy, Debug, PartialEq, Serialize)]
pub struct GpuSpec {
    /// The table row that matched.
    pub name: &'static str,
    /// HBM bandwidth, bytes/s.
    pub hbm_bytes_per_s: f64,
    /// Dense bf16 tensor-core peak, FLOP/s.
    pub bf16_flops_per_s: f64,
}

/// Datasheet figures, most specific name first (the first row whose key the device name contains
/// wins, case-insensitively): NVIDIA H200 SXM 4.8 TB/s and 989 TFLOP/s dense bf16, etc.
pub const GPU_SPECS: &[(&str, GpuSpec)] = &[
    ("gh200", spec("NVIDIA GH200", 4.0e12, 989e12)),
    ("h200", spec("NVIDIA H200 (SXM)", 4.8e12, 989e12)),
    ("h100 pcie", spec("NVIDIA H100 PCIe", 2.0e12, 756e12)),
    ("h100 nvl", spec("NVIDIA H100 NVL", 3.9e12, 835e12)),
    ("h100", spec("NVIDIA H100 SXM", 3.35e12, 989e12)),
    (
        "a100-sxm4-80gb",
        spec("NVIDIA A100 SXM 80GB", 2.039e12, 312e12),
    ),
    (
        "a100 80gb pcie",
        spec("NVIDIA A100 PCIe 80GB", 1.935e12, 312e12),
    ),
    ("a100", spec("NVIDIA A100 40GB", 1.555e12, 312e12)),
    ("l40s", spec("NVIDIA L40S", 0.864e12, 362e12)),
];

const fn spec(name: &'static str, hbm_bytes_per_s: f64, bf16_flops_per_s: f64) -> GpuSpec {
    GpuSpec {
        name,
        hbm_bytes_per_s,
        bf16_flops_per_s,
    }
}

/// The spec of the GPU whose name (as the driver reports it) contains a table key.
pub fn spec_for(device_name: &str) -> Option<GpuSpec> {
    let lower = device_name.to_lowercase();
    GPU_SPECS
        .iter()
        .find(|(key, _)| lower.contains(key))
        .map(|&(_, s)| s)
}

/// The dimensions the roofline needs (an untied LM head, no q/k/v bias).
#[derive(Clone, Copy, Debug, PartialEq, Serialize)]
pub struct ModelShape {
    pub hidden: usize,
    pub layers: usize,
    pub heads: usize,
    pub kv_heads: usize,
    pub head_dim: usize,
    pub ffn: usize,
    pub vocab: usize,
    /// Bytes of one weight or KV element (2 for bf16).
    pub dtype_bytes: usize,
}

impl ModelShape {
    /// Meta-Llama-3-8B in bf16.
    pub const LLAMA3_8B: ModelShape = ModelShape {
        hidden: 4096,
        layers: 32,
        heads: 32,
        kv_heads: 8,
        head_dim: 128,
        ffn: 14336,
        vocab: 128256,
        dtype_bytes: 2,
    };

    /// Weights of the seven projections of one layer.
    pub fn projection_params_per_layer(&self) -> u64 {
        let (h, q, kv, f) = (
            self.hidden as u64,
            (self.heads * self.head_dim) as u64,
            (self.kv_heads * self.head_dim) as u64,
            self.ffn as u64,
        );
        h * (q + 2 * kv) + q * h + 3 * h * f
    }

    /// Parameters a forward pass multiplies by for every token: all projections and the LM head.
    pub fn matmul_params(&self) -> u64 {
        self.layers as u64 * self.projection_params_per_layer() + (self.vocab * self.hidden) as u64
    }

    /// Bytes of weights one step reads: projections, LM head and norms (the embedding table is
    /// gathered a row per token, negligible).
    pub fn weight_bytes_read(&self) -> u64 {
        let norms = ((2 * self.layers + 1) * self.hidden) as u64;
        (self.matmul_params() + norms) * self.dtype_bytes as u64
    }

    /// K and V of one token in one layer.
    pub fn kv_bytes_per_token_layer(&self) -> u64 {
        (2 * self.kv_heads * self.head_dim * self.dtype_bytes) as u64
    }

    /// K and V of one token across all layers.
    pub fn kv_bytes_per_token(&self) -> u64 {
        self.layers as u64 * self.kv_bytes_per_token_layer()
    }

    /// Attention FLOPs of one query token against `context` keys, all layers (QK^T and PV).
    pub(crate) fn attention_flops(&self, context: u64) -> u64 {
        4 * (self.layers * self.heads * self.head_dim) as u64 * context
    }
}

/// Bytes and FLOPs of one piece of work and the least time the GPU needs for it.
#[derive(Clone, Copy, Debug, PartialEq, Serialize)]
pub struct Roofline {
    pub bytes: u64,
    pub flops: u64,
    /// bytes / HBM bandwidth.
    pub memory_s: f64,
    /// FLOPs / peak.
    pub compute_s: f64,
    /// max(memory_s, compute_s).
    pub bound_s: f64,
    /// "memory" or "compute": which one bounds it.
    pub bound_by: &'static str,
}

impl Roofline {
    fn new(bytes: u64, flops: u64, gpu: &GpuSpec) -> Roofline {
        let memory_s = bytes as f64 / gpu.hbm_bytes_per_s;
        let compute_s = flops as f64 / gpu.bf16_flops_per_s;
        Roofline {
            bytes,
            flops,
            memory_s,
            compute_s,
            bound_s: memory_s.max(compute_s),
            bound_by: if memory_s >= compute_s {
                "memory"
            } else {
                "compute"
            },
        }
    }
}

/// One decode step of `batch` sequences whose context (the new token included) is `context`
/// tokens: weights read once, every sequence's KV read and its new K/V written.
pub fn decode_step(shape: &ModelShape, gpu: &GpuSpec, batch: usize, context: usize) -> Roofline {
    let (b, ctx) = (batch as u64, context as u64);
    let kv = shape.kv_bytes_per_token() * b * (ctx + 1);
    let flops = b * (2 * shape.matmul_params() + shape.attention_flops(ctx));
    Roofline::new(shape.weight_bytes_read() + kv, flops, gpu)
}

/// `num_prompts` prompts of `prompt_len` tokens each in prefill (causal attention, logits of the
/// last position only, as the engine asks).
pub fn prefill(
    shape: &ModelShape,
    gpu: &GpuSpec,
    num_prompts: usize,
    prompt_len: usize,
) -> Roofline {
    let (n, t) = (num_prompts as u64, prompt_len as u64);
    let projections = 2 * shape.layers as u64 * shape.projection_params_per_layer() * t;
    let head = 2 * (shape.vocab * shape.hidden) as u64;
    // Token i attends to i + 1 keys: the sum over the prompt is t (t + 1) / 2.
    let attention = shape.attention_flops(t * (t + 1) / 2);
    let flops = n * (projections + head + attention);
    let bytes = shape.weight_bytes_read() + n * t * shape.kv_bytes_per_token();
    Roofline::new(bytes, flops, gpu)
}

#[cfg(test)]
mod tests {
    use super::*;

    const H200: GpuSpec = spec("test", 4.8e12, 989e12);

    #[test]
    fn llama3_8b_weights_and_kv_match_hand_counts() {
        let s = ModelShape::LLAMA3_8B;
        // 4096*6144 + 4096*4096 + 3*4096*14336 = 25165824 + 16777216 + 176160768.
        assert_eq!(s.projection_params_per_layer(), 218_103_808);
        // 32 layers + 128256*4096 head.
        assert_eq!(s.matmul_params(), 6_979_321_856 + 525_336_576);
        // (7504658432 + 65*4096) * 2 bytes.
        assert_eq!(s.weight_bytes_read(), 15_009_849_344);
        // 32 layers * K,V * 8 heads * 128 * 2 bytes = 128 KiB per token.
        assert_eq!(s.kv_bytes_per_token(), 131_072);
    }

    #[test]
    fn decode_roofline_is_memory_bound_at_batch_1_and_256() {
        let s = ModelShape::LLAMA3_8B;
        let one = decode_step(&s, &H200, 1, 1024);
        // 15009849344 + 1025 * 131072 bytes over 4.8 TB/s.
        assert_eq!(one.bytes, 15_144_198_144);
        assert!((one.bound_s - 3.155_041_28e-3).abs() < 1e-9, "{one:?}");
        assert_eq!(one.bound_by, "memory");
        // 2 * 7504658432 + 4 * 32 * 32 * 128 * 1024 FLOPs.
        assert_eq!(one.flops, 15_546_187_776);
        let big = decode_step(&s, &H200, 256, 1024);
        assert_eq!(big.bytes, 15_009_849_344 + 256 * 1025 * 131_072);
        assert_eq!(big.flops, 256 * 15_546_187_776);
        // 49.40 GB / 4.8e12 = 10.29 ms against 3.98 PFLOP / 989e12 = 4.02 ms.
        assert!((big.bound_s - 10.292_321_28e-3).abs() < 1e-9, "{big:?}");
        assert!((big.compute_s - 4.024_089e-3).abs() < 1e-8, "{big:?}");
        assert_eq!(big.bound_by, "memory");
    }

    #[test]
    fn prefill_of_2k_tokens_is_compute_bound() {
        let s = ModelShape::LLAMA3_8B;
        let r = prefill(&s, &H200, 1, 2048);
        // 2*6979321856*2048 + 2*525336576 + 4*32*32*128*(2048*2049/2).
        let want = 28_587_302_322_176u64 + 1_050_673_152 + 1_100_048_498_688;
        assert_eq!(r.flops, want);
        assert_eq!(r.bound_by, "compute");
        assert!((r.bound_s - want as f64 / 989e12).abs() < 1e-12);
    }

    #[test]
    fn gpu_names_pick_the_most_specific_row() {
        let h200 = spec_for("cuda:0 NVIDIA H200 sm_90").unwrap();
        assert_eq!(h200.hbm_bytes_per_s, 4.8e12);
        assert_eq!(h200.bf16_flops_per_s, 989e12);
        assert_eq!(
            spec_for("NVIDIA H100 PCIe").unwrap().hbm_bytes_per_s,
            2.0e12
        );
        assert_eq!(
            spec_for("NVIDIA H100 80GB HBM3").unwrap().hbm_bytes_per_s,
            3.35e12
        );
        assert_eq!(spec_for("NVIDIA GH200 480GB").unwrap().name, "NVIDIA GH200");
        assert_eq!(spec_for("cuda-emu (host emulation)"), None);
    }
}
