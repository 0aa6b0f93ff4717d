//! Why an adapter directory could not be read: every variant names the directory and, where it
//! applies, the file or tensor and what was expected, so an operator can fix the adapter without
//! reading code.

use std::fmt;
use std::path::PathBuf;

/// A PEFT adapter that cannot be served.
#[derive(Debug, thiserror::Error)]
pub enum AdapterError {
    /// `adapter_config.json` or `adapter_model.safetensors` does not exist.
    #[error("adapter {dir}: {file} is missing (a PEFT adapter directory holds adapter_config.json and adapter_model.safetensors)")]
    MissingFile { dir: PathBuf, file: &'static str },
    /// The file exists but could not be read.
    #[error("adapter {dir}: cannot read {file}: {source}")]
    Io {
        dir: PathBuf,
        file: &'static str,
        source: std::io::Error,
    },
    /// The file is larger than the configured limit (checked before reading it).
    #[error("adapter {dir}: {file} is {size} bytes, over the limit of {limit} bytes")]
    TooLarge {
        dir: PathBuf,
        file: &'static str,
        size: u64,
        limit: u64,
    },
    /// `adapter_config.json` is not valid JSON or has a field of the wrong type.
    #[error("adapter {dir}: adapter_config.json: {message}")]
    Config { dir: PathBuf, message: String },
    /// A PEFT feature Caduceus does not implement (DoRA, biases, per-module ranks, ...).
    #[error("adapter {dir}: {feature} is not supported")]
    Unsupported { dir: PathBuf, feature: String },
    /// `r` is above the `max_lora_rank` limit.
    #[error("adapter {dir}: rank r = {rank} exceeds the limit max_lora_rank = {max_rank}")]
    RankTooLarge {
        dir: PathBuf,
        rank: usize,
        max_rank: usize,
    },
    /// A `target_modules` entry that is not one of the seven decoder-layer projections.
    #[error("adapter {dir}: target module {module:?} is not supported: {reason}")]
    UnknownTarget {
        dir: PathBuf,
        module: String,
        reason: String,
    },
    /// A targeted projection with no tensors at all in the weights file.
    #[error("adapter {dir}: target module {module} has no lora_A/lora_B tensors in adapter_model.safetensors")]
    TargetWithoutTensors { dir: PathBuf, module: &'static str },
    /// The weights file is not a well-formed safetensors file (bad header, truncated data).
    #[error("adapter {dir}: adapter_model.safetensors is not a valid safetensors file: {message}")]
    Safetensors { dir: PathBuf, message: String },
    /// One tensor is wrong: unexpected, of the wrong type or shape, or missing.
    #[error("adapter {dir}: tensor {tensor}: {problem}")]
    Tensor {
        dir: PathBuf,
        tensor: String,
        problem: TensorProblem,
    },
}

/// What is wrong with one tensor of `adapter_model.safetensors`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum TensorProblem {
    /// Not a `lora_A`/`lora_B` weight of a decoder-layer projection (embeddings, `modules_to_save`,
    /// DoRA magnitudes, biases, ...).
    Unexpected(String),
    /// The layer index is past the base model's last layer.
    LayerOutOfRange { layer: usize, num_layers: usize },
    /// A projection the config does not target.
    NotTargeted,
    /// Only f32, f16 and bf16 are read.
    Dtype(String),
    /// The shape does not fit the base model and rank.
    Shape {
        expected: [usize; 2],
        got: Vec<usize>,
    },
    /// Required by the config (or by its other half) but absent.
    Missing,
    /// The same weight appears twice (with and without the `.weight` suffix).
    Duplicate,
}

impl fmt::Display for TensorProblem {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            TensorProblem::Unexpected(why) => write!(f, "unexpected tensor: {why}"),
            TensorProblem::LayerOutOfRange { layer, num_layers } => write!(
                f,
                "layer {layer} is out of range: the base model has {num_layers} layers"
            ),
            TensorProblem::NotTargeted => {
                write!(
                    f,
                    "its module is not in target_modules of adapter_config.json"
                )
            }
            TensorProblem::Dtype(dtype) => {
                write!(
                    f,
                    "dtype {dtype} is not supported (expected F32, F16 or BF16)"
                )
            }
            TensorProblem::Shape { expected, got } => write!(
                f,
                "shape {got:?} does not match the base model: expected {expected:?}"
            ),
            TensorProblem::Missing => write!(f, "missing from adapter_model.safetensors"),
            TensorProblem::Duplicate => write!(f, "appears twice"),
        }
    }
}
