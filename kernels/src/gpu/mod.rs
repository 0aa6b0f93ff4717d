//! The GPU kernels (`kernels/cuda/*.cu`) seen from Rust: devices, buffers, launches.
//!
//! One [`Device`] API runs a kernel either on an NVIDIA GPU (feature `cuda`: nvcc-built fatbins
//! loaded through cudarc, which dlopens the driver at run time) or in host emulation (feature
//! `cuda-emu`: the same `.cu` sources compiled by the host C++ compiler against
//! `cuda/emu/emu.hpp`). Tests run one body on every device there is, against the CPU kernels of
//! this crate as the reference; CI runs them emulated, `scripts/gpu-check` on a GPU.
//!
//! Each kernel file has a parameter header (`cuda/params/*.h`) mirrored by a `#[repr(C)]` struct
//! here, passed by value as the kernel's one argument, and a host-side launcher that checks
//! shapes and picks the grid.

pub mod attention;
pub mod attention_prefill;
pub mod copy_stream;
#[cfg(feature = "cuda")]
mod cublaslt;
#[cfg(feature = "cuda")]
mod cuda;
mod device;
pub mod gemm;
pub mod gemm_cache;
pub mod gemm_tune;
pub mod gemv;
mod graph;
mod kernel;
pub mod lora;
pub mod ops;
pub mod pinned_pool;
pub mod rope_cache;
pub mod sampling;
mod staging;
pub mod timing;

#[cfg(feature = "cuda-emu")]
pub use device::Emulation;
pub use device::{
    as_bytes, BufferView, DType, Device, DeviceBuffer, DeviceElem, GpuError, EMULATED_MEMORY_BYTES,
};
pub use graph::{DeviceGraph, Transfers};
pub use kernel::LaunchDims;
pub use staging::HostStaging;

/// The devices GPU tests run on: the host emulation (unless `CAD_GPU_ONLY=1`), plus CUDA
/// device 0 when built with `cuda` and `CAD_GPU_TESTS=1` or `CAD_GPU_ONLY=1` (set by
/// `scripts/gpu-check`), where a missing GPU is then an error, not a skip.
#[cfg(feature = "cuda-emu")]
#[allow(unused_mut)]
pub fn devices_under_test() -> Result<Vec<Device>, GpuError> {
    let flag = |name: &str| std::env::var(name).is_ok_and(|s| s == "1");
    let gpu_only = flag("CAD_GPU_ONLY");
    let mut v = if gpu_only {
        Vec::new()
    } else {
        vec![Device::emulated()]
    };
    #[cfg(feature = "cuda")]
    if gpu_only || flag("CAD_GPU_TESTS") {
        v.push(Device::cuda(0)?);
    }
    Ok(v)
}
