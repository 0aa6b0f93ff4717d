//! GPU layer ops (`cuda/ops.cu`) against their CPU twins, on every device (see gpu_support).

mod gpu_support;

use caduceus_kernels::gpu::ops::{self, RmsNormArgs};
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
const NORM_DIMS: [usize; 4] = [7, 64, 576, 1100];

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
        for dtype in DTYPES {
            let (rows, dim) = (4, 576);
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
        for dtype in DTYPES {
            let (rows, ffn) = (5, 1536 + 7);
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
fn launchers_refuse_buffers_too_small_for_the_shape() {
    let dev = &devices()[0];
    let dtype = DTYPES[0];
    let small = zeros(dev, dtype, 10);
    let err = ops::silu_mul(dev, dtype, &small, 2, 8, &small).unwrap_err();
    assert!(err.to_string().contains("silu_mul gate_up"), "{err}");
}
