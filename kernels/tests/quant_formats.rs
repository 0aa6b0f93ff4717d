//! Block formats: geometry, dequantization and reference quantizers against gguf-py's numpy
//! implementation (fixtures written by scripts/gen-quant-fixtures.py), and `Matrix` invariants.

use caduceus_kernels::quant::activations::{
    quantize_q8, quantize_q8_k, quantize_q8_scalar, BlockQ8, BlockQ8K, Q8Acts,
};
use caduceus_kernels::quant::{GgmlType, Matrix, QuantError};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

fn fixture(name: &str) -> Vec<u8> {
    let path = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/fixtures/quant/").to_string() + name;
    std::fs::read(&path).unwrap_or_else(|e| {
        panic!("missing fixture {path} ({e}); run scripts/gen-quant-fixtures.py")
    })
}

fn u32_at(b: &[u8], at: usize) -> usize {
    u32::from_le_bytes(b[at..at + 4].try_into().unwrap()) as usize
}

fn f32s(b: &[u8]) -> Vec<f32> {
    b.chunks_exact(4)
        .map(|c| f32::from_le_bytes(c.try_into().unwrap()))
        .collect()
}

/// (type, n_elements, first payload, second payload) of a fixture file.
fn parse(name: &str) -> (GgmlType, usize, Vec<u8>, Vec<u8>) {
    let b = fixture(name);
    let ty = GgmlType::from_ggml_id(u32_at(&b, 0) as u32).unwrap();
    let (n, n_bytes) = (u32_at(&b, 4), u32_at(&b, 8));
    let body = &b[12..];
    let (first, second) = if name.ends_with(".dequant.bin") {
        body.split_at(n_bytes)
    } else {
        body.split_at(4 * n)
    };
    (ty, n, first.to_vec(), second.to_vec())
}

#[test]
fn quant_type_geometry_matches_ggml() {
    let expected = [
        (0, "F32", 1, 4),
        (1, "F16", 1, 2),
        (2, "Q4_0", 32, 18),
        (3, "Q4_1", 32, 20),
        (6, "Q5_0", 32, 22),
        (7, "Q5_1", 32, 24),
        (8, "Q8_0", 32, 34),
        (9, "Q8_1", 32, 36),
        (10, "Q2_K", 256, 84),
        (11, "Q3_K", 256, 110),
        (12, "Q4_K", 256, 144),
        (13, "Q5_K", 256, 176),
        (14, "Q6_K", 256, 210),
        (15, "Q8_K", 256, 292),
        (30, "BF16", 1, 2),
    ];
    for (id, name, len, bytes) in expected {
        let ty = GgmlType::from_ggml_id(id).unwrap();
        assert_eq!(
            (ty.name(), ty.block_len(), ty.block_bytes(), ty.ggml_id()),
            (name, len, bytes, id)
        );
    }
    for id in [4, 5, 16, 29, 31, 1000] {
        assert_eq!(GgmlType::from_ggml_id(id), None);
    }
    assert_eq!(GgmlType::Q4_1.row_bytes(576), Some(18 * 20));
    assert_eq!(GgmlType::Q4_1.row_bytes(100), None);
    assert_eq!(GgmlType::Q6_K.row_bytes(512), Some(420));
    assert_eq!(GgmlType::F32.row_bytes(7), Some(28));
    let fast: Vec<_> = [
        GgmlType::F32,
        GgmlType::Q5_0,
        GgmlType::Q4_1,
        GgmlType::BF16,
        GgmlType::Q6_K,
    ]
    .iter()
    .map(|t| t.has_fast_matmul())
    .collect();
    assert_eq!(fast, [true, false, true, false, true]);
}

#[test]
fn quant_dequantize_matches_gguf_py_exactly() {
    let names = [
        "Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q8_0", "Q2_K", "Q3_K", "Q4_K", "Q5_K", "Q6_K", "F16",
        "BF16",
    ];
    for name in names {
        let (ty, n, bytes, expected) = parse(&format!("{name}.dequant.bin"));
        let expected = f32s(&expected);
        assert_eq!(ty.name(), name);
        let cols = ty.block_len() * if ty.block_len() == 1 { 64 } else { 1 };
        let m = Matrix::new(ty, n / cols, cols, bytes).unwrap();
        let got = m.to_f32();
        for (i, (g, e)) in got.iter().zip(&expected).enumerate() {
            assert_eq!(
                g.to_bits(),
                e.to_bits(),
                "{name} element {i}: {g} vs gguf-py {e}"
            );
        }
        let mut row = vec![0f32; cols];
        m.dequantize_row(m.rows() - 1, &mut row);
        assert_eq!(row[..], expected[n - cols..]);
    }
}

