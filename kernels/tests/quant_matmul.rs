//! Matrix products: the fast paths against the f64 reference (within activation-quantization error)
//! and against each other (equal up to float summation order), across shapes that exercise token
//! tiles, remainders and the parallel row split.

use caduceus_kernels::quant::{
    matmul, matmul_reference, matmul_with_path, GgmlType, KernelPath, Matrix,
};
use half::f16;
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

fn random_f32(rng: &mut ChaCha8Rng, n: usize) -> Vec<f32> {
    (0..n).map(|_| rng.random_range(-1.0f32..1.0)).collect()
}

/// A weight matrix of `ty` from random values (quantized) or random blocks with sane f16 scales.
fn random_matrix(rng: &mut ChaCha8Rng, ty: GgmlType, rows: usize, cols: usize) -> Matrix {
    let values = random_f32(rng, rows * cols);
    match ty {
        GgmlType::F32 => Matrix::from_f32(rows, cols, &values),
        GgmlType::F16 => {
            let data = values
                .iter()
                .flat_map(|v| f16::from_f32(*v).to_bits().to_le_bytes())
                .collect();
            Matrix::new(ty, rows, cols, data).unwrap()
        }
        GgmlType::Q8_0 => Matrix::quantize_q8_0(rows, cols, &values),
        GgmlType::Q4_0 => Matrix::quantize_q4_0(rows, cols, &values),
        GgmlType::Q4_1 => Matrix::quantize_q4_1(rows, cols, &values),
        _ => {
            let n_bytes = ty.row_bytes(cols).unwrap() * rows;
            let mut data: Vec<u8> = (0..n_bytes).map(|_| rng.random()).collect();
            let scale_offsets: &[usize] = match ty {
                GgmlType::Q4_K | GgmlType::Q5_K => &[0, 2],
                GgmlType::Q6_K => &[208],
                GgmlType::Q2_K => &[80, 82],
                GgmlType::Q3_K => &[108],
                GgmlType::Q5_0 => &[0],
                GgmlType::Q5_1 => &[0, 2],
                _ => panic!("no generator for {ty}"),
            };
            for block in data.chunks_exact_mut(ty.block_bytes()) {
                for &o in scale_offsets {
                    let s = f16::from_f32(rng.random_range(0.001f32..0.02))
                        .to_bits()
                        .to_le_bytes();
                    block[o..o + 2].copy_from_slice(&s);
                }
            }
            Matrix::new(ty, rows, cols, data).unwrap()
        }
    }
}

/// Per-output scale for tolerances: sum |w| |x| over the dot product.
fn magnitudes(x: &[f32], w: &Matrix) -> Vec<f32> {
    let abs_w = Matrix::from_f32(
        w.rows(),
        w.cols(),
        &w.to_f32().iter().map(|v| v.abs()).collect::<Vec<_>>(),
    );
    let abs_x: Vec<f32> = x.iter().map(|v| v.abs()).collect();
    let mut out = vec![0f32; x.len() / w.cols() * w.rows()];
    matmul_reference(&abs_x, &abs_w, &mut out);
    out
}

fn run(x: &[f32], w: &Matrix, path: KernelPath) -> Vec<f32> {
    let mut out = vec![f32::NAN; x.len() / w.cols() * w.rows()];
    matmul_with_path(x, w, &mut out, path).unwrap();
    out
}

fn paths() -> Vec<KernelPath> {
    let mut paths = vec![KernelPath::Scalar];
    for p in [KernelPath::Avx2, KernelPath::Vnni] {
        if p.is_available() {
            paths.push(p);
        } else {
            eprintln!("NOTICE: this CPU cannot run {p:?}; that path is not tested");
        }
    }
    paths
}

/// Checks every path against the reference and the paths against each other, for the matrix as
/// built and as `into_fast` repacks it.
fn check(ty: GgmlType, rows: usize, cols: usize, num_tokens: usize, seed: u64) {
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    let w = random_matrix(&mut rng, ty, rows, cols);
    let x = random_f32(&mut rng, num_tokens * cols);
    check_matrix(&w, &x);
    check_matrix(&w.into_fast(), &x);
}

