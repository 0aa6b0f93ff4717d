//! [`LoaderPool`]: an engine's adapter loader threads. Where the backend leaves cores idle (a GPU
//! engine computes with one host thread), several cold adapters load at once: one loader thread
//! reads, validates and converts a Llama-3-8B rank-16 adapter in ~0.2 s, so a burst of cold
//! doctors (a fresh replica, a shift change) queued behind one thread for seconds. Where the
//! compute pool takes every core there is one thread, as before.
//!
//! Each adapter name always goes to the same [`AdapterLoader`] (by a hash of the name), so each
//! keeps its own rules unchanged: a version queued once, the supervision of its thread and the
//! quarantine of a version that keeps killing it.

use std::time::{Duration, Instant};

use super::loader::{AdapterLoader, LoadDone};
use super::registry::AdapterEntry;
use super::service::AdapterService;
use std::sync::Arc;

/// Most loader threads an engine starts (each holds an adapter's file, weights and converted
/// form while it works: ~0.4 GB for an 8B rank-16 adapter).
pub const MAX_LOADER_THREADS: usize = 4;

/// How often [`LoaderPool::wait`] looks at its loaders when it has more than one.
const WAIT_POLL: Duration = Duration::from_millis(1);

/// Loader threads for `cores` cores of which `compute_threads` compute steps: the idle cores,
/// from 1 to [`MAX_LOADER_THREADS`].
pub fn loader_threads(compute_threads: usize, cores: usize) -> usize {
    cores
        .saturating_sub(compute_threads)
        .clamp(1, MAX_LOADER_THREADS)
}

/// Which of `n` loaders takes the adapter `name` (always the same one).
fn loader_of(name: &str, n: usize) -> usize {
    (xxhash_rust::xxh3::xxh3_64(name.as_bytes()) % n.max(1) as u64) as usize
}

/// The loader threads of one engine (see the module docs).
pub struct LoaderPool {
    loaders: Vec<AdapterLoader>,
    /// Loads one [`Self::wait`] collected beyond the one it returned.
    ready: Vec<LoadDone>,
}

impl LoaderPool {
    /// Starts `threads` loader threads (at least one) over `service`.
    pub fn spawn(service: Arc<AdapterService>, threads: usize) -> std::io::Result<Self> {
        let loaders = (0..threads.max(1))
            .map(|_| AdapterLoader::spawn(service.clone()))
            .collect::<std::io::Result<Vec<_>>>()?;
        Ok(LoaderPool {
            loaders,
            ready: Vec::new(),
        })
    }

    /// Loader threads.
    pub fn threads(&self) -> usize {
        self.loaders.len()
    }

    fn index_of(&self, name: &str) -> usize {
        loader_of(name, self.loaders.len())
    }

    fn loader_for(&mut self, entry: &AdapterEntry) -> &mut AdapterLoader {
        let i = self.index_of(&entry.name);
        &mut self.loaders[i]
    }

    /// [`AdapterLoader::request`] on the loader of `entry`'s name.
    pub fn request(&mut self, entry: &AdapterEntry) -> bool {
        self.loader_for(entry).request(entry)
    }

    /// Whether `entry`'s version is being loaded.
    pub fn is_loading(&self, entry: &AdapterEntry) -> bool {
        self.loaders[self.index_of(&entry.name)].is_loading(entry)
    }

    /// Loads queued or running, all threads together.
    pub fn num_in_flight(&self) -> usize {
        self.loaders.iter().map(AdapterLoader::num_in_flight).sum()
    }

    /// Times a loader thread died and was restarted, all threads together.
    pub fn num_restarts(&self) -> usize {
        self.loaders.iter().map(AdapterLoader::num_restarts).sum()
    }

    /// Loads finished since the last call, from every thread (see [`AdapterLoader::poll`]).
    pub fn poll(&mut self) -> Vec<LoadDone> {
        let mut out = std::mem::take(&mut self.ready);
        for l in &mut self.loaders {
            out.extend(l.poll());
        }
        out
    }

    /// Waits up to `timeout` for a load to finish (for callers with nothing else to do); the
    /// others that finished meanwhile come with the next call or [`Self::poll`]. One loader is
    /// waited on directly (`ready` fills only with several).
    pub fn wait(&mut self, timeout: Duration) -> Option<LoadDone> {
        if let [only] = &mut self.loaders[..] {
            return only.wait(timeout);
        }
        let deadline = Instant::now() + timeout;
        loop {
            let mut done = self.poll();
            if let Some(first) = done.pop() {
                self.ready = done;
                return Some(first);
            }
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return None;
            }
            std::thread::sleep(left.min(WAIT_POLL));
        }
    }

    /// Makes the loader of `name` panic when it is next asked to load it (tests only).
    #[cfg(feature = "fault-injection")]
    pub fn panic_on_load_of(&self, name: Arc<str>) {
        self.loaders[self.index_of(&name)].panic_on_load_of(name);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn idle_cores_load_adapters_up_to_the_cap() {
        // The CPU engine's pool on every core: one loader, as before.
        assert_eq!(loader_threads(16, 16), 1);
        assert_eq!(loader_threads(32, 16), 1);
        // A GPU engine's one thread.
        assert_eq!(loader_threads(1, 2), 1);
        assert_eq!(loader_threads(1, 3), 2);
        assert_eq!(loader_threads(1, 16), MAX_LOADER_THREADS);
        // `--threads` below the cores.
        assert_eq!(loader_threads(6, 8), 2);
    }

    #[test]
    fn names_spread_over_the_loaders_and_each_keeps_one() {
        let names: Vec<String> = (0..64).map(|i| format!("doctor-{i:04}")).collect();
        for n in 1..=MAX_LOADER_THREADS {
            let mut per = vec![0; n];
            for name in &names {
                let i = loader_of(name, n);
                assert_eq!(i, loader_of(name, n));
                per[i] += 1;
            }
            // 64 names over n loaders: none idle, none with more than twice its share.
            assert!(
                per.iter().all(|&c| c > 0 && c <= 2 * 64 / n),
                "{n}: {per:?}"
            );
        }
    }
}
