//! B/A ratios for `compare`: bootstrap confidence intervals (requests resampled with replacement within
//! each arm, the run durations held fixed) and pass/fail gates such as `output_throughput>=1.0`.

use crate::outcome::RequestOutcome;
use crate::slo::Slo;
use crate::stats::{bootstrap_intervals, mean, percentile_sorted, resample, Interval};
use serde::Serialize;
use std::collections::BTreeMap;
use std::fmt;
use std::str::FromStr;

/// One side of a comparison: its pooled requests and the summed duration of its runs.
pub struct Arm<'a> {
    pub outcomes: Vec<&'a RequestOutcome>,
    pub duration_s: f64,
}

/// The metrics that get a bootstrap interval. ITL gets only its mean: its percentiles pool every token
/// gap and would make each resample a sort of the whole run.
pub fn key_metrics(
    outs: &[&RequestOutcome],
    duration_s: f64,
    slo: Option<&Slo>,
) -> Vec<(String, f64)> {
    let ok: Vec<&&RequestOutcome> = outs.iter().filter(|o| o.ok()).collect();
    let per_s = |x: f64| {
        if duration_s > 0.0 {
            x / duration_s
        } else {
            0.0
        }
    };
    let input: u64 = ok.iter().map(|o| o.prompt_tokens.unwrap_or(0)).sum();
    let output: u64 = ok.iter().map(|o| o.output_tokens).sum();
    let mut out = vec![
        ("request_throughput".to_string(), per_s(ok.len() as f64)),
        ("output_throughput".to_string(), per_s(output as f64)),
        (
            "total_token_throughput".to_string(),
            per_s((input + output) as f64),
        ),
    ];
    if let Some(slo) = slo.filter(|s| !s.is_empty()) {
        let good = outs.iter().filter(|o| slo.met_by(o)).count() as f64;
        out.push(("request_goodput".into(), per_s(good)));
        out.push((
            "slo_attainment".into(),
            if outs.is_empty() {
                0.0
            } else {
                good / outs.len() as f64
            },
        ));
    }
    let lat = |f: &dyn Fn(&RequestOutcome) -> Option<f64>| {
        let mut v: Vec<f64> = ok.iter().filter_map(|o| f(o)).map(|s| s * 1000.0).collect();
        v.sort_by(f64::total_cmp);
        v
    };
    for (name, v) in [
        ("ttft", lat(&|o| o.ttft_s)),
        ("tpot", lat(&|o| o.tpot_s())),
        ("e2el", lat(&|o| Some(o.e2el_s))),
    ] {
        out.push((format!("mean_{name}_ms"), mean(&v)));
        out.push((format!("median_{name}_ms"), percentile_sorted(&v, 50.0)));
        out.push((format!("p90_{name}_ms"), percentile_sorted(&v, 90.0)));
        out.push((format!("p99_{name}_ms"), percentile_sorted(&v, 99.0)));
    }
    let (sum, n) = ok
        .iter()
        .flat_map(|o| o.itl_s.iter())
        .fold((0.0, 0usize), |(s, n), x| (s + x, n + 1));
    out.push((
        "mean_itl_ms".into(),
        if n > 0 { sum / n as f64 * 1000.0 } else { 0.0 },
    ));
    out
}

/// Central `level` bootstrap interval of every key metric's B/A ratio (both arms resampled together in
/// each replicate).
pub fn bootstrap_ratios(
    a: &Arm<'_>,
    b: &Arm<'_>,
    slo: Option<&Slo>,
    resamples: usize,
    level: f64,
    seed: u64,
) -> BTreeMap<String, Interval> {
    if a.outcomes.is_empty() || b.outcomes.is_empty() {
        return BTreeMap::new();
    }
    bootstrap_intervals(resamples, level, seed, |rng| {
        let pick_a: Vec<&RequestOutcome> =
            resample(&a.outcomes, rng).into_iter().copied().collect();
        let pick_b: Vec<&RequestOutcome> =
            resample(&b.outcomes, rng).into_iter().copied().collect();
        let ma = key_metrics(&pick_a, a.duration_s, slo);
        let mb = key_metrics(&pick_b, b.duration_s, slo);
        ma.into_iter()
            .zip(mb)
            .map(|((name, va), (_, vb))| (name, vb / va))
            .collect()
    })
}

#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
pub enum Op {
    #[serde(rename = ">=")]
    Ge,
    #[serde(rename = "<=")]
    Le,
    #[serde(rename = ">")]
    Gt,
    #[serde(rename = "<")]
    Lt,
}

/// A condition on the B/A ratio of one metric.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Gate {
    pub metric: String,
    pub op: Op,
    pub threshold: f64,
}

#[derive(Debug, thiserror::Error)]
#[error("invalid gate {0:?} (expected METRIC>=X, METRIC<=X, METRIC>X or METRIC<X, e.g. output_throughput>=1.0)")]
pub struct GateParseError(String);

