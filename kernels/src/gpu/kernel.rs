//! Kernel descriptors and launch geometry.

/// Grid, block and dynamic shared memory of one launch.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct LaunchDims {
    pub grid: (u32, u32, u32),
    pub block: (u32, u32, u32),
    pub shared_bytes: u32,
}

/// What every NVIDIA GPU since Volta accepts: threads per block, block and grid extents.
const MAX_THREADS_PER_BLOCK: u32 = 1024;
const MAX_BLOCK: (u32, u32, u32) = (1024, 1024, 64);
const MAX_GRID: (u32, u32, u32) = (i32::MAX as u32, 65535, 65535);
/// The most dynamic shared memory one block may opt into on every GPU the kernels are built for
/// (sm_80 and later: 99 KB on sm_86/sm_89, more on sm_80 and sm_90).
const MAX_OPT_IN_DYNAMIC_SHARED: u32 = 99 * 1024;

impl LaunchDims {
    /// A one-dimensional grid of `blocks` blocks of `threads` threads.
    pub fn linear(blocks: u32, threads: u32) -> LaunchDims {
        LaunchDims {
            grid: (blocks, 1, 1),
            block: (threads, 1, 1),
            shared_bytes: 0,
        }
    }

    /// Refuses a geometry a GPU would refuse (`CUDA_ERROR_INVALID_VALUE` there, with no word of
    /// which limit), so the emulation refuses it too and the message names the kernel and limit.
    pub(crate) fn check(&self, kernel: &'static str) -> Result<(), super::GpuError> {
        let (g, b) = (self.grid, self.block);
        let threads = u64::from(b.0) * u64::from(b.1) * u64::from(b.2);
        let fault = if threads == 0 || threads > u64::from(MAX_THREADS_PER_BLOCK) {
            Some(format!(
                "{threads} threads per block (1 to {MAX_THREADS_PER_BLOCK})"
            ))
        } else if b.0 > MAX_BLOCK.0 || b.1 > MAX_BLOCK.1 || b.2 > MAX_BLOCK.2 {
            Some(format!("block {b:?} (at most {MAX_BLOCK:?})"))
        } else if g.0 > MAX_GRID.0 || g.1 > MAX_GRID.1 || g.2 > MAX_GRID.2 {
            Some(format!("grid {g:?} (at most {MAX_GRID:?})"))
        } else if self.shared_bytes > MAX_OPT_IN_DYNAMIC_SHARED {
            Some(format!(
                "{} bytes of dynamic shared memory (at most {MAX_OPT_IN_DYNAMIC_SHARED})",
                self.shared_bytes
            ))
        } else {
            None
        };
        match fault {
            Some(what) => Err(super::GpuError::Launch { kernel, what }),
            None => Ok(()),
        }
    }
}

/// The geometry an emulated entry point receives (`CadEmuLaunch` in emu.hpp).
#[cfg(feature = "cuda-emu")]
#[repr(C)]
#[derive(Clone, Copy)]
pub(crate) struct EmuLaunch {
    pub grid: [u32; 3],
    pub block: [u32; 3],
    pub shared_bytes: u32,
}

/// An emulated kernel: runs the launch and returns 0, or returns without running 1 when
/// `params_size` differs from the C struct's size (a Rust/C layout mismatch) and 2 when the block
/// has more threads than the kernel's `__launch_bounds__` (a GPU refuses that launch).
#[cfg(feature = "cuda-emu")]
pub(crate) type EmuEntry =
    unsafe extern "C" fn(*const EmuLaunch, *const core::ffi::c_void, u32) -> i32;

/// What an emulated entry point's return code means.
#[cfg(feature = "cuda-emu")]
pub(crate) fn emu_result(
    kernel: &'static str,
    launch: &EmuLaunch,
    rc: i32,
) -> Result<(), super::GpuError> {
    match rc {
        0 => Ok(()),
        2 => Err(super::GpuError::Launch {
            kernel,
            what: format!("block {:?} exceeds its __launch_bounds__", launch.block),
        }),
        _ => Err(super::GpuError::ParamsMismatch(kernel)),
    }
}

