//! Shared by the GPU kernel tests: the devices to run on, inputs, and tolerance checks.
//!
//! Every test body runs on each device [`devices`] returns: the host emulation always, and
//! CUDA device 0 when built with `--features cuda` and `CAD_GPU_TESTS=1` (set by
//! `scripts/gpu-check kernels`), where a missing GPU is then an error, not a skip.
#![allow(dead_code)]

use caduceus_kernels::gpu::{DType, Device, DeviceBuffer};
use half::{bf16, f16};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

/// The devices every GPU test runs on (see [`caduceus_kernels::gpu::devices_under_test`]).
pub fn devices() -> Vec<Device> {
    match caduceus_kernels::gpu::devices_under_test() {
        Ok(v) => v,
        Err(e) => panic!("CAD_GPU_TESTS=1 but no GPU: {e}"),
    }
}

pub const DTYPES: [DType; 2] = [DType::Bf16, DType::F16];

pub fn rng(seed: u64) -> ChaCha8Rng {
    ChaCha8Rng::seed_from_u64(seed)
}

/// `n` values uniform in `[-scale, scale)`.
pub fn random(rng: &mut ChaCha8Rng, n: usize, scale: f32) -> Vec<f32> {
    (0..n).map(|_| rng.random_range(-scale..scale)).collect()
}

/// Rounds through the dtype: what the device actually holds for `v`.
pub fn round(dtype: DType, v: &[f32]) -> Vec<f32> {
    match dtype {
        DType::Bf16 => v.iter().map(|&x| bf16::from_f32(x).to_f32()).collect(),
        DType::F16 => v.iter().map(|&x| f16::from_f32(x).to_f32()).collect(),
    }
}

/// Uploads `v` converted to the dtype.
pub fn upload(dev: &Device, dtype: DType, v: &[f32]) -> DeviceBuffer {
    match dtype {
        DType::Bf16 => dev
            .upload(&v.iter().map(|&x| bf16::from_f32(x)).collect::<Vec<_>>())
            .unwrap(),
        DType::F16 => dev
            .upload(&v.iter().map(|&x| f16::from_f32(x)).collect::<Vec<_>>())
            .unwrap(),
    }
}

/// A zeroed buffer of `n` dtype elements.
pub fn zeros(dev: &Device, dtype: DType, n: usize) -> DeviceBuffer {
    dev.alloc_zeroed(n * dtype.size()).unwrap()
}

/// Downloads a dtype buffer as f32.
pub fn download(dev: &Device, dtype: DType, buf: &DeviceBuffer) -> Vec<f32> {
    match dtype {
        DType::Bf16 => dev
            .download::<bf16>(buf)
            .unwrap()
            .iter()
            .map(|x| x.to_f32())
            .collect(),
        DType::F16 => dev
            .download::<f16>(buf)
            .unwrap()
            .iter()
            .map(|x| x.to_f32())
            .collect(),
    }
}

/// Relative precision of one rounding to the dtype (half an ulp at 1.0).
pub fn eps(dtype: DType) -> f32 {
    match dtype {
        DType::Bf16 => 1.0 / 256.0,
        DType::F16 => 1.0 / 2048.0,
    }
}

/// Asserts `|got - want| <= atol + rtol * |want|` elementwise, naming the first offender.
pub fn assert_close(what: &str, got: &[f32], want: &[f32], atol: f32, rtol: f32) {
    assert_eq!(got.len(), want.len(), "{what}: lengths differ");
    for (i, (&g, &w)) in got.iter().zip(want).enumerate() {
        let tol = atol + rtol * w.abs();
        assert!(
            (g - w).abs() <= tol || (g.is_nan() && w.is_nan()),
            "{what}: element {i}: got {g}, want {w} (tolerance {tol})"
        );
    }
}
