//! `out = x · Wᵀ` for quantized weights: activations are quantized once per call, rows are split into
//! chunks across the rayon pool, and each row is multiplied against tiles of tokens (packed
//! weights: see `matmul_packed`).

use super::activations::{quantize_q8_k, BlockQ8K, Q8Acts};
use super::dot_scalar as scalar;
use super::matrix::Matrix;
use super::types::{GgmlType, QuantError, QK, QK_K};
use rayon::prelude::*;

/// Which kernel family computes a product. Tests and benches compare them; [`matmul`] uses the best.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum KernelPath {
    /// Portable integer/float code (llama.cpp's generic order of operations).
    Scalar,
    /// AVX2 + FMA + F16C intrinsics (x86-64 only).
    Avx2,
    /// AVX2 plus AVX-512 (F/BW) VNNI byte dot products on 512-bit vectors for packed
    /// Q4_0/Q4_1/Q8_0 weights (x86-64 only).
    Vnni,
}

impl KernelPath {
    /// Whether this CPU can run the path.
    pub fn is_available(self) -> bool {
        match self {
            KernelPath::Scalar => true,
            #[cfg(target_arch = "x86_64")]
            KernelPath::Avx2 => super::dot_avx2::available(),
            #[cfg(target_arch = "x86_64")]
            KernelPath::Vnni => super::dot_packed::vnni_available(),
            #[cfg(not(target_arch = "x86_64"))]
            KernelPath::Avx2 | KernelPath::Vnni => false,
        }
    }

    /// The fastest path this CPU supports (detected once).
    pub fn best() -> KernelPath {
        if KernelPath::Vnni.is_available() {
            KernelPath::Vnni
        } else if KernelPath::Avx2.is_available() {
            KernelPath::Avx2
        } else {
            KernelPath::Scalar
        }
    }
}

/// Multiply-accumulates below which a call stays on the calling thread (rayon's hand-off costs more).
pub(super) const SERIAL_WORK: usize = 1 << 19;
/// Multiply-accumulates a parallel task should at least get.
pub(super) const MIN_TASK_WORK: usize = 1 << 17;

/// out[t * w.rows() + r] = sum_c x[t * w.cols() + c] * W[r, c] for t in 0..num_tokens (x is [num_tokens, cols]
/// f32 row-major). Uses all threads of the current rayon pool. Panics only on a shape mismatch.
pub fn matmul(x: &[f32], w: &Matrix, out: &mut [f32]) {
    run(x, w, out, KernelPath::best());
}

/// [`matmul`] on a chosen kernel path; errors if this CPU cannot run it.
pub fn matmul_with_path(
    x: &[f32],
    w: &Matrix,
    out: &mut [f32],
    path: KernelPath,
) -> Result<(), QuantError> {
    if !path.is_available() {
        return Err(QuantError::PathUnavailable(path));
    }
    run(x, w, out, path);
    Ok(())
}

/// The slow, obviously-correct reference: dequantize W to f32, f64 accumulation.
pub fn matmul_reference(x: &[f32], w: &Matrix, out: &mut [f32]) {
    let num_tokens = check_shapes(x, w, out);
    let (rows, cols) = (w.rows(), w.cols());
    let wf = w.to_f32();
    for t in 0..num_tokens {
        let xt = &x[t * cols..(t + 1) * cols];
        for r in 0..rows {
            let wr = &wf[r * cols..(r + 1) * cols];
            out[t * rows + r] = wr
                .iter()
                .zip(xt)
                .map(|(&a, &b)| a as f64 * b as f64)
                .sum::<f64>() as f32;
        }
    }
}

fn check_shapes(x: &[f32], w: &Matrix, out: &[f32]) -> usize {
    let cols = w.cols();
    assert!(
        cols > 0 && x.len().is_multiple_of(cols),
        "matmul: x has {} values, not a multiple of cols {cols}",
        x.len()
    );
    let num_tokens = x.len() / cols;
    assert_eq!(
        out.len(),
        num_tokens * w.rows(),
        "matmul: out must hold num_tokens * rows values"
    );
    num_tokens
}

/// Activations in the form the weight type's kernel consumes.
pub(super) enum Acts<'a> {
    F32(&'a [f32]),
    Q8(Q8Acts),
    Q8K(Vec<BlockQ8K>),
}

fn quantize_acts(ty: GgmlType, x: &[f32], cols: usize) -> Acts<'_> {
    let parallel = x.len() >= 1 << 16;
    match ty {
        GgmlType::Q4_0 | GgmlType::Q4_1 | GgmlType::Q8_0 => {
            Acts::Q8(Q8Acts::quantize(x, cols, parallel))
        }
        GgmlType::Q4_K | GgmlType::Q6_K => {
            let mut acts = vec![BlockQ8K::default(); x.len() / QK_K];
            if parallel {
                acts.par_chunks_mut(cols / QK_K)
                    .zip(x.par_chunks(cols))
                    .for_each(|(a, xt)| quantize_q8_k(xt, a));
            } else {
                quantize_q8_k(x, &mut acts);
            }
            Acts::Q8K(acts)
        }
        _ => Acts::F32(x),
    }
}

