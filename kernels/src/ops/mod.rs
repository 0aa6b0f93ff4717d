//! Elementwise and per-row ops of a transformer layer: RMSNorm, rotary embeddings, SwiGLU.
//!
//! All work on row-major f32 buffers; large inputs are split over the rayon pool by rows.

mod activation;
mod norm;
mod rope;

pub use activation::{add_inplace, silu_mul, silu_mul_fused};
pub use norm::{rms_norm, rms_norm_inplace};
pub use rope::{Rope, RopeStyle};

/// Elements below which an op stays on the calling thread (splitting costs more than it saves).
const PARALLEL_MIN_ELEMS: usize = 1 << 16;
