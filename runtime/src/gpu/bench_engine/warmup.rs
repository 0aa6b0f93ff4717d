//! Warming the adapters before the clock starts: one one-token request per adapter runs
//! through the engine's own path, so each adapter is read from disk into the host cache (the
//! loader thread) and copied into a device slot (the executor's first schedule of it). A
//! prefetch ([`EngineCore::prefetch_adapter`]) would stop at the host cache: slots are filled
//! only when a request on the adapter is scheduled. With one slot per adapter nothing is
//! evicted afterwards, so the timed run fills no slot.

use std::sync::Arc;
use std::time::Instant;

use caduceus_scheduler::{FinishReason, RequestId};
use tokio::sync::mpsc;

use super::slot_watch::SlotWatch;
use super::steps::{drive, StepProfile};
use super::{fail, EngineBenchError};
use crate::engine::{Backend, EngineCore, EngineRequest, RequestOutput};

/// What warming the adapters took.
pub(super) struct Warmup {
    /// Seconds from the first warm-up request to the last one's end.
    pub seconds: f64,
    pub steps: StepProfile,
}

/// Runs one one-token request (a one-token prompt) on each of `names`, with request ids from
/// `first_id`, until all have finished; fails if any did not end normally.
pub(super) fn warm_up<B: Backend>(
    core: &mut EngineCore<SlotWatch<B>>,
    names: &[Arc<str>],
    first_id: u64,
    progress: &mut dyn FnMut(&str),
) -> Result<Warmup, EngineBenchError> {
    progress(&format!("engine: warming {} adapters", names.len()));
    let start = Instant::now();
    let mut streams = Vec::with_capacity(names.len());
    for (k, name) in names.iter().enumerate() {
        let mut req = EngineRequest::new(vec![1], 1);
        req.ignore_eos = true;
        req.detokenize = false;
        req.adapter = Some(name.clone());
        let (tx, rx) = mpsc::unbounded_channel();
        core.add_request(RequestId(first_id + k as u64), req, tx)
            .map_err(|e| fail("adding a warm-up request")(&e))?;
        streams.push((name, rx));
    }
    let steps = drive(core, "engine warm-up", progress)?;
    for (name, mut rx) in streams {
        let mut last = None;
        while let Ok(out) = rx.try_recv() {
            last = Some(out);
        }
        check_finished(name, last)?;
    }
    Ok(Warmup {
        seconds: start.elapsed().as_secs_f64(),
        steps,
    })
}

/// A warm-up request's last output must end it at its one token (`Length`).
fn check_finished(name: &str, last: Option<RequestOutput>) -> Result<(), EngineBenchError> {
    let finished = last.and_then(|o| o.finished);
    match finished {
        Some(f) if f.reason == FinishReason::Length => Ok(()),
        Some(f) => Err(fail("adapter warm-up")(&format!(
            "{name}: ended {:?}{}",
            f.reason,
            f.error.map_or(String::new(), |e| format!(": {e}"))
        ))),
        None => Err(fail("adapter warm-up")(&format!("{name}: never finished"))),
    }
}
