//! Time-slicing between the engine's compute and the adapter loader thread, for machines where
//! the compute threads take every core.
//!
//! There a loader that runs whenever it is runnable (even in `SCHED_IDLE`) slows the running
//! streams: idle compute workers yield their core to it mid-step and get it back only at the next
//! scheduler tick. With the gate the loader runs only between steps: the engine closes the gate
//! for the duration of a step (the loader stops at its next [`checkpoint`], a fraction of a
//! millisecond of work apart) and afterwards lends it a share of the step's time
//! (`adapters.loader_step_share_percent`). Inter-token latency then rises by at most that share
//! while loads are pending, and not at all otherwise; a cold load takes about its CPU time divided
//! by the share. Outside steps (an idle engine) the gate is open.

use std::cell::RefCell;
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::time::{Duration, Instant};

/// Longest the engine waits for a running loader to reach a checkpoint before starting a step
/// anyway (a bound, not the usual case: checkpoints are well under a millisecond apart).
const MAX_PARK_WAIT: Duration = Duration::from_millis(5);

#[derive(Debug, Default)]
struct GateState {
    /// The engine is computing: loaders wait at their next checkpoint.
    closed: bool,
    /// Loaders with a job (running or parked).
    busy: usize,
    /// Loaders waiting at a checkpoint.
    parked: usize,
}

/// The gate shared by the engine and its loader thread(s).
#[derive(Debug, Default)]
pub struct LoaderGate {
    state: Mutex<GateState>,
    changed: Condvar,
}

impl LoaderGate {
    fn lock(&self) -> MutexGuard<'_, GateState> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Loader side: a job begins (the loader waits here while the gate is closed).
    pub fn begin_job(&self) {
        self.lock().busy += 1;
        self.checkpoint();
    }

    /// Loader side: the job is done.
    pub fn end_job(&self) {
        let mut s = self.lock();
        s.busy = s.busy.saturating_sub(1);
        self.changed.notify_all();
    }

    /// Loader side: waits while the gate is closed.
    pub fn checkpoint(&self) {
        let mut s = self.lock();
        if !s.closed {
            return;
        }
        s.parked += 1;
        self.changed.notify_all();
        while s.closed {
            s = self.changed.wait(s).unwrap_or_else(|e| e.into_inner());
        }
        s.parked -= 1;
    }

    /// Engine side: closes the gate for a step, waiting (at most [`MAX_PARK_WAIT`]) until every
    /// busy loader has stopped at a checkpoint.
    pub fn close(&self) {
        let mut s = self.lock();
        s.closed = true;
        self.wait_while(s, MAX_PARK_WAIT, |s| s.parked < s.busy);
    }

    /// Engine side: opens the gate after a step and, if a loader has work, waits until it has
    /// had `lend` of time or has finished its jobs.
    pub fn open(&self, lend: Duration) {
        let mut s = self.lock();
        s.closed = false;
        self.changed.notify_all();
        self.wait_while(s, lend, |s| s.busy > 0);
    }

    /// Waits (at most `timeout`) while `condition` holds, then releases the lock.
    fn wait_while(
        &self,
        s: MutexGuard<'_, GateState>,
        timeout: Duration,
        condition: impl FnMut(&mut GateState) -> bool,
    ) {
        let _released = self
            .changed
            .wait_timeout_while(s, timeout, condition)
            .unwrap_or_else(|e| e.into_inner());
    }

    /// Whether a loader has a job.
    pub fn is_busy(&self) -> bool {
        self.lock().busy > 0
    }
}

thread_local! {
    /// The gate of the loader running on this thread (none on other threads).
    static CURRENT: RefCell<Option<Arc<LoaderGate>>> = const { RefCell::new(None) };
}

/// Runs `f` on this thread as a loader job of `gate`: while it runs, [`checkpoint`] waits on
/// `gate` (the loader thread's loads, and an adapter registered through the HTTP endpoint).
pub fn as_loader_job<R>(gate: Arc<LoaderGate>, f: impl FnOnce() -> R) -> R {
    struct Restore {
        gate: Arc<LoaderGate>,
        previous: Option<Arc<LoaderGate>>,
    }
    impl Drop for Restore {
        fn drop(&mut self) {
            self.gate.end_job();
            CURRENT.with(|c| *c.borrow_mut() = self.previous.take());
        }
    }
    let previous = CURRENT.with(|c| c.borrow_mut().replace(gate.clone()));
    gate.begin_job();
    let _restore = Restore { gate, previous };
    f()
}

/// A point in the loading work where the loader may be held while the engine computes: waits
/// while this thread's gate is closed. Does nothing on threads without a gate (an HTTP handler
/// registering an adapter, a test).
pub fn checkpoint() {
    CURRENT.with(|c| {
        if let Some(g) = c.borrow().as_ref() {
            g.checkpoint();
        }
    });
}

/// The engine's side: closes the gate around each step and lends the loader its share.
#[derive(Debug)]
pub struct StepGate {
    gate: Arc<LoaderGate>,
    /// Share of a step's time lent to the loader after it, in percent.
    share_percent: u32,
}

