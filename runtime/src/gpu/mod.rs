//! The GPU engine (issue 17, in progress): how device memory is divided, which batch sizes get a
//! captured CUDA graph (pure arithmetic, tested on any machine), and the model forward pass over
//! the kernels of `caduceus_kernels::gpu` (`model`, with feature `cuda` or `gpu-emu`).

pub mod graph_ladder;
#[cfg(any(feature = "cuda", feature = "gpu-emu"))]
pub mod lora;
pub mod memory_plan;
#[cfg(any(feature = "cuda", feature = "gpu-emu"))]
pub mod model;
