//! The background loader: reads, validates and converts adapters from disk on its own
//! low-priority thread, so the engine thread never waits on a disk load.

use std::collections::HashMap;
use std::sync::{mpsc, Arc};
use std::time::Duration;

use super::gate::as_loader_job;
use super::host_cache::LoadedAdapter;
use super::registry::AdapterEntry;
use super::service::AdapterService;

/// The loader threads' `nice` value: below the engine and HTTP threads, yet with a share of a
/// busy core (about a tenth against one `nice` 0 thread). `SCHED_IDLE`, used before, starved
/// the loader whenever anything else in the container was busy: beside two busy threads a burst
/// of 16 cold loads (`bench-lora --burst 16`) took 114 s instead of 14 s, and the engine,
/// waiting each step for a loader that got no core to reach its checkpoint, slowed its running
/// streams' p99 step 3.4x instead of 0.97x.
const LOADER_NICE: i32 = 10;

/// An adapter version whose load killed the loader thread this many times is not loaded again
/// (until it is registered anew, which makes a new version): one retry covers a transient
/// fault, and a file that crashes the loader every time cannot keep it restarting.
pub const MAX_LOADER_CRASHES: u32 = 2;

/// One finished load.
#[derive(Debug)]
pub struct LoadDone {
    /// What was loaded.
    pub entry: AdapterEntry,
    /// The adapter (already in the host cache), or why it could not be loaded.
    pub result: Result<Arc<LoadedAdapter>, LoadError>,
    /// Time spent reading and validating.
    pub elapsed: Duration,
}

/// Why a load produced no adapter.
#[derive(Clone, Debug, PartialEq, thiserror::Error)]
pub enum LoadError {
    /// The adapter could not be read, validated or converted (the message may name server paths:
    /// redact it before a client sees it).
    #[error("{0}")]
    Failed(String),
    /// The loader thread died (a panic) while loading this adapter; it has been restarted.
    #[error("the adapter loader thread stopped while loading it")]
    LoaderStopped,
    /// Loading this adapter version killed the loader thread [`MAX_LOADER_CRASHES`] times: it is
    /// refused without another try.
    #[error(
        "loading it crashed the adapter loader {crashes} times; it is not tried again until it \
         is registered anew"
    )]
    Quarantined { crashes: u32 },
}

/// An adapter version: what a load is for.
type LoadKey = (Arc<str>, u64);

fn key_of(entry: &AdapterEntry) -> LoadKey {
    (entry.name.clone(), entry.version)
}

/// Handle to the loader thread; dropping it stops the thread after its current load. The
/// handle supervises the thread: when it dies, [`Self::poll`] fails the load it died on (so the
/// requests parked on it end at once with a clear error instead of waiting forever), starts a
/// new thread and hands it the loads that were queued behind. The thread takes its jobs in
/// order, so the load it died on is the oldest unfinished one; a version that killed it
/// [`MAX_LOADER_CRASHES`] times is refused from then on.
pub struct AdapterLoader {
    service: Arc<AdapterService>,
    jobs: Option<mpsc::Sender<AdapterEntry>>,
    done: mpsc::Receiver<LoadDone>,
    /// Loads queued or running, each with its place in the queue.
    in_flight: HashMap<LoadKey, (u64, AdapterEntry)>,
    next_seq: u64,
    thread: Option<std::thread::JoinHandle<()>>,
    /// Failed loads not yet reported.
    failed: Vec<LoadDone>,
    /// Times the thread died and was started again.
    num_restarts: usize,
    /// Times each adapter version's load killed the thread.
    crashes: HashMap<LoadKey, u32>,
    #[cfg(feature = "fault-injection")]
    panic_on: Arc<std::sync::Mutex<Option<Arc<str>>>>,
}

/// The channels and thread of one loader thread's life.
type Spawned = (
    mpsc::Sender<AdapterEntry>,
    mpsc::Receiver<LoadDone>,
    std::thread::JoinHandle<()>,
);

impl AdapterLoader {
    /// Starts the loader thread; it does its work between the [`super::gate::checkpoint`]s that
    /// the service's loader gate lets it pass.
    pub fn spawn(service: Arc<AdapterService>) -> std::io::Result<Self> {
        keep_freed_memory();
        #[cfg(feature = "fault-injection")]
        let panic_on = Arc::default();
        let (jobs, done, thread) = start_thread(
            service.clone(),
            #[cfg(feature = "fault-injection")]
            Arc::clone(&panic_on),
        )?;
        Ok(AdapterLoader {
            service,
            jobs: Some(jobs),
            done,
            in_flight: HashMap::new(),
            next_seq: 0,
            thread: Some(thread),
            failed: Vec::new(),
            num_restarts: 0,
            crashes: HashMap::new(),
            #[cfg(feature = "fault-injection")]
            panic_on,
        })
    }

