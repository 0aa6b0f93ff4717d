//! Caduceus load generator: builds a seeded request schedule up front, replays it over HTTP against any
//! OpenAI-compatible server, and reports vLLM-style serving metrics. It speaks only HTTP and links no
//! other workspace crate, so the same binary measures Caduceus, vLLM or llama.cpp's server.

pub mod arrival;
pub mod cli;
pub mod client;
pub mod compare;
pub mod dataset;
pub mod fuzz;
pub mod fuzz_run;
pub mod lengths;
pub mod metrics;
pub mod mock;
pub mod outcome;
pub mod patients;
pub mod plot;
pub mod popularity;
pub mod ratio;
pub mod report;
pub mod runner;
pub mod schedule;
pub mod setup;
pub mod slo;
pub mod sse;
pub mod stats;
pub mod sweep;
pub mod timeseries;
