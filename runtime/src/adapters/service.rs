//! [`AdapterService`]: the registry, the host cache and the loading rules, shared by the HTTP layer
//! (listing, load and unload endpoints) and the engine (which loads adapters off its thread).

use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use caduceus_scheduler::AdapterKey;

use super::gate::LoaderGate;
use super::host_cache::{HostCache, LoadedAdapter};
use super::peft::{with_adapter, AdapterError, AdapterLimits};
use super::prepared::{PrepareError, PreparedAdapter, SlotFormat};
use super::registry::{AdapterEntry, AdapterRegistry, RegistryError};
use crate::model::config::LlamaConfig;

/// Settings of the adapter tiers (the `[adapters]` config section, resolved).
#[derive(Clone, Debug)]
pub struct AdapterSettings {
    /// Device slots: distinct adapters in one batch.
    pub max_loras: usize,
    /// Adapters kept in the host cache.
    pub max_cpu_loras: usize,
    /// Bytes the host cache may hold.
    pub max_cpu_lora_bytes: usize,
    /// Validation limits (rank, file size).
    pub limits: AdapterLimits,
    /// What the engine's slots are filled from (adapters are converted to it when loaded, on
    /// the loader's thread).
    pub format: SlotFormat,
    /// Where the compute threads take every core: the share of each step's time lent to the
    /// loader thread after the step, in percent (100 = no slicing; see [`super::gate`]).
    pub loader_share_percent: u32,
    /// Loader threads (`None`: the cores the compute leaves idle; see
    /// [`super::loader_pool::loader_threads`]).
    pub loader_threads: Option<usize>,
}

/// Why `POST /v1/load_lora_adapter` failed.
#[derive(Debug, thiserror::Error)]
pub enum LoadAdapterError {
    #[error(transparent)]
    Registry(#[from] RegistryError),
    #[error(transparent)]
    Adapter(#[from] AdapterError),
    #[error("adapter could not be converted for the slots: {0}")]
    Prepare(#[from] PrepareError),
}

/// The shared adapter state.
pub struct AdapterService {
    registry: AdapterRegistry,
    host: Mutex<HostCache>,
    base: LlamaConfig,
    settings: AdapterSettings,
    gate: Arc<LoaderGate>,
}

impl AdapterService {
    /// A service over `registry` for adapters of the base model `base`.
    pub fn new(registry: AdapterRegistry, base: LlamaConfig, settings: AdapterSettings) -> Self {
        let host = HostCache::new(settings.max_cpu_loras, settings.max_cpu_lora_bytes);
        AdapterService {
            registry,
            host: Mutex::new(host),
            base,
            settings,
            gate: Arc::default(),
        }
    }

    /// The gate the loader threads of this service's engines pass (see [`super::gate`]).
    pub fn loader_gate(&self) -> Arc<LoaderGate> {
        self.gate.clone()
    }

    /// The registry.
    pub fn registry(&self) -> &AdapterRegistry {
        &self.registry
    }

    /// The tier settings.
    pub fn settings(&self) -> &AdapterSettings {
        &self.settings
    }

    /// The adapter of `entry` if the host cache holds that version.
    pub fn cached(&self, entry: &AdapterEntry) -> Option<Arc<LoadedAdapter>> {
        self.host().get(&entry.name, entry.version)
    }

    /// Reads, validates and converts `entry`'s adapter for the slots (blocking: call it off the
    /// engine thread), returning it and how long it took. Not cached; see [`Self::cache`].
    pub fn load(
        &self,
        entry: &AdapterEntry,
    ) -> Result<(Arc<LoadedAdapter>, Duration), LoadAdapterError> {
        let start = Instant::now();
        let converted = self.convert(&entry.path)?;
        Ok((loaded(entry, converted), start.elapsed()))
    }

    /// Reads and validates the adapter in `dir` and converts it for the slots, straight from
    /// the file's bytes.
    fn convert(&self, dir: &Path) -> Result<Converted, LoadAdapterError> {
        with_adapter(dir, &self.base, &self.settings.limits, |t| {
            Ok(Converted {
                generation: t.generation,
                rank: t.rank,
                prepared: PreparedAdapter::prepare(&self.base, t, &self.settings.format)?,
            })
        })
    }

    /// Puts a loaded adapter in the host cache (unless its registry entry changed meanwhile),
    /// evicting least recently used ones.
    pub fn cache(&self, adapter: Arc<LoadedAdapter>) {
        let current = self.registry.get(&adapter.name);
        if current.is_none_or(|e| e.version != adapter.version) {
            return;
        }
        let mut host = self.host();
        let evicted = host.insert(adapter);
        crate::metrics::record_lora_host(host.len(), host.bytes(), evicted.len());
    }

    /// `POST /v1/load_lora_adapter`: resolves `lora_path` inside the root, reads and validates
    /// the adapter, then registers it as `name` (replacing an existing one only with `replace`)
    /// and caches it, so its first request is a host hit. Blocking; the reading and converting
    /// pass the loader gate like the loader thread's own work (see [`super::gate`]).
    pub fn load_and_register(
        &self,
        name: &str,
        lora_path: &str,
        replace: bool,
    ) -> Result<Arc<LoadedAdapter>, LoadAdapterError> {
        super::gate::as_loader_job(self.gate.clone(), || {
            self.register_loaded(name, lora_path, replace)
        })
    }

    fn register_loaded(
        &self,
        name: &str,
        lora_path: &str,
        replace: bool,
    ) -> Result<Arc<LoadedAdapter>, LoadAdapterError> {
        if !super::registry::valid_name(name) {
            return Err(RegistryError::BadName(name.into()).into());
        }
        if !replace && self.registry.get(name).is_some() {
            return Err(RegistryError::AlreadyLoaded(name.into()).into());
        }
        let path = self.registry.resolve_path(lora_path)?;
        // Converted before it is registered: nothing is registered that cannot be served.
        let converted = self.convert(&path)?;
        let entry = self.registry.register(name, path, replace)?;
        let adapter = loaded(&entry, converted);
        self.cache(adapter.clone());
        Ok(adapter)
    }

    /// Unregisters `name` and drops it from the host cache; in-flight requests keep their copy.
    pub fn unload(&self, name: &str) -> Result<AdapterEntry, RegistryError> {
        let entry = self.registry.unregister(name)?;
        let mut host = self.host();
        host.remove(name);
        crate::metrics::record_lora_host(host.len(), host.bytes(), 0);
        Ok(entry)
    }

    /// Adapters and bytes in the host cache.
    pub fn host_usage(&self) -> (usize, usize) {
        let host = self.host();
        (host.len(), host.bytes())
    }

    fn host(&self) -> std::sync::MutexGuard<'_, HostCache> {
        self.host.lock().unwrap_or_else(|e| e.into_inner())
    }
}

/// An adapter file converted for the slots, with what identifies it.
struct Converted {
    generation: u64,
    rank: usize,
    prepared: PreparedAdapter,
}

/// The loaded adapter of `entry`.
fn loaded(entry: &AdapterEntry, converted: Converted) -> Arc<LoadedAdapter> {
    Arc::new(LoadedAdapter {
        name: entry.name.clone(),
        version: entry.version,
        key: AdapterKey {
            id: entry.id,
            generation: converted.generation,
        },
        rank: converted.rank,
        prepared: converted.prepared,
    })
}
