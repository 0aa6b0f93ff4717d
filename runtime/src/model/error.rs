//! One error enum for everything that can go wrong while loading a model, so the CLI and the
//! server can report *which* file, tensor or key was wrong and what was expected.

use std::path::PathBuf;

use caduceus_kernels::quant::QuantError;

/// Errors from reading model files (GGUF or a Hugging Face directory) and building the config.
#[derive(Debug, thiserror::Error)]
pub enum ModelError {
    #[error("cannot read {}: {source}", path.display())]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{} not found: {hint}", path.display())]
    NotFound { path: PathBuf, hint: String },
    #[error("{} is corrupt or truncated: {what}", path.display())]
    Corrupt { path: PathBuf, what: String },
    #[error(
        "unsupported GGUF version {0} (supported: 2 and 3; a huge number suggests a big-endian file)"
    )]
    UnsupportedGgufVersion(u32),
    #[error("tensor {tensor}: unsupported data type {ty}")]
    UnsupportedType { tensor: String, ty: String },
    #[error("unsupported model architecture {0:?} (supported: llama, mistral, qwen2)")]
    UnsupportedArchitecture(String),
    #[error("missing tensor {0}")]
    MissingTensor(String),
    #[error("missing metadata key {0}")]
    MissingMetadata(String),
    #[error("tensor {tensor}: expected shape {expected:?}, found {actual:?}")]
    Shape {
        tensor: String,
        expected: Vec<usize>,
        actual: Vec<usize>,
    },
    #[error("invalid model config: {0}")]
    Config(String),
    #[error(transparent)]
    Quant(#[from] QuantError),
}
