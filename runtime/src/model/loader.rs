//! Loads a model from a GGUF file or a Hugging Face directory: config, weights, tokenizer and
//! chat template, with errors that name the file and the problem.

use std::path::{Path, PathBuf};
use std::time::Instant;

use super::config::LlamaConfig;
use super::error::ModelError;
use super::gguf::GgufFile;
use super::llama::{LlamaModel, WeightFormat};
use super::weights::TensorStore;
use crate::chat_template::{ChatTemplate, ChatTemplateError};
use crate::tokenizer::{GgufTokenizerSpec, Tokenizer, TokenizerError};

/// The model file the binary uses when none is given (fetched by `scripts/fetch-default-model`).
pub const DEFAULT_MODEL_PATH: &str = "models/SmolLM2-135M-Instruct.Q4_1.gguf";

/// Why a model could not be loaded.
#[derive(Debug, thiserror::Error)]
pub enum LoadError {
    /// The path does not exist.
    #[error("model not found at {path}{hint}")]
    NotFound { path: PathBuf, hint: String },
    /// Weights or config are unusable.
    #[error(transparent)]
    Model(#[from] ModelError),
    /// The tokenizer could not be built.
    #[error("tokenizer of {path}: {source}")]
    Tokenizer {
        path: PathBuf,
        source: TokenizerError,
    },
    /// The weights could not be placed on the device.
    #[error("putting the model on {device}: {message}")]
    Device { device: String, message: String },
    /// The chat template does not compile.
    #[error("chat template of {path}: {source}")]
    ChatTemplate {
        path: PathBuf,
        source: ChatTemplateError,
    },
}

/// A network built from a checkpoint's tensors: the CPU [`LlamaModel`], or the GPU model.
pub trait Network {
    fn config(&self) -> &LlamaConfig;
    /// Bytes of weights held (host or device).
    fn weight_bytes(&self) -> usize;
}

impl Network for LlamaModel {
    fn config(&self) -> &LlamaConfig {
        LlamaModel::config(self)
    }
    fn weight_bytes(&self) -> usize {
        LlamaModel::weight_bytes(self)
    }
}

/// Everything needed to turn text into tokens, run the model and turn tokens back into text.
pub struct LoadedModel<N = LlamaModel> {
    /// The network.
    pub model: N,
    /// The model's own tokenizer.
    pub tokenizer: Tokenizer,
    /// The model's own chat template (ChatML when the model ships none).
    pub chat_template: ChatTemplate,
    /// Name the model is served under: the file name without extension, or the directory name.
    pub name: String,
    /// Where it was loaded from.
    pub path: PathBuf,
}

impl LoadedModel {
    /// Loads a `.gguf` file or an HF model directory (config.json, *.safetensors, tokenizer.json).
    pub fn load(path: &Path) -> Result<Self, LoadError> {
        Self::load_with(path, WeightFormat::Native)
    }

