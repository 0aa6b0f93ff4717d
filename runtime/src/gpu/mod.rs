//! The GPU engine's host-side planning (issue 17, in progress): how device memory is divided and
//! which batch sizes get a captured CUDA graph. Pure arithmetic, tested on any machine; the
//! kernels it plans for are `caduceus_kernels::gpu`.

pub mod graph_ladder;
pub mod memory_plan;
