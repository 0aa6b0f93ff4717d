//! Log-probabilities of the model's raw distribution: the definitions live in
//! `caduceus_kernels::sampling::logprobs`, shared with the GPU sampling kernel.

pub use caduceus_kernels::sampling::logprobs::{top_logprobs, LogSoftmax};
