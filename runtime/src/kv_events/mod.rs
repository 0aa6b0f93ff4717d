//! KV-cache events for prefix-aware routing: the engine drains the scheduler's
//! [`KvCacheEvent`]s after each step and hands them to a [`KvEventPublisher`] thread, which
//! sends them over ZeroMQ in vLLM's wire format (what llm-d's precise prefix-cache scorer
//! decodes) and keeps the recent ones for replay.
//!
//! [`KvCacheEvent`]: caduceus_scheduler::KvCacheEvent

mod publisher;
mod wire;

pub use publisher::{
    KvEventPublisher, KvEventSettings, KvEventSink, KvEventsError, DEFAULT_REPLAY_BUFFER,
};
pub use wire::{encode_batch, WireEvent, REPLAY_END_SEQ};
