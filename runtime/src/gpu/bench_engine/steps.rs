//! The bench's engine loop and its step profile. After a step that scheduled nothing (every
//! unfinished request parked on an adapter load) the loop blocks on the engine's own wait for
//! the next load ([`EngineCore::wait_for_adapter_load`]) instead of stepping again, as the
//! server's engine thread blocks on its channel: the bench used to spin through ~23,000 empty
//! steps while 64 cold adapters loaded.

use std::time::{Duration, Instant};

use serde::Serialize;

use super::slot_watch::{BackendCalls, SlotWatch};
use super::{fail, EngineBenchError};
use crate::engine::{Backend, EngineCore, StepStats, IDLE_POLL};

/// Longest single wait for an adapter load; it returns as soon as one lands, so this only sets
/// how often an idle loop re-checks (one empty step per expiry).
const LOAD_WAIT: Duration = Duration::from_secs(1);
/// No step scheduling anything for this long is a stall: the bench fails instead of hanging.
const STALL: Duration = Duration::from_secs(300);

/// What one step did, from its [`StepStats`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum StepKind {
    /// Nothing was scheduled.
    Empty,
    /// More tokens than requests: at least one request ran a prompt chunk (or recomputed
    /// after a preemption). A step whose only prompt work is one-token chunks has a decode's
    /// shape and counts as decode-only.
    Prefill,
    /// One token per scheduled request.
    DecodeOnly,
}

impl StepKind {
    /// Classifies a step from what [`EngineCore::step`] returned.
    pub fn of(s: &StepStats) -> Self {
        if s.num_scheduled_reqs == 0 {
            StepKind::Empty
        } else if s.num_scheduled_tokens > s.num_scheduled_reqs {
            StepKind::Prefill
        } else {
            StepKind::DecodeOnly
        }
    }
}

/// Steps of one kind: how many, and the host wall time spent in [`EngineCore::step`] on them
/// (the step reads its sampled tokens back, so this includes the device time), with the part
/// of it inside the backend's `forward` (queueing the step's work: a graph replay, or every
/// kernel of an eager step) and `sample` (waiting for the device to finish the step, sampling
/// there, reading the tokens back). `wall_s - forward_s - sample_s` is the host's own share:
/// scheduling, batch preparation, outputs.
#[derive(Clone, Copy, Debug, Default, PartialEq, Serialize)]
pub struct StepTime {
    pub steps: u64,
    pub wall_s: f64,
    pub forward_s: f64,
    pub sample_s: f64,
}

impl StepTime {
    fn add(&mut self, wall: Duration, calls: BackendCalls) {
        self.steps += 1;
        self.wall_s += wall.as_secs_f64();
        self.forward_s += calls.forward.as_secs_f64();
        self.sample_s += calls.sample.as_secs_f64();
    }
}

/// Where one run's steps went. `empty + with_prefill + decode_only` steps are `num_steps`.
#[derive(Clone, Copy, Debug, Default, PartialEq, Serialize)]
pub struct StepProfile {
    pub num_steps: u64,
    pub empty: StepTime,
    pub with_prefill: StepTime,
    pub decode_only: StepTime,
    /// Times the loop blocked after an empty step (for an adapter load, or idly) ...
    pub waits: u64,
    /// ... and the wall time it spent blocked, outside the steps.
    pub wait_s: f64,
}

impl StepProfile {
    /// Adds one step of `kind` that took `wall`, `calls` of it inside the backend.
    pub fn record(&mut self, kind: StepKind, wall: Duration, calls: BackendCalls) {
        self.num_steps += 1;
        match kind {
            StepKind::Empty => self.empty.add(wall, calls),
            StepKind::Prefill => self.with_prefill.add(wall, calls),
            StepKind::DecodeOnly => self.decode_only.add(wall, calls),
        }
    }

    fn record_wait(&mut self, wall: Duration) {
        self.waits += 1;
        self.wait_s += wall.as_secs_f64();
    }
}

/// Steps `core` until every request has finished, blocking after each empty step until a
/// parked request's adapter load lands; `label` names the run in progress lines.
pub(super) fn drive<B: Backend>(
    core: &mut EngineCore<SlotWatch<B>>,
    label: &str,
    progress: &mut dyn FnMut(&str),
) -> Result<StepProfile, EngineBenchError> {
    let mut profile = StepProfile::default();
    let mut last_scheduled = Instant::now();
    while core.has_unfinished() {
        let (started, before) = (Instant::now(), core.backend().calls());
        let stats = core.step().map_err(|e| fail("engine step")(&e))?;
        let kind = StepKind::of(&stats);
        let after = core.backend().calls();
        let calls = BackendCalls {
            forward: after.forward.saturating_sub(before.forward),
            sample: after.sample.saturating_sub(before.sample),
        };
        profile.record(kind, started.elapsed(), calls);
        if profile.num_steps.is_multiple_of(100) {
            progress(&format!("{label}: {} steps", profile.num_steps));
        }
        if kind != StepKind::Empty {
            last_scheduled = Instant::now();
            continue;
        }
        if last_scheduled.elapsed() > STALL {
            return Err(fail("engine step")(&format!(
                "no step scheduled anything for {} s ({} requests parked on adapter loads)",
                STALL.as_secs(),
                core.num_parked()
            )));
        }
        let waited = Instant::now();
        if core.num_parked() > 0 {
            core.wait_for_adapter_load(LOAD_WAIT);
        } else {
            // Nothing parked and nothing runnable: wait as the server's engine thread does.
            std::thread::sleep(IDLE_POLL);
        }
        profile.record_wait(waited.elapsed());
    }
    Ok(profile)
}
