//! Caduceus compute kernels: quantized matrix products, paged-KV cache writes and paged attention.
//!
//! Every op has a straightforward reference implementation (used by tests) and a fast CPU
//! implementation that uses all threads of the current rayon pool. CUDA versions live behind
//! the `cuda` feature.

pub mod attention;
#[cfg(any(feature = "cuda", feature = "cuda-emu"))]
pub mod gpu;
pub mod lora;
pub mod ops;
pub mod sampling;

pub use attention::{
    paged_attention, paged_attention_reference, write_kv, AttentionParams, KvCacheShape,
    LayerKvCache, SeqAttention, PAD_SLOT,
};
pub use ops::{add_inplace, rms_norm, rms_norm_inplace, silu_mul, silu_mul_fused, Rope, RopeStyle};

pub mod quant;
pub use quant::{matmul, matmul_reference, GgmlType, Matrix, QuantError};