/// One kernel: its symbol in the fatbins and, in emulation, its host entry point.
pub(crate) struct KernelFn {
    pub name: &'static str,
    #[cfg(feature = "cuda-emu")]
    pub emu: EmuEntry,
}

/// Parameter structs: `#[repr(C)]`, plain data (device addresses as `u64`), mirrored by a C
/// struct in `cuda/params/`.
///
/// # Safety
/// The type must have exactly the layout of its C twin and hold only plain data.
pub(crate) unsafe trait KernelParams: Copy + ParamRepr {}

#[cfg(feature = "cuda")]
pub(crate) use cudarc::driver::DeviceRepr as ParamRepr;
#[cfg(not(feature = "cuda"))]
pub(crate) trait ParamRepr {}

/// Declares `#[repr(C)]` parameter structs as [`KernelParams`].
macro_rules! kernel_params {
    ($($t:ty),* $(,)?) => {$(
        // SAFETY: `#[repr(C)]` plain-data struct checked against its C twin's size at launch.
        unsafe impl $crate::gpu::kernel::KernelParams for $t {}
        #[cfg(feature = "cuda")]
        // SAFETY: as above; cudarc copies it into the launch's argument buffer.
        unsafe impl cudarc::driver::DeviceRepr for $t {}
        #[cfg(not(feature = "cuda"))]
        impl $crate::gpu::kernel::ParamRepr for $t {}
    )*};
}
pub(crate) use kernel_params;

/// `kernel_fn!(cad_rms_norm_bf16)`: the [`KernelFn`] of an `extern "C"` kernel of that name.
macro_rules! kernel_fn {
    ($name:ident) => {{
        #[cfg(feature = "cuda-emu")]
        {
            extern "C" {
                fn $name(
                    l: *const $crate::gpu::kernel::EmuLaunch,
                    p: *const core::ffi::c_void,
                    params_size: u32,
                ) -> i32;
            }
            $crate::gpu::kernel::KernelFn {
                name: stringify!($name),
                emu: $name,
            }
        }
        #[cfg(not(feature = "cuda-emu"))]
        {
            $crate::gpu::kernel::KernelFn {
                name: stringify!($name),
            }
        }
    }};
}
pub(crate) use kernel_fn;

#[cfg(test)]
mod tests {
    use super::LaunchDims;

    fn dims(grid: (u32, u32, u32), block: (u32, u32, u32), shared_bytes: u32) -> LaunchDims {
        LaunchDims {
            grid,
            block,
            shared_bytes,
        }
    }

    #[test]
    fn a_geometry_past_any_gpu_limit_is_refused_naming_the_limit() {
        let ok = [
            dims((i32::MAX as u32, 65535, 65535), (1024, 1, 1), 48 * 1024),
            // Past the default 48 KB: the launch opts its kernel in (up to 99 KB on sm_86).
            dims((1, 1, 1), (128, 1, 1), 99 * 1024),
            dims((1, 1, 1), (8, 8, 16), 0),
            dims((1, 1, 1), (1, 1, 64), 0),
        ];
        for d in ok {
            assert!(d.check("k").is_ok(), "{d:?}");
        }
        let refused = [
            (dims((1, 1, 1), (1025, 1, 1), 0), "1025 threads per block"),
            (dims((1, 1, 1), (32, 32, 2), 0), "2048 threads per block"),
            (dims((1, 1, 1), (0, 1, 1), 0), "0 threads per block"),
            (dims((1, 1, 1), (1, 1, 65), 0), "block (1, 1, 65)"),
            (dims((1, 65536, 1), (32, 1, 1), 0), "grid (1, 65536, 1)"),
            (dims((1u32 << 31, 1, 1), (32, 1, 1), 0), "grid"),
            (
                dims((1, 1, 1), (32, 1, 1), 99 * 1024 + 1),
                "101377 bytes of dynamic shared",
            ),
        ];
        for (d, what) in refused {
            let err = d.check("cad_k").unwrap_err().to_string();
            assert!(err.contains("cad_k") && err.contains(what), "{d:?}: {err}");
        }
    }
}
