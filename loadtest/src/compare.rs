//! `compare`: one schedule replayed against two servers in A-B-B-A order (so drift over time, e.g. a
//! warming machine, hits both sides alike), every metric's B/A ratio with a bootstrap interval, and gates
//! that decide the exit code.

use crate::cli::CompareArgs;
use crate::metrics::Metrics;
use crate::outcome::RequestOutcome;
use crate::plot::{cdf_panel, draw_grid, PlotError};
pub use crate::ratio::Gate;
use crate::ratio::{bootstrap_ratios, Arm};
use crate::report::Plan;
use crate::schedule::Targets;
use crate::setup::{self, SetupError};
use serde::Serialize;
use std::fmt::Write as _;
use std::path::Path;

/// The order of the four runs.
pub const ORDER: [Side; 4] = [Side::A, Side::B, Side::B, Side::A];

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub enum Side {
    A,
    B,
}

#[derive(Debug, Clone, Serialize)]
pub struct ArmReport {
    pub url: String,
    /// Each of this side's runs, in the order they ran.
    pub runs: Vec<Metrics>,
    /// Both runs pooled: all requests over the summed duration.
    pub pooled: Metrics,
}

#[derive(Debug, Clone, Serialize)]
pub struct RatioRow {
    pub metric: String,
    pub a: f64,
    pub b: f64,
    /// B / A; absent when A is 0.
    pub ratio: Option<f64>,
    pub ci_lo: Option<f64>,
    pub ci_hi: Option<f64>,
}

#[derive(Debug, Clone, Serialize)]
pub struct CompareResult {
    #[serde(flatten)]
    pub plan: Plan,
    pub order: Vec<Side>,
    pub confidence_level: f64,
    pub a: ArmReport,
    pub b: ArmReport,
    pub ratios: Vec<RatioRow>,
    #[serde(skip)]
    pub outcomes_a: Vec<RequestOutcome>,
    #[serde(skip)]
    pub outcomes_b: Vec<RequestOutcome>,
}

#[derive(Debug, Clone, Serialize)]
pub struct Verdict {
    pub gate: String,
    pub ratio: Option<f64>,
    pub passed: bool,
}

const LEVEL: f64 = 0.95;

pub async fn compare(args: &CompareArgs) -> Result<CompareResult, SetupError> {
    let client_a = setup::client(&args.url_a, &args.load)?;
    let client_b = setup::client(&args.url_b, &args.load)?;
    // Targets come from A; B must serve the same adapter ids (or map the base model with --model-b).
    let targets = setup::resolve_targets(&args.load, &client_a).await?;
    let rename_b = match (&targets, &args.model_b) {
        (Targets::Model(a), Some(b)) => Some((a.clone(), b.clone())),
        _ => None,
    };
    let spec = setup::schedule_spec(&args.load, targets, None)?;
    let prepared = setup::prepare(client_a.base_url(), &args.load, spec)?;
    eprintln!("{}", setup::describe(&prepared));

    let (mut runs_a, mut runs_b) = (Vec::new(), Vec::new());
    for (i, side) in ORDER.iter().enumerate() {
        let (client, rename) = match side {
            Side::A => (&client_a, None),
            Side::B => (&client_b, rename_b.clone()),
        };
        eprintln!("run {}/4: {side:?} ({})", i + 1, client.base_url());
        let (result, report) = setup::measure(client, &args.load, &prepared, rename, false).await;
        eprintln!(
            "  {:.2} req/s, {:.1} tok/s, median TTFT {:.1} ms, {} failed",
            report.metrics.request_throughput,
            report.metrics.output_throughput,
            report.metrics.latency("ttft").median,
            report.metrics.failed
        );
        match side {
            Side::A => runs_a.push((result, report.metrics)),
            Side::B => runs_b.push((result, report.metrics)),
        }
    }
    let slo = args.load.slo.as_ref();
    let pool = |runs: &[(crate::runner::RunResult, Metrics)]| {
        let outcomes: Vec<RequestOutcome> = runs
            .iter()
            .flat_map(|(r, _)| r.outcomes.iter().cloned())
            .collect();
        let duration: f64 = runs.iter().map(|(r, _)| r.duration_s).sum();
        (outcomes, duration)
    };
    let (outcomes_a, dur_a) = pool(&runs_a);
    let (outcomes_b, dur_b) = pool(&runs_b);
    let pooled_a = Metrics::compute(&outcomes_a, dur_a, slo);
    let pooled_b = Metrics::compute(&outcomes_b, dur_b, slo);
    let cis = bootstrap_ratios(
        &Arm {
            outcomes: outcomes_a.iter().collect(),
            duration_s: dur_a,
        },
        &Arm {
            outcomes: outcomes_b.iter().collect(),
            duration_s: dur_b,
        },
        slo,
        args.bootstrap,
        LEVEL,
        args.load.seed,
    );
    let ratios = pooled_a
        .flat()
        .into_iter()
        .map(|(metric, a)| {
            let b = pooled_b.get(&metric).unwrap_or(f64::NAN);
            let ratio = (a != 0.0).then_some(b / a).filter(|r| r.is_finite());
            let ci = cis.get(&metric);
            RatioRow {
                ci_lo: ci.map(|c| c.lo),
                ci_hi: ci.map(|c| c.hi),
                metric,
                a,
                b,
                ratio,
            }
        })
        .collect();
    Ok(CompareResult {
        plan: prepared.plan,
        order: ORDER.to_vec(),
        confidence_level: LEVEL,
        a: ArmReport {
            url: client_a.base_url().to_string(),
            runs: runs_a.into_iter().map(|(_, m)| m).collect(),
            pooled: pooled_a,
        },
        b: ArmReport {
            url: client_b.base_url().to_string(),
            runs: runs_b.into_iter().map(|(_, m)| m).collect(),
            pooled: pooled_b,
        },
        ratios,
        outcomes_a,
        outcomes_b,
    })
}

