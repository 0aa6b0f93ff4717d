//! The adapter registry: every adapter the server can serve, by name (the doctor id), without
//! reading any weights. Sub-folders of the adapter root holding an `adapter_config.json` are
//! registered at start-up and discovered on first use; `POST /v1/load_lora_adapter` adds more and
//! `POST /v1/unload_lora_adapter` removes them.

use std::collections::BTreeMap;
use std::path::{Component, Path, PathBuf};
use std::sync::{Arc, RwLock};

pub use super::peft::{CONFIG_FILE, WEIGHTS_FILE};

/// Longest adapter name accepted.
pub const MAX_NAME_LEN: usize = 128;

/// One registered adapter.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct AdapterEntry {
    /// The name requests use in their `model` field.
    pub name: Arc<str>,
    /// Small integer id, stable for the name for the life of the process (prefix-cache keys and
    /// metrics use it; the content generation tells versions apart).
    pub id: u32,
    /// The adapter folder (canonical, inside the adapter root).
    pub path: PathBuf,
    /// Bumped on every (re)registration of the name, so caches can tell a replaced entry.
    pub version: u64,
    /// Unix seconds of registration (`created` in `/v1/models`).
    pub created: u64,
}

/// Why an adapter name or path is refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum RegistryError {
    #[error("no adapter directory is configured (set adapters.dir)")]
    NoRoot,
    #[error("invalid adapter name {0:?}: use 1-{MAX_NAME_LEN} letters, digits, '-', '_' or '.', not starting with '.'")]
    BadName(String),
    #[error("lora_path {0:?} must not contain '..'")]
    DotDot(String),
    #[error("lora_path {path:?} resolves outside the adapter directory")]
    OutsideRoot { path: String },
    #[error("lora_path {path:?}: {reason}")]
    NotAnAdapter { path: String, reason: String },
    #[error("adapter {0:?} is already loaded (pass \"load_inplace\": true to replace it)")]
    AlreadyLoaded(String),
    #[error("adapter {0:?} is not loaded")]
    NotLoaded(String),
    #[error("adapter name {0:?} is the base model's name")]
    BaseName(String),
}

#[derive(Default)]
struct Inner {
    by_name: BTreeMap<Arc<str>, AdapterEntry>,
    /// Ids of names seen before (an unloaded then reloaded name keeps its id).
    ids: BTreeMap<Arc<str>, u32>,
    /// Names unloaded through the API: not rediscovered from the root until loaded again.
    unloaded: std::collections::BTreeSet<Arc<str>>,
    next_version: u64,
}

/// Thread-safe registry shared by the HTTP layer and the engine.
pub struct AdapterRegistry {
    root: Option<PathBuf>,
    reserved: Vec<String>,
    inner: RwLock<Inner>,
}

impl AdapterRegistry {
    /// A registry over `root` (canonicalized), registering each sub-folder that holds an
    /// `adapter_config.json`. Only directory entries are read. `reserved` names (the base model's
    /// served names) are never adapters.
    pub fn scan(root: Option<&Path>, reserved: Vec<String>) -> std::io::Result<Self> {
        let root = root.map(std::fs::canonicalize).transpose()?;
        let registry = AdapterRegistry {
            root,
            reserved,
            inner: RwLock::new(Inner::default()),
        };
        if let Some(root) = &registry.root {
            let mut found = Vec::new();
            for entry in std::fs::read_dir(root)? {
                let entry = entry?;
                let Ok(name) = entry.file_name().into_string() else {
                    continue;
                };
                if valid_name(&name) && entry.path().join(CONFIG_FILE).is_file() {
                    found.push(name);
                }
            }
            found.sort();
            for name in found {
                match registry.resolve_path(&name) {
                    Ok(path) => {
                        let _ = registry.insert(&name, path, true);
                    }
                    Err(e) => tracing::warn!(adapter = %name, error = %e, "adapter folder skipped"),
                }
            }
        }
        Ok(registry)
    }

    /// A registry with no adapter root (base model only, until adapters are loaded by path:
    /// which then fails with [`RegistryError::NoRoot`]).
    pub fn empty() -> Self {
        AdapterRegistry {
            root: None,
            reserved: Vec::new(),
            inner: RwLock::new(Inner::default()),
        }
    }

    /// The canonical adapter root.
    pub fn root(&self) -> Option<&Path> {
        self.root.as_deref()
    }

    /// The entry for `name`; a folder of that name that appeared in the root since start-up is
    /// registered now (reads one directory entry, no weights).
    pub fn get(&self, name: &str) -> Option<AdapterEntry> {
        {
            let inner = self.read();
            if let Some(e) = inner.by_name.get(name) {
                return Some(e.clone());
            }
            if inner.unloaded.contains(name) {
                return None;
            }
        }
        let root = self.root.as_ref()?;
        if !valid_name(name) || self.reserved.iter().any(|r| r == name) {
            return None;
        }
        if !root.join(name).join(CONFIG_FILE).is_file() {
            return None;
        }
        // The same confinement as `lora_path`: a symlinked folder or file leaving the root is
        // not an adapter.
        let path = match self.resolve_path(name) {
            Ok(path) => path,
            Err(e) => {
                tracing::warn!(adapter = %name, error = %e, "adapter folder refused");
                return None;
            }
        };
        // Another thread may have registered it meanwhile: keep the first.
        self.insert(name, path, false)
            .ok()
            .or_else(|| self.read().by_name.get(name).cloned())
    }

