//! The GEMV kernels (`cuda/gemv.cu`) against the exact product and each other, and the GEMM
//! policies that decide when they run (`gpu::gemm_tune`), on every device (see gpu_support).
//! Part of the `gpu_ops` test binary (one binary fewer to carry to the GPU machine).

use crate::gpu_support::*;
use caduceus_kernels::gpu::gemm::{gemm, gemm_bias, GemmShape};
use caduceus_kernels::gpu::gemm_tune::GemmPolicy;
use caduceus_kernels::gpu::gemv::{gemv, GemvKernel, GEMV_MAX_ROWS};
use caduceus_kernels::gpu::{DType, Device, DeviceBuffer};

/// What bounds one output's error: the magnitudes of the dot product, previous y and bias (each
/// of which cuBLASLt may round to the dtype before adding the next: seen on an H200, bf16 with
/// bias and beta = 1), and the sum of the products' magnitudes (f32 accumulation error).
#[derive(Clone, Copy)]
struct Scale {
    terms: f32,
    products: f32,
}

/// The exact `prev + x · Wᵀ + bias` in f64, and each output's [`Scale`].
fn exact(
    x: &[f32],
    w: &[f32],
    bias: Option<&[f32]>,
    prev: Option<&[f32]>,
    s: GemmShape,
) -> (Vec<f32>, Vec<Scale>) {
    (0..s.m * s.n)
        .map(|i| {
            let (row, col) = (i / s.n, i % s.n);
            let products: Vec<f64> = (0..s.k)
                .map(|j| x[row * s.k + j] as f64 * w[col * s.k + j] as f64)
                .collect();
            let dot: f64 = products.iter().sum();
            let p = prev.map_or(0.0, |p| p[i] as f64);
            let b = bias.map_or(0.0, |b| b[col] as f64);
            let scale = Scale {
                terms: (dot.abs() + p.abs() + b.abs()) as f32,
                products: products.iter().map(|t| t.abs()).sum::<f64>() as f32,
            };
            ((dot + p + b) as f32, scale)
        })
        .unzip()
}

/// How many roundings to the dtype an output may have taken.
#[derive(Clone, Copy, PartialEq)]
enum Rounding {
    /// Ours: one, of the finished sum.
    Once,
    /// A library's: of the product, the bias and the previous y too.
    PerTerm,
}

fn check(what: &str, dtype: DType, got: &[f32], want: &[f32], scale: &[Scale], r: Rounding) {
    for (i, ((&g, &w), s)) in got.iter().zip(want).zip(scale).enumerate() {
        let rounding = match r {
            Rounding::Once => eps(dtype) * w.abs(),
            Rounding::PerTerm => 2.0 * eps(dtype) * s.terms,
        };
        let tol = 1e-3 + rounding + 1e-5 * s.products;
        assert!(
            (g - w).abs() <= tol,
            "{what}: element {i}: got {g}, want {w} (tolerance {tol})"
        );
    }
}

struct Case {
    x: Vec<f32>,
    w: Vec<f32>,
    b: Vec<f32>,
    y0: Vec<f32>,
}

fn case(dtype: DType, s: GemmShape, seed: u64) -> Case {
    let mut r = rng(seed);
    Case {
        x: round(dtype, &random(&mut r, s.m * s.k, 1.0)),
        w: round(dtype, &random(&mut r, s.n * s.k, 1.0)),
        b: round(dtype, &random(&mut r, s.n, 4.0)),
        y0: round(dtype, &random(&mut r, s.m * s.n, 1.0)),
    }
}

/// Every row count the kernels take (each of their four variants, full and partial), n not a
/// multiple of a block's outputs, k crossing the direct kernel's unrolled loop and the ring
/// kernel's stages unevenly (and wrapping its ring at every variant); with and without bias and
/// accumulation. Both kernels sum each output in the same order: their bits must agree.
#[test]
fn gemv_matches_the_exact_product_for_every_row_count() {
    for dev in devices() {
        for dtype in DTYPES {
            // k = 8 * 131: one full unrolled pass of 128 vectors and 3 more (ring: 3 stages at
            // m 1, 5 at m 4, less than a ring at m 1); 8 * 453: 8 stages of 64 vectors at m 1,
            // past its 6-stage ring.
            for (n, k) in [(37, 8 * 131), (9, 8 * 453)] {
                for m in 1..=GEMV_MAX_ROWS {
                    for (with_bias, accumulate) in [(false, false), (true, false), (true, true)] {
                        let s = GemmShape {
                            m,
                            n,
                            k,
                            accumulate,
                        };
                        check_kernels(&dev, dtype, s, with_bias);
                    }
                }
            }
        }
    }
}

