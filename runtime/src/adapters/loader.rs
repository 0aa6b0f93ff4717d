//! The background loader: reads, validates and converts adapters from disk on its own
//! low-priority thread, so the engine thread never waits on a disk load.

use std::collections::HashMap;
use std::sync::{mpsc, Arc};
use std::time::Duration;

use super::gate::as_loader_job;
use super::host_cache::LoadedAdapter;
use super::registry::AdapterEntry;
use super::service::AdapterService;

/// The loader's `nice` value where `SCHED_IDLE` is refused.
const LOADER_NICE: i32 = 19;

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
    /// The loader thread died (a panic) before finishing this load; it has been restarted.
    #[error("the adapter loader thread stopped before finishing the load")]
    LoaderStopped,
}

/// Handle to the loader thread; dropping it stops the thread after its current load. The
/// handle supervises the thread: when it dies, [`Self::poll`] fails its unfinished loads (so
/// parked requests end at once with a clear error instead of waiting forever) and starts a new one.
pub struct AdapterLoader {
    service: Arc<AdapterService>,
    jobs: Option<mpsc::Sender<AdapterEntry>>,
    done: mpsc::Receiver<LoadDone>,
    in_flight: HashMap<(Arc<str>, u64), AdapterEntry>,
    thread: Option<std::thread::JoinHandle<()>>,
    /// Loads failed by a thread's death, not yet reported.
    failed: Vec<LoadDone>,
    /// Times the thread died and was started again.
    num_restarts: usize,
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
            thread: Some(thread),
            failed: Vec::new(),
            num_restarts: 0,
            #[cfg(feature = "fault-injection")]
            panic_on,
        })
    }

    /// Queues a load of `entry` unless that version is already queued; true if queued now.
    pub fn request(&mut self, entry: &AdapterEntry) -> bool {
        let key = (entry.name.clone(), entry.version);
        if self.in_flight.contains_key(&key) {
            return false;
        }
        let send = |l: &Self| {
            l.jobs
                .as_ref()
                .is_some_and(|j| j.send(entry.clone()).is_ok())
        };
        let mut sent = send(self);
        if !sent {
            // The thread died: its loads fail (reported by the next poll), a new one takes this.
            let failed = self.fail_in_flight();
            self.failed.extend(failed);
            sent = self.restart() && send(self);
        }
        if sent {
            self.in_flight.insert(key, entry.clone());
        }
        sent
    }

    /// Whether `entry`'s version is being loaded.
    pub fn is_loading(&self, entry: &AdapterEntry) -> bool {
        self.in_flight
            .contains_key(&(entry.name.clone(), entry.version))
    }

    /// Number of loads queued or running.
    pub fn num_in_flight(&self) -> usize {
        self.in_flight.len()
    }

    /// Times the loader thread died and was restarted.
    pub fn num_restarts(&self) -> usize {
        self.num_restarts
    }

    /// Loads finished since the last call. If the thread died, every load it had not finished
    /// is reported as [`LoadError::LoaderStopped`] and a new thread is started.
    pub fn poll(&mut self) -> Vec<LoadDone> {
        let mut out = std::mem::take(&mut self.failed);
        loop {
            match self.done.try_recv() {
                Ok(d) => out.push(self.landed(d)),
                Err(mpsc::TryRecvError::Empty) => break,
                Err(mpsc::TryRecvError::Disconnected) => {
                    out.extend(self.fail_in_flight());
                    self.restart();
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
                self.failed = self.fail_in_flight();
                self.restart();
                self.failed.pop()
            }
        }
    }

    /// Makes the loader thread panic when it is next asked to load `name` (tests only).
    #[cfg(feature = "fault-injection")]
    pub fn panic_on_load_of(&self, name: Arc<str>) {
        *self.panic_on.lock().unwrap_or_else(|e| e.into_inner()) = Some(name);
    }

    fn landed(&mut self, d: LoadDone) -> LoadDone {
        self.in_flight
            .remove(&(d.entry.name.clone(), d.entry.version));
        d
    }

    /// The unfinished loads of a dead thread, each failed; logs why the thread died.
    fn fail_in_flight(&mut self) -> Vec<LoadDone> {
        let why = match self.thread.take().map(std::thread::JoinHandle::join) {
            Some(Err(panic)) => panic_message(panic.as_ref()),
            _ => "it exited".to_owned(),
        };
        tracing::error!(
            reason = %why,
            failed_loads = self.in_flight.len(),
            "the adapter loader thread died; failing its loads and restarting it"
        );
        self.in_flight
            .drain()
            .map(|(_, entry)| LoadDone {
                entry,
                result: Err(LoadError::LoaderStopped),
                elapsed: Duration::ZERO,
            })
            .collect()
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

/// Puts the calling thread in Linux's `SCHED_IDLE` class (it runs only on CPU time no other
/// thread wants), falling back to the lowest `nice`; both apply to the calling thread only. So a
/// burst of cold loads uses the gaps between and within engine steps instead of delaying the
/// compute threads (measured by `caduceus bench-lora`). Best effort: on failure the default
/// priority stays.
fn lower_priority() {
    #[cfg(target_os = "linux")]
    // SAFETY: both calls take plain values (and a pointer to a live local) and only change this
    // thread's scheduling.
    unsafe {
        let param = libc::sched_param { sched_priority: 0 };
        if libc::sched_setscheduler(0, libc::SCHED_IDLE, &param) != 0 {
            let _ = libc::setpriority(libc::PRIO_PROCESS, 0, LOADER_NICE);
        }
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