#[test]
fn quant_reference_quantizers_match_gguf_py_bytes() {
    type Quantizer = fn(usize, usize, &[f32]) -> Matrix;
    let cases: [(&str, Quantizer); 3] = [
        ("Q8_0", Matrix::quantize_q8_0),
        ("Q4_0", Matrix::quantize_q4_0),
        ("Q4_1", Matrix::quantize_q4_1),
    ];
    for (name, quantize) in cases {
        let (ty, n, input, expected) = parse(&format!("{name}.quant.bin"));
        let m = quantize(n / 64, 64, &f32s(&input));
        assert_eq!(m.ty(), ty);
        assert_eq!(m.data(), &expected[..], "{name} bytes differ from gguf-py");
    }
}

#[test]
fn quant_round_trip_error_is_within_half_a_step() {
    let mut rng = ChaCha8Rng::seed_from_u64(7);
    let (rows, cols) = (8, 128);
    let x: Vec<f32> = (0..rows * cols)
        .map(|_| rng.random_range(-2.0f32..2.0))
        .collect();
    // Worst-case error as a fraction of the block's largest magnitude: half a step for Q8_0 and Q4_1;
    // a whole step for Q4_0, whose grid [-8d, 7d] clamps the side opposite the largest value.
    for (m, bound) in [
        (Matrix::quantize_q8_0(rows, cols, &x), 0.5 / 127.0),
        (Matrix::quantize_q4_0(rows, cols, &x), 1.0 / 8.0),
        (Matrix::quantize_q4_1(rows, cols, &x), 1.0 / 15.0),
    ] {
        let y = m.to_f32();
        for (blk_x, blk_y) in x.chunks(32).zip(y.chunks(32)) {
            let amax = blk_x.iter().fold(0f32, |a, v| a.max(v.abs()));
            for (a, b) in blk_x.iter().zip(blk_y) {
                // Plus the f16 rounding of the scale (relative 2^-11, times up to 16 steps).
                assert!(
                    (a - b).abs() <= bound * amax * 1.01 + amax * 1e-3,
                    "{}: {a} -> {b}",
                    m.ty()
                );
            }
        }
    }
}

#[test]
fn quant_activation_quantizers_round_trip() {
    let mut rng = ChaCha8Rng::seed_from_u64(3);
    let x: Vec<f32> = (0..512).map(|_| rng.random_range(-3.0f32..3.0)).collect();
    let mut q8 = vec![BlockQ8::default(); 16];
    quantize_q8(&x, &mut q8);
    for (blk, b) in x.chunks(32).zip(&q8) {
        let sum: i32 = b.qs.iter().map(|&q| q as i32).sum();
        assert!((b.s - b.d * sum as f32).abs() <= 2e-3 * (b.d * sum as f32).abs() + 1e-6);
        assert!(b.qs.iter().any(|&q| q.abs() == 127));
        for (v, &q) in blk.iter().zip(&b.qs) {
            // Half a step, plus |q| <= 127 times the f16 rounding of d.
            assert!((v - q as f32 * b.d).abs() <= 0.57 * b.d);
        }
    }
    let mut q8k = vec![BlockQ8K::default(); 2];
    quantize_q8_k(&x, &mut q8k);
    for (blk, b) in x.chunks(256).zip(&q8k) {
        for (g, &s) in b.qs.chunks(16).zip(&b.bsums) {
            assert_eq!(g.iter().map(|&q| q as i32).sum::<i32>(), s as i32);
        }
        for (v, &q) in blk.iter().zip(&b.qs) {
            assert!((v - q as f32 * b.d).abs() <= 0.5 * b.d.abs() * 1.001);
        }
    }
}

