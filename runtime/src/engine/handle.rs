//! Runs an [`EngineCore`] on its own thread behind a cheap, cloneable [`EngineHandle`]: requests
//! and aborts go in through a channel, each request's outputs come back on its own stream. The
//! thread blocks while idle and exits when every handle is dropped or on [`EngineHandle::shutdown`].

use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{mpsc, Arc};
use std::thread::JoinHandle;

use caduceus_scheduler::{FinishReason, RequestId, SchedulerStats};
use tokio::sync::mpsc as async_mpsc;

use super::backend::Backend;
use super::engine_core::{EngineCore, EngineError};
use super::failure::RequestFailure;
use super::output::{OutputSender, RequestOutput, RequestStream};
use super::request::{EngineRequest, RequestError, RequestLimits};
use super::watchdog::{Progress, Stall};

/// How long an engine with work but nothing runnable waits before trying again.
pub(crate) const IDLE_POLL: std::time::Duration = std::time::Duration::from_millis(2);

enum Command {
    Add {
        id: RequestId,
        req: Box<EngineRequest>,
        out: OutputSender,
    },
    Abort(RequestId),
    Shutdown,
}

/// State shared between the handles and the engine thread.
struct Shared {
    alive: AtomicBool,
    next_id: AtomicU64,
    /// Requests sent to the engine thread but not yet taken from the channel.
    in_channel: AtomicUsize,
    /// Requests waiting in the scheduler as of the last step.
    waiting: AtomicUsize,
    /// Admission limit on `in_channel + waiting`.
    max_queued: AtomicUsize,
    stats: std::sync::Mutex<SchedulerStats>,
    /// When the engine thread last finished a step (the stall watchdog's evidence).
    progress: Progress,
}

/// A cloneable handle to an engine running on its own thread.
#[derive(Clone)]
pub struct EngineHandle {
    tx: mpsc::Sender<Command>,
    limits: RequestLimits,
    shared: Arc<Shared>,
}

impl EngineHandle {
    /// Starts `core` on a new thread named `caduceus-engine`.
    pub fn spawn<B>(
        core: EngineCore<B>,
    ) -> std::io::Result<(EngineHandle, JoinHandle<Result<(), EngineError>>)>
    where
        B: Backend + Send + 'static,
    {
        let (tx, rx) = mpsc::channel();
        let shared = Arc::new(Shared {
            alive: AtomicBool::new(true),
            next_id: AtomicU64::new(0),
            in_channel: AtomicUsize::new(0),
            waiting: AtomicUsize::new(0),
            max_queued: AtomicUsize::new(usize::MAX),
            stats: std::sync::Mutex::new(core.stats()),
            progress: Progress::new(),
        });
        let handle = EngineHandle {
            tx,
            limits: core.limits(),
            shared: shared.clone(),
        };
        let thread = std::thread::Builder::new()
            .name("caduceus-engine".into())
            .spawn(move || {
                let _alive = AliveGuard(shared.clone());
                // Logged here, before `alive` turns false, so the reason is in the log before
                // the server notices and the process exits.
                let run = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
                    run_loop(core, rx, &shared)
                }));
                match run {
                    Ok(Ok(())) => Ok(()),
                    Ok(Err(e)) => {
                        tracing::error!(error = %e, "the engine thread stopped with an error");
                        Err(e)
                    }
                    Err(panic) => {
                        let message = panic
                            .downcast_ref::<&str>()
                            .map(|s| s.to_string())
                            .or_else(|| panic.downcast_ref::<String>().cloned())
                            .unwrap_or_else(|| "a non-string panic payload".into());
                        tracing::error!(panic = %message, "the engine thread panicked");
                        std::panic::resume_unwind(panic)
                    }
                }
            })?;
        Ok((handle, thread))
    }

    /// Checks and queues a request; its outputs arrive on the returned stream. Dropping the
    /// stream aborts the request.
    pub fn submit(&self, req: EngineRequest) -> Result<RequestStream, RequestError> {
        self.limits.check(&req)?;
        if !self.is_alive() {
            return Err(RequestError::EngineStopped);
        }
        let limit = self.shared.max_queued.load(Ordering::Relaxed);
        let queued = self.shared.in_channel.fetch_add(1, Ordering::AcqRel)
            + self.shared.waiting.load(Ordering::Acquire);
        if queued >= limit {
            self.shared.in_channel.fetch_sub(1, Ordering::AcqRel);
            return Err(RequestError::QueueFull { limit });
        }
        let id = RequestId(self.shared.next_id.fetch_add(1, Ordering::Relaxed));
        let (out, rx) = async_mpsc::unbounded_channel::<RequestOutput>();
        let sent = self.tx.send(Command::Add {
            id,
            req: Box::new(req),
            out,
        });
        if sent.is_err() {
            self.shared.in_channel.fetch_sub(1, Ordering::AcqRel);
            return Err(RequestError::EngineStopped);
        }
        Ok(RequestStream::new(id, rx))
    }

    /// Bounds the waiting queue: once this many requests wait, [`Self::submit`] answers
    /// [`RequestError::QueueFull`] at once.
    pub fn set_max_queued(&self, limit: usize) {
        self.shared.max_queued.store(limit, Ordering::Relaxed);
    }

    /// Requests waiting for their first schedule (as of the last step, plus those in transit).
    pub fn num_queued(&self) -> usize {
        self.shared.in_channel.load(Ordering::Acquire) + self.shared.waiting.load(Ordering::Acquire)
    }

    /// Aborts a request wherever it is (a no-op once it finished).
    pub fn abort(&self, id: RequestId) {
        let _ = self.tx.send(Command::Abort(id));
    }

    /// Asks the engine thread to stop after its current step; unfinished requests are aborted.
    pub fn shutdown(&self) {
        let _ = self.tx.send(Command::Shutdown);
    }

    /// Whether the engine thread is running.
    pub fn is_alive(&self) -> bool {
        self.shared.alive.load(Ordering::Acquire)
    }

    /// The limits requests are checked against.
    pub fn limits(&self) -> RequestLimits {
        self.limits
    }

    /// The stall, if the engine has had work for longer than `timeout` without finishing a
    /// step (`server.engine_stall_timeout`; zero is off). Logs when a stall starts and ends.
    pub fn stall(&self, timeout: std::time::Duration) -> Option<Stall> {
        self.shared.progress.check(timeout)
    }

    /// Scheduler statistics as of the end of the last step.
    pub fn stats(&self) -> SchedulerStats {
        self.shared
            .stats
            .lock()
            .map(|s| s.clone())
            .unwrap_or_default()
    }
}

