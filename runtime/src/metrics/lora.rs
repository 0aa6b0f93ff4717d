//! Adapter (LoRA) metrics: per-adapter traffic, loads by tier, load latency, evictions, resident
//! adapters per tier, and the info gauge LoRA-affinity routers read.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use crate::engine::SlotFill;

/// Finished requests per adapter (`adapter` label).
pub const LORA_REQUESTS: &str = "caduceus_lora_requests_total";
/// Generated tokens per adapter.
pub const LORA_TOKENS: &str = "caduceus_lora_generation_tokens_total";
/// Adapter acquisitions by `source`: `device` (already in a slot), `host` (copied from the host
/// cache into a slot), `disk` (read from disk by the loader).
pub const LORA_LOADS: &str = "caduceus_lora_loads_total";
/// Adapter loads that failed validation or I/O, per adapter.
pub const LORA_LOAD_FAILURES: &str = "caduceus_lora_load_failures_total";
/// Time to read and validate an adapter from disk.
pub const LORA_LOAD_LATENCY: &str = "caduceus_lora_load_seconds";
/// Adapters evicted, by `tier` (`device`, `host`).
pub const LORA_EVICTIONS: &str = "caduceus_lora_evictions_total";
/// Adapters resident, by `tier` (`device`, `host`); `device_slots` is the slot count.
pub const LORA_RESIDENT: &str = "caduceus_lora_resident_adapters";
/// Bytes of adapter weights in the host cache.
pub const LORA_RESIDENT_BYTES: &str = "caduceus_lora_host_cache_bytes";
/// Time the engine paused between steps so the adapter loader could run (the compute threads
/// take every core; see `adapters::gate`).
pub const LORA_LOADER_LENT: &str = "caduceus_lora_loader_lent_microseconds_total";
/// Times the adapter loader thread died and was restarted.
pub const LORA_LOADER_RESTARTS: &str = "caduceus_lora_loader_restarts_total";
/// Adapter images a GPU engine's host tier kept in ordinary memory because its pinned pool was
/// full (their slot fills copy through the staging ring on the engine thread).
pub const LORA_UNPINNED: &str = "caduceus_lora_unpinned_images_total";
/// vLLM's `vllm:lora_requests_info` under our prefix: labels `max_lora`,
/// `running_lora_adapters`, `waiting_lora_adapters` (comma-separated names); value = Unix time of
/// the update, so readers take the newest series.
pub const LORA_INFO: &str = "caduceus_lora_requests_info";

pub(super) fn describe() {
    use metrics::{describe_counter, describe_gauge, describe_histogram, Unit};
    describe_counter!(LORA_REQUESTS, Unit::Count, "Finished requests per adapter.");
    describe_counter!(LORA_TOKENS, Unit::Count, "Generated tokens per adapter.");
    describe_counter!(
        LORA_LOADS,
        Unit::Count,
        "Adapter acquisitions by source tier (device hit, host hit, disk load)."
    );
    describe_counter!(
        LORA_LOAD_FAILURES,
        Unit::Count,
        "Adapter loads that failed, per adapter."
    );
    describe_histogram!(
        LORA_LOAD_LATENCY,
        Unit::Seconds,
        "Time to read and validate an adapter from disk."
    );
    describe_counter!(LORA_EVICTIONS, Unit::Count, "Adapters evicted, by tier.");
    describe_counter!(
        LORA_LOADER_RESTARTS,
        Unit::Count,
        "Times the adapter loader thread died (the load it died on failed) and was restarted."
    );
    describe_counter!(
        LORA_UNPINNED,
        Unit::Count,
        "Adapter images kept in ordinary memory because the pinned pool was full (GPU)."
    );
    describe_gauge!(LORA_RESIDENT, "Adapters resident, by tier.");
    describe_gauge!(
        LORA_RESIDENT_BYTES,
        Unit::Bytes,
        "Bytes of adapter weights in the host cache."
    );
    describe_counter!(
        LORA_LOADER_LENT,
        Unit::Microseconds,
        "Time the engine paused between steps for the adapter loader (compute on every core)."
    );
}

/// A request on `adapter` finished after generating `tokens` tokens.
pub fn record_lora_request(adapter: &str, tokens: usize) {
    let label = adapter.to_owned();
    metrics::counter!(LORA_REQUESTS, "adapter" => label.clone()).increment(1);
    metrics::counter!(LORA_TOKENS, "adapter" => label).increment(tokens as u64);
}