/// Applies the gates to the point ratios.
pub fn judge(result: &CompareResult, gates: &[Gate]) -> Vec<Verdict> {
    gates
        .iter()
        .map(|g| {
            let ratio = result
                .ratios
                .iter()
                .find(|r| r.metric == g.metric)
                .and_then(|r| r.ratio);
            Verdict {
                gate: g.to_string(),
                ratio,
                passed: g.passes(ratio),
            }
        })
        .collect()
}

/// The JSON written by `--out`: the comparison plus the gate verdicts.
pub fn with_verdicts(result: &CompareResult, verdicts: &[Verdict]) -> serde_json::Value {
    let mut v = serde_json::to_value(result).unwrap_or_default();
    v["gates"] = serde_json::to_value(verdicts).unwrap_or_default();
    v
}

impl CompareResult {
    pub fn table(&self, verdicts: &[Verdict]) -> String {
        let mut s = String::new();
        let _ = writeln!(
            s,
            "A = {}   B = {}   schedule {}   order A-B-B-A",
            self.a.url, self.b.url, self.plan.schedule_hash
        );
        let _ = writeln!(
            s,
            "{:<26}{:>13}{:>13}{:>9}   {:>19}",
            "metric", "A", "B", "B/A", "95% CI"
        );
        for r in &self.ratios {
            let ci = match (r.ci_lo, r.ci_hi) {
                (Some(lo), Some(hi)) => format!("[{lo:.3}, {hi:.3}]"),
                _ => String::new(),
            };
            let ratio = r.ratio.map_or("-".into(), |x| format!("{x:.3}"));
            let _ = writeln!(
                s,
                "{:<26}{:>13.2}{:>13.2}{:>9}   {:>19}",
                r.metric, r.a, r.b, ratio, ci
            );
        }
        for v in verdicts {
            let _ = writeln!(
                s,
                "gate {}: {} (B/A = {})",
                v.gate,
                if v.passed { "PASS" } else { "FAIL" },
                v.ratio.map_or("undefined".into(), |r| format!("{r:.3}"))
            );
        }
        s
    }
}

/// Latency CDFs of both sides.
pub fn plot_compare(r: &CompareResult, path: &Path) -> Result<(), PlotError> {
    let ms = |outs: &[RequestOutcome], f: &dyn Fn(&RequestOutcome) -> Option<f64>| -> Vec<f64> {
        outs.iter()
            .filter(|o| o.ok())
            .filter_map(f)
            .map(|s| s * 1000.0)
            .collect()
    };
    let panels: Vec<_> = [
        (
            "TTFT",
            &(|o: &RequestOutcome| o.ttft_s) as &dyn Fn(&RequestOutcome) -> Option<f64>,
        ),
        ("TPOT", &|o: &RequestOutcome| o.tpot_s()),
        ("End-to-end latency", &|o: &RequestOutcome| Some(o.e2el_s)),
    ]
    .into_iter()
    .map(|(title, f)| {
        cdf_panel(
            title,
            &[("A", ms(&r.outcomes_a, f)), ("B", ms(&r.outcomes_b, f))],
        )
    })
    .collect();
    let title = format!(
        "A = {}  vs  B = {}  (schedule {})",
        r.a.url, r.b.url, r.plan.schedule_hash
    );
    draw_grid(path, &title, 1, 3, &panels)
}