/// The SIMD activation quantizer (used where the CPU has it) must give the scalar one's blocks bit
/// for bit, including all-zero blocks, exact halves (ties round to even) and saturating maxima.
#[test]
fn quant_activation_quantizer_matches_scalar_bit_for_bit() {
    let mut rng = ChaCha8Rng::seed_from_u64(8);
    let mut x: Vec<f32> = (0..32 * 64)
        .map(|_| rng.random_range(-4.0f32..4.0))
        .collect();
    x[..32].fill(0.0);
    // amax 127: every value is an integer or a half, so ties are exercised.
    for (i, v) in x[32..64].iter_mut().enumerate() {
        *v = (i as f32 - 15.5) * 0.5;
    }
    x[63] = 127.0;
    x[64..96].fill(-1e-30);
    for (i, v) in x[96..128].iter_mut().enumerate() {
        *v *= 10f32.powi(i as i32 % 7 - 3);
    }
    let (mut fast, mut scalar) = (vec![BlockQ8::default(); 64], vec![BlockQ8::default(); 64]);
    quantize_q8(&x, &mut fast);
    quantize_q8_scalar(&x, &mut scalar);
    for (i, (a, b)) in fast.iter().zip(&scalar).enumerate() {
        assert_eq!(
            (a.qs, a.d.to_bits(), a.s.to_bits()),
            (b.qs, b.d.to_bits(), b.s.to_bits()),
            "block {i}"
        );
    }
    let acts = Q8Acts::quantize(&x, 256, false);
    for (i, b) in scalar.iter().enumerate() {
        assert_eq!(acts.isum[i], b.qs.iter().map(|&q| q as i32).sum::<i32>());
        assert_eq!(acts.blocks[i].qs, b.qs);
    }
}

#[test]
fn quant_matrix_validates_and_concatenates() {
    let err = Matrix::new(GgmlType::Q4_1, 2, 64, vec![0; 79]).unwrap_err();
    assert!(
        matches!(
            err,
            QuantError::SizeMismatch {
                expected: 80,
                actual: 79,
                ..
            }
        ),
        "{err}"
    );
    let err = Matrix::new(GgmlType::Q8_0, 1, 40, vec![0; 34]).unwrap_err();
    assert!(
        matches!(
            err,
            QuantError::ColsNotBlockMultiple {
                block_len: 32,
                cols: 40,
                ..
            }
        ),
        "{err}"
    );

    let a = Matrix::quantize_q4_1(2, 64, &(0..128).map(|i| i as f32).collect::<Vec<_>>());
    let b = Matrix::quantize_q4_1(3, 64, &(0..192).map(|i| -(i as f32)).collect::<Vec<_>>());
    let ab = Matrix::concat_rows(&[a.clone(), b.clone()]).unwrap();
    assert_eq!(
        (ab.rows(), ab.cols(), ab.nbytes()),
        (5, 64, a.nbytes() + b.nbytes())
    );
    assert_eq!(ab.to_f32(), [a.to_f32(), b.to_f32()].concat());
    let c = Matrix::quantize_q8_0(1, 64, &[1.0; 64]);
    assert!(matches!(
        Matrix::concat_rows(&[a.clone(), c]),
        Err(QuantError::ConcatMismatch(_))
    ));
    assert!(Matrix::concat_rows(&[]).is_err());

    // into_fast keeps fast types and dequantizes the rest to identical F32 values.
    assert_eq!(a.clone().into_fast().ty(), GgmlType::Q4_1);
    let (_, n, bytes, _) = parse("Q5_K.dequant.bin");
    let q5k = Matrix::new(GgmlType::Q5_K, n / 256, 256, bytes).unwrap();
    let fast = q5k.clone().into_fast();
    assert_eq!(
        (fast.ty(), fast.rows(), fast.cols()),
        (GgmlType::F32, q5k.rows(), 256)
    );
    assert_eq!(fast.to_f32(), q5k.to_f32());
    let f = Matrix::from_f32(2, 3, &[1.0, -2.0, 3.5, 0.0, 1e-3, 7.0]);
    assert_eq!(f.to_f32(), [1.0, -2.0, 3.5, 0.0, 1e-3, 7.0]);
}
