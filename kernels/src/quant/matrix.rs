//! A weight matrix kept in its ggml storage type.

use super::blocks::{dequantize_row, quantize_row_q4_0, quantize_row_q4_1, quantize_row_q8_0};
use super::packed;
use super::types::{GgmlType, QuantError};
use std::borrow::Cow;

/// A weight matrix [rows = out_features, cols = in_features], row-major, kept in its storage type.
/// `data` holds ggml's raw block bytes (for F32 the little-endian f32 bytes), so GGUF tensors are
/// used without conversion and several matrices can be fused by concatenating rows.
/// [`Matrix::into_fast`] may instead hold them row-interleaved (see `packed`), which batched
/// products read much faster; [`Matrix::data`] still returns ggml's bytes.
#[derive(Clone, Debug)]
pub struct Matrix {
    ty: GgmlType,
    rows: usize,
    cols: usize,
    data: Vec<u8>,
    /// `data` is in the packed row-group layout rather than ggml's row-major one.
    packed: bool,
}

impl Matrix {
    /// Wraps raw ggml bytes, checking that they hold exactly `rows` whole rows of `cols` elements.
    pub fn new(
        ty: GgmlType,
        rows: usize,
        cols: usize,
        data: Vec<u8>,
    ) -> Result<Matrix, QuantError> {
        let row_bytes = ty.row_bytes(cols).ok_or(QuantError::ColsNotBlockMultiple {
            ty,
            cols,
            block_len: ty.block_len(),
        })?;
        let expected = row_bytes
            .checked_mul(rows)
            .ok_or(QuantError::SizeMismatch {
                ty,
                rows,
                cols,
                expected: usize::MAX,
                actual: data.len(),
            })?;
        if data.len() != expected {
            return Err(QuantError::SizeMismatch {
                ty,
                rows,
                cols,
                expected,
                actual: data.len(),
            });
        }
        Ok(Matrix {
            ty,
            rows,
            cols,
            data,
            packed: false,
        })
    }

    /// An F32 matrix from row-major values. Panics if `values.len() != rows * cols`.
    pub fn from_f32(rows: usize, cols: usize, values: &[f32]) -> Matrix {
        assert_eq!(
            values.len(),
            rows * cols,
            "from_f32: values do not match {rows}x{cols}"
        );
        let data = values.iter().flat_map(|v| v.to_le_bytes()).collect();
        Matrix {
            ty: GgmlType::F32,
            rows,
            cols,
            data,
            packed: false,
        }
    }

    fn quantize_with(
        ty: GgmlType,
        rows: usize,
        cols: usize,
        values: &[f32],
        f: fn(&[f32], &mut Vec<u8>),
    ) -> Matrix {
        assert_eq!(
            values.len(),
            rows * cols,
            "quantize: values do not match {rows}x{cols}"
        );
        assert_eq!(
            cols % ty.block_len(),
            0,
            "quantize: cols must be a multiple of {}",
            ty.block_len()
        );
        let mut data = Vec::with_capacity(rows * cols / ty.block_len() * ty.block_bytes());
        f(values, &mut data);
        Matrix {
            ty,
            rows,
            cols,
            data,
            packed: false,
        }
    }

    /// Quantizes row-major values to Q8_0 exactly as ggml's reference quantizer. Panics on a shape mismatch.
    pub fn quantize_q8_0(rows: usize, cols: usize, values: &[f32]) -> Matrix {
        Self::quantize_with(GgmlType::Q8_0, rows, cols, values, quantize_row_q8_0)
    }

    /// Quantizes row-major values to Q4_0 exactly as ggml's reference quantizer. Panics on a shape mismatch.
    pub fn quantize_q4_0(rows: usize, cols: usize, values: &[f32]) -> Matrix {
        Self::quantize_with(GgmlType::Q4_0, rows, cols, values, quantize_row_q4_0)
    }

    /// Quantizes row-major values to Q4_1 exactly as ggml's reference quantizer. Panics on a shape mismatch.
    pub fn quantize_q4_1(rows: usize, cols: usize, values: &[f32]) -> Matrix {
        Self::quantize_with(GgmlType::Q4_1, rows, cols, values, quantize_row_q4_1)
    }

    pub fn ty(&self) -> GgmlType {
        self.ty
    }

    pub fn rows(&self) -> usize {
        self.rows
    }

