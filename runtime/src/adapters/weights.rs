//! An adapter's weights in memory, as the loader produces them and the slots consume them: owned
//! f32 ([`AdapterWeights`]) or still in the weights file's bytes ([`AdapterTensors`]).

use std::path::{Path, PathBuf};

use caduceus_kernels::quant::Floats;

/// The seven projections a Llama-family LoRA adapter may target, by PEFT module name.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Projection {
    Q,
    K,
    V,
    O,
    Gate,
    Up,
    Down,
}

impl Projection {
    /// All seven, in index order.
    pub const ALL: [Projection; 7] = [
        Projection::Q,
        Projection::K,
        Projection::V,
        Projection::O,
        Projection::Gate,
        Projection::Up,
        Projection::Down,
    ];

    /// The PEFT / Hugging Face module name (`q_proj`, ..., `down_proj`).
    pub fn module_name(self) -> &'static str {
        match self {
            Projection::Q => "q_proj",
            Projection::K => "k_proj",
            Projection::V => "v_proj",
            Projection::O => "o_proj",
            Projection::Gate => "gate_proj",
            Projection::Up => "up_proj",
            Projection::Down => "down_proj",
        }
    }

    /// Parses a PEFT module name.
    pub fn from_module_name(name: &str) -> Option<Projection> {
        Projection::ALL
            .into_iter()
            .find(|p| p.module_name() == name)
    }

    /// Position in [`Projection::ALL`].
    pub fn index(self) -> usize {
        self as usize
    }
}

/// One projection's low-rank pair, f32, row-major, in the base model's own row order (for GGUF
/// llama/mistral bases the q/k rows of `b` are already permuted the way llama.cpp permuted the
/// base weights).
#[derive(Clone, Debug, PartialEq)]
pub struct LoraPair {
    /// PEFT `lora_A.weight`: `[rank, in_dim]`.
    pub a: Vec<f32>,
    /// PEFT `lora_B.weight`: `[out_dim, rank]`.
    pub b: Vec<f32>,
}

/// A validated adapter, ready to be copied into device slots.
#[derive(Clone, Debug)]
pub struct AdapterWeights {
    /// The LoRA rank `r` (every targeted projection has it).
    pub rank: usize,
    /// `lora_alpha / r`, or `lora_alpha / sqrt(r)` with rsLoRA.
    pub scale: f32,
    /// Per layer, per [`Projection::index`]: the pair, or `None` when not targeted.
    pub layers: Vec<[Option<LoraPair>; 7]>,
    /// Content hash of the adapter's files (config and weights): the adapter's generation.
    pub generation: u64,
    /// Where it was read from.
    pub source: PathBuf,
}

impl AdapterWeights {
    /// Its pairs as [`AdapterTensors`] (borrowed, nothing copied).
    pub fn tensors(&self) -> AdapterTensors<'_> {
        AdapterTensors {
            rank: self.rank,
            scale: self.scale,
            generation: self.generation,
            source: &self.source,
            layers: self
                .layers
                .iter()
                .map(|layer| {
                    layer.each_ref().map(|p| {
                        p.as_ref().map(|p| PairTensors {
                            a: Floats::F32(&p.a),
                            b: Values::Matrix(Floats::F32(&p.b)),
                        })
                    })
                })
                .collect(),
        }
    }

    /// Bytes of f32 weights held.
    pub fn nbytes(&self) -> usize {
        self.layers
            .iter()
            .flatten()
            .flatten()
            .map(|p| (p.a.len() + p.b.len()) * std::mem::size_of::<f32>())
            .sum()
    }

    /// Which projections are targeted (in any layer).
    pub fn targets(&self) -> Vec<Projection> {
        Projection::ALL
            .into_iter()
            .filter(|p| self.layers.iter().any(|l| l[p.index()].is_some()))
            .collect()
    }
}

/// A validated adapter whose values may still lie in its weights file's bytes (the loader
/// thread's buffer, borrowed: see [`super::peft::with_adapter`]): a slot form is built from it
/// without a widened f32 copy of the whole adapter first.
#[derive(Debug)]
pub struct AdapterTensors<'a> {
    /// As [`AdapterWeights::rank`].
    pub rank: usize,
    /// As [`AdapterWeights::scale`].
    pub scale: f32,
    /// As [`AdapterWeights::generation`].
    pub generation: u64,
    /// Where it was read from.
    pub source: &'a Path,
    /// Per layer, per [`Projection::index`]: the pair, or `None` when not targeted.
    pub layers: Vec<[Option<PairTensors<'a>>; 7]>,
}

impl AdapterTensors<'_> {
    /// The pairs as owned f32 [`AdapterWeights`] (what the CPU slots are loaded from).
    pub fn to_weights(&self) -> AdapterWeights {
        AdapterWeights {
            rank: self.rank,
            scale: self.scale,
            layers: self
                .layers
                .iter()
                .map(|layer| {
                    layer.each_ref().map(|p| {
                        p.as_ref().map(|p| LoraPair {
                            a: p.a.to_vec(),
                            b: p.b().to_vec(),
                        })
                    })
                })
                .collect(),
            generation: self.generation,
            source: self.source.to_path_buf(),
        }
    }
}

/// One projection's low-rank pair as [`LoraPair`] lays it out, its values where the loader
/// holds them.
#[derive(Debug)]
pub struct PairTensors<'a> {
    /// PEFT `lora_A.weight`: `[rank, in_dim]`.
    pub a: Floats<'a>,
    /// PEFT `lora_B.weight`: `[out_dim, rank]`, in the base's row order.
    b: Values<'a>,
}

impl<'a> PairTensors<'a> {
    /// A pair whose values both lie where the matrices point.
    pub fn new(a: Floats<'a>, b: Floats<'a>) -> Self {
        PairTensors {
            a,
            b: Values::Matrix(b),
        }
    }

    /// A pair whose B was converted (its rows permuted for a GGUF base).
    pub fn with_owned_b(a: Floats<'a>, b: Vec<f32>) -> Self {
        PairTensors {
            a,
            b: Values::Owned(b),
        }
    }

    /// PEFT `lora_B.weight`: `[out_dim, rank]`, in the base's row order.
    pub fn b(&self) -> Floats<'_> {
        match &self.b {
            Values::Matrix(m) => *m,
            Values::Owned(v) => Floats::F32(v),
        }
    }
}

/// A matrix's values: borrowed, or converted and owned.
#[derive(Debug)]
enum Values<'a> {
    Matrix(Floats<'a>),
    Owned(Vec<f32>),
}