fn check_kernels(dev: &Device, dtype: DType, s: GemmShape, with_bias: bool) {
    let c = case(dtype, s, 100 + (s.m * s.k) as u64);
    let (dx, dw, db) = (
        upload(dev, dtype, &c.x),
        upload(dev, dtype, &c.w),
        upload(dev, dtype, &c.b),
    );
    let bias = with_bias.then_some(&db);
    let (want, scale) = exact(
        &c.x,
        &c.w,
        with_bias.then_some(&c.b[..]),
        s.accumulate.then_some(&c.y0[..]),
        s,
    );
    let outputs: Vec<Vec<f32>> = GemvKernel::ALL
        .iter()
        .map(|&kernel| {
            let dy = upload(dev, dtype, &c.y0);
            gemv(dev, dtype, kernel, &dx, &dw, bias, &dy, s).unwrap();
            let what = format!(
                "{} {} {dtype:?} m {} k {} bias {with_bias} accumulate {}",
                dev.describe(),
                kernel.name(),
                s.m,
                s.k,
                s.accumulate
            );
            let got = download(dev, dtype, &dy);
            check(&what, dtype, &got, &want, &scale, Rounding::Once);
            got
        })
        .collect();
    for (kernel, got) in GemvKernel::ALL.iter().zip(&outputs).skip(1) {
        let same = got
            .iter()
            .zip(&outputs[0])
            .all(|(a, b)| a.to_bits() == b.to_bits());
        assert!(
            same,
            "{} {dtype:?} {s:?}: {} differs from {}",
            dev.describe(),
            kernel.name(),
            GemvKernel::ALL[0].name()
        );
    }
}

#[test]
fn gemv_refuses_shapes_it_does_not_take() {
    for dev in devices() {
        let dtype = DType::Bf16;
        let buf = zeros(&dev, dtype, 16 * 64);
        let shape = |m, k| GemmShape {
            m,
            n: 4,
            k,
            accumulate: false,
        };
        for (s, why) in [
            (shape(GEMV_MAX_ROWS + 1, 8), "too many rows"),
            (shape(0, 8), "no rows"),
            (shape(1, 12), "k not a multiple of 8"),
        ] {
            for kernel in GemvKernel::ALL {
                let err = gemv(&dev, dtype, kernel, &buf, &buf, None, &buf, s);
                assert!(err.is_err(), "{}: {why} accepted", dev.describe());
            }
        }
        // A buffer too small for the shape is refused before any launch.
        let small = zeros(&dev, dtype, 4);
        let err = gemv(
            &dev,
            dtype,
            GemvKernel::Ring,
            &small,
            &buf,
            None,
            &buf,
            shape(1, 8),
        );
        let err = err.unwrap_err();
        assert!(err.to_string().contains("gemv x"), "{err}");
    }
}

fn run_policy(dev: &Device, dtype: DType, s: GemmShape, c: &Case, with_bias: bool) -> Vec<f32> {
    let (dx, dw, db): (DeviceBuffer, DeviceBuffer, DeviceBuffer) = (
        upload(dev, dtype, &c.x),
        upload(dev, dtype, &c.w),
        upload(dev, dtype, &c.b),
    );
    let dy = upload(dev, dtype, &c.y0);
    match with_bias {
        true => gemm_bias(dev, dtype, &dx, &dw, &db, &dy, s).unwrap(),
        false => gemm(dev, dtype, &dx, &dw, &dy, s).unwrap(),
    }
    download(dev, dtype, &dy)
}

/// Whichever implementation a policy picks (the library, our GEMV where it applies, or the
/// tuner's fastest), the product is right at decode's row counts and beyond the GEMV's; on a GPU
/// the tuner leaves a record per shape bucket naming a candidate it timed.
#[test]
fn every_gemm_policy_computes_the_product() {
    for dev in devices() {
        let dtype = DType::Bf16;
        let (n, k) = (40, 8 * 40);
        for policy in [GemmPolicy::Library, GemmPolicy::Gemv, GemmPolicy::Tuned] {
            dev.set_gemm_policy(policy).unwrap();
            assert_eq!(dev.gemm_policy(), policy);
            for m in [1, 3, 8, 9] {
                for (with_bias, accumulate) in [(false, false), (true, true)] {
                    let s = GemmShape {
                        m,
                        n,
                        k,
                        accumulate,
                    };
                    let c = case(dtype, s, 7 * m as u64);
                    let got = run_policy(&dev, dtype, s, &c, with_bias);
                    let (want, scale) = exact(
                        &c.x,
                        &c.w,
                        with_bias.then_some(&c.b[..]),
                        accumulate.then_some(&c.y0[..]),
                        s,
                    );
                    let what = format!("{} {policy:?} m {m} bias {with_bias}", dev.describe());
                    // Whichever implementation ran: the library's rounding bound covers ours.
                    check(&what, dtype, &got, &want, &scale, Rounding::PerTerm);
                }
            }
            let records = dev.gemm_tuning();
            if policy == GemmPolicy::Tuned && !dev.is_emulated() {
                // m 1, 3 (bucket 4), 8 and 9 (bucket 16), each with and without bias+beta.
                assert_eq!(records.len(), 8, "{records:#?}");
                for r in &records {
                    assert!(r.fallback.is_none(), "{r:#?}");
                    let timed = r.candidates.iter().find(|c| c.name == r.chosen);
                    assert!(timed.is_some_and(|c| c.us.is_some()), "{r:#?}");
                    for g in GemvKernel::ALL {
                        let timed = r.candidates.iter().any(|c| c.name == g.name());
                        assert_eq!(timed, r.m <= GEMV_MAX_ROWS, "{r:#?}");
                    }
                }
            } else {
                assert!(records.is_empty(), "{policy:?}: {records:#?}");
            }
        }
        dev.set_gemm_policy(GemmPolicy::default()).unwrap();
    }
}
