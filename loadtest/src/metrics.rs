//! Serving metrics as vLLM's `bench serve` defines them, computed from request outcomes:
//!
//! - TTFT: send to the first chunk with non-empty text.
//! - TPOT: per request, (E2E - TTFT) / (output tokens - 1), for requests with more than one token.
//! - ITL: every gap between successive non-empty chunks, pooled over requests.
//! - E2EL: send to the end of the stream.
//! - Throughputs: completed requests, output tokens and input + output tokens per second of run duration
//!   (start of the run to the last completion). Goodput: requests meeting every SLO per second.
//!
//! Latency summaries cover successful requests only; failures are counted by kind.

use crate::outcome::RequestOutcome;
use crate::slo::Slo;
use crate::stats::Summary;
use serde::ser::SerializeMap;
use serde::{Serialize, Serializer};
use std::collections::BTreeMap;

/// The latency metrics, in the order vLLM prints them.
pub const LATENCIES: [&str; 4] = ["ttft", "tpot", "itl", "e2el"];

#[derive(Debug, Clone, PartialEq, Default)]
pub struct Metrics {
    pub completed: usize,
    pub failed: usize,
    pub duration: f64,
    pub total_input_tokens: u64,
    pub total_output_tokens: u64,
    pub request_throughput: f64,
    pub output_throughput: f64,
    pub total_token_throughput: f64,
    /// Requests meeting every SLO per second; `None` without an SLO.
    pub request_goodput: Option<f64>,
    /// Share of all requests (failures included) meeting every SLO.
    pub slo_attainment: Option<f64>,
    /// Milliseconds, keyed by [`LATENCIES`].
    pub latency_ms: BTreeMap<&'static str, Summary>,
    pub errors: BTreeMap<String, usize>,
}

impl Metrics {
    pub fn compute(outcomes: &[RequestOutcome], duration_s: f64, slo: Option<&Slo>) -> Self {
        let ok: Vec<&RequestOutcome> = outcomes.iter().filter(|o| o.ok()).collect();
        let mut errors = BTreeMap::new();
        for o in outcomes {
            if let Some(e) = o.error {
                *errors.entry(e.to_string()).or_insert(0) += 1;
            }
        }
        let total_input_tokens: u64 = ok.iter().map(|o| o.prompt_tokens.unwrap_or(0)).sum();
        let total_output_tokens: u64 = ok.iter().map(|o| o.output_tokens).sum();
        let per_s = |x: f64| {
            if duration_s > 0.0 {
                x / duration_s
            } else {
                0.0
            }
        };
        let ttft: Vec<f64> = ok.iter().filter_map(|o| o.ttft_s).collect();
        let tpot: Vec<f64> = ok.iter().filter_map(|o| o.tpot_s()).collect();
        let itl: Vec<f64> = ok.iter().flat_map(|o| o.itl_s.iter().copied()).collect();
        let e2el: Vec<f64> = ok.iter().map(|o| o.e2el_s).collect();
        let latency_ms = LATENCIES
            .into_iter()
            .zip([ttft, tpot, itl, e2el])
            .map(|(k, v)| (k, Summary::of(&v).scaled(1000.0)))
            .collect();
        let good = slo
            .filter(|s| !s.is_empty())
            .map(|s| outcomes.iter().filter(|o| s.met_by(o)).count());
        Self {
            completed: ok.len(),
            failed: outcomes.len() - ok.len(),
            duration: duration_s,
            total_input_tokens,
            total_output_tokens,
            request_throughput: per_s(ok.len() as f64),
            output_throughput: per_s(total_output_tokens as f64),
            total_token_throughput: per_s((total_input_tokens + total_output_tokens) as f64),
            request_goodput: good.map(|g| per_s(g as f64)),
            slo_attainment: good.map(|g| {
                if outcomes.is_empty() {
                    0.0
                } else {
                    g as f64 / outcomes.len() as f64
                }
            }),
            latency_ms,
            errors,
        }
    }

    /// Every numeric metric under its vLLM-style name (`mean_ttft_ms`, `p99_itl_ms`, ...), for the JSON
    /// report, the comparison table and `--gate` expressions.
    pub fn flat(&self) -> Vec<(String, f64)> {
        let mut out: Vec<(String, f64)> = vec![
            ("completed".into(), self.completed as f64),
            ("failed".into(), self.failed as f64),
            ("duration".into(), self.duration),
            ("total_input_tokens".into(), self.total_input_tokens as f64),
            (
                "total_output_tokens".into(),
                self.total_output_tokens as f64,
            ),
            ("request_throughput".into(), self.request_throughput),
            ("output_throughput".into(), self.output_throughput),
            ("total_token_throughput".into(), self.total_token_throughput),
        ];
        if let Some(g) = self.request_goodput {
            out.push(("request_goodput".into(), g));
        }
        if let Some(a) = self.slo_attainment {
            out.push(("slo_attainment".into(), a));
        }
        for (k, s) in &self.latency_ms {
            for (stat, v) in [
                ("mean", s.mean),
                ("median", s.median),
                ("std", s.std),
                ("p90", s.p90),
                ("p99", s.p99),
                ("max", s.max),
            ] {
                out.push((format!("{stat}_{k}_ms"), v));
            }
        }
        out
    }

    pub fn get(&self, name: &str) -> Option<f64> {
        self.flat()
            .into_iter()
            .find(|(k, _)| k == name)
            .map(|(_, v)| v)
    }

