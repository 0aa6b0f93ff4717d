//! GPU layer ops (`cuda/ops.cu`) against their CPU twins, on every device (see gpu_support).

#[path = "gpu_ops/gemv.rs"]
mod gemv;
mod gpu_support;

use caduceus_kernels::gpu::ops::{self, RmsNormArgs};
use caduceus_kernels::gpu::DType;
use caduceus_kernels::{add_inplace, rms_norm, silu_mul_fused};
use gpu_support::*;

#[test]
fn embedding_gathers_rows_and_zeroes_out_of_vocab_ids() {
    for dev in devices() {
        for dtype in DTYPES {
            let (vocab, hidden) = (37, 200);
            let table = random(&mut rng(1), vocab * hidden, 2.0);
            let ids: Vec<u32> = vec![0, 36, 5, 5, 99, 17];
            let d_table = upload(&dev, dtype, &table);
            let d_ids = dev.upload(&ids).unwrap();
            let out = zeros(&dev, dtype, ids.len() * hidden);
            ops::embedding(
                &dev,
                dtype,
                &d_table,
                vocab,
                hidden,
                &d_ids,
                ids.len(),
                &out,
            )
            .unwrap();
            let got = download(&dev, dtype, &out);
            let rounded = round(dtype, &table);
            for (t, &id) in ids.iter().enumerate() {
                let row = &got[t * hidden..(t + 1) * hidden];
                if (id as usize) < vocab {
                    let want = &rounded[id as usize * hidden..(id as usize + 1) * hidden];
                    assert_eq!(row, want, "{}: token {t}", dev.describe());
                } else {
                    assert!(row.iter().all(|&v| v == 0.0), "out-of-vocab id gives zeros");
                }
            }
        }
    }
}

/// Shapes crossing the block size: a single warp, a partial warp, many threads per element.
/// Row lengths: below a warp, a warp, partial rounds, and 4100 past the 4096 elements one round
/// of the kernel's 512 threads x 8 covers.
const NORM_DIMS: [usize; 5] = [7, 64, 576, 1100, 4100];

#[test]
fn rms_norm_matches_the_cpu_kernel() {
    for dev in devices() {
        for dtype in DTYPES {
            for (i, &dim) in NORM_DIMS.iter().enumerate() {
                let rows = 3;
                let mut r = rng(10 + i as u64);
                let x = round(dtype, &random(&mut r, rows * dim, 3.0));
                let w = round(dtype, &random(&mut r, dim, 1.5));
                let (dx, dw) = (upload(&dev, dtype, &x), upload(&dev, dtype, &w));
                let out = zeros(&dev, dtype, rows * dim);
                let args = RmsNormArgs {
                    x: &dx,
                    residual: None,
                    residual_out: None,
                    weight: &dw,
                    out: &out,
                    rows,
                    dim,
                    eps: 1e-5,
                };
                ops::rms_norm(&dev, dtype, &args).unwrap();
                let mut want = vec![0.0; rows * dim];
                rms_norm(&x, &w, 1e-5, &mut want);
                // One rounding of the output plus f32 (vs f64) accumulation of the sum.
                let got = download(&dev, dtype, &out);
                assert_close(
                    &format!("{} {dtype:?} dim {dim}", dev.describe()),
                    &got,
                    &want,
                    1e-6,
                    2.0 * eps(dtype),
                );
            }
        }
    }
}