impl StepGate {
    /// Slices `gate` with `share_percent` of each step's time for the loader, or `None` when
    /// slicing is off: a share of 100 or more, or compute threads that leave a core free (the
    /// loader then runs on that core).
    pub fn new(
        gate: Arc<LoaderGate>,
        share_percent: u32,
        compute_threads: usize,
        cores: usize,
    ) -> Option<StepGate> {
        (share_percent < 100 && compute_threads >= cores).then_some(StepGate {
            gate,
            share_percent,
        })
    }

    /// Changes the share lent after each step.
    pub fn set_share_percent(&mut self, percent: u32) {
        self.share_percent = percent;
    }

    /// Runs `step` with the gate closed, then lends the loader its share of the time it took.
    pub fn around<R>(&self, step: impl FnOnce() -> R) -> R {
        let start = Instant::now();
        self.gate.close();
        let _open = Reopen {
            gate: &self.gate,
            start,
            share_percent: self.share_percent,
        };
        step()
    }
}

/// Opens the gate when dropped (also when the step fails or panics).
struct Reopen<'a> {
    gate: &'a LoaderGate,
    start: Instant,
    share_percent: u32,
}

impl Drop for Reopen<'_> {
    fn drop(&mut self) {
        let lend = self.start.elapsed() * self.share_percent / 100;
        let paused = Instant::now();
        self.gate.open(lend);
        crate::metrics::record_lora_loader_lent(paused.elapsed());
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};

    #[test]
    fn closed_gate_holds_the_loader_and_open_releases_it() {
        let gate = Arc::new(LoaderGate::default());
        let progress = Arc::new(AtomicUsize::new(0));
        let stop = Arc::new(AtomicBool::new(false));
        let loader = {
            let (gate, progress, stop) = (gate.clone(), progress.clone(), stop.clone());
            std::thread::spawn(move || {
                as_loader_job(gate, || {
                    while !stop.load(Ordering::Acquire) {
                        progress.fetch_add(1, Ordering::AcqRel);
                        checkpoint();
                    }
                })
            })
        };
        // Let it run, then close: once `close` returns the loader is parked and makes no
        // progress until the gate opens.
        while progress.load(Ordering::Acquire) < 100 {
            std::thread::yield_now();
        }
        gate.close();
        let held = progress.load(Ordering::Acquire);
        std::thread::sleep(Duration::from_millis(30));
        assert_eq!(
            progress.load(Ordering::Acquire),
            held,
            "loader ran while closed"
        );
        // A lend lets it run, and `open` waits out the lend while the loader is busy.
        let t = Instant::now();
        gate.open(Duration::from_millis(20));
        assert!(t.elapsed() >= Duration::from_millis(20));
        assert!(
            progress.load(Ordering::Acquire) > held,
            "loader did not run"
        );
        stop.store(true, Ordering::Release);
        loader.join().unwrap();
        // With no busy loader, closing and opening do not wait.
        let t = Instant::now();
        gate.close();
        gate.open(Duration::from_secs(10));
        assert!(t.elapsed() < Duration::from_secs(5));
        assert!(!gate.is_busy());
    }

    #[test]
    fn a_job_on_another_thread_passes_the_same_gate() {
        let gate = Arc::new(LoaderGate::default());
        gate.close();
        let progress = Arc::new(AtomicUsize::new(0));
        let (go, wait_go) = std::sync::mpsc::channel::<()>();
        let job = {
            let (gate, progress) = (gate.clone(), progress.clone());
            std::thread::spawn(move || {
                as_loader_job(gate, || {
                    checkpoint();
                    progress.fetch_add(1, Ordering::AcqRel);
                });
                // Outside the job the thread has no gate again: a closed gate does not hold it.
                let _ = wait_go.recv();
                checkpoint();
                progress.fetch_add(1, Ordering::AcqRel);
            })
        };
        // The job counts as busy and is held at its checkpoint while the gate is closed.
        while !gate.is_busy() {
            std::thread::yield_now();
        }
        gate.close();
        std::thread::sleep(Duration::from_millis(30));
        assert_eq!(progress.load(Ordering::Acquire), 0, "job ran while closed");
        gate.open(Duration::from_secs(10));
        assert_eq!(progress.load(Ordering::Acquire), 1);
        assert!(!gate.is_busy());
        gate.close();
        go.send(()).unwrap();
        let deadline = Instant::now() + Duration::from_secs(10);
        while progress.load(Ordering::Acquire) < 2 && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(1));
        }
        let after_job = progress.load(Ordering::Acquire);
        gate.open(Duration::ZERO);
        job.join().unwrap();
        assert_eq!(after_job, 2, "the thread kept the gate after its job");
    }

    #[test]
    fn slicing_only_when_compute_takes_every_core() {
        let gate = Arc::new(LoaderGate::default());
        assert!(StepGate::new(gate.clone(), 5, 2, 2).is_some());
        assert!(StepGate::new(gate.clone(), 5, 4, 2).is_some());
        assert!(StepGate::new(gate.clone(), 5, 1, 2).is_none());
        assert!(StepGate::new(gate, 100, 2, 2).is_none());
    }
}
