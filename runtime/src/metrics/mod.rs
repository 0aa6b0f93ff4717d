//! Prometheus metrics, prefix `caduceus_`. Names follow vLLM's (`vllm:num_requests_waiting` ->
//! `caduceus_num_requests_waiting`, ...) so dashboards and inference gateways can be pointed at
//! them by swapping the prefix; docs/metrics.md lists them.
//!
//! Recorded through the `metrics` facade: the engine thread sets the scheduler gauges after each
//! step, the server records per-request counters and latency histograms.

mod lora;
mod structured;

pub use lora::{
    record_lora_disk_load, record_lora_host, record_lora_info, record_lora_load_failure,
    record_lora_loader_lent, record_lora_loader_restart, record_lora_request,
    record_lora_slot_fill, record_lora_slots, record_lora_unpinned, LORA_EVICTIONS, LORA_INFO,
    LORA_LOADER_LENT, LORA_LOADS, LORA_LOAD_FAILURES, LORA_LOAD_LATENCY, LORA_REQUESTS,
    LORA_RESIDENT, LORA_RESIDENT_BYTES, LORA_TOKENS, LORA_UNPINNED,
};

pub use structured::{
    record_grammar_cache_hit, record_grammar_compile, record_grammar_refused_again, CompileResult,
    GRAMMAR_CACHE_HITS, GRAMMAR_COMPILES, GRAMMAR_COMPILE_TIME, GRAMMAR_REFUSED_AGAIN,
};

use std::sync::OnceLock;
use std::time::Duration;

use caduceus_scheduler::SchedulerStats;
use metrics_exporter_prometheus::{Matcher, PrometheusBuilder, PrometheusHandle};

/// Requests waiting to be scheduled.
pub const NUM_REQUESTS_WAITING: &str = "caduceus_num_requests_waiting";
/// Requests in the running batch.
pub const NUM_REQUESTS_RUNNING: &str = "caduceus_num_requests_running";
/// Fraction of usable KV blocks held by requests (0..=1).
pub const KV_CACHE_USAGE: &str = "caduceus_kv_cache_usage_perc";
/// Prompt tokens looked up in the prefix cache.
pub const PREFIX_CACHE_QUERIES: &str = "caduceus_prefix_cache_queries_total";
/// Prompt tokens found in the prefix cache.
pub const PREFIX_CACHE_HITS: &str = "caduceus_prefix_cache_hits_total";
/// Requests preempted (by recompute) because KV blocks ran out.
pub const NUM_PREEMPTIONS: &str = "caduceus_num_preemptions_total";
/// Engine steps executed.
pub const ENGINE_STEPS: &str = "caduceus_engine_steps_total";
/// Finished HTTP generation requests, labelled by `status` (HTTP code) and `finish_reason`.
pub const REQUESTS: &str = "caduceus_requests_total";
/// Prompt tokens of finished requests.
pub const PROMPT_TOKENS: &str = "caduceus_prompt_tokens_total";
/// Generated tokens of finished requests.
pub const GENERATION_TOKENS: &str = "caduceus_generation_tokens_total";
/// Arrival to first token.
pub const TIME_TO_FIRST_TOKEN: &str = "caduceus_time_to_first_token_seconds";
/// Gap between consecutive output tokens of a request.
pub const INTER_TOKEN_LATENCY: &str = "caduceus_inter_token_latency_seconds";
/// Arrival to last token.
pub const E2E_REQUEST_LATENCY: &str = "caduceus_e2e_request_latency_seconds";
/// Arrival to first schedule.
pub const REQUEST_QUEUE_TIME: &str = "caduceus_request_queue_time_seconds";
/// vLLM's `cache_config_info`: value 1, labels `block_size` (tokens per KV block) and
/// `num_gpu_blocks` (blocks requests can hold), which gateways read to size their view of the
/// cache (llm-d's `cacheInfoSpec`).
pub const CACHE_CONFIG_INFO: &str = "caduceus_cache_config_info";

/// Bucket bounds of every latency histogram. The SLO thresholds of deploy/ (TTFT 2 s, TPOT
/// 250 ms) are bounds, so the share of requests under them is exact.
const LATENCY_BUCKETS: &[f64] = &[
    0.001, 0.0025, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.15, 0.25, 0.5, 0.75, 1.0, 2.0, 2.5,
    5.0, 7.5, 10.0, 20.0, 40.0, 80.0,
];

static HANDLE: OnceLock<Option<PrometheusHandle>> = OnceLock::new();

/// Installs the process-wide Prometheus recorder (once; later calls return the same handle).
/// `None` if another recorder was installed first.
pub fn install() -> Option<PrometheusHandle> {
    HANDLE
        .get_or_init(|| {
            let recorder = PrometheusBuilder::new()
                .set_buckets_for_metric(Matcher::Suffix("_seconds".into()), LATENCY_BUCKETS)
                .ok()?
                .build_recorder();
            let handle = recorder.handle();
            metrics::set_global_recorder(recorder).ok()?;
            describe();
            Some(handle)
        })
        .clone()
}