    /// Queues a load of `entry` unless that version is already queued; true if queued now. A
    /// quarantined version is not queued: its failure is reported by the next poll (true too).
    pub fn request(&mut self, entry: &AdapterEntry) -> bool {
        let key = key_of(entry);
        if self.in_flight.contains_key(&key) {
            return false;
        }
        if let Some(&crashes) = self.crashes.get(&key).filter(|&&n| n >= MAX_LOADER_CRASHES) {
            if !self.failed.iter().any(|d| key_of(&d.entry) == key) {
                self.failed.push(failed_load(
                    entry.clone(),
                    LoadError::Quarantined { crashes },
                ));
            }
            return true;
        }
        if !self.send(entry) {
            // The thread died: its unfinished loads are settled (reported by the next poll),
            // and a new thread takes this one.
            let settled = self.on_death();
            self.failed.extend(settled);
            if !self.send(entry) {
                return false;
            }
        }
        self.in_flight.insert(key, (self.next_seq, entry.clone()));
        self.next_seq += 1;
        true
    }

    /// Whether `entry`'s version is being loaded.
    pub fn is_loading(&self, entry: &AdapterEntry) -> bool {
        self.in_flight.contains_key(&key_of(entry))
    }

    /// Number of loads queued or running.
    pub fn num_in_flight(&self) -> usize {
        self.in_flight.len()
    }

    /// Times the loader thread died and was restarted.
    pub fn num_restarts(&self) -> usize {
        self.num_restarts
    }

    /// Loads finished since the last call. If the thread died, the load it died on is reported
    /// as [`LoadError::LoaderStopped`] and a new thread takes the others.
    pub fn poll(&mut self) -> Vec<LoadDone> {
        let mut out = std::mem::take(&mut self.failed);
        loop {
            match self.done.try_recv() {
                Ok(d) => out.push(self.landed(d)),
                Err(mpsc::TryRecvError::Empty) => break,
                Err(mpsc::TryRecvError::Disconnected) => {
                    out.extend(self.on_death());
                    break;
                }
            }
        }
        out
    }

    /// Waits up to `timeout` for a load to finish (for callers with nothing else to do).
    pub fn wait(&mut self, timeout: Duration) -> Option<LoadDone> {
        if let Some(d) = self.failed.pop() {
            return Some(d);
        }
        match self.done.recv_timeout(timeout) {
            Ok(d) => Some(self.landed(d)),
            Err(mpsc::RecvTimeoutError::Timeout) => None,
            Err(mpsc::RecvTimeoutError::Disconnected) => {
                // The rest are reported by the next `poll` or `wait`.
                self.failed = self.on_death();
                self.failed.pop()
            }
        }
    }

    /// Makes the loader thread panic when it is next asked to load `name` (tests only).
    #[cfg(feature = "fault-injection")]
    pub fn panic_on_load_of(&self, name: Arc<str>) {
        *self.panic_on.lock().unwrap_or_else(|e| e.into_inner()) = Some(name);
    }

    fn send(&self, entry: &AdapterEntry) -> bool {
        self.jobs
            .as_ref()
            .is_some_and(|j| j.send(entry.clone()).is_ok())
    }

    fn landed(&mut self, d: LoadDone) -> LoadDone {
        self.in_flight.remove(&key_of(&d.entry));
        d
    }

    /// Settles a dead thread's work: the loads it finished, the one it died on (failed, and
    /// counted against that version), and the ones queued behind, handed to a new thread (or
    /// failed, if none can be started). Returns what is to be reported.
    fn on_death(&mut self) -> Vec<LoadDone> {
        let mut out = Vec::new();
        while let Ok(d) = self.done.try_recv() {
            out.push(self.landed(d));
        }
        let why = match self.thread.take().map(std::thread::JoinHandle::join) {
            Some(Err(panic)) => panic_message(panic.as_ref()),
            _ => "it exited".to_owned(),
        };
        let mut queued: Vec<(u64, AdapterEntry)> = self.in_flight.drain().map(|(_, v)| v).collect();
        queued.sort_unstable_by_key(|&(seq, _)| seq);
        let mut queued = queued.into_iter().map(|(_, entry)| entry);
        let culprit = queued.next();
        let crashes = culprit.as_ref().map_or(0, |entry| {
            let n = self.crashes.entry(key_of(entry)).or_default();
            *n += 1;
            *n
        });
        tracing::error!(
            reason = %why,
            adapter = culprit.as_ref().map_or("", |e| &*e.name),
            crashes,
            requeued = queued.len(),
            "the adapter loader thread died; failing the load it died on and restarting it"
        );
        out.extend(culprit.map(|entry| failed_load(entry, LoadError::LoaderStopped)));
        if self.restart() {
            for entry in queued {
                if self.send(&entry) {
                    self.in_flight
                        .insert(key_of(&entry), (self.next_seq, entry));
                    self.next_seq += 1;
                } else {
                    out.push(failed_load(entry, LoadError::LoaderStopped));
                }
            }
        } else {
            out.extend(queued.map(|entry| failed_load(entry, LoadError::LoaderStopped)));
        }
        out
    }

