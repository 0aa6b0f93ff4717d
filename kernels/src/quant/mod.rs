//! Quantized weight formats (ggml's block layouts) and fast CPU matrix products over them.
//!
//! A [`Matrix`] keeps GGUF bytes as they are (or, after [`Matrix::into_fast`], Q4_0/Q4_1/Q8_0
//! rows interleaved 16 at a time: `packed`); [`matmul`] quantizes the activations once per call
//! (Q8_0/Q8_1/Q8_K, as llama.cpp does) and runs integer block dot products, AVX2 or AVX-512 VNNI
//! when the CPU has them, so greedy outputs track llama.cpp's. Packed weights go through
//! register-blocked 16-row x 8-token micro-kernels (`dot_packed`), which is what makes batched
//! decode cheaper per token than single-stream decode. [`matmul_reference`] is the f64 yardstick
//! for tests.

pub mod activations;
pub mod blocks;
#[cfg(target_arch = "x86_64")]
mod dot_avx2;
#[cfg(target_arch = "x86_64")]
mod dot_packed;
pub mod dot_scalar;
mod floats;
mod matmul;
mod matmul_packed;
mod matrix;
mod packed;
#[cfg(target_arch = "x86_64")]
mod quantize_x86;
mod types;

pub use floats::Floats;
pub use matmul::{matmul, matmul_reference, matmul_with_path, KernelPath};
pub use matrix::Matrix;
pub use types::{GgmlType, QuantError, QK, QK_K};
