//! Caduceus runtime: model engine (weights, tokenizer, chat template, batched forward), sampler,
//! and the `caduceus` command-line entry points.
pub mod adapters;
pub mod chat_template;
pub mod cli;
pub mod config;
pub mod engine;
pub mod generate;
pub mod gpu;
pub mod kv_cache;
pub mod kv_events;
pub mod metrics;
pub mod model;
pub mod sampling;
pub mod server;
pub mod structured;
pub mod tokenizer;
