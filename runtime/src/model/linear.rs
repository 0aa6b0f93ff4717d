//! A linear projection whose weight may be several matrices fused row-wise (q/k/v, gate/up), so one
//! matmul call (one pass over the activations, one parallel dispatch) computes them all.

use caduceus_kernels::quant::{matmul, Matrix};

use super::error::ModelError;

/// `y = x W^T` for `W = [W_0; W_1; ...]` stacked row-wise.
pub struct Linear {
    /// One matrix when all parts share a storage type (the usual case); otherwise one per part.
    parts: Vec<Matrix>,
    out_features: usize,
}

impl Linear {
    /// A projection with one weight matrix.
    pub fn single(w: Matrix) -> Self {
        let out_features = w.rows();
        Self {
            parts: vec![w],
            out_features,
        }
    }

    /// Fuses matrices that share `cols` into one projection; types that differ stay separate.
    pub fn fused(parts: Vec<Matrix>) -> Result<Self, ModelError> {
        let out_features = parts.iter().map(Matrix::rows).sum();
        let same_type = parts.windows(2).all(|w| w[0].ty() == w[1].ty());
        let parts = if same_type && parts.len() > 1 {
            vec![Matrix::concat_rows(&parts)?]
        } else {
            parts
        };
        Ok(Self {
            parts,
            out_features,
        })
    }

    /// Output width (sum of the parts' rows).
    pub fn out_features(&self) -> usize {
        self.out_features
    }

    /// Bytes held by the weights.
    pub fn nbytes(&self) -> usize {
        self.parts.iter().map(Matrix::nbytes).sum()
    }

    /// `out[t, :] = x[t, :] W^T`; `x` is `[num_tokens, in]`, `out` is `[num_tokens, out_features]`.
    pub fn forward(&self, x: &[f32], out: &mut [f32]) {
        if let [w] = self.parts.as_slice() {
            matmul(x, w, out);
            return;
        }
        let num_tokens = out.len() / self.out_features;
        let mut offset = 0;
        for w in &self.parts {
            let mut part = vec![0f32; num_tokens * w.rows()];
            matmul(x, w, &mut part);
            for (t, row) in part.chunks_exact(w.rows()).enumerate() {
                let start = t * self.out_features + offset;
                out[start..start + w.rows()].copy_from_slice(row);
            }
            offset += w.rows();
        }
    }
}
