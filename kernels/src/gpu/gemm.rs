//! Dense projections `y = x · Wᵀ (+ bias)` (all linear layers and the LM head): cuBLASLt in
//! bf16/f16 with f32 accumulation on a GPU, or our GEMV kernel for decode's few rows, the
//! implementation chosen once per shape bucket ([`super::gemm_cache`], [`super::gemm_tune`]); a
//! plain host loop with the same rounding points in emulation, so the emulated engine can run a
//! whole forward pass.

use super::device::{DType, Device, DeviceBuffer, GpuError};
#[cfg(feature = "cuda-emu")]
use super::gemm_cache::GemmKey;
#[cfg(feature = "cuda-emu")]
use super::gemm_tune::{GemmChoice, GemmPolicy};
use super::gemv::GemvAddrs;
#[cfg(any(feature = "cuda", feature = "cuda-emu"))]
use super::gemv::{gemv_applies, launch_gemv, GemvKernel};
use super::ops::need;

/// Shape of one projection: `x` is `[m, k]`, `w` is `[n, k]` (PyTorch's `Linear.weight`), `y` is
/// `[m, n]`; all row-major in the dtype. With `accumulate`, `y += x · Wᵀ` (residual fusion).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct GemmShape {
    pub m: usize,
    pub n: usize,
    pub k: usize,
    pub accumulate: bool,
}

/// `y (+)= x · Wᵀ`, f32 accumulation, one rounding to the dtype at the end.
pub fn gemm(
    dev: &Device,
    dtype: DType,
    x: &DeviceBuffer,
    w: &DeviceBuffer,
    y: &DeviceBuffer,
    s: GemmShape,
) -> Result<(), GpuError> {
    run(dev, dtype, x, w, None, y, s)
}

/// `y (+)= x · Wᵀ + bias`: a linear layer with bias (Qwen2's q/k/v projections), the bias
/// (`[n]` in the dtype) added to every row in f32 before the one rounding (cuBLASLt's BIAS
/// epilogue on a GPU, so the bias costs no extra pass over `y`).
pub fn gemm_bias(
    dev: &Device,
    dtype: DType,
    x: &DeviceBuffer,
    w: &DeviceBuffer,
    bias: &DeviceBuffer,
    y: &DeviceBuffer,
    s: GemmShape,
) -> Result<(), GpuError> {
    run(dev, dtype, x, w, Some(bias), y, s)
}

/// How a launcher's errors name the operands x, w, y and bias.
pub(crate) type OperandNames = [&'static str; 4];

/// Refuses buffers too small for `s` (`x` `[m, k]`, `w` `[n, k]`, `y` `[m, n]`, `bias` `[n]`),
/// naming the operand by `names`; the one check of every projection's launcher.
pub(crate) fn check_operands(
    names: OperandNames,
    dtype: DType,
    [x, w, y]: [&DeviceBuffer; 3],
    bias: Option<&DeviceBuffer>,
    s: &GemmShape,
) -> Result<(), GpuError> {
    let es = dtype.size();
    need(names[0], x, s.m * s.k, es)?;
    need(names[1], w, s.n * s.k, es)?;
    need(names[2], y, s.m * s.n, es)?;
    match bias {
        Some(b) => need(names[3], b, s.n, es),
        None => Ok(()),
    }
}

fn run(
    dev: &Device,
    dtype: DType,
    x: &DeviceBuffer,
    w: &DeviceBuffer,
    bias: Option<&DeviceBuffer>,
    y: &DeviceBuffer,
    s: GemmShape,
) -> Result<(), GpuError> {
    check_operands(
        ["gemm x", "gemm w", "gemm y", "gemm bias"],
        dtype,
        [x, w, y],
        bias,
        &s,
    )?;
    if s.m == 0 || s.n == 0 {
        return Ok(());
    }
    let addrs = GemvAddrs {
        x: x.ptr(),
        w: w.ptr(),
        bias: bias.map(|b| b.ptr()),
        y: y.ptr(),
    };
    match dev {
        #[cfg(feature = "cuda-emu")]
        Device::Emulated(e) => {
            // The host loop has nothing to tune, but the choice is cached and counted exactly as
            // on a GPU; the ring GEMV kernel runs where the policy forces it.
            let applies = gemv_applies(&s, &addrs);
            let choice =
                e.gemm_algos
                    .get_or_choose(GemmKey::new(dtype, &s, bias.is_some()), || {
                        Ok::<_, GpuError>(match e.gemm_policy() {
                            GemmPolicy::Gemv if applies => GemmChoice::Gemv(GemvKernel::Ring),
                            _ => GemmChoice::Library(()),
                        })
                    })?;
            if let (GemmChoice::Gemv(kernel), true) = (choice, applies) {
                return launch_gemv(dev, dtype, kernel, addrs, s);
            }
            if e.capture.record_gemm(dtype, [x, w, y], bias, s)? {
                return Ok(());
            }
            host_gemm(dtype, x.ptr(), w.ptr(), bias.map(|b| b.ptr()), y.ptr(), s);
            Ok(())
        }
        #[cfg(feature = "cuda")]
        Device::Cuda(d) => {
            let gemv = |kernel: GemvKernel, y: u64| {
                launch_gemv(dev, dtype, kernel, GemvAddrs { y, ..addrs }, s)
            };
            let gemv: &dyn Fn(GemvKernel, u64) -> Result<(), GpuError> = &gemv;
            let applies = gemv_applies(&s, &addrs);
            d.gemm(
                dtype,
                x.ptr(),
                w.ptr(),
                bias.map(|b| b.ptr()),
                y.ptr(),
                s,
                applies.then_some(gemv),
            )
        }
    }
}

/// The emulated GEMM on raw emulated addresses (also what a replayed graph runs); the caller
/// checked every buffer against `s`.
#[cfg(feature = "cuda-emu")]
pub(crate) fn host_gemm(dtype: DType, x: u64, w: u64, bias: Option<u64>, y: u64, s: GemmShape) {
    use half::{bf16, f16};
    let load = |p: u64, i: usize| -> f32 {
        // SAFETY: `need` checked every index below lies inside its emulated (host) buffer.
        let bits = unsafe { *(p as usize as *const u16).add(i) };
        match dtype {
            DType::Bf16 => bf16::from_bits(bits).to_f32(),
            DType::F16 => f16::from_bits(bits).to_f32(),
        }
    };
    let store = |p: u64, i: usize, v: f32| {
        let bits = match dtype {
            DType::Bf16 => bf16::from_f32(v).to_bits(),
            DType::F16 => f16::from_f32(v).to_bits(),
        };
        // SAFETY: as in `load`.
        unsafe { *(p as usize as *mut u16).add(i) = bits };
    };
    for r in 0..s.m {
        for c in 0..s.n {
            let acc = (0..s.k).fold(0f32, |a, i| {
                load(x, r * s.k + i).mul_add(load(w, c * s.k + i), a)
            });
            let prev = if s.accumulate {
                load(y, r * s.n + c)
            } else {
                0.0
            };
            let b = bias.map_or(0.0, |b| load(b, c));
            store(y, r * s.n + c, prev + acc + b);
        }
    }
}
