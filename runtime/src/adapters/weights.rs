//! An adapter's weights in memory, as the loader produces them and the device slots consume them.

use std::path::PathBuf;

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
