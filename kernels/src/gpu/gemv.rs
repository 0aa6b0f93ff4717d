//! Launcher of `cuda/gemv.cu`: `y (+)= x · Wᵀ (+ bias)` for at most [`GEMV_MAX_ROWS`] rows of `x`
//! (decode steps of small batches), streaming W once with 16-byte loads, by one of two kernels
//! ([`GemvKernel`]) that give the same bits. Both are candidates the GEMM tuner times against
//! cuBLASLt's ([`super::gemm_tune`]): under the tuned policy one replaces a library algorithm
//! only where it measured faster.

use super::device::{DType, Device, DeviceBuffer, GpuError};
use super::gemm::{check_operands, GemmShape};
use super::kernel::{kernel_fn, kernel_params, KernelFn, LaunchDims};
use super::ops::{by_dtype, dim32};

/// Most rows of `x` the kernel takes.
pub const GEMV_MAX_ROWS: usize = 8;

/// `GemvParams` in `cuda/params/gemv.h`.
#[repr(C)]
#[derive(Clone, Copy, Debug)]
struct GemvParams {
    x: u64,
    w: u64,
    bias: u64,
    y: u64,
    m: u32,
    n: u32,
    k: u32,
    accumulate: u32,
}

kernel_params!(GemvParams);

const THREADS: u32 = 128;
const WARPS: usize = THREADS as usize / 32;

/// Which GEMV kernel runs (`cuda/gemv.cu`); both compute each output in the same order.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum GemvKernel {
    /// Loads a few vectors of each row into registers, then multiplies them.
    Direct,
    /// Streams each row through a per-lane cp.async ring in shared memory, several stages ahead.
    Ring,
}

impl GemvKernel {
    /// Every kernel, in the order the tuner times them.
    pub const ALL: [GemvKernel; 2] = [GemvKernel::Direct, GemvKernel::Ring];

    /// The name in tuning records (`gemv`, `gemv_ring`).
    pub fn name(self) -> &'static str {
        match self {
            GemvKernel::Direct => "gemv",
            GemvKernel::Ring => "gemv_ring",
        }
    }
}

/// The kernels by the largest `m` they take, with the rows of W each warp owns (as in the .cu,
/// the same for both kernels): `[direct bf16, direct f16]`, `[ring bf16, ring f16]`.
const VARIANTS: [(usize, usize, [[KernelFn; 2]; 2]); 4] = [
    (
        1,
        1,
        [
            [kernel_fn!(cad_gemv_m1_bf16), kernel_fn!(cad_gemv_m1_f16)],
            [
                kernel_fn!(cad_gemv_ring_m1_bf16),
                kernel_fn!(cad_gemv_ring_m1_f16),
            ],
        ],
    ),
    (
        2,
        2,
        [
            [kernel_fn!(cad_gemv_m2_bf16), kernel_fn!(cad_gemv_m2_f16)],
            [
                kernel_fn!(cad_gemv_ring_m2_bf16),
                kernel_fn!(cad_gemv_ring_m2_f16),
            ],
        ],
    ),
    (
        4,
        4,
        [
            [kernel_fn!(cad_gemv_m4_bf16), kernel_fn!(cad_gemv_m4_f16)],
            [
                kernel_fn!(cad_gemv_ring_m4_bf16),
                kernel_fn!(cad_gemv_ring_m4_f16),
            ],
        ],
    ),
    (
        8,
        4,
        [
            [kernel_fn!(cad_gemv_m8_bf16), kernel_fn!(cad_gemv_m8_f16)],
            [
                kernel_fn!(cad_gemv_ring_m8_bf16),
                kernel_fn!(cad_gemv_ring_m8_f16),
            ],
        ],
    ),
];

/// Whether the kernel takes this projection: 1 to [`GEMV_MAX_ROWS`] rows, `k` a multiple of 8 and
/// every address 16-byte aligned (its loads are 16-byte vectors).
pub fn gemv_applies(s: &GemmShape, addrs: &GemvAddrs) -> bool {
    let aligned = [addrs.x, addrs.w, addrs.y]
        .into_iter()
        .chain(addrs.bias)
        .all(|a| a.is_multiple_of(16));
    (1..=GEMV_MAX_ROWS).contains(&s.m) && s.n > 0 && s.k > 0 && s.k.is_multiple_of(8) && aligned
}

/// `y (+)= x · Wᵀ (+ bias)` by one GEMV kernel alone (what [`super::gemm::gemm`] runs when the
/// policy or the tuner picks it), with the buffers checked against `s`; an error where the
/// kernels do not apply ([`gemv_applies`]).
#[allow(clippy::too_many_arguments)]
pub fn gemv(
    dev: &Device,
    dtype: DType,
    kernel: GemvKernel,
    x: &DeviceBuffer,
    w: &DeviceBuffer,
    bias: Option<&DeviceBuffer>,
    y: &DeviceBuffer,
    s: GemmShape,
) -> Result<(), GpuError> {
    check_operands(
        ["gemv x", "gemv w", "gemv y", "gemv bias"],
        dtype,
        [x, w, y],
        bias,
        &s,
    )?;
    let addrs = GemvAddrs {
        x: x.ptr(),
        w: w.ptr(),
        bias: bias.map(|b| b.ptr()),
        y: y.ptr(),
    };
    launch_gemv(dev, dtype, kernel, addrs, s)
}

/// Launches the kernel on raw device addresses; the caller checked every buffer against `s`
/// (as [`super::gemm::gemm`] does) and that [`gemv_applies`].
pub(crate) fn launch_gemv(
    dev: &Device,
    dtype: DType,
    kernel: GemvKernel,
    addrs: GemvAddrs,
    s: GemmShape,
) -> Result<(), GpuError> {
    if !gemv_applies(&s, &addrs) {
        return Err(GpuError::Shape(format!(
            "gemv: {s:?} (m 1 to {GEMV_MAX_ROWS}, k a multiple of 8, 16-byte aligned buffers)"
        )));
    }
    let (_, rows_per_warp, families) = VARIANTS
        .iter()
        .find(|(max_m, _, _)| s.m <= *max_m)
        .ok_or_else(|| GpuError::Shape(format!("gemv: m = {}", s.m)))?;
    let family = match kernel {
        GemvKernel::Direct => &families[0],
        GemvKernel::Ring => &families[1],
    };
    let blocks = s.n.div_ceil(WARPS * rows_per_warp);
    let params = GemvParams {
        x: addrs.x,
        w: addrs.w,
        bias: addrs.bias.unwrap_or(0),
        y: addrs.y,
        m: dim32("gemv m", s.m)?,
        n: dim32("gemv n", s.n)?,
        k: dim32("gemv k", s.k)?,
        accumulate: u32::from(s.accumulate),
    };
    dev.launch(
        by_dtype(family, dtype),
        LaunchDims::linear(dim32("gemv blocks", blocks)?, THREADS),
        &params,
    )
}

/// Device addresses of one projection's operands (`bias`: `None` without one).
#[derive(Clone, Copy, Debug)]
pub struct GemvAddrs {
    pub x: u64,
    pub w: u64,
    pub bias: Option<u64>,
    pub y: u64,
}
