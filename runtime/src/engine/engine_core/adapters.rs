//! The engine's side of adapter residency: the loader thread, the requests parked until their
//! adapter is in host memory, the step gate, and the adapter metrics (slots, info gauge).

use std::collections::HashMap;
use std::sync::Arc;

use caduceus_scheduler::RequestId;

use super::{EngineCore, EngineError};
use crate::adapters::{
    loader_threads, AdapterEntry, AdapterService, LoadDone, LoadError, LoaderPool, StepGate,
};
use crate::engine::backend::{Backend, SlotSpec};
use crate::engine::device_slots::SlotFill;
use crate::engine::failure::RequestFailure;
use crate::engine::request::EngineRequest;

/// The engine's side of adapter residency: the shared service, the loader thread and the
/// requests parked until their adapter is in host memory.
pub(super) struct EngineAdapters {
    pub(super) service: Arc<AdapterService>,
    pub(super) loader: LoaderPool,
    /// Holds the loader during steps when the compute threads take every core.
    pub(super) step_gate: Option<StepGate>,
    /// Requests waiting for a disk load, with the registry entry they named.
    pub(super) parked: HashMap<RequestId, (EngineRequest, AdapterEntry)>,
    /// The adapter names last published in the info gauge (running, waiting).
    published: (Vec<Arc<str>>, Vec<Arc<str>>),
}

impl<B: Backend> EngineCore<B> {
    /// Serves the adapters of `service`: allocates its `max_loras` slots (ranks up to its
    /// `max_lora_rank`, filled from its `format`), sets the scheduler's distinct-adapter limit to the
    /// slot count and starts the loader thread. Call before adding requests.
    pub fn with_adapters(mut self, service: Arc<AdapterService>) -> Result<Self, EngineError> {
        let settings = service.settings().clone();
        let format = &settings.format;
        let bytes = self.executor.set_lora(SlotSpec {
            num_slots: settings.max_loras,
            max_rank: settings.limits.max_rank,
            format: format.clone(),
        })?;
        tracing::info!(
            slots = settings.max_loras,
            max_rank = settings.limits.max_rank,
            format = ?format,
            mib = bytes / (1 << 20),
            "adapter slots allocated"
        );
        let mut config = self.scheduler.config().clone();
        config.max_loras = Some(settings.max_loras);
        self.scheduler = Self::scheduler_for(config, self.executor.backend())?;
        if self.kv_events.is_some() {
            self.scheduler.enable_kv_cache_events();
        }
        let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
        let compute_threads = self.executor.backend().host_compute_threads();
        let step_gate = StepGate::new(
            service.loader_gate(),
            settings.loader_share_percent,
            compute_threads,
            cores,
        );
        let loaders = settings
            .loader_threads
            .unwrap_or_else(|| loader_threads(compute_threads, cores));
        tracing::info!(
            threads = loaders,
            cores,
            compute_threads,
            "adapter loader threads"
        );
        if step_gate.is_some() {
            tracing::info!(
                share_percent = settings.loader_share_percent,
                cores,
                "compute threads take every core: the adapter loader runs between steps"
            );
        }
        self.adapters = Some(EngineAdapters {
            loader: LoaderPool::spawn(service.clone(), loaders)?,
            step_gate,
            service,
            parked: HashMap::new(),
            published: Default::default(),
        });
        crate::metrics::record_lora_slots(settings.max_loras, 0);
        Ok(self)
    }

    /// Admits the requests parked on loads that finished; fails those whose load failed (or
    /// whose loader thread died: it is restarted, see [`crate::adapters::AdapterLoader::poll`]).
    pub(super) fn poll_adapter_loads(&mut self) {
        let Some(a) = self.adapters.as_mut() else {
            return;
        };
        let done = a.loader.poll();
        for d in done {
            self.on_load_done(d);
        }
    }

