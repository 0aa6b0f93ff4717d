//! The element types adapter weights can be stored in.
//!
//! Decode with many distinct adapters streams every adapter's A and B once per token, so it is
//! bound by their bytes: 16 rank-16 adapters on one SmolLM2-135M layer are 11 MB in f32, five
//! times the layer's Q4_1 base weights. Storing them as f16 or bf16 halves that; the kernels
//! widen to f32 (exactly) on load and compute in f32, so results are the f32 computation on the
//! rounded weights, and every path still produces the same bits.
//!
//! [`Q8`] halves the bytes again: int8 weights with one f32 scale per row of A and per column of
//! B (so the expand reads nothing per output but the weights), multiplied against activations
//! quantized to 8 bits per token (AVX-512 VNNI dot products). It is an approximation (about 1% of the delta's magnitude), not the f32 computation; see `q8`.

use half::{bf16, f16};

/// Which storage type a [`LoraWeight`] is (lets one kernel pick its load instruction at compile
/// time).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum WeightKind {
    F32,
    F16,
    Bf16,
    Q8,
}

mod sealed {
    pub trait Sealed {}
    impl Sealed for f32 {}
    impl Sealed for half::f16 {}
    impl Sealed for half::bf16 {}
    impl Sealed for super::Q8 {}
}

/// An int8 adapter weight. The value alone is not the weight: a [`super::LoraSlots`]`<Q8>` keeps a
/// scale per row of A and per column of B, quantizes symmetrically (`round(w * 127 / max|w|)`) in
/// `load_slot`, and its kernels multiply the integers against per-token 8-bit activations.
/// `from_f32`/`to_f32` convert the raw integer (rounding and saturating), without any scale.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
#[repr(transparent)]
pub struct Q8(pub i8);

/// An adapter weight storage type: `f32`, `half::f16`, `half::bf16` or [`Q8`].
pub trait LoraWeight: sealed::Sealed + Copy + Default + Send + Sync + 'static {
    const KIND: WeightKind;
    /// Rounds to nearest (how `load_slot` stores f32 weights).
    fn from_f32(v: f32) -> Self;
    /// Exact widening.
    fn to_f32(self) -> f32;
}

impl LoraWeight for f32 {
    const KIND: WeightKind = WeightKind::F32;
    fn from_f32(v: f32) -> f32 {
        v
    }
    fn to_f32(self) -> f32 {
        self
    }
}

impl LoraWeight for f16 {
    const KIND: WeightKind = WeightKind::F16;
    fn from_f32(v: f32) -> f16 {
        f16::from_f32(v)
    }
    fn to_f32(self) -> f32 {
        f16::to_f32(self)
    }
}

impl LoraWeight for bf16 {
    const KIND: WeightKind = WeightKind::Bf16;
    fn from_f32(v: f32) -> bf16 {
        bf16::from_f32(v)
    }
    fn to_f32(self) -> f32 {
        bf16::to_f32(self)
    }
}

impl LoraWeight for Q8 {
    const KIND: WeightKind = WeightKind::Q8;
    fn from_f32(v: f32) -> Q8 {
        Q8(super::q8::round_small(v.clamp(-127.0, 127.0)) as i8)
    }
    fn to_f32(self) -> f32 {
        self.0 as f32
    }
}