fn check_matrix(w: &Matrix, x: &[f32]) {
    let (ty, rows, cols) = (w.ty(), w.rows(), w.cols());
    let num_tokens = x.len() / cols;
    let mut reference = vec![0f32; num_tokens * rows];
    matmul_reference(x, w, &mut reference);
    let mags = magnitudes(x, w);
    // Float weights see no activation quantization; quantized ones see 8-bit activations.
    let (tol_ref, tol_paths) = match ty {
        GgmlType::F32 | GgmlType::F16 => (1e-5, 1e-5),
        _ => (1e-2, 1e-5),
    };
    let outs: Vec<_> = paths().into_iter().map(|p| (p, run(x, w, p))).collect();
    for (path, out) in &outs {
        let (mut err2, mut ref2) = (0f64, 0f64);
        for i in 0..out.len() {
            let e = (out[i] - reference[i]).abs();
            assert!(
                e <= tol_ref * mags[i] + 1e-6,
                "{ty} {path:?} {rows}x{cols} t={num_tokens} [{i}]: {} vs {}",
                out[i],
                reference[i]
            );
            err2 += (e as f64).powi(2);
            ref2 += (reference[i] as f64).powi(2);
        }
        let rel = (err2 / ref2.max(1e-30)).sqrt();
        assert!(
            rel < 0.01,
            "{ty} {path:?}: relative error {rel} vs reference"
        );
    }
    let a = &outs[0].1;
    for (path, b) in &outs[1..] {
        for i in 0..a.len() {
            assert!(
                (a[i] - b[i]).abs() <= tol_paths * mags[i] + 1e-6,
                "{ty} scalar vs {path:?} [{i}]: {} vs {}",
                a[i],
                b[i]
            );
        }
    }
}

const FAST: [GgmlType; 7] = [
    GgmlType::Q4_0,
    GgmlType::Q4_1,
    GgmlType::Q8_0,
    GgmlType::Q4_K,
    GgmlType::Q6_K,
    GgmlType::F32,
    GgmlType::F16,
];

#[test]
fn quant_matmul_fast_types_match_reference_and_each_other() {
    for (k, ty) in FAST.into_iter().enumerate() {
        let cols = if ty.block_len() == 256 { 512 } else { 160 };
        for (j, num_tokens) in [1, 2, 3, 4, 5, 8, 11].into_iter().enumerate() {
            check(ty, 37, cols, num_tokens, (k * 100 + j) as u64);
        }
    }
}

#[test]
fn quant_matmul_float_tails_and_odd_columns() {
    for cols in [1, 7, 8, 15, 16, 23, 40] {
        check(GgmlType::F32, 5, cols, 3, cols as u64);
        check(GgmlType::F16, 5, cols, 5, cols as u64 + 50);
    }
}

#[test]
fn quant_matmul_parallel_split_matches_serial_results() {
    let pool = rayon::ThreadPoolBuilder::new()
        .num_threads(3)
        .build()
        .unwrap();
    for ty in FAST {
        let cols = if ty.block_len() == 256 { 256 } else { 576 };
        let mut rng = ChaCha8Rng::seed_from_u64(11);
        let w = random_matrix(&mut rng, ty, 301, cols).into_fast();
        let x = random_f32(&mut rng, 6 * cols);
        let path = KernelPath::best();
        // Enough work to split into parallel chunks; each row's result must not depend on the split.
        let parallel = pool.install(|| run(&x, &w, path));
        let serial_pool = rayon::ThreadPoolBuilder::new()
            .num_threads(1)
            .build()
            .unwrap();
        let serial = serial_pool.install(|| run(&x, &w, path));
        assert_eq!(parallel, serial, "{ty}");
        let mut fast = vec![0f32; parallel.len()];
        matmul(&x, &w, &mut fast);
        assert_eq!(fast, parallel, "{ty}: matmul() uses the best path");
        check(ty, 301, cols, 6, 99);
    }
}