fn describe() {
    use metrics::{describe_counter, describe_gauge, describe_histogram, Unit};
    describe_gauge!(NUM_REQUESTS_WAITING, "Requests waiting to be scheduled.");
    describe_gauge!(NUM_REQUESTS_RUNNING, "Requests in the running batch.");
    describe_gauge!(
        KV_CACHE_USAGE,
        "Fraction of KV-cache blocks in use (1 = full)."
    );
    describe_counter!(
        PREFIX_CACHE_QUERIES,
        Unit::Count,
        "Prompt tokens looked up in the prefix cache."
    );
    describe_counter!(
        PREFIX_CACHE_HITS,
        Unit::Count,
        "Prompt tokens served from the prefix cache."
    );
    describe_counter!(
        NUM_PREEMPTIONS,
        Unit::Count,
        "Requests preempted because KV blocks ran out."
    );
    describe_counter!(ENGINE_STEPS, Unit::Count, "Engine iterations executed.");
    describe_counter!(
        REQUESTS,
        Unit::Count,
        "Generation requests by HTTP status and finish reason."
    );
    describe_counter!(
        PROMPT_TOKENS,
        Unit::Count,
        "Prompt tokens of finished requests."
    );
    describe_counter!(
        GENERATION_TOKENS,
        Unit::Count,
        "Generated tokens of finished requests."
    );
    describe_histogram!(
        TIME_TO_FIRST_TOKEN,
        Unit::Seconds,
        "Time from arrival to the first token."
    );
    describe_histogram!(
        INTER_TOKEN_LATENCY,
        Unit::Seconds,
        "Time between consecutive output tokens."
    );
    describe_histogram!(
        E2E_REQUEST_LATENCY,
        Unit::Seconds,
        "Time from arrival to the last token."
    );
    describe_histogram!(
        REQUEST_QUEUE_TIME,
        Unit::Seconds,
        "Time from arrival to first schedule."
    );
    describe_gauge!(
        CACHE_CONFIG_INFO,
        "KV-cache geometry: labels block_size and num_gpu_blocks; value 1."
    );
    lora::describe();
    structured::describe();
}

/// The `/metrics` page: the recorder's metrics plus the current LoRA info series.
pub fn render(handle: &PrometheusHandle) -> String {
    let mut page = handle.render();
    lora::render_lora_info(&mut page);
    page
}

/// Publishes the KV-cache geometry (once, when the engine starts).
pub fn record_cache_config(block_size: usize, num_usable_blocks: usize) {
    metrics::gauge!(
        CACHE_CONFIG_INFO,
        "block_size" => block_size.to_string(),
        "num_gpu_blocks" => num_usable_blocks.to_string(),
    )
    .set(1.0);
}

/// Publishes the scheduler's gauges and cumulative counters (called after each engine step).
pub fn record_engine_stats(s: &SchedulerStats) {
    metrics::gauge!(NUM_REQUESTS_WAITING).set(s.num_waiting as f64);
    metrics::gauge!(NUM_REQUESTS_RUNNING).set(s.num_running as f64);
    metrics::gauge!(KV_CACHE_USAGE).set(f64::from(s.kv_usage));
    metrics::counter!(PREFIX_CACHE_QUERIES).absolute(s.prefix_cache_queries);
    metrics::counter!(PREFIX_CACHE_HITS).absolute(s.prefix_cache_hits);
    metrics::counter!(NUM_PREEMPTIONS).absolute(s.num_preemptions);
    metrics::counter!(ENGINE_STEPS).increment(1);
}

/// What the server records when a generation request ends.
#[derive(Clone, Debug, Default)]
pub struct RequestRecord {
    /// HTTP status sent (or that would have been sent, for a client that left).
    pub status: u16,
    /// `stop`, `length`, `abort`, `error` or `none` (rejected before generating).
    pub finish_reason: &'static str,
    /// Prompt tokens.
    pub prompt_tokens: usize,
    /// Generated tokens.
    pub generation_tokens: usize,
    /// Arrival to first token.
    pub ttft: Option<Duration>,
    /// Arrival to first schedule.
    pub queue_time: Option<Duration>,
    /// Arrival to finish.
    pub e2e: Option<Duration>,
}

/// Records one finished request.
pub fn record_request(r: &RequestRecord) {
    metrics::counter!(REQUESTS, "status" => r.status.to_string(), "finish_reason" => r.finish_reason)
        .increment(1);
    metrics::counter!(PROMPT_TOKENS).increment(r.prompt_tokens as u64);
    metrics::counter!(GENERATION_TOKENS).increment(r.generation_tokens as u64);
    if let Some(d) = r.ttft {
        metrics::histogram!(TIME_TO_FIRST_TOKEN).record(d.as_secs_f64());
    }
    if let Some(d) = r.queue_time {
        metrics::histogram!(REQUEST_QUEUE_TIME).record(d.as_secs_f64());
    }
    if let Some(d) = r.e2e {
        metrics::histogram!(E2E_REQUEST_LATENCY).record(d.as_secs_f64());
    }
}

/// Records the gap between two consecutive outputs of one request.
pub fn record_inter_token(gap: Duration) {
    metrics::histogram!(INTER_TOKEN_LATENCY).record(gap.as_secs_f64());
}
