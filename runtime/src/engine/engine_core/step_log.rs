//! The step log: what each step did, at debug level, and each request's chunk at trace level
//! (ids and counts only, never text).

use caduceus_scheduler::{ScheduledData, SchedulerOutput};

/// What a step did, at debug level (`RUST_LOG=caduceus::step=debug`), and each request's chunk
/// at trace level: ids and counts only, never text.
pub(super) fn log_step(sched: &SchedulerOutput, elapsed: std::time::Duration) {
    if !tracing::enabled!(target: "caduceus::step", tracing::Level::DEBUG) {
        return;
    }
    let admitted = sched
        .scheduled
        .iter()
        .filter(|r| matches!(r.data, ScheduledData::New { .. }))
        .count();
    tracing::debug!(
        target: "caduceus::step",
        step = sched.step,
        reqs = sched.scheduled.len(),
        tokens = sched.total_num_scheduled_tokens,
        admitted,
        preempted = sched.preempted_ids.len(),
        ms = elapsed.as_secs_f64() * 1e3,
        "step"
    );
    if tracing::enabled!(target: "caduceus::step", tracing::Level::TRACE) {
        for r in &sched.scheduled {
            tracing::trace!(
                target: "caduceus::step",
                step = sched.step,
                id = r.id.0,
                computed = r.num_computed_tokens,
                scheduled = r.num_scheduled_tokens,
                adapter = match &r.data {
                    ScheduledData::New { adapter, .. } => adapter.map_or(-1, |a| i64::from(a.id)),
                    ScheduledData::Cached { .. } => -2,
                },
                "chunk"
            );
        }
    }
}
