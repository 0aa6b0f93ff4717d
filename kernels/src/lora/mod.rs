//! Per-token LoRA deltas for a batch that mixes adapters (issue 5): `y_t += scale_a · (x_t A_aᵀ) B_aᵀ`
//! where `a` is token t's adapter slot, or nothing for base-model tokens.
//!
//! Adapters live in a fixed number of [`LoraSlots`] per projection (vLLM's `max_loras`), so a batch
//! names an adapter by slot index and the kernels read stacked buffers. The batch is described as
//! [`Segment`]s: runs of consecutive tokens on one slot. A one-token segment (a decode step) goes
//! down the BGMV path (one matrix-vector product per token); a longer one (a prefill chunk, or
//! decode tokens of requests sharing an adapter) goes down the SGMV path, tiles of tokens against
//! each weight row so A and B are read once per tile instead of once per token.
//!
//! Batch independence: every output value is produced by one fixed sequence of float operations
//! (see `scalar`), whichever path, tile or thread computes it, so a token's delta is bit-identical
//! alone, in a BGMV batch or inside an SGMV segment of any length. The scalar fallback performs the
//! same fused multiply-adds in the same order as the AVX2 kernels, so they agree bit for bit too.
//! [`Q8`] stores keep both properties: their activations are quantized per token and their sums
//! are integers (exact in any order), see `q8`.
//!
//! Choosing a weight kind ([`LoraSlots`]`<W>`): decode with many distinct adapters streams every
//! adapter's A and B once per token, so its time follows the bytes (measured by
//! `benches/benches/lora.rs`). `f32` is the exact computation (use it where results are compared
//! with PEFT); `f16`/`bf16` halve the bytes and compute exactly on the rounded weights; [`Q8`]
//! quarters them with 8-bit activations (about 1% RMS error on the delta) and is the fastest on
//! CPUs with AVX-512 VNNI (elsewhere it runs portable code, slower than the float kinds' AVX2).
//!
//! The runtime calls [`add_lora_fused`] once per input: q, k and v into the fused QKV output, gate
//! and up into the fused gate/up output, and o and down each as a one-part call. That is one
//! parallel dispatch per input, each token's input quantized once.

mod apply;
#[cfg(target_arch = "x86_64")]
mod avx2;
#[cfg(target_arch = "x86_64")]
mod avx512;
mod q8;
mod scalar;
mod slots;
mod weight;

pub use apply::{
    add_lora, add_lora_fused, add_lora_fused_with, add_lora_with, lora_expand, lora_shrink,
    FusedPart,
};
/// The half-precision storage types, re-exported so callers need not depend on `half`.
pub use half::{bf16, f16};
pub use slots::{LoraShape, LoraSlots, PeftSlot};
pub use weight::{LoraWeight, WeightKind, Q8};

/// Largest adapter rank a slot store accepts (PEFT adapters in practice use 8 to 128).
pub const MAX_LORA_RANK: usize = 512;

/// Consecutive tokens `start..start + len` of the flattened batch that use adapter `slot` (`None`:
/// base model only). Segments must be sorted by `start` and must not overlap; tokens that no
/// segment covers get no delta.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Segment {
    pub start: usize,
    pub len: usize,
    pub slot: Option<u32>,
}

/// Groups a per-token slot list into segments: consecutive tokens on the same slot form one, so
/// requests that share an adapter and sit next to each other in the batch share its weight reads.
pub fn segments_from_token_slots(token_slots: &[Option<u32>]) -> Vec<Segment> {
    let mut segments: Vec<Segment> = Vec::new();
    for (t, &slot) in token_slots.iter().enumerate() {
        match segments.last_mut() {
            Some(last) if last.slot == slot => last.len += 1,
            _ => segments.push(Segment {
                start: t,
                len: 1,
                slot,
            }),
        }
    }
    segments
}

/// The LoRA scale PEFT applies: `alpha / rank`, or `alpha / sqrt(rank)` with rsLoRA.
pub fn lora_scale(alpha: f32, rank: usize, use_rslora: bool) -> f32 {
    let r = rank.max(1) as f32;
    if use_rslora {
        alpha / r.sqrt()
    } else {
        alpha / r
    }
}

