//! The background loader: reads, validates and converts adapters from disk on its own
//! low-priority thread, so the engine thread never waits on a disk load.

use std::collections::HashSet;
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
    pub result: Result<Arc<LoadedAdapter>, String>,
    /// Time spent reading and validating.
    pub elapsed: Duration,
}

/// Handle to the loader thread; dropping it stops the thread after its current load.
pub struct AdapterLoader {
    jobs: Option<mpsc::Sender<AdapterEntry>>,
    done: mpsc::Receiver<LoadDone>,
    in_flight: HashSet<(Arc<str>, u64)>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl AdapterLoader {
    /// Starts the loader thread; it does its work between the [`super::gate::checkpoint`]s that
    /// the service's loader gate lets it pass.
    pub fn spawn(service: Arc<AdapterService>) -> std::io::Result<Self> {
        let (jobs, job_rx) = mpsc::channel::<AdapterEntry>();
        let (done_tx, done) = mpsc::channel();
        keep_freed_memory();
        let thread = std::thread::Builder::new()
            .name("caduceus-lora-loader".into())
            .spawn(move || {
                lower_priority();
                for entry in job_rx {
                    let job = || match service.load(&entry) {
                        Ok((adapter, elapsed)) => {
                            service.cache(adapter.clone());
                            (Ok(adapter), elapsed)
                        }
                        Err(e) => (Err(e.to_string()), Duration::ZERO),
                    };
                    let (result, elapsed) = as_loader_job(service.loader_gate(), job);
                    if done_tx
                        .send(LoadDone {
                            entry,
                            result,
                            elapsed,
                        })
                        .is_err()
                    {
                        return;
                    }
                }
            })?;
        Ok(AdapterLoader {
            jobs: Some(jobs),
            done,
            in_flight: HashSet::new(),
            thread: Some(thread),
        })
    }

    /// Queues a load of `entry` unless that version is already queued; true if queued now.
    pub fn request(&mut self, entry: &AdapterEntry) -> bool {
        if !self.in_flight.insert((entry.name.clone(), entry.version)) {
            return false;
        }
        let sent = self.jobs.as_ref().map(|j| j.send(entry.clone()));
        if !matches!(sent, Some(Ok(()))) {
            // The thread is gone: report the failure through `poll` like any other.
            self.in_flight.remove(&(entry.name.clone(), entry.version));
            return false;
        }
        true
    }

    /// Whether `entry`'s version is being loaded.
    pub fn is_loading(&self, entry: &AdapterEntry) -> bool {
        self.in_flight
            .contains(&(entry.name.clone(), entry.version))
    }

    /// Number of loads queued or running.
    pub fn num_in_flight(&self) -> usize {
        self.in_flight.len()
    }

    /// Loads finished since the last call.
    pub fn poll(&mut self) -> Vec<LoadDone> {
        let mut out = Vec::new();
        while let Ok(d) = self.done.try_recv() {
            self.in_flight
                .remove(&(d.entry.name.clone(), d.entry.version));
            out.push(d);
        }
        out
    }

    /// Waits up to `timeout` for a load to finish (for callers with nothing else to do).
    pub fn wait(&mut self, timeout: Duration) -> Option<LoadDone> {
        let d = self.done.recv_timeout(timeout).ok()?;
        self.in_flight
            .remove(&(d.entry.name.clone(), d.entry.version));
        Some(d)
    }
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