/// An adapter was read from disk and validated in `elapsed`.
pub fn record_lora_disk_load(elapsed: Duration) {
    metrics::counter!(LORA_LOADS, "source" => "disk").increment(1);
    metrics::histogram!(LORA_LOAD_LATENCY, "source" => "disk").record(elapsed.as_secs_f64());
}

/// Loading `adapter` failed.
pub fn record_lora_load_failure(adapter: &str) {
    metrics::counter!(LORA_LOAD_FAILURES, "adapter" => adapter.to_owned()).increment(1);
}

/// The adapter loader thread died and was restarted.
pub fn record_lora_loader_restart() {
    metrics::counter!(LORA_LOADER_RESTARTS).increment(1);
}

/// An adapter image stayed in ordinary memory: the pinned pool had no room.
pub fn record_lora_unpinned() {
    metrics::counter!(LORA_UNPINNED).increment(1);
}

/// The engine paused `lent` between steps for the adapter loader.
pub fn record_lora_loader_lent(lent: Duration) {
    let micros = lent.as_micros() as u64;
    if micros > 0 {
        metrics::counter!(LORA_LOADER_LENT).increment(micros);
    }
}

/// A newly scheduled request found its adapter's slot.
pub fn record_lora_slot_fill(fill: SlotFill) {
    let source = match fill {
        SlotFill::Hit => "device",
        SlotFill::Loaded | SlotFill::Evicted => "host",
    };
    metrics::counter!(LORA_LOADS, "source" => source).increment(1);
    if fill == SlotFill::Evicted {
        metrics::counter!(LORA_EVICTIONS, "tier" => "device").increment(1);
    }
}

/// Device slots and how many hold an adapter.
pub fn record_lora_slots(num_slots: usize, resident: usize) {
    metrics::gauge!(LORA_RESIDENT, "tier" => "device").set(resident as f64);
    metrics::gauge!(LORA_RESIDENT, "tier" => "device_slots").set(num_slots as f64);
}

/// Host cache occupancy after a change, with the number of adapters it just evicted.
pub fn record_lora_host(adapters: usize, bytes: usize, evicted: usize) {
    metrics::gauge!(LORA_RESIDENT, "tier" => "host").set(adapters as f64);
    metrics::gauge!(LORA_RESIDENT_BYTES).set(bytes as f64);
    if evicted > 0 {
        metrics::counter!(LORA_EVICTIONS, "tier" => "host").increment(evicted as u64);
    }
}

/// The current LoRA info series. Rendered by [`render_lora_info`] rather than through the
/// recorder: every change of the label values would otherwise leave one more stale series
/// behind for the life of the process (unbounded with thousands of adapters).
static LORA_INFO_NOW: Mutex<Option<String>> = Mutex::new(None);

/// Publishes the running and waiting adapter names, stamped with the Unix time of the update.
pub fn record_lora_info(max_lora: usize, running: &[Arc<str>], waiting: &[Arc<str>]) {
    let join = |names: &[Arc<str>]| {
        let joined = names.iter().map(|n| &**n).collect::<Vec<_>>().join(",");
        escape_label(&joined)
    };
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0.0, |d| d.as_secs_f64());
    let line = format!(
        "{LORA_INFO}{{max_lora=\"{max_lora}\",running_lora_adapters=\"{}\",waiting_lora_adapters=\"{}\"}} {now}\n",
        join(running),
        join(waiting),
    );
    *LORA_INFO_NOW.lock().unwrap_or_else(|e| e.into_inner()) = Some(line);
}

/// Appends the current LoRA info series (if any was published) to a Prometheus text page.
pub(super) fn render_lora_info(page: &mut String) {
    let now = LORA_INFO_NOW.lock().unwrap_or_else(|e| e.into_inner());
    if let Some(line) = now.as_deref() {
        page.push_str(&format!(
            "# HELP {LORA_INFO} Running and waiting adapters and the slot count (for LoRA-affinity routing); value = Unix time of the update.\n# TYPE {LORA_INFO} gauge\n"
        ));
        page.push_str(line);
    }
}

/// Escapes a Prometheus label value (backslash, double quote, newline).
fn escape_label(value: &str) -> String {
    value
        .replace('\\', "\\\\")
        .replace('"', "\\\"")
        .replace('\n', "\\n")
}