    pub fn latency(&self, name: &str) -> Summary {
        self.latency_ms.get(name).copied().unwrap_or_default()
    }
}

impl Serialize for Metrics {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        let flat = self.flat();
        let mut map = s.serialize_map(Some(flat.len() + 1))?;
        for (k, v) in &flat {
            if matches!(
                k.as_str(),
                "completed" | "failed" | "total_input_tokens" | "total_output_tokens"
            ) {
                map.serialize_entry(k, &(*v as u64))?;
            } else {
                map.serialize_entry(k, v)?;
            }
        }
        map.serialize_entry("errors", &self.errors)?;
        map.end()
    }
}

/// Metrics for the most popular adapters and for the rest, over the same run duration.
#[derive(Debug, Clone, Serialize)]
pub struct PopularitySplit {
    /// Adapters with rank below this are the head.
    pub head_adapters: usize,
    pub num_adapters: usize,
    pub head: Metrics,
    pub tail: Metrics,
}

/// Splits at the top `head_fraction` of adapters (at least one). `None` when requests go to the base
/// model.
pub fn split_by_popularity(
    outcomes: &[RequestOutcome],
    num_adapters: usize,
    head_fraction: f64,
    duration_s: f64,
    slo: Option<&Slo>,
) -> Option<PopularitySplit> {
    if num_adapters == 0 {
        return None;
    }
    let head_adapters =
        ((num_adapters as f64 * head_fraction).ceil() as usize).clamp(1, num_adapters);
    let (head, tail): (Vec<RequestOutcome>, Vec<RequestOutcome>) = outcomes
        .iter()
        .cloned()
        .partition(|o| o.adapter_rank.is_some_and(|r| r < head_adapters));
    Some(PopularitySplit {
        head_adapters,
        num_adapters,
        head: Metrics::compute(&head, duration_s, slo),
        tail: Metrics::compute(&tail, duration_s, slo),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::outcome::ErrorKind;

    fn o(index: usize, rank: Option<usize>, ttft: f64, itl: &[f64], tokens: u64) -> RequestOutcome {
        RequestOutcome {
            index,
            model: "m".into(),
            adapter_rank: rank,
            scheduled_s: 0.0,
            start_s: index as f64,
            ttft_s: Some(ttft),
            itl_s: itl.to_vec(),
            e2el_s: ttft + itl.iter().sum::<f64>(),
            prompt_tokens: Some(100),
            output_tokens: tokens,
            error: None,
        }
    }

    #[test]
    fn hand_computed_metrics() {
        let outs = vec![
            o(0, Some(0), 0.1, &[0.02, 0.04], 3), // e2el 0.16, tpot 0.03
            o(1, Some(1), 0.3, &[0.01], 2),       // e2el 0.31, tpot 0.01
            RequestOutcome {
                error: Some(ErrorKind::Status(503)),
                ..o(2, Some(3), 0.0, &[], 0)
            },
            RequestOutcome {
                error: Some(ErrorKind::Timeout),
                ..o(3, Some(3), 0.0, &[], 0)
            },
        ];
        let slo: Slo = "ttft=200ms".parse().unwrap();
        let m = Metrics::compute(&outs, 2.0, Some(&slo));
        assert_eq!((m.completed, m.failed), (2, 2));
        assert_eq!((m.total_input_tokens, m.total_output_tokens), (200, 5));
        assert_eq!(m.request_throughput, 1.0);
        assert_eq!(m.output_throughput, 2.5);
        assert_eq!(m.total_token_throughput, 102.5);
        assert_eq!(m.request_goodput, Some(0.5));
        assert_eq!(m.slo_attainment, Some(0.25));
        let close = |a: f64, b: f64| (a - b).abs() < 1e-9;
        assert!(close(m.latency("ttft").mean, 200.0));
        assert!(close(m.latency("tpot").mean, 20.0));
        // ITL pooled: [20, 40, 10] ms -> median 20, mean 23.33
        assert!(close(m.latency("itl").median, 20.0));
        assert!(close(m.latency("itl").mean, 70.0 / 3.0));
        assert!(close(m.latency("e2el").max, 310.0));
        assert_eq!(m.errors.get("http_503"), Some(&1));
        assert_eq!(m.errors.get("timeout"), Some(&1));
        assert!(close(m.get("p90_ttft_ms").unwrap(), 280.0));
        assert_eq!(m.get("nonexistent"), None);

        let json = serde_json::to_value(&m).unwrap();
        assert_eq!(json["completed"], 2);
        assert_eq!(json["request_goodput"], 0.5);
        assert!(json["median_e2el_ms"].is_number() && json["errors"]["timeout"] == 1);

        let split = split_by_popularity(&outs, 10, 0.2, 2.0, None).unwrap();
        assert_eq!(split.head_adapters, 2);
        assert_eq!((split.head.completed, split.head.failed), (2, 0));
        assert_eq!((split.tail.completed, split.tail.failed), (0, 2));
        assert!(split_by_popularity(&outs, 0, 0.2, 2.0, None).is_none());
    }

    #[test]
    fn empty_run_is_all_zero() {
        let m = Metrics::compute(&[], 0.0, None);
        assert_eq!(
            (m.completed, m.request_throughput, m.request_goodput),
            (0, 0.0, None)
        );
        assert_eq!(m.latency("ttft").p99, 0.0);
    }
}
