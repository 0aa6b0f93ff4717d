//! Quantized weight formats (ggml's block layouts) and fast CPU matrix products over them.
//!
//! A [`Matrix`] keeps GGUF bytes as they are; [`matmul`] quantizes the activations once per call
//! (Q8_0/Q8_1/Q8_K, as llama.cpp does) and runs integer block dot products, AVX2 when the CPU has
//! it, so greedy outputs track llama.cpp's. [`matmul_reference`] is the f64 yardstick for tests.

pub mod activations;
pub mod blocks;
#[cfg(target_arch = "x86_64")]
mod dot_avx2;
pub mod dot_scalar;
mod matmul;
mod matrix;
mod types;

pub use matmul::{matmul, matmul_reference, matmul_with_path, KernelPath};
pub use matrix::Matrix;
pub use types::{GgmlType, QuantError, QK, QK_K};