    /// Starts a new loader thread in place of a dead one; false if it cannot be started (the
    /// next request tries again).
    fn restart(&mut self) -> bool {
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
        let spawned = start_thread(
            self.service.clone(),
            #[cfg(feature = "fault-injection")]
            Arc::clone(&self.panic_on),
        );
        match spawned {
            Ok((jobs, done, thread)) => {
                self.jobs = Some(jobs);
                self.done = done;
                self.thread = Some(thread);
                self.num_restarts += 1;
                crate::metrics::record_lora_loader_restart();
                tracing::info!(
                    restarts = self.num_restarts,
                    "adapter loader thread restarted"
                );
                true
            }
            Err(e) => {
                tracing::error!(error = %e, "the adapter loader thread could not be restarted");
                false
            }
        }
    }
}

/// Starts one loader thread: it takes jobs until its handle drops the job sender.
fn start_thread(
    service: Arc<AdapterService>,
    #[cfg(feature = "fault-injection")] panic_on: Arc<std::sync::Mutex<Option<Arc<str>>>>,
) -> std::io::Result<Spawned> {
    let (jobs, job_rx) = mpsc::channel::<AdapterEntry>();
    let (done_tx, done) = mpsc::channel();
    let thread = std::thread::Builder::new()
        .name("caduceus-lora-loader".into())
        .spawn(move || {
            lower_priority();
            for entry in job_rx {
                let job = || match load(
                    &service,
                    &entry,
                    #[cfg(feature = "fault-injection")]
                    &panic_on,
                ) {
                    Ok((adapter, elapsed)) => {
                        service.cache(adapter.clone());
                        (Ok(adapter), elapsed)
                    }
                    Err(e) => (Err(LoadError::Failed(e.to_string())), Duration::ZERO),
                };
                let (result, elapsed) = as_loader_job(service.loader_gate(), job);
                let done = LoadDone {
                    entry,
                    result,
                    elapsed,
                };
                if done_tx.send(done).is_err() {
                    return;
                }
            }
        })?;
    Ok((jobs, done, thread))
}

/// Reads one adapter (inside the loader gate, where a real panic would strike too).
fn load(
    service: &AdapterService,
    entry: &AdapterEntry,
    #[cfg(feature = "fault-injection")] panic_on: &std::sync::Mutex<Option<Arc<str>>>,
) -> Result<(Arc<LoadedAdapter>, Duration), super::service::LoadAdapterError> {
    #[cfg(feature = "fault-injection")]
    {
        let mut armed = panic_on.lock().unwrap_or_else(|e| e.into_inner());
        if armed.as_deref() == Some(&*entry.name) {
            *armed = None;
            drop(armed);
            panic!("injected fault: adapter loader panic");
        }
    }
    service.load(entry)
}

/// A load that produced no adapter, reported without having run.
fn failed_load(entry: AdapterEntry, error: LoadError) -> LoadDone {
    LoadDone {
        entry,
        result: Err(error),
        elapsed: Duration::ZERO,
    }
}

/// The text of a panic payload.
fn panic_message(panic: &(dyn std::any::Any + Send)) -> String {
    panic
        .downcast_ref::<&str>()
        .map(|s| s.to_string())
        .or_else(|| panic.downcast_ref::<String>().cloned())
        .unwrap_or_else(|| "a non-string panic payload".into())
}

impl Drop for AdapterLoader {
    fn drop(&mut self) {
        self.jobs = None;
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// Lowers the calling thread to [`LOADER_NICE`] (on Linux `setpriority` with id 0 applies to the
/// calling thread only), so loads running beside the engine's steps (free cores) yield to the
/// compute threads when those want the core. Best effort: on failure the default priority stays.
fn lower_priority() {
    #[cfg(target_os = "linux")]
    // SAFETY: setpriority takes plain values and only changes this thread's scheduling.
    unsafe {
        let _ = libc::setpriority(libc::PRIO_PROCESS, 0, LOADER_NICE);
    }
}

/// Keeps large freed blocks in the allocator instead of unmapping them: every `munmap` of an
/// adapter-sized buffer makes the kernel interrupt all cores running this process (TLB
/// shootdown), stalling the compute threads mid-step. With glibc, blocks of up to 1 GiB come from
/// the heap and the heap is trimmed only past 1 GiB of free space. Best effort, process-wide.
fn keep_freed_memory() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: mallopt takes two integers and only changes allocator thresholds.
    unsafe {
        let _ = libc::mallopt(libc::M_MMAP_THRESHOLD, 1 << 30);
        let _ = libc::mallopt(libc::M_TRIM_THRESHOLD, 1 << 30);
    }
}