#[test]
fn quant_matmul_token_tiles_give_each_token_the_single_token_result() {
    // 11 tokens: a full 8-token tile plus a 3-token remainder (4 + 4 + 3 where tiles are 4 wide);
    // 37 rows: two whole 16-row groups and a padded one.
    const TOKENS: usize = 11;
    const ROWS: usize = 37;
    for ty in FAST {
        let cols = if ty.block_len() == 256 { 256 } else { 288 };
        let mut rng = ChaCha8Rng::seed_from_u64(5);
        let raw = random_matrix(&mut rng, ty, ROWS, cols);
        let x = random_f32(&mut rng, TOKENS * cols);
        for w in [raw.clone(), raw.into_fast()] {
            for path in paths() {
                let batched = run(&x, &w, path);
                for t in 0..TOKENS {
                    let single = run(&x[t * cols..(t + 1) * cols], &w, path);
                    assert_eq!(
                        &batched[t * ROWS..(t + 1) * ROWS],
                        &single[..],
                        "{ty} {path:?} packed={} token {t}",
                        w.is_packed()
                    );
                }
                // A token's result must not depend on where its tile starts either.
                let tail = run(&x[3 * cols..], &w, path);
                assert_eq!(&batched[3 * ROWS..], &tail[..], "{ty} {path:?} shifted");
            }
        }
    }
}

/// The packed kernels' builds (AVX-512 VNNI and AVX2) do the same float operations per lane, so
/// where both run they must agree bit for bit, not just within tolerance.
#[test]
fn quant_matmul_packed_builds_agree_bit_for_bit() {
    if !KernelPath::Vnni.is_available() {
        eprintln!("NOTICE: no AVX-512 VNNI; the packed builds are not compared");
        return;
    }
    for ty in [GgmlType::Q4_0, GgmlType::Q4_1] {
        let mut rng = ChaCha8Rng::seed_from_u64(17);
        let w = random_matrix(&mut rng, ty, 40, 320).into_fast();
        assert!(w.is_packed(), "{ty}");
        for num_tokens in [1, 5, 8, 13] {
            let x = random_f32(&mut rng, num_tokens * 320);
            let vnni = run(&x, &w, KernelPath::Vnni);
            let avx2 = run(&x, &w, KernelPath::Avx2);
            assert_eq!(vnni, avx2, "{ty} t={num_tokens}");
        }
    }
}

#[test]
fn quant_matmul_slow_types_are_dequantized_then_multiplied() {
    for (k, ty) in [
        GgmlType::Q5_0,
        GgmlType::Q5_1,
        GgmlType::Q2_K,
        GgmlType::Q3_K,
        GgmlType::Q5_K,
    ]
    .into_iter()
    .enumerate()
    {
        let mut rng = ChaCha8Rng::seed_from_u64(k as u64);
        let w = random_matrix(&mut rng, ty, 6, 256);
        let x = random_f32(&mut rng, 2 * 256);
        let (mut got, mut want) = (vec![0f32; 12], vec![0f32; 12]);
        matmul(&x, &w, &mut got);
        matmul_reference(&x, &w, &mut want);
        let mags = magnitudes(&x, &w);
        for i in 0..12 {
            assert!(
                (got[i] - want[i]).abs() <= 1e-5 * mags[i] + 1e-6,
                "{ty} [{i}]"
            );
        }
    }
}

#[test]
fn quant_matmul_packing_keeps_the_ggml_bytes_and_rows() {
    for ty in [GgmlType::Q4_0, GgmlType::Q4_1, GgmlType::Q8_0] {
        let mut rng = ChaCha8Rng::seed_from_u64(21);
        let parts = [
            random_matrix(&mut rng, ty, 13, 96),
            random_matrix(&mut rng, ty, 6, 96),
        ];
        let raw = Matrix::concat_rows(&parts).unwrap();
        let fast = parts.map(|p| p.into_fast());
        let fused = Matrix::concat_rows(&fast).unwrap();
        assert_eq!(fused.is_packed(), fast[0].is_packed(), "{ty}");
        assert_eq!(
            fused.data(),
            raw.data(),
            "{ty}: data() restores ggml's bytes"
        );
        assert_eq!(fused.to_f32(), raw.to_f32(), "{ty}");
        let (mut a, mut b) = (vec![0f32; 96], vec![0f32; 96]);
        for row in [0, 7, 8, 12, 18] {
            raw.dequantize_row(row, &mut a);
            fused.dequantize_row(row, &mut b);
            assert_eq!(a, b, "{ty} row {row}");
        }
    }
}

#[test]
#[should_panic(expected = "out must hold")]
fn quant_matmul_panics_on_shape_mismatch() {
    let w = Matrix::from_f32(2, 4, &[0.0; 8]);
    let mut out = vec![0f32; 3];
    matmul(&[1.0; 8], &w, &mut out);
}
