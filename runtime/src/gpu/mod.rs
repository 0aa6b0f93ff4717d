//! The GPU engine (issue 17): how device memory is divided, which batch sizes get a captured CUDA
//! graph (pure arithmetic, tested on any machine), and the model forward pass over the kernels of
//! `caduceus_kernels::gpu` (`model`) in a preallocated activation workspace with one upload per
//! step (`workspace`), decode steps replayed from captured graphs (`decode_graph`), behind the
//! engine's backend seam (`backend`), with feature `cuda` or `gpu-emu`; `roofline` (pure
//! arithmetic), `random_model` and `bench`/`bench_engine` are `caduceus gpu-bench`. It has run on
//! an H200 (`scripts/gpu-check`; docs/benchmarking.md says which changes since have not).

#[cfg(any(feature = "cuda", feature = "gpu-emu"))]
pub mod adapter_copies;
#[cfg(any(feature = "cuda", feature = "gpu-emu"))]
pub mod backend;
#[cfg(any(feature = "cuda", feature = "gpu-emu"))]
pub mod bench;
#[cfg(any(feature = "cuda", feature = "gpu-emu"))]
pub mod bench_engine;
#[cfg(any(feature = "cuda", feature = "gpu-emu"))]
pub mod decode_graph;
#[cfg(any(feature = "cuda", feature = "gpu-emu"))]
mod device_sampler;
pub mod graph_ladder;
#[cfg(any(feature = "cuda", feature = "gpu-emu"))]
pub mod lora;
pub mod memory_plan;
#[cfg(any(feature = "cuda", feature = "gpu-emu"))]
pub mod model;
#[cfg(any(feature = "cuda", feature = "gpu-emu"))]
pub mod random_model;
pub mod roofline;
#[cfg(any(feature = "cuda", feature = "gpu-emu"))]
pub mod workspace;

#[cfg(any(feature = "cuda", feature = "gpu-emu"))]
pub use backend::{GpuBackend, GpuBackendConfig, KvBlocks};
#[cfg(any(feature = "cuda", feature = "gpu-emu"))]
pub use workspace::StepLimits;
