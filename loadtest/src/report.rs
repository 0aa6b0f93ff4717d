//! The JSON report of one run (metric names as in vLLM's `bench serve` result file, at the top level) and
//! the summary table printed at the end.

use crate::metrics::{Metrics, PopularitySplit, LATENCIES};
use crate::outcome::RequestOutcome;
use crate::runner::RunResult;
use crate::slo::Slo;
use crate::stats::Summary;
use crate::timeseries::{time_series, Second};
use serde::Serialize;
use std::fmt::Write as _;

/// What was run, enough to repeat it.
#[derive(Debug, Clone, Serialize)]
pub struct Plan {
    pub url: String,
    pub endpoint: String,
    pub model_id: String,
    pub seed: u64,
    pub num_prompts: usize,
    /// Requests/s, or "inf"; absent in closed loop.
    pub request_rate: Option<String>,
    pub burstiness: f64,
    pub ramp_s: f64,
    /// Closed-loop clients.
    pub max_concurrency: Option<usize>,
    pub dataset: String,
    pub num_adapters: usize,
    pub adapter_dist: Option<String>,
    pub output_len: String,
    pub ignore_eos: bool,
    pub slo: Option<Slo>,
    pub schedule_hash: String,
}

/// How faithfully the harness kept the schedule.
#[derive(Debug, Clone, Serialize)]
pub struct Harness {
    /// Open loop: actual minus scheduled send time.
    pub mean_send_lag_ms: f64,
    pub max_send_lag_ms: f64,
    pub not_sent: usize,
    pub interrupted: bool,
    pub warmup_requests: usize,
}

#[derive(Debug, Clone, Serialize)]
pub struct Report {
    pub tool: String,
    #[serde(flatten)]
    pub plan: Plan,
    #[serde(flatten)]
    pub metrics: Metrics,
    pub by_popularity: Option<PopularitySplit>,
    pub harness: Harness,
    pub time_series: Vec<Second>,
    /// Per-request records (`--save-detailed`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub requests: Option<Vec<RequestOutcome>>,
}

/// Options of the analysis (not of the load).
#[derive(Debug, Clone, Copy)]
pub struct Analysis<'a> {
    pub slo: Option<&'a Slo>,
    pub head_fraction: f64,
    pub num_adapters: usize,
    pub open_loop: bool,
    pub warmup_requests: usize,
    pub detailed: bool,
}

impl Report {
    pub fn build(plan: Plan, run: &RunResult, a: Analysis<'_>) -> Self {
        let metrics = Metrics::compute(&run.outcomes, run.duration_s, a.slo);
        let by_popularity = crate::metrics::split_by_popularity(
            &run.outcomes,
            a.num_adapters,
            a.head_fraction,
            run.duration_s,
            a.slo,
        );
        let lags: Vec<f64> = if a.open_loop {
            run.outcomes
                .iter()
                .map(|o| (o.start_s - o.scheduled_s).max(0.0) * 1000.0)
                .collect()
        } else {
            Vec::new()
        };
        let lag = Summary::of(&lags);
        Self {
            tool: format!("caduceus-loadtest {}", env!("CARGO_PKG_VERSION")),
            plan,
            metrics,
            by_popularity,
            harness: Harness {
                mean_send_lag_ms: lag.mean,
                max_send_lag_ms: lag.max,
                not_sent: run.not_sent,
                interrupted: run.interrupted,
                warmup_requests: a.warmup_requests,
            },
            time_series: time_series(&run.outcomes, 1.0),
            requests: a.detailed.then(|| run.outcomes.clone()),
        }
    }

    /// The end-of-run table.
    pub fn summary(&self) -> String {
        let m = &self.metrics;
        let p = &self.plan;
        let mut s = String::new();
        let line = |s: &mut String, k: &str, v: String| {
            let _ = writeln!(s, "{k:<40}{v:>12}");
        };
        let _ = writeln!(s, "{:=^64}", " Serving Benchmark Result ");
        line(&mut s, "Schedule hash:", p.schedule_hash.clone());
        line(&mut s, "Successful requests:", m.completed.to_string());
        line(&mut s, "Failed requests:", m.failed.to_string());
        line(
            &mut s,
            "Benchmark duration (s):",
            format!("{:.2}", m.duration),
        );
        line(
            &mut s,
            "Total input tokens:",
            m.total_input_tokens.to_string(),
        );
        line(
            &mut s,
            "Total generated tokens:",
            m.total_output_tokens.to_string(),
        );
        line(
            &mut s,
            "Request throughput (req/s):",
            format!("{:.2}", m.request_throughput),
        );
        if let (Some(g), Some(a)) = (m.request_goodput, m.slo_attainment) {
            line(&mut s, "Request goodput (req/s):", format!("{g:.2}"));
            line(
                &mut s,
                "Requests meeting the SLO (%):",
                format!("{:.1}", a * 100.0),
            );
        }
        line(
            &mut s,
            "Output token throughput (tok/s):",
            format!("{:.2}", m.output_throughput),
        );
        line(
            &mut s,
            "Total token throughput (tok/s):",
            format!("{:.2}", m.total_token_throughput),
        );
        let _ = writeln!(s, "{:-^64}", " Latency (ms) ");
        let _ = writeln!(
            s,
            "{:<8}{:>11}{:>11}{:>11}{:>11}{:>11}",
            "", "mean", "median", "p90", "p99", "max"
        );
        for k in LATENCIES {
            let l = m.latency(k);
            let _ = writeln!(
                s,
                "{:<8}{:>11.2}{:>11.2}{:>11.2}{:>11.2}{:>11.2}",
                k.to_uppercase(),
                l.mean,
                l.median,
                l.p90,
                l.p99,
                l.max
            );
        }
        if let Some(split) = &self.by_popularity {
            let _ = writeln!(
                s,
                "{:-^64}",
                format!(
                    " Adapters: head = top {} of {} ",
                    split.head_adapters, split.num_adapters
                )
            );
            let _ = writeln!(
                s,
                "{:<8}{:>9}{:>8}{:>11}{:>14}{:>14}",
                "", "ok", "failed", "out tok/s", "median TTFT", "p99 TTFT"
            );
            for (name, h) in [("head", &split.head), ("tail", &split.tail)] {
                let t = h.latency("ttft");
                let _ = writeln!(
                    s,
                    "{name:<8}{:>9}{:>8}{:>11.1}{:>14.2}{:>14.2}",
                    h.completed, h.failed, h.output_throughput, t.median, t.p99
                );
            }
        }
        if !m.errors.is_empty() {
            let _ = writeln!(s, "{:-^64}", " Errors ");
            for (k, v) in &m.errors {
                line(&mut s, &format!("{k}:"), v.to_string());
            }
        }
        let h = &self.harness;
        if h.max_send_lag_ms > 0.0 || h.not_sent > 0 || h.interrupted {
            let _ = writeln!(s, "{:-^64}", " Harness ");
            line(
                &mut s,
                "Mean / max send lag (ms):",
                format!("{:.1} / {:.1}", h.mean_send_lag_ms, h.max_send_lag_ms),
            );
            line(&mut s, "Scheduled but not sent:", h.not_sent.to_string());
            if h.interrupted {
                line(&mut s, "Interrupted:", "yes".into());
            }
        }
        let _ = writeln!(s, "{:=<64}", "");
        s
    }
}
