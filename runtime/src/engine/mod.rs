//! The engine loop: continuous (iteration-level) batching of many requests over one model.
//!
//! [`EngineCore::step`] is `schedule -> execute -> update`: the scheduler picks the tokens of this
//! iteration under one token budget (decodes, prefill chunks, prefix-cache hits), the
//! [`Executor`] runs them as one flattened batch on a [`Backend`] (CPU or CUDA: the one hardware
//! seam) over its paged KV pool and samples, and the
//! scheduler applies the sampled tokens. Around it, the core streams each request's tokens and
//! text, matches stop strings and aborts requests whose client has gone.
//! [`EngineHandle`] runs the core on its own thread for the async server.

mod backend;
mod cpu_backend;
mod device_slots;
mod engine_core;
mod executor;
mod failure;
#[cfg(feature = "fault-injection")]
mod fault;
mod handle;
mod output;
mod request;
mod step_time;
mod stop;
mod watchdog;

pub use backend::{scored_rows_per_step, Backend, BackendError, RowOutcome, SlotSpec};
pub use cpu_backend::CpuBackend;
pub use device_slots::SlotFill;
pub use engine_core::{EngineCore, EngineError, RunError, StepStats};
pub use executor::{ExecuteResult, Executor, ExecutorError, SeqSampling};
pub use failure::RequestFailure;
#[cfg(feature = "fault-injection")]
pub use fault::{FaultPlan, RequestMatcher, StepLatch};
pub use handle::EngineHandle;
// The GPU bench's engine loop idles as the handle does.
#[cfg(any(feature = "cuda", feature = "gpu-emu"))]
pub(crate) use handle::IDLE_POLL;
pub use output::{Finished, OutputSender, RequestOutput, RequestStream, RequestTimes, StopReason};
pub use request::{
    EngineRequest, RequestError, RequestLimits, MAX_STOP_STRINGS, MAX_STOP_STRING_BYTES,
    MAX_STOP_TOKEN_IDS,
};
pub use step_time::StepTimer;
pub use stop::{StopCheck, StopStrings};
pub use watchdog::Stall;

pub use caduceus_scheduler::{AdapterKey, FinishReason, RequestId, SchedulerConfig};