/// How a segment is computed. All three give the same bits; they differ only in speed.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum LoraStrategy {
    /// BGMV for one-token segments, SGMV for longer ones.
    Auto,
    /// Every token on its own (matrix-vector products).
    Bgmv,
    /// Every segment as a small matrix product over tiles of tokens.
    Sgmv,
}

/// Instruction set the kernels use.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum LoraKernel {
    /// Portable code (the same fused multiply-adds, one lane at a time).
    Scalar,
    /// AVX2 + FMA + F16C (x86-64 only). [`Q8`] stores run the portable code under it.
    Avx2,
    /// AVX-512 F/BW + VNNI on top of AVX2 (x86-64 only): `vpdpbusd` for [`Q8`] stores; float
    /// stores run the AVX2 kernels under it.
    Avx512,
}

impl LoraKernel {
    /// Whether this CPU can run the kernel.
    pub fn is_available(self) -> bool {
        match self {
            LoraKernel::Scalar => true,
            #[cfg(target_arch = "x86_64")]
            LoraKernel::Avx2 => avx2::available(),
            #[cfg(target_arch = "x86_64")]
            LoraKernel::Avx512 => avx2::available() && avx512::available(),
            #[cfg(not(target_arch = "x86_64"))]
            LoraKernel::Avx2 | LoraKernel::Avx512 => false,
        }
    }

    /// The fastest kernel this CPU supports.
    pub fn best() -> LoraKernel {
        if LoraKernel::Avx512.is_available() {
            LoraKernel::Avx512
        } else if LoraKernel::Avx2.is_available() {
            LoraKernel::Avx2
        } else {
            LoraKernel::Scalar
        }
    }
}

/// Where the deltas go: token t's `out_dim` outputs are `data[t * stride + offset..][..out_dim]`.
/// A stride wider than `out_dim` lets one projection's adapter add into its columns of a fused
/// output (q, k and v of a fused QKV product, gate and up of a fused gate/up).
#[derive(Debug)]
pub struct OutputRows<'a> {
    pub data: &'a mut [f32],
    pub stride: usize,
    pub offset: usize,
}

impl<'a> OutputRows<'a> {
    /// Rows of exactly `out_dim` values, back to back.
    pub fn dense(data: &'a mut [f32], out_dim: usize) -> OutputRows<'a> {
        OutputRows {
            data,
            stride: out_dim,
            offset: 0,
        }
    }
}

/// Why a slot could not be loaded or a batch could not be applied. Nothing is written on error.
#[derive(Debug, thiserror::Error, PartialEq)]
pub enum LoraError {
    #[error("LoRA shape must have nonzero slots, in_dim and out_dim, and 1 <= max_rank <= {MAX_LORA_RANK}: {0:?}")]
    BadShape(LoraShape),
    #[error("slot {slot} out of range ({num_slots} slots)")]
    SlotOutOfRange { slot: usize, num_slots: usize },
    #[error("slot {slot} holds no adapter")]
    EmptySlot { slot: usize },
    #[error("rank {rank} not in 1..={max_rank}")]
    BadRank { rank: usize, max_rank: usize },
    #[error("{what} holds {actual} values, expected {expected}")]
    LengthMismatch {
        what: &'static str,
        expected: usize,
        actual: usize,
    },
    #[error("segment {index} ({start}..{end}) is out of order, overlaps the previous one or passes the batch's {num_tokens} tokens")]
    BadSegment {
        index: usize,
        start: usize,
        end: usize,
        num_tokens: usize,
    },
    #[error(
        "output rows (stride {stride}, offset {offset}) cannot hold {out_dim} values per token"
    )]
    BadOutputRows {
        stride: usize,
        offset: usize,
        out_dim: usize,
    },
    #[error("the {0:?} kernel is not available on this CPU")]
    KernelUnavailable(LoraKernel),
}
