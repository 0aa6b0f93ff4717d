//! Rotary position embeddings with a precomputed frequency table.

use rayon::prelude::*;

use super::PARALLEL_MIN_ELEMS;

/// Which dimensions of a head form a rotated pair.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RopeStyle {
    /// Pairs `(2i, 2i+1)`: llama.cpp's "normal" mode, used for GGUF `llama` tensors (the
    /// converter permutes q/k weights into this order).
    Interleaved,
    /// Pairs `(i, i + d/2)`: Hugging Face `rotate_half` / llama.cpp NEOX mode.
    Neox,
}

/// Precomputed rotary table for one head size (rotation covers the whole head).
#[derive(Clone, Debug)]
pub struct Rope {
    style: RopeStyle,
    head_dim: usize,
    inv_freq: Vec<f32>,
}

impl Rope {
    /// `inv_freq[i] = 1 / (theta^(2i/head_dim) * freq_factors[i])`, factors defaulting to 1
    /// (Llama-3 scaling supplies them, see [`Rope::llama3_freq_factors`]).
    pub fn new(
        style: RopeStyle,
        head_dim: usize,
        theta: f32,
        freq_factors: Option<&[f32]>,
    ) -> Rope {
        assert!(
            head_dim > 0 && head_dim.is_multiple_of(2),
            "rope: head_dim {head_dim} must be positive and even"
        );
        let half = head_dim / 2;
        if let Some(f) = freq_factors {
            assert_eq!(
                f.len(),
                half,
                "rope: need head_dim/2 = {half} freq factors, got {}",
                f.len()
            );
        }
        let inv_freq = (0..half)
            .map(|i| {
                let factor = freq_factors.map_or(1.0, |f| f[i] as f64);
                let base = (theta as f64).powf(2.0 * i as f64 / head_dim as f64);
                (1.0 / (base * factor)) as f32
            })
            .collect();
        Rope {
            style,
            head_dim,
            inv_freq,
        }
    }

    /// Llama-3 rope scaling (`rope_type: "llama3"`) as transformers computes it, returned as
    /// per-pair frequency divisors (`inv_freq_scaled = inv_freq / factor_i`), the same form
    /// GGUF stores in `rope_freqs.weight`. High frequencies are kept, low frequencies divided
    /// by `factor`, and the band between is interpolated smoothly.
    pub fn llama3_freq_factors(
        head_dim: usize,
        theta: f32,
        factor: f32,
        low_freq_factor: f32,
        high_freq_factor: f32,
        original_max_position: usize,
    ) -> Vec<f32> {
        assert!(head_dim.is_multiple_of(2), "rope: head_dim must be even");
        let (factor, low, high) = (
            factor as f64,
            low_freq_factor as f64,
            high_freq_factor as f64,
        );
        let orig = original_max_position as f64;
        let low_freq_wavelen = orig / low;
        let high_freq_wavelen = orig / high;
        (0..head_dim / 2)
            .map(|i| {
                let inv_freq = 1.0 / (theta as f64).powf(2.0 * i as f64 / head_dim as f64);
                let wavelen = 2.0 * std::f64::consts::PI / inv_freq;
                let divisor = if wavelen < high_freq_wavelen {
                    1.0
                } else if wavelen > low_freq_wavelen {
                    factor
                } else {
                    let smooth = (orig / wavelen - low) / (high - low);
                    1.0 / ((1.0 - smooth) / factor + smooth)
                };
                divisor as f32
            })
            .collect()
    }

    /// Rotates `x` (`[num_tokens, num_heads * head_dim]`) in place, token `t` at `positions[t]`.
    /// Angles are `positions[t] as f32 * inv_freq[i]` in f32, matching llama.cpp/transformers.
    pub fn apply(&self, x: &mut [f32], num_heads: usize, positions: &[u32]) {
        let row = num_heads * self.head_dim;
        assert_eq!(
            x.len(),
            positions.len() * row,
            "rope: x must be [num_tokens, num_heads * head_dim] with one position per token"
        );
        if row == 0 {
            return;
        }
        let f = |(xr, &pos): (&mut [f32], &u32)| self.rotate_row(xr, pos);
        if x.len() >= PARALLEL_MIN_ELEMS {
            x.par_chunks_exact_mut(row).zip(positions).for_each(f);
        } else {
            x.chunks_exact_mut(row).zip(positions).for_each(f);
        }
    }

    /// Rotates all heads of one token.
    fn rotate_row(&self, xr: &mut [f32], pos: u32) {
        let half = self.head_dim / 2;
        let p = pos as f32;
        // Up to 256 pairs on the stack (head_dim 512); larger heads fall back to the heap.
        let mut stack = [(0.0f32, 0.0f32); 256];
        let mut heap = Vec::new();
        let cs: &mut [(f32, f32)] = if half <= stack.len() {
            &mut stack[..half]
        } else {
            heap.resize(half, (0.0, 0.0));
            &mut heap
        };
        for (c, &f) in cs.iter_mut().zip(&self.inv_freq) {
            let angle = p * f;
            *c = (angle.cos(), angle.sin());
        }
        for head in xr.chunks_exact_mut(self.head_dim) {
            match self.style {
                RopeStyle::Interleaved => {
                    for (pair, &(cos, sin)) in head.chunks_exact_mut(2).zip(cs.iter()) {
                        let (x0, x1) = (pair[0], pair[1]);
                        pair[0] = x0 * cos - x1 * sin;
                        pair[1] = x0 * sin + x1 * cos;
                    }
                }
                RopeStyle::Neox => {
                    let (lo, hi) = head.split_at_mut(half);
                    for ((a, b), &(cos, sin)) in lo.iter_mut().zip(hi.iter_mut()).zip(cs.iter()) {
                        let (x0, x1) = (*a, *b);
                        *a = x0 * cos - x1 * sin;
                        *b = x0 * sin + x1 * cos;
                    }
                }
            }
        }
    }
}

// ---- accessors for the GPU kernels (gpu::rope_cache uploads the same table) ----
impl Rope {
    /// The per-pair inverse frequencies (`head_dim / 2`, scaling applied): the device kernel
    /// takes this exact table so its angles equal the CPU's.
    pub fn inv_freq(&self) -> &[f32] {
        &self.inv_freq
    }

    /// Which dimensions form a rotated pair.
    pub fn style(&self) -> RopeStyle {
        self.style
    }

    pub fn head_dim(&self) -> usize {
        self.head_dim
    }
}
