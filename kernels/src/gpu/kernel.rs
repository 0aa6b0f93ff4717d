//! Kernel descriptors and launch geometry.

/// Grid, block and dynamic shared memory of one launch.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct LaunchDims {
    pub grid: (u32, u32, u32),
    pub block: (u32, u32, u32),
    pub shared_bytes: u32,
}

impl LaunchDims {
    /// A one-dimensional grid of `blocks` blocks of `threads` threads.
    pub fn linear(blocks: u32, threads: u32) -> LaunchDims {
        LaunchDims {
            grid: (blocks, 1, 1),
            block: (threads, 1, 1),
            shared_bytes: 0,
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

/// An emulated kernel: runs the launch and returns 0, or returns 1 without running when
/// `params_size` differs from the C struct's size (a Rust/C layout mismatch).
#[cfg(feature = "cuda-emu")]
pub(crate) type EmuEntry =
    unsafe extern "C" fn(*const EmuLaunch, *const core::ffi::c_void, u32) -> i32;

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