fn run(x: &[f32], w: &Matrix, out: &mut [f32], path: KernelPath) {
    let num_tokens = check_shapes(x, w, out);
    if !w.ty().has_fast_matmul() {
        let fast = w.clone().into_fast();
        return run(x, &fast, out, path);
    }
    let (rows, cols) = (w.rows(), w.cols());
    if rows == 0 || num_tokens == 0 {
        return;
    }
    let acts = quantize_acts(w.ty(), x, cols);
    let Some(data) = w.row_major() else {
        return super::matmul_packed::run_packed(w, &acts, num_tokens, out, path);
    };
    let row_bytes = w.row_bytes();
    let kernel = |w_rows: &[u8], o: &mut [f32]| {
        compute_rows(w.ty(), path, w_rows, row_bytes, &acts, cols, num_tokens, o)
    };

    let work = rows * cols * num_tokens;
    let threads = rayon::current_num_threads();
    let chunk_rows = if work <= SERIAL_WORK || threads == 1 {
        rows
    } else {
        // A few chunks per thread for balance, but never tasks too small to pay for themselves.
        let by_balance = rows.div_ceil(threads * 4);
        let by_work = MIN_TASK_WORK.div_ceil(cols * num_tokens);
        by_balance.max(by_work).clamp(1, rows)
    };
    // Results are produced [row][token]; with one token that is already the output layout.
    let mut transposed = Vec::new();
    let dst: &mut [f32] = if num_tokens == 1 {
        out
    } else {
        transposed.resize(rows * num_tokens, 0f32);
        &mut transposed
    };
    if chunk_rows >= rows {
        kernel(data, dst);
    } else {
        dst.par_chunks_mut(chunk_rows * num_tokens)
            .zip(data.par_chunks(chunk_rows * row_bytes))
            .for_each(|(o, w_rows)| kernel(w_rows, o));
    }
    if num_tokens > 1 {
        for (r, vals) in transposed.chunks_exact(num_tokens).enumerate() {
            for (t, &v) in vals.iter().enumerate() {
                out[t * rows + r] = v;
            }
        }
    }
}

pub(super) fn w_row_bytes(ty: GgmlType, cols: usize) -> usize {
    cols / ty.block_len() * ty.block_bytes()
}

/// All rows of `w_rows` against all tokens; `out` is [row][token].
#[allow(clippy::too_many_arguments)]
pub(super) fn compute_rows(
    ty: GgmlType,
    path: KernelPath,
    w_rows: &[u8],
    row_bytes: usize,
    acts: &Acts<'_>,
    cols: usize,
    num_tokens: usize,
    out: &mut [f32],
) {
    #[cfg(target_arch = "x86_64")]
    if path != KernelPath::Scalar {
        use super::dot_avx2 as v;
        let (n8, n8k) = (cols / QK, cols / QK_K);
        match (ty, acts) {
            (GgmlType::Q4_0, Acts::Q8(a)) => {
                v::rows_q4_0(w_rows, row_bytes, a, n8, num_tokens, out)
            }
            (GgmlType::Q4_1, Acts::Q8(a)) => {
                v::rows_q4_1(w_rows, row_bytes, a, n8, num_tokens, out)
            }
            (GgmlType::Q8_0, Acts::Q8(a)) => {
                v::rows_q8_0(w_rows, row_bytes, a, n8, num_tokens, out)
            }
            (GgmlType::Q4_K, Acts::Q8K(a)) => {
                v::rows_q4_k(w_rows, row_bytes, a, n8k, num_tokens, out)
            }
            (GgmlType::Q6_K, Acts::Q8K(a)) => {
                v::rows_q6_k(w_rows, row_bytes, a, n8k, num_tokens, out)
            }
            (GgmlType::F32, Acts::F32(a)) => {
                v::rows_f32(w_rows, row_bytes, a, cols, num_tokens, out)
            }
            (GgmlType::F16, Acts::F32(a)) => {
                v::rows_f16(w_rows, row_bytes, a, cols, num_tokens, out)
            }
            _ => unreachable!("no AVX2 kernel for {ty}"),
        }
        return;
    }
    let _ = path;
    for (row, o) in w_rows
        .chunks_exact(row_bytes)
        .zip(out.chunks_exact_mut(num_tokens))
    {
        for (t, o) in o.iter_mut().enumerate() {
            *o = match (ty, acts) {
                (GgmlType::Q4_0, Acts::Q8(a)) => {
                    scalar::dot_q4_0(row, &a.blocks[t * (cols / QK)..])
                }
                (GgmlType::Q4_1, Acts::Q8(a)) => {
                    scalar::dot_q4_1(row, &a.blocks[t * (cols / QK)..])
                }
                (GgmlType::Q8_0, Acts::Q8(a)) => {
                    scalar::dot_q8_0(row, &a.blocks[t * (cols / QK)..])
                }
                (GgmlType::Q4_K, Acts::Q8K(a)) => scalar::dot_q4_k(row, &a[t * (cols / QK_K)..]),
                (GgmlType::Q6_K, Acts::Q8K(a)) => scalar::dot_q6_k(row, &a[t * (cols / QK_K)..]),
                (GgmlType::F32, Acts::F32(a)) => scalar::dot_f32(row, &a[t * cols..]),
                (GgmlType::F16, Acts::F32(a)) => scalar::dot_f16(row, &a[t * cols..]),
                _ => unreachable!("no scalar kernel for {ty}"),
            };
        }
    }
}
