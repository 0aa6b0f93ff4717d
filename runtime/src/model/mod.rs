pub mod batch;
pub mod config;
pub mod error;
pub mod gguf;
pub mod gguf_writer;
pub mod linear;
pub mod llama;
pub mod loader;
pub mod lora;
pub mod safetensors_dir;
pub mod weights;

pub use batch::ForwardBatch;
pub use llama::{LlamaModel, WeightFormat};
pub use loader::{LoadedModel, Network, DEFAULT_MODEL_PATH};
pub use lora::{LoraBatch, LoraDtype, LoraStack};
