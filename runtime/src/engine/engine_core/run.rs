//! Driving the core on the calling thread to the end of a fixed workload (`generate`, tools,
//! tests), instead of the threaded [`crate::engine::EngineHandle`].

use std::time::Duration;

use caduceus_scheduler::RequestId;
use tokio::sync::mpsc;

use super::{EngineCore, EngineError};
use crate::engine::backend::Backend;
use crate::engine::{EngineRequest, RequestError, RequestOutput};

/// Why [`EngineCore::run_to_end`] stopped early.
#[derive(Debug, thiserror::Error)]
pub enum RunError {
    /// The engine refused request `index` of the workload.
    #[error("request {index}: {source}")]
    Request { index: usize, source: RequestError },
    /// The engine failed.
    #[error(transparent)]
    Engine(#[from] EngineError),
    /// Unfinished requests, yet steps scheduled nothing and no adapter was loading.
    #[error("the engine made no progress in {0} steps with requests unfinished")]
    Stuck(usize),
}

/// Idle steps in a row (nothing scheduled, no adapter loading) that mean the engine is stuck.
const MAX_IDLE_STEPS: usize = 1000;

impl<B: Backend> EngineCore<B> {
    /// Queues `reqs` as requests `0..` and steps until every one has finished, waiting for
    /// adapter loads when nothing else can run; returns each request's outputs in order.
    pub fn run_to_end(
        &mut self,
        reqs: Vec<EngineRequest>,
    ) -> Result<Vec<Vec<RequestOutput>>, RunError> {
        let mut streams = Vec::with_capacity(reqs.len());
        for (index, r) in reqs.into_iter().enumerate() {
            let (tx, rx) = mpsc::unbounded_channel();
            self.add_request(RequestId(index as u64), r, tx)
                .map_err(|source| RunError::Request { index, source })?;
            streams.push(rx);
        }
        let mut idle = 0;
        while self.has_unfinished() {
            let step = self.step()?;
            if step.num_scheduled_reqs > 0 {
                idle = 0;
            } else if self.num_parked() > 0 {
                self.wait_for_adapter_load(Duration::from_millis(50));
            } else {
                idle += 1;
                if idle == MAX_IDLE_STEPS {
                    return Err(RunError::Stuck(idle));
                }
            }
        }
        Ok(streams
            .iter_mut()
            .map(|rx| std::iter::from_fn(|| rx.try_recv().ok()).collect())
            .collect())
    }
}
