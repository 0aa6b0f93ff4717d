//! Logit penalties for repeated tokens: the definitions live in
//! `caduceus_kernels::sampling::penalties`, shared with the GPU sampling kernel.

pub use caduceus_kernels::sampling::penalties::{
    apply_frequency_presence_penalties, apply_penalties, apply_repetition_penalty, penalty_entries,
    Penalties, PenaltyEntry,
};
