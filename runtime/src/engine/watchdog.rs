//! The stall watchdog's evidence: when the engine thread last made progress. An engine that is
//! alive but stuck (a step that never returns: a deadlock, a hung device call) serves nobody,
//! yet a liveness check of the thread alone would call it healthy. The engine thread stamps
//! every finished step; `/health` compares the stamp with `server.engine_stall_timeout` and
//! answers 503 while the engine has work and no step finished within it.

use std::fmt;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

/// Progress stamps, written by the engine thread and read by any handle.
#[derive(Debug)]
pub(super) struct Progress {
    epoch: Instant,
    /// The engine has unfinished requests (as of its last report).
    busy: AtomicBool,
    /// Milliseconds since `epoch` of the last finished step, or of the moment work arrived at an
    /// idle engine (idle time is not a stall).
    last_ms: AtomicU64,
    /// A stall is being reported (so the log says it once, and says when it ends).
    reported: AtomicBool,
}

impl Progress {
    pub fn new() -> Self {
        Progress {
            epoch: Instant::now(),
            busy: AtomicBool::new(false),
            last_ms: AtomicU64::new(0),
            reported: AtomicBool::new(false),
        }
    }

    fn now_ms(&self) -> u64 {
        self.epoch.elapsed().as_millis() as u64
    }

    /// Work arrived at an idle engine: the stall clock starts now.
    pub fn became_busy(&self) {
        self.last_ms.store(self.now_ms(), Ordering::Release);
        self.busy.store(true, Ordering::Release);
    }

    /// A step finished; `busy` says whether unfinished requests remain.
    pub fn step_finished(&self, busy: bool) {
        self.last_ms.store(self.now_ms(), Ordering::Release);
        self.busy.store(busy, Ordering::Release);
    }

    /// The stall, if the engine has had work for longer than `timeout` without finishing a
    /// step; `timeout` zero turns the watchdog off. Logs when a stall starts and ends.
    pub fn check(&self, timeout: Duration) -> Option<Stall> {
        if timeout.is_zero() {
            return None;
        }
        let idle_for = self
            .now_ms()
            .saturating_sub(self.last_ms.load(Ordering::Acquire));
        let stalled_for = Duration::from_millis(idle_for);
        let stall = (self.busy.load(Ordering::Acquire) && stalled_for > timeout).then_some(Stall {
            stalled_for,
            timeout,
        });
        let was = self.reported.swap(stall.is_some(), Ordering::AcqRel);
        match (&stall, was) {
            (Some(s), false) => tracing::error!(
                stalled_ms = s.stalled_for.as_millis() as u64,
                "engine stall: {s}; /health answers 503 until steps resume"
            ),
            (None, true) => tracing::info!("engine steps resumed; the stall is over"),
            _ => {}
        }
        stall
    }
}

/// The engine has work but finished no step within the stall timeout.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Stall {
    /// Time since the last finished step (or since work arrived).
    pub stalled_for: Duration,
    /// `server.engine_stall_timeout`.
    pub timeout: Duration,
}

impl fmt::Display for Stall {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "the engine has work but finished no step for {:.1} s (server.engine_stall_timeout \
             is {:.1} s)",
            self.stalled_for.as_secs_f64(),
            self.timeout.as_secs_f64()
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_a_busy_engine_without_steps_is_stalled() {
        let p = Progress::new();
        let timeout = Duration::from_millis(1);
        // Idle for longer than the timeout: not a stall.
        std::thread::sleep(Duration::from_millis(5));
        assert_eq!(p.check(timeout), None);
        // Work arrives: the clock starts then, and runs out without a step.
        p.became_busy();
        std::thread::sleep(Duration::from_millis(5));
        let stall = p
            .check(timeout)
            .expect("a busy engine without steps is stalled");
        assert!(stall.stalled_for > timeout && stall.timeout == timeout);
        assert!(stall.to_string().contains("engine_stall_timeout"));
        // Off with a zero timeout.
        assert_eq!(p.check(Duration::ZERO), None);
        // A step resets it; going idle ends it for good.
        p.step_finished(true);
        assert_eq!(p.check(Duration::from_secs(3600)), None);
        p.step_finished(false);
        std::thread::sleep(Duration::from_millis(5));
        assert_eq!(p.check(timeout), None);
    }
}
