//! Caduceus scheduler: request state machine, paged KV block allocator, prefix cache and
//! batching policy, shaped after vLLM v1 (`Scheduler`, `KvCacheManager`, `BlockPool`). Pure Rust:
//! no tensors, no async, no threads, deterministic.
//!
//! The engine loop is `schedule() -> execute -> update()`: [`Scheduler::schedule`] emits a plain
//! [`SchedulerOutput`], the executor answers with a [`StepOutput`] (one sampled token per request
//! that reached its end), and [`Scheduler::update`] applies it.

mod admission;
mod backlog;
mod block_hash;
mod block_pool;
mod chunk;
mod config;
mod fair_order;
mod fair_room;
mod fair_share;
mod fairness;
mod free_queue;
mod fx;
mod ids;
mod kv_cache_manager;
mod kv_events;
mod output;
mod queue;
mod request;
mod schedule;
mod scheduler;
mod update;

pub use admission::AdmissionLimits;
pub use block_hash::{
    extend_block_hashes, hash_block_tokens, BlockHash, ExtraKeys, BLOCK_HASH_FORMAT,
};
pub use block_pool::{BlockKey, BlockPool, Evict, Hit};
pub use config::{ConfigError, SchedulerConfig};
pub use fairness::{Fairness, VTC_OUTPUT_WEIGHT, VTC_PROMPT_WEIGHT};
pub use free_queue::{FreeBlockQueue, Segment, SegmentedFreeList};
pub use ids::{AdapterKey, BlockId, RequestId};
pub use kv_cache_manager::{ComputedBlocks, KvCacheManager};
pub use kv_events::KvCacheEvent;
pub use output::{
    RequestUpdate, ScheduledData, ScheduledRequest, SchedulerOutput, SchedulerStats, StepOutput,
};
pub use request::{AddRequestError, FinishReason, NewRequest, Request, RequestStatus};
pub use scheduler::Scheduler;