impl FromStr for Gate {
    type Err = GateParseError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let err = || GateParseError(s.to_string());
        let (pos, op, len) = [(">=", Op::Ge), ("<=", Op::Le), (">", Op::Gt), ("<", Op::Lt)]
            .into_iter()
            .find_map(|(tok, op)| s.find(tok).map(|p| (p, op, tok.len())))
            .ok_or_else(err)?;
        let metric = s[..pos].trim().to_string();
        let threshold: f64 = s[pos + len..].trim().parse().map_err(|_| err())?;
        if metric.is_empty() || !threshold.is_finite() {
            return Err(err());
        }
        Ok(Self {
            metric,
            op,
            threshold,
        })
    }
}

impl fmt::Display for Gate {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let op = match self.op {
            Op::Ge => ">=",
            Op::Le => "<=",
            Op::Gt => ">",
            Op::Lt => "<",
        };
        write!(f, "{}{op}{}", self.metric, self.threshold)
    }
}

impl Gate {
    /// Whether a ratio passes; a missing or undefined ratio fails.
    pub fn passes(&self, ratio: Option<f64>) -> bool {
        let Some(r) = ratio.filter(|r| r.is_finite()) else {
            return false;
        };
        match self.op {
            Op::Ge => r >= self.threshold,
            Op::Le => r <= self.threshold,
            Op::Gt => r > self.threshold,
            Op::Lt => r < self.threshold,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::metrics::Metrics;

    fn o(i: usize, ttft: f64, itl: &[f64], tokens: u64) -> RequestOutcome {
        RequestOutcome {
            index: i,
            model: "m".into(),
            adapter_rank: None,
            scheduled_s: 0.0,
            start_s: i as f64 * 0.1,
            ttft_s: Some(ttft),
            itl_s: itl.to_vec(),
            e2el_s: ttft + itl.iter().sum::<f64>(),
            prompt_tokens: Some(50),
            output_tokens: tokens,
            error: None,
        }
    }

    #[test]
    fn key_metrics_agree_with_the_full_metrics() {
        let outs: Vec<RequestOutcome> = (0..40)
            .map(|i| o(i, 0.1 + i as f64 * 0.01, &[0.02, 0.03 + i as f64 * 1e-3], 3))
            .collect();
        let refs: Vec<&RequestOutcome> = outs.iter().collect();
        let slo: Slo = "ttft=300ms".parse().unwrap();
        let full = Metrics::compute(&outs, 7.0, Some(&slo));
        for (k, v) in key_metrics(&refs, 7.0, Some(&slo)) {
            let want = full.get(&k).unwrap();
            assert!((v - want).abs() < 1e-9, "{k}: {v} vs {want}");
        }
    }

    #[test]
    fn identical_arms_give_a_ratio_interval_around_one_and_scaled_ones_around_two() {
        let outs: Vec<RequestOutcome> = (0..200)
            .map(|i| o(i, 0.1 + (i % 7) as f64 * 0.05, &[0.02], 2))
            .collect();
        let a = Arm {
            outcomes: outs.iter().collect(),
            duration_s: 10.0,
        };
        let b = Arm {
            outcomes: outs.iter().collect(),
            duration_s: 5.0,
        };
        let ci = bootstrap_ratios(&a, &b, None, 300, 0.95, 3);
        // Same requests in half the time: exactly twice the throughput in every resample.
        let t = ci["output_throughput"];
        assert!(
            (t.lo - 2.0).abs() < 1e-9 && (t.hi - 2.0).abs() < 1e-9,
            "{t:?}"
        );
        let m = ci["mean_ttft_ms"];
        assert!(
            m.lo < 1.0 && m.hi > 1.0 && m.lo > 0.8 && m.hi < 1.25,
            "{m:?}"
        );
        assert_eq!(ci, bootstrap_ratios(&a, &b, None, 300, 0.95, 3), "seeded");
    }

    #[test]
    fn gates_parse_and_judge() {
        let g: Gate = "output_throughput>=1.0".parse().unwrap();
        assert_eq!(
            (g.metric.as_str(), g.op, g.threshold),
            ("output_throughput", Op::Ge, 1.0)
        );
        assert!(
            g.passes(Some(1.0))
                && !g.passes(Some(0.99))
                && !g.passes(None)
                && !g.passes(Some(f64::NAN))
        );
        let g: Gate = " p99_ttft_ms < 1.1 ".parse().unwrap();
        assert!(g.passes(Some(1.05)) && !g.passes(Some(1.1)));
        assert_eq!(g.to_string(), "p99_ttft_ms<1.1");
        for bad in ["output_throughput", ">=1", "x>=abc", "x=1"] {
            assert!(bad.parse::<Gate>().is_err(), "{bad}");
        }
    }
}