#[test]
fn rms_norm_fuses_the_residual_add_in_place() {
    for dev in devices() {
        // One round of the kernel's loads per thread, and two (the second partial).
        for (dtype, dim) in DTYPES.into_iter().flat_map(|d| [(d, 576), (d, 4100)]) {
            let rows = 4;
            let mut r = rng(3);
            let x = round(dtype, &random(&mut r, rows * dim, 2.0));
            let res = round(dtype, &random(&mut r, rows * dim, 2.0));
            let w = round(dtype, &random(&mut r, dim, 1.0));
            let (dx, dres, dw) = (
                upload(&dev, dtype, &x),
                upload(&dev, dtype, &res),
                upload(&dev, dtype, &w),
            );
            let out = zeros(&dev, dtype, rows * dim);
            // The residual buffer is both read and updated, as in the layer loop.
            let args = RmsNormArgs {
                x: &dx,
                residual: Some(&dres),
                residual_out: Some(&dres),
                weight: &dw,
                out: &out,
                rows,
                dim,
                eps: 1e-6,
            };
            ops::rms_norm(&dev, dtype, &args).unwrap();
            let mut h = x.clone();
            add_inplace(&mut h, &res);
            let h = round(dtype, &h);
            assert_eq!(
                download(&dev, dtype, &dres),
                h,
                "residual_out is the rounded sum"
            );
            let mut want = vec![0.0; rows * dim];
            rms_norm(&h, &w, 1e-6, &mut want);
            assert_close(
                dev.describe().as_str(),
                &download(&dev, dtype, &out),
                &want,
                1e-6,
                2.0 * eps(dtype),
            );
        }
    }
}

#[test]
fn silu_mul_matches_the_cpu_kernel() {
    for dev in devices() {
        // Rows of whole 16-byte vectors (8 columns per thread) and not (one at a time).
        for (dtype, ffn) in DTYPES
            .into_iter()
            .flat_map(|d| [(d, 1536 + 7), (d, 1536 + 8)])
        {
            let rows = 5;
            let gu = round(dtype, &random(&mut rng(4), rows * 2 * ffn, 6.0));
            let dgu = upload(&dev, dtype, &gu);
            let out = zeros(&dev, dtype, rows * ffn);
            ops::silu_mul(&dev, dtype, &dgu, rows, ffn, &out).unwrap();
            let mut want = vec![0.0; rows * ffn];
            silu_mul_fused(&gu, ffn, &mut want);
            assert_close(
                dev.describe().as_str(),
                &download(&dev, dtype, &out),
                &want,
                1e-6,
                2.0 * eps(dtype),
            );
        }
    }
}

#[test]
fn to_f32_widens_every_element_exactly() {
    for dev in devices() {
        for dtype in DTYPES {
            // Spans more than one grid-stride pass would at 65,535 blocks only on a GPU; odd n.
            let n = 3 * 256 + 5;
            let x = round(dtype, &random(&mut rng(9), n, 50.0));
            let out = dev.alloc_zeroed(n * 4).unwrap();
            ops::to_f32(&dev, dtype, &upload(&dev, dtype, &x), n, &out).unwrap();
            assert_eq!(dev.download::<f32>(&out).unwrap(), x, "{}", dev.describe());
            let short = dev.alloc_zeroed((n - 1) * 4).unwrap();
            let err = ops::to_f32(&dev, dtype, &upload(&dev, dtype, &x), n, &short).unwrap_err();
            assert!(err.to_string().contains("to_f32 out"), "{err}");
        }
    }
}

#[test]
fn add_at_adds_each_entry_once_and_skips_indices_past_the_end() {
    use caduceus_kernels::gpu::ops::AddAtEntry;
    for dev in devices() {
        // More entries than one block's threads, scattered over a buffer two rows long.
        let len = 2 * 1000;
        let x = random(&mut rng(4), len, 10.0);
        let mut entries: Vec<AddAtEntry> = (0..300u32)
            .map(|i| AddAtEntry {
                index: (i * 7 + 3) % len as u32,
                value: i as f32 - 150.0,
            })
            .collect();
        entries.dedup_by_key(|e| e.index);
        entries.push(AddAtEntry {
            index: len as u32,
            value: 1.0,
        });
        let mut want = x.clone();
        for e in entries.iter().filter(|e| (e.index as usize) < len) {
            want[e.index as usize] += e.value;
        }
        let dx = dev.upload(&x).unwrap();
        let de = dev.upload(&entries).unwrap();
        ops::add_at(&dev, &dx, len, &de, entries.len()).unwrap();
        assert_eq!(
            dev.download::<f32>(&dx).unwrap(),
            want,
            "{}",
            dev.describe()
        );
        // No entries: nothing launched, nothing changed.
        ops::add_at(&dev, &dx, len, &de, 0).unwrap();
        assert_eq!(dev.download::<f32>(&dx).unwrap(), want);
        let err = ops::add_at(&dev, &dx, len + 1, &de, entries.len()).unwrap_err();
        assert!(err.to_string().contains("add_at x"), "{err}");
    }
}

