//! Doctor avatars: PEFT LoRA adapters on the shared base model, from disk to the device slots.
//!
//! Tiers: the [`AdapterRegistry`] knows every adapter by name without reading weights; the
//! [`AdapterLoader`] thread reads and validates them ([`peft`]) into the host cache
//! ([`HostCache`], LRU by count and bytes); the engine copies them into the device slots the
//! LoRA kernels read (`engine::device_slots`).

pub mod error;
pub mod gate;
pub mod host_cache;
pub mod loader;
pub mod loader_pool;
pub mod make;
pub mod peft;
pub mod peft_config;
pub mod prepared;
pub mod registry;
pub mod service;
pub mod weights;

pub use error::AdapterError;
pub use gate::{LoaderGate, StepGate};
pub use host_cache::{HostCache, LoadedAdapter};
pub use loader::{AdapterLoader, LoadDone, LoadError, MAX_LOADER_CRASHES};
pub use loader_pool::{loader_threads, LoaderPool};
pub use peft::{load_adapter, probe, with_adapter, AdapterInfo, AdapterLimits};
pub use prepared::{PrepareError, PreparedAdapter, SlotFormat};
pub use registry::{AdapterEntry, AdapterRegistry, RegistryError};
pub use service::{AdapterService, AdapterSettings, LoadAdapterError};
pub use weights::{AdapterTensors, AdapterWeights, LoraPair, PairTensors, Projection};