    fn on_load_done(&mut self, d: LoadDone) {
        let Some(a) = self.adapters.as_mut() else {
            return;
        };
        let waiting: Vec<RequestId> = a
            .parked
            .iter()
            .filter(|(_, (_, e))| e.name == d.entry.name && e.version == d.entry.version)
            .map(|(&id, _)| id)
            .collect();
        match &d.result {
            Ok(_) => {
                crate::metrics::record_lora_disk_load(d.elapsed);
                tracing::info!(
                    adapter = %d.entry.name,
                    ms = d.elapsed.as_secs_f64() * 1e3,
                    waiting = waiting.len(),
                    "adapter loaded from disk"
                );
            }
            Err(e) => {
                crate::metrics::record_lora_load_failure(&d.entry.name);
                // A loader death was logged, with its panic, where the handle noticed it.
                if !matches!(e, LoadError::LoaderStopped) {
                    tracing::warn!(adapter = %d.entry.name, error = %e, "adapter could not be loaded");
                }
            }
        }
        for id in waiting {
            let Some((req, _)) = self.adapters.as_mut().and_then(|a| a.parked.remove(&id)) else {
                continue;
            };
            let adapter = d.entry.name.to_string();
            let admitted = match &d.result {
                Ok(loaded) => self
                    .admit(id, req, Some(loaded.clone()))
                    .map_err(RequestFailure::Rejected),
                Err(LoadError::Failed(e)) => Err(RequestFailure::AdapterLoad {
                    adapter,
                    message: self.redact_adapter_paths(e),
                }),
                Err(LoadError::LoaderStopped) => Err(RequestFailure::LoaderStopped { adapter }),
                Err(e @ LoadError::Quarantined { .. }) => Err(RequestFailure::AdapterLoad {
                    adapter,
                    message: e.to_string(),
                }),
            };
            if let Err(failure) = admitted {
                self.finish_failed(id, failure);
            }
        }
    }

    /// An adapter error without the server's paths, for the client.
    fn redact_adapter_paths(&self, message: &str) -> String {
        match &self.adapters {
            Some(a) => a.service.registry().redact(message),
            None => message.to_owned(),
        }
    }

    /// Changes the share of each step's time lent to the adapter loader where it runs between
    /// steps (no effect otherwise). 0 holds the loader during this engine's steps without lending
    /// it time: a benchmark's twin engine, stepped in turn with one that lends.
    pub fn set_loader_share_percent(&mut self, percent: u32) {
        if let Some(g) = self.adapters.as_mut().and_then(|a| a.step_gate.as_mut()) {
            g.set_share_percent(percent);
        }
    }

    /// Adapter loader threads (0 without adapters): several where the backend leaves cores idle
    /// (see [`crate::adapters::loader_pool`]).
    pub fn adapter_loader_threads(&self) -> usize {
        self.adapters.as_ref().map_or(0, |a| a.loader.threads())
    }

    /// Whether the adapter loader runs between this engine's steps (see [`crate::adapters::gate`]).
    pub fn slices_loader(&self) -> bool {
        self.adapters
            .as_ref()
            .is_some_and(|a| a.step_gate.is_some())
    }

    /// Queues a background load of the registered adapter `name` (what a request on a cold
    /// adapter triggers, without the request); false if it is unknown or already loading.
    pub fn prefetch_adapter(&mut self, name: &str) -> bool {
        let Some(a) = self.adapters.as_mut() else {
            return false;
        };
        let Some(entry) = a.service.registry().get(name) else {
            return false;
        };
        a.loader.request(&entry)
    }

    /// Waits up to `timeout` for an adapter load to finish and applies it; for a caller whose
    /// only unfinished requests are parked (nothing can be scheduled until a load lands).
    pub fn wait_for_adapter_load(&mut self, timeout: std::time::Duration) {
        let Some(a) = self.adapters.as_mut() else {
            return;
        };
        if let Some(d) = a.loader.wait(timeout) {
            self.on_load_done(d);
        }
    }

    pub(super) fn note_slot_fills(&mut self, fills: &[SlotFill]) {
        let Some(a) = &mut self.adapters else {
            return;
        };
        for fill in fills {
            crate::metrics::record_lora_slot_fill(*fill);
        }
        if !fills.is_empty() {
            crate::metrics::record_lora_slots(
                a.service.settings().max_loras,
                self.executor.num_resident_adapters(),
            );
        }
    }

    /// Publishes the running and waiting adapter names when they change (the gateway's info
    /// gauge), after the step's finishes so an idle engine shows none.
    pub(super) fn publish_adapter_info(&mut self) {
        let Some(a) = &mut self.adapters else {
            return;
        };
        let mut running: Vec<Arc<str>> = Vec::new();
        let mut waiting: Vec<Arc<str>> = Vec::new();
        for t in self.requests.values() {
            if let Some(name) = &t.adapter {
                let list = if t.times.first_scheduled.is_some() {
                    &mut running
                } else {
                    &mut waiting
                };
                list.push(name.clone());
            }
        }
        for list in [&mut running, &mut waiting] {
            list.sort();
            list.dedup();
        }
        if a.published != (running.clone(), waiting.clone()) {
            crate::metrics::record_lora_info(a.service.settings().max_loras, &running, &waiting);
            a.published = (running, waiting);
        }
    }
}