#[test]
fn launchers_refuse_buffers_too_small_for_the_shape() {
    let dev = &devices()[0];
    let dtype = DTYPES[0];
    let small = zeros(dev, dtype, 10);
    let err = ops::silu_mul(dev, dtype, &small, 2, 8, &small).unwrap_err();
    assert!(err.to_string().contains("silu_mul gate_up"), "{err}");
}

#[test]
fn gemm_projects_rows_against_pytorch_layout_weights() {
    use caduceus_kernels::gpu::gemm::{gemm, gemm_bias, GemmShape};
    for dev in devices() {
        for dtype in DTYPES {
            // Odd sizes: no dimension a multiple of a GPU tile.
            let (m, n, k) = (5, 37, 70);
            let mut r = rng(9);
            let x = round(dtype, &random(&mut r, m * k, 1.0));
            let w = round(dtype, &random(&mut r, n * k, 1.0));
            let y0 = round(dtype, &random(&mut r, m * n, 1.0));
            // A Qwen2-style q/k/v bias: a few units, so a missed or misplaced bias shows.
            let b = round(dtype, &random(&mut r, n, 4.0));
            let (dx, dw, db) = (
                upload(&dev, dtype, &x),
                upload(&dev, dtype, &w),
                upload(&dev, dtype, &b),
            );
            for with_bias in [false, true] {
                for accumulate in [false, true] {
                    let dy = upload(&dev, dtype, &y0);
                    let s = GemmShape {
                        m,
                        n,
                        k,
                        accumulate,
                    };
                    if with_bias {
                        gemm_bias(&dev, dtype, &dx, &dw, &db, &dy, s).unwrap();
                    } else {
                        gemm(&dev, dtype, &dx, &dw, &dy, s).unwrap();
                    }
                    // The exact sum, and the sum of its terms' magnitudes: cuBLASLt may round
                    // the product, the bias or the accumulated value to the output dtype before
                    // adding the next (seen on an H200: f16 with bias and beta = 1, ~4 ulps of
                    // the result), so each rounding is bounded by the terms, not by the result.
                    let (want, scale): (Vec<f32>, Vec<f32>) = (0..m * n)
                        .map(|i| {
                            let (row, col) = (i / n, i % n);
                            let dot: f64 = (0..k)
                                .map(|j| x[row * k + j] as f64 * w[col * k + j] as f64)
                                .sum();
                            let prev = if accumulate { y0[i] as f64 } else { 0.0 };
                            let bias = if with_bias { b[col] as f64 } else { 0.0 };
                            let terms = dot.abs() + prev.abs() + bias.abs();
                            ((dot + prev + bias) as f32, terms as f32)
                        })
                        .unzip();
                    let what = format!(
                        "{} {dtype:?} accumulate={accumulate} bias={with_bias}",
                        dev.describe()
                    );
                    let got = download(&dev, dtype, &dy);
                    for (i, ((&g, &w), &t)) in got.iter().zip(&want).zip(&scale).enumerate() {
                        let tol = 1e-3 + 2.0 * eps(dtype) * t;
                        assert!(
                            (g - w).abs() <= tol,
                            "{what}: element {i}: got {g}, want {w} (tolerance {tol})"
                        );
                    }
                }
            }
        }
        // Every call above was a new (dtype, beta, bias) combination: 8 choices, no reuse.
        let stats = dev.gemm_cache_stats();
        assert_eq!(
            (stats.hits, stats.misses, stats.entries),
            (0, 8, 8),
            "{}",
            dev.describe()
        );
    }
}