/// Marks the engine dead when its thread ends, normally or by panic.
struct AliveGuard(Arc<Shared>);

impl Drop for AliveGuard {
    fn drop(&mut self) {
        self.0.alive.store(false, Ordering::Release);
    }
}

fn run_loop<B: Backend>(
    mut core: EngineCore<B>,
    rx: mpsc::Receiver<Command>,
    shared: &Shared,
) -> Result<(), EngineError> {
    let config = core.scheduler_config();
    crate::metrics::record_cache_config(config.block_size, config.num_usable_blocks());
    loop {
        // Block while idle; otherwise take whatever arrived since the last step.
        if !core.has_unfinished() {
            match rx.recv() {
                Ok(cmd) => {
                    shared.progress.became_busy();
                    if !apply(&mut core, cmd, shared) {
                        return Ok(());
                    }
                }
                Err(_) => return Ok(()),
            }
        }
        while let Ok(cmd) = rx.try_recv() {
            if !apply(&mut core, cmd, shared) {
                return Ok(());
            }
        }
        let step = core.step()?;
        shared.progress.step_finished(core.has_unfinished());
        let stats = core.stats();
        shared.waiting.store(stats.num_waiting, Ordering::Release);
        crate::metrics::record_engine_stats(&stats);
        if let Ok(mut s) = shared.stats.lock() {
            *s = stats;
        }
        if step.num_scheduled_reqs == 0 {
            // Nothing could run (e.g. every waiting request awaits a resource): wait for news
            // instead of spinning.
            match rx.recv_timeout(IDLE_POLL) {
                Ok(cmd) => {
                    if !apply(&mut core, cmd, shared) {
                        return Ok(());
                    }
                }
                Err(mpsc::RecvTimeoutError::Timeout) => {}
                Err(mpsc::RecvTimeoutError::Disconnected) => return Ok(()),
            }
        }
    }
}

/// Applies one command; false means shut down.
fn apply<B: Backend>(core: &mut EngineCore<B>, cmd: Command, shared: &Shared) -> bool {
    match cmd {
        Command::Add { id, req, out } => {
            shared.in_channel.fetch_sub(1, Ordering::AcqRel);
            shared.waiting.fetch_add(1, Ordering::AcqRel);
            if let Err(e) = core.add_request(id, *req, out.clone()) {
                // Checked by the handle already; only a pool or id clash can land here.
                tracing::warn!(request_id = id.0, error = %e, "request rejected by the engine");
                let failure = Some(RequestFailure::Rejected(e));
                let _ = out.send(RequestOutput::failed_with(FinishReason::Error, failure));
            }
            true
        }
        Command::Abort(id) => {
            core.abort_request(id, FinishReason::Abort);
            true
        }
        Command::Shutdown => false,
    }
}