    /// Every registered adapter, by name.
    pub fn list(&self) -> Vec<AdapterEntry> {
        self.read().by_name.values().cloned().collect()
    }

    /// Up to `limit` adapters whose names sort after `after` (from the first when `None`), by
    /// name, and whether more follow: one page of `GET /v1/models` without copying the rest.
    pub fn page(&self, after: Option<&str>, limit: usize) -> (Vec<AdapterEntry>, bool) {
        use std::ops::Bound;
        let inner = self.read();
        let start = after.map_or(Bound::Unbounded, Bound::Excluded);
        let mut rest = inner.by_name.range::<str, _>((start, Bound::Unbounded));
        let page: Vec<AdapterEntry> = rest.by_ref().take(limit).map(|(_, e)| e.clone()).collect();
        (page, rest.next().is_some())
    }

    /// Number of registered adapters.
    pub fn len(&self) -> usize {
        self.read().by_name.len()
    }

    /// Whether no adapter is registered.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Resolves a `lora_path` from `POST /v1/load_lora_adapter`: relative paths are taken from
    /// the root; `..` is refused; the folder, its config and its weights must all resolve
    /// (following symlinks) inside the root.
    pub fn resolve_path(&self, lora_path: &str) -> Result<PathBuf, RegistryError> {
        let root = self.root.as_ref().ok_or(RegistryError::NoRoot)?;
        let requested = Path::new(lora_path);
        if requested
            .components()
            .any(|c| matches!(c, Component::ParentDir))
        {
            return Err(RegistryError::DotDot(lora_path.into()));
        }
        let joined = root.join(requested);
        let not_adapter = |reason: String| RegistryError::NotAnAdapter {
            path: lora_path.into(),
            reason,
        };
        let dir = std::fs::canonicalize(&joined).map_err(|e| not_adapter(e.to_string()))?;
        let outside = || RegistryError::OutsideRoot {
            path: lora_path.into(),
        };
        if !dir.starts_with(root) || dir == *root {
            return Err(outside());
        }
        if !dir.is_dir() {
            return Err(not_adapter("not a directory".into()));
        }
        for file in [CONFIG_FILE, WEIGHTS_FILE] {
            let f = std::fs::canonicalize(dir.join(file))
                .map_err(|e| not_adapter(format!("{file}: {e}")))?;
            if !f.starts_with(root) {
                return Err(outside());
            }
        }
        Ok(dir)
    }

    /// Where `entry` lives, relative to the adapter root: what clients may see (`/v1/models`),
    /// never the server's own paths.
    pub fn client_path(&self, entry: &AdapterEntry) -> String {
        self.root
            .as_ref()
            .and_then(|root| entry.path.strip_prefix(root).ok())
            .map_or_else(|| entry.name.to_string(), |p| p.display().to_string())
    }

    /// `message` with the adapter root's absolute path taken out, for errors clients see
    /// (adapter errors name their folder for the operator's log).
    pub fn redact(&self, message: &str) -> String {
        let Some(root) = &self.root else {
            return message.to_owned();
        };
        let root = root.display().to_string();
        message
            .replace(&format!("{root}/"), "")
            .replace(&root, "adapters.dir")
    }

    /// Registers `name` at `path` (already resolved). With `replace`, an existing entry is
    /// replaced (same id, new version); without, an existing name is an error.
    pub fn register(
        &self,
        name: &str,
        path: PathBuf,
        replace: bool,
    ) -> Result<AdapterEntry, RegistryError> {
        if !valid_name(name) {
            return Err(RegistryError::BadName(name.into()));
        }
        if self.reserved.iter().any(|r| r == name) {
            return Err(RegistryError::BaseName(name.into()));
        }
        let entry = self.insert(name, path, replace)?;
        self.write().unloaded.remove(name);
        Ok(entry)
    }

    /// Removes `name`; requests already admitted keep the weights they hold.
    pub fn unregister(&self, name: &str) -> Result<AdapterEntry, RegistryError> {
        let mut inner = self.write();
        let entry = inner
            .by_name
            .remove(name)
            .ok_or_else(|| RegistryError::NotLoaded(name.into()))?;
        inner.unloaded.insert(entry.name.clone());
        Ok(entry)
    }

    fn insert(
        &self,
        name: &str,
        path: PathBuf,
        replace: bool,
    ) -> Result<AdapterEntry, RegistryError> {
        let mut inner = self.write();
        if !replace && inner.by_name.contains_key(name) {
            return Err(RegistryError::AlreadyLoaded(name.into()));
        }
        let name: Arc<str> = Arc::from(name);
        let next_id = u32::try_from(inner.ids.len()).unwrap_or(u32::MAX);
        let id = *inner.ids.entry(name.clone()).or_insert(next_id);
        inner.next_version += 1;
        let entry = AdapterEntry {
            name: name.clone(),
            id,
            path,
            version: inner.next_version,
            created: unix_now(),
        };
        inner.by_name.insert(name, entry.clone());
        Ok(entry)
    }

    fn read(&self) -> std::sync::RwLockReadGuard<'_, Inner> {
        self.inner.read().unwrap_or_else(|e| e.into_inner())
    }

    fn write(&self) -> std::sync::RwLockWriteGuard<'_, Inner> {
        self.inner.write().unwrap_or_else(|e| e.into_inner())
    }
}

/// Whether `name` can name an adapter (and a folder): one safe path component.
pub fn valid_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= MAX_NAME_LEN
        && !name.starts_with('.')
        && name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'))
}

fn unix_now() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}