/// The algorithm is chosen once per (m bucket, n, k, dtype, beta, bias) and then reused: what
/// lets a CUDA graph be captured after one warm-up step without cuBLASLt heuristic queries.
/// Also checks that reused choices still compute the right product at every m of a bucket.
#[test]
fn gemm_chooses_its_algorithm_once_per_shape_bucket() {
    use caduceus_kernels::gpu::gemm::{gemm, GemmShape};
    for dev in devices() {
        let dtype = DType::Bf16;
        let (n, k) = (24, 40);
        let mut r = rng(10);
        let w = round(dtype, &random(&mut r, n * k, 1.0));
        let dw = upload(&dev, dtype, &w);
        // m 5..=8 share a bucket, 9 and 16 share the next, 1 is its own.
        let ms = [5, 8, 6, 7, 9, 16, 1, 5];
        for (i, &m) in ms.iter().enumerate() {
            let x = round(dtype, &random(&mut r, m * k, 1.0));
            let (dx, dy) = (upload(&dev, dtype, &x), zeros(&dev, dtype, m * n));
            let s = GemmShape {
                m,
                n,
                k,
                accumulate: false,
            };
            gemm(&dev, dtype, &dx, &dw, &dy, s).unwrap();
            let want: Vec<f32> = (0..m * n)
                .map(|e| {
                    let (row, col) = (e / n, e % n);
                    (0..k)
                        .map(|j| x[row * k + j] as f64 * w[col * k + j] as f64)
                        .sum::<f64>() as f32
                })
                .collect();
            let what = format!("{} call {i} m {m}", dev.describe());
            assert_close(
                &what,
                &download(&dev, dtype, &dy),
                &want,
                1e-3,
                2.0 * eps(dtype),
            );
        }
        let stats = dev.gemm_cache_stats();
        assert_eq!(
            (stats.hits, stats.misses, stats.entries),
            (5, 3, 3),
            "{}",
            dev.describe()
        );
    }
}

/// A `cuda` build opened on a machine without a GPU or driver reports it (cudarc would panic
/// on a missing library if the driver were not probed first). Skipped where a GPU run is asked
/// for (`CAD_GPU_TESTS=1`): there the device opens for real in every other test.
#[cfg(feature = "cuda")]
#[test]
fn opening_cuda_without_a_gpu_is_a_clean_error() {
    use caduceus_kernels::gpu::{Device, GpuError};
    if std::env::var("CAD_GPU_TESTS").is_ok_and(|s| s == "1") {
        return;
    }
    let present = std::path::Path::new("/dev/nvidiactl").exists();
    match Device::cuda(0) {
        Err(e @ (GpuError::NoDriver | GpuError::NoSuchDevice { .. })) => {
            assert!(!present, "a GPU node exists but opening failed: {e}");
            let msg = e.to_string();
            assert!(msg.contains("GPU") || msg.contains("CUDA device"), "{msg}");
        }
        Err(e) => panic!("unexpected error opening CUDA: {e}"),
        Ok(d) => assert!(present, "opened {} without /dev/nvidiactl", d.describe()),
    }
}

#[test]
fn copy_rows_moves_a_column_range_between_strided_layouts() {
    use caduceus_kernels::gpu::ops::{copy_rows, Strided};
    for dev in devices() {
        for dtype in DTYPES {
            // q (first 40 columns) out of 3 rows of a fused [q | k | v] of width 72.
            let (rows, cols, width) = (3, 40, 72);
            let src = round(dtype, &random(&mut rng(5), rows * width, 1.0));
            let dsrc = upload(&dev, dtype, &src);
            let dst = upload(&dev, dtype, &vec![7.0; rows * cols + 1]);
            let (s, d) = (
                Strided {
                    buf: &dsrc,
                    stride: width,
                },
                Strided {
                    buf: &dst,
                    stride: cols,
                },
            );
            copy_rows(&dev, dtype, s, d, rows, cols).unwrap();
            let got = download(&dev, dtype, &dst);
            for r in 0..rows {
                assert_eq!(
                    &got[r * cols..(r + 1) * cols],
                    &src[r * width..r * width + cols]
                );
            }
            assert_eq!(got[rows * cols], 7.0, "nothing written past the rows");
        }
    }
}
