//! The host tier: loaded, validated adapters kept in memory, least recently used evicted first
//! once either bound (count, bytes) is passed. Requests hold their adapter by `Arc`, so evicting
//! an entry never takes weights from a request that is using them.

use std::sync::Arc;

use caduceus_scheduler::AdapterKey;

use super::prepared::PreparedAdapter;

/// An adapter ready for the device slots: validated and already converted to the slots' storage
/// type and layout, so filling a slot is a plain copy.
pub struct LoadedAdapter {
    /// Registry name.
    pub name: Arc<str>,
    /// Registry version it was loaded for.
    pub version: u64,
    /// Registry id and content generation: the prefix-cache and slot key.
    pub key: AdapterKey,
    /// LoRA rank.
    pub rank: usize,
    /// The weights in the form the engine's slots copy ([`super::SlotFormat`]).
    pub prepared: PreparedAdapter,
}

impl std::fmt::Debug for LoadedAdapter {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LoadedAdapter")
            .field("name", &self.name)
            .field("version", &self.version)
            .field("key", &self.key)
            .field("rank", &self.rank)
            .finish_non_exhaustive()
    }
}

/// What the host cache needs to know of an entry.
pub trait Cached {
    /// Registry name.
    fn name(&self) -> &Arc<str>;
    /// Registry version.
    fn version(&self) -> u64;
    /// Bytes held.
    fn nbytes(&self) -> usize;
}

impl Cached for LoadedAdapter {
    fn name(&self) -> &Arc<str> {
        &self.name
    }
    fn version(&self) -> u64 {
        self.version
    }
    fn nbytes(&self) -> usize {
        self.prepared.nbytes()
    }
}

struct Entry<T> {
    adapter: Arc<T>,
    last_used: u64,
}

/// LRU cache of loaded adapters bounded by count and bytes.
pub struct HostCache<T: Cached = LoadedAdapter> {
    max_entries: usize,
    max_bytes: usize,
    entries: Vec<Entry<T>>,
    bytes: usize,
    tick: u64,
}

impl<T: Cached> HostCache<T> {
    /// An empty cache holding at most `max_entries` adapters and `max_bytes` bytes (the most
    /// recent adapter is kept even when it alone exceeds `max_bytes`).
    pub fn new(max_entries: usize, max_bytes: usize) -> Self {
        HostCache {
            max_entries: max_entries.max(1),
            max_bytes,
            entries: Vec::new(),
            bytes: 0,
            tick: 0,
        }
    }

    /// The adapter loaded for `name` at registry `version`, marking it used.
    pub fn get(&mut self, name: &str, version: u64) -> Option<Arc<T>> {
        self.tick += 1;
        let tick = self.tick;
        let e = self
            .entries
            .iter_mut()
            .find(|e| &**e.adapter.name() == name && e.adapter.version() == version)?;
        e.last_used = tick;
        Some(e.adapter.clone())
    }

    /// Adds (or replaces) an adapter; returns the names evicted to make room.
    pub fn insert(&mut self, adapter: Arc<T>) -> Vec<Arc<str>> {
        self.remove(&adapter.name().clone());
        self.tick += 1;
        self.bytes += adapter.nbytes();
        self.entries.push(Entry {
            adapter,
            last_used: self.tick,
        });
        let mut evicted = Vec::new();
        while self.entries.len() > 1
            && (self.entries.len() > self.max_entries || self.bytes > self.max_bytes)
        {
            let Some(lru) = self
                .entries
                .iter()
                .enumerate()
                .min_by_key(|(_, e)| e.last_used)
                .map(|(i, _)| i)
            else {
                break;
            };
            let e = self.entries.swap_remove(lru);
            self.bytes -= e.adapter.nbytes();
            evicted.push(e.adapter.name().clone());
        }
        evicted
    }

    /// Drops `name` (any version); true if it was cached.
    pub fn remove(&mut self, name: &str) -> bool {
        let before = self.entries.len();
        let bytes = &mut self.bytes;
        self.entries.retain(|e| {
            let keep = &**e.adapter.name() != name;
            if !keep {
                *bytes -= e.adapter.nbytes();
            }
            keep
        });
        self.entries.len() != before
    }

    /// Adapters cached.
    pub fn len(&self) -> usize {
        self.entries.len()
    }

    /// Whether nothing is cached.
    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    /// Bytes of weights cached.
    pub fn bytes(&self) -> usize {
        self.bytes
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    struct Fake {
        name: Arc<str>,
        version: u64,
        bytes: usize,
    }

    impl Cached for Fake {
        fn name(&self) -> &Arc<str> {
            &self.name
        }
        fn version(&self) -> u64 {
            self.version
        }
        fn nbytes(&self) -> usize {
            self.bytes
        }
    }

    fn adapter(name: &str, version: u64, floats: usize) -> Arc<Fake> {
        Arc::new(Fake {
            name: name.into(),
            version,
            bytes: floats * 4,
        })
    }

    #[test]
    fn evicts_least_recently_used_by_count() {
        let mut c = HostCache::new(2, usize::MAX);
        assert!(c.insert(adapter("a", 1, 1)).is_empty());
        assert!(c.insert(adapter("b", 1, 1)).is_empty());
        assert!(c.get("a", 1).is_some());
        assert_eq!(c.insert(adapter("c", 1, 1)), vec![Arc::from("b")]);
        assert!(c.get("b", 1).is_none());
        assert!(c.get("a", 1).is_some() && c.get("c", 1).is_some());
    }

    #[test]
    fn evicts_by_bytes_but_keeps_the_newest() {
        let mut c = HostCache::new(10, 100);
        c.insert(adapter("a", 1, 10)); // 40 bytes
        c.insert(adapter("b", 1, 10));
        assert_eq!(c.bytes(), 80);
        assert_eq!(c.insert(adapter("c", 1, 10)), vec![Arc::from("a")]);
        assert_eq!(c.bytes(), 80);
        let evicted = c.insert(adapter("huge", 1, 1000));
        assert_eq!(evicted.len(), 2);
        assert_eq!(c.len(), 1);
        assert_eq!(c.bytes(), 4000);
    }

    #[test]
    fn versions_and_removal() {
        let mut c = HostCache::new(4, usize::MAX);
        c.insert(adapter("a", 1, 1));
        assert!(c.get("a", 2).is_none(), "a stale version is a miss");
        c.insert(adapter("a", 2, 1));
        assert_eq!(c.len(), 1, "a new version replaces the old");
        assert!(c.remove("a"));
        assert!(!c.remove("a"));
        assert_eq!((c.len(), c.bytes()), (0, 0));
    }
}
