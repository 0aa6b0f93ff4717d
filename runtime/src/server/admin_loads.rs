//! The bound on concurrent `POST /v1/load_lora_adapter` work (`server.max_concurrent_adapter_loads`):
//! each load reads and validates a whole adapter on the blocking pool, so a burst of admin calls
//! could otherwise take every blocking thread and the disk from tokenization and the adapter
//! loader. Up to `max` loads run at once, as many again wait their turn, and beyond that the
//! caller gets 429 at once.

use std::sync::Arc;

use tokio::sync::{OwnedSemaphorePermit, Semaphore};

use super::protocol::ApiError;

/// Admission for adapter loads; cheap to share.
#[derive(Debug)]
pub struct AdapterLoadLimit {
    max: usize,
    /// Loads running or waiting (`2 * max` permits).
    admitted: Arc<Semaphore>,
    /// Loads running (`max` permits).
    running: Arc<Semaphore>,
}

/// A load allowed to run; dropping it lets the next one in.
#[derive(Debug)]
pub struct LoadPermit {
    _running: OwnedSemaphorePermit,
    _admitted: OwnedSemaphorePermit,
}

impl AdapterLoadLimit {
    /// `max` loads at once (at least 1), `max` more waiting.
    pub fn new(max: usize) -> Self {
        let max = max.max(1);
        AdapterLoadLimit {
            max,
            admitted: Arc::new(Semaphore::new(2 * max)),
            running: Arc::new(Semaphore::new(max)),
        }
    }

    /// Loads allowed to run at once.
    pub fn max(&self) -> usize {
        self.max
    }

    /// Loads running or waiting now.
    pub fn num_admitted(&self) -> usize {
        2 * self.max - self.admitted.available_permits()
    }

    /// Waits for a turn, or answers 429 at once when `max` loads already wait.
    pub async fn enter(&self) -> Result<LoadPermit, ApiError> {
        let admitted = self.admitted.clone().try_acquire_owned().map_err(|_| {
            let mut e = ApiError::rate_limited(1);
            e.body.error.message = format!(
                "{} adapter loads are running and {} more are waiting \
                     (server.max_concurrent_adapter_loads = {}); retry after 1 s",
                self.max, self.max, self.max
            );
            e
        })?;
        let running = self
            .running
            .clone()
            .acquire_owned()
            .await
            .map_err(|_| ApiError::internal())?;
        Ok(LoadPermit {
            _running: running,
            _admitted: admitted,
        })
    }
}

impl Default for AdapterLoadLimit {
    /// The config default: two loads at once.
    fn default() -> Self {
        AdapterLoadLimit::new(2)
    }
}