    /// [`Self::load`] holding the weights in `weights` format.
    pub fn load_with(path: &Path, weights: WeightFormat) -> Result<Self, LoadError> {
        LoadedModel::load_into(path, |config, store| {
            Ok(LlamaModel::from_tensors_with(config, store, weights)?)
        })
    }
}

/// Builds a network from the checkpoint's config and tensors.
type Build<'a, N> = dyn FnOnce(LlamaConfig, &mut TensorStore) -> Result<N, LoadError> + 'a;

impl<N: Network> LoadedModel<N> {
    /// Loads a `.gguf` file or an HF model directory, the network made by `build` from its
    /// tensors (e.g. uploaded to a GPU).
    pub fn load_into(
        path: &Path,
        build: impl FnOnce(LlamaConfig, &mut TensorStore) -> Result<N, LoadError>,
    ) -> Result<Self, LoadError> {
        if !path.exists() {
            let hint =
                if path == Path::new(DEFAULT_MODEL_PATH) || path.ends_with(DEFAULT_MODEL_PATH) {
                    "; fetch the default model with `scripts/fetch-default-model`".to_string()
                } else {
                    "; pass a GGUF file or a Hugging Face model directory with --model".to_string()
                };
            return Err(LoadError::NotFound {
                path: path.to_path_buf(),
                hint,
            });
        }
        let started = Instant::now();
        let loaded = if path.is_dir() {
            Self::load_hf_dir(path, Box::new(build))?
        } else {
            Self::load_gguf(path, Box::new(build))?
        };
        let c = loaded.model.config();
        tracing::info!(
            model = %loaded.name,
            arch = %c.architecture,
            layers = c.num_layers,
            hidden = c.hidden_size,
            heads = c.num_heads,
            kv_heads = c.num_kv_heads,
            vocab = c.vocab_size,
            weight_mib = loaded.model.weight_bytes() / (1 << 20),
            load_ms = started.elapsed().as_millis() as u64,
            "model loaded"
        );
        Ok(loaded)
    }

    fn load_gguf(path: &Path, build: Box<Build<'_, N>>) -> Result<Self, LoadError> {
        let file = GgufFile::open(path)?;
        let config = LlamaConfig::from_gguf(&file)?;
        let mut store = TensorStore::from_gguf(&file)?;
        tracing::info!(tensor_types = ?store.type_summary(), "read GGUF tensors");
        let tok_err = |source| LoadError::Tokenizer {
            path: path.to_path_buf(),
            source,
        };
        let spec = GgufTokenizerSpec::from_gguf(&file).map_err(tok_err)?;
        let tokenizer = Tokenizer::from_gguf_spec(&spec).map_err(tok_err)?;
        let template = file.get_str("tokenizer.chat_template").map(str::to_owned);
        let model = build(config, &mut store)?;
        let name = path
            .file_stem()
            .map(|s| s.to_string_lossy().into_owned())
            .unwrap_or_default();
        Self::assemble(model, tokenizer, template.as_deref(), name, path)
    }

    fn load_hf_dir(dir: &Path, build: Box<Build<'_, N>>) -> Result<Self, LoadError> {
        let config_path = dir.join("config.json");
        let json = std::fs::read_to_string(&config_path).map_err(|source| ModelError::Io {
            path: config_path.clone(),
            source,
        })?;
        let config = LlamaConfig::from_hf_json(&json)?;
        let mut store = TensorStore::from_hf_dir(dir)?;
        let tokenizer = Tokenizer::from_hf_dir(dir).map_err(|source| LoadError::Tokenizer {
            path: dir.to_path_buf(),
            source,
        })?;
        let template = tokenizer.chat_template().map(str::to_owned);
        let model = build(config, &mut store)?;
        let name = dir
            .file_name()
            .map(|s| s.to_string_lossy().into_owned())
            .unwrap_or_default();
        Self::assemble(model, tokenizer, template.as_deref(), name, dir)
    }

    fn assemble(
        model: N,
        tokenizer: Tokenizer,
        template: Option<&str>,
        name: String,
        path: &Path,
    ) -> Result<Self, LoadError> {
        let chat_template = match template {
            Some(src) => ChatTemplate::new(src, tokenizer.bos_token(), tokenizer.eos_token())
                .map_err(|source| LoadError::ChatTemplate {
                    path: path.to_path_buf(),
                    source,
                })?,
            None => {
                tracing::warn!(
                    "model has no chat template (GGUF metadata, chat_template.jinja or \
                     tokenizer_config.json); using ChatML"
                );
                ChatTemplate::chatml()
            }
        };
        Ok(Self {
            model,
            tokenizer,
            chat_template,
            name,
            path: path.to_path_buf(),
        })
    }

    /// Longest sequence (prompt plus output) the model accepts.
    pub fn max_model_len(&self) -> usize {
        self.model.config().max_position_embeddings
    }
}