    pub fn cols(&self) -> usize {
        self.cols
    }

    /// Size of the stored bytes (what the matrix costs in memory).
    pub fn nbytes(&self) -> usize {
        self.data.len()
    }

    /// The raw ggml bytes (restored from the packed layout, so a copy, if the matrix is packed).
    pub fn data(&self) -> Cow<'_, [u8]> {
        if self.packed {
            Cow::Owned(packed::unpack(self.ty, self.rows, self.cols, &self.data))
        } else {
            Cow::Borrowed(&self.data)
        }
    }

    /// The stored bytes when they are ggml's row-major layout.
    pub(crate) fn row_major(&self) -> Option<&[u8]> {
        (!self.packed).then_some(&self.data[..])
    }

    /// The stored bytes when they are packed row groups.
    pub(crate) fn packed_groups(&self) -> Option<&[u8]> {
        self.packed.then_some(&self.data[..])
    }

    /// Whether the weights are held row-interleaved for the batched kernels.
    pub fn is_packed(&self) -> bool {
        self.packed
    }

    /// Bytes of one ggml row.
    pub fn row_bytes(&self) -> usize {
        self.ty.row_bytes(self.cols).unwrap_or(0)
    }

    /// Dequantizes row `row` into `out` (`out.len() == cols`); used for embedding lookups.
    pub fn dequantize_row(&self, row: usize, out: &mut [f32]) {
        assert!(
            row < self.rows,
            "row {row} out of range ({} rows)",
            self.rows
        );
        assert_eq!(
            out.len(),
            self.cols,
            "dequantize_row: out must hold cols values"
        );
        let rb = self.row_bytes();
        if self.packed {
            let gb = packed::group_bytes(self.ty, self.cols);
            let (g, r) = (row / packed::GROUP, row % packed::GROUP);
            let mut raw = vec![0u8; (r + 1) * rb];
            packed::unpack_group(
                self.ty,
                self.cols,
                &self.data[g * gb..(g + 1) * gb],
                r + 1,
                &mut raw,
            );
            dequantize_row(self.ty, &raw[r * rb..], out);
        } else {
            dequantize_row(self.ty, &self.data[row * rb..(row + 1) * rb], out);
        }
    }

    /// The whole matrix as row-major f32.
    pub fn to_f32(&self) -> Vec<f32> {
        let mut out = vec![0f32; self.rows * self.cols];
        if self.cols > 0 {
            dequantize_row(self.ty, &self.data(), &mut out);
        }
        out
    }

    /// Returns a matrix [`crate::quant::matmul`] has a fast kernel for: types without one are
    /// dequantized to F32 (bigger, but multiplied at full speed); Q4_0/Q4_1/Q8_0 are repacked
    /// row-interleaved where this CPU has kernels for that; others are returned as they are.
    pub fn into_fast(self) -> Matrix {
        if !self.ty.has_fast_matmul() {
            Matrix::from_f32(self.rows, self.cols, &self.to_f32())
        } else if !self.packed && self.rows > 0 && packed::worth_packing(self.ty) {
            Matrix {
                data: packed::pack(self.ty, self.rows, self.cols, &self.data),
                packed: true,
                ..self
            }
        } else {
            self
        }
    }

    /// Stacks matrices of the same type and column count vertically (fuses q/k/v or gate/up projections
    /// so one matmul call computes them all).
    pub fn concat_rows(parts: &[Matrix]) -> Result<Matrix, QuantError> {
        let first = parts
            .first()
            .ok_or_else(|| QuantError::ConcatMismatch("no parts".to_string()))?;
        if let Some(p) = parts
            .iter()
            .find(|p| p.ty != first.ty || p.cols != first.cols)
        {
            return Err(QuantError::ConcatMismatch(format!(
                "{} x{} cols does not match {} x{} cols",
                p.ty, p.cols, first.ty, first.cols
            )));
        }
        let rows = parts.iter().map(|p| p.rows).sum();
        let mut data = Vec::with_capacity(parts.iter().map(|p| p.data.len()).sum());
        for p in parts {
            data.extend_from_slice(&p.data());
        }
        let m = Matrix::new(first.ty, rows, first.cols, data)?;
        // Packed parts give a packed whole (groups may straddle the parts' boundaries).
        Ok(if parts.iter().any(|p| p.packed) {
            m.into_fast()
        } else {
            m
        })
    }
}
