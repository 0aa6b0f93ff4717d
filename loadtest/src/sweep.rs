//! `sweep`: the same prompts at several open-loop rates (only send times change with the rate), or a
//! search for the highest rate at which a chosen share of requests meets the SLO: double from
//! `--min-rate` until a rate fails (or `--max-rate` passes), then bisect geometrically.

use crate::arrival::Rate;
use crate::cli::SweepArgs;
use crate::client::ApiClient;
use crate::metrics::Metrics;
use crate::plot::{draw_grid, Panel, PlotError, Series};
use crate::schedule::Targets;
use crate::setup::{self, SetupError};
use serde::Serialize;
use std::fmt::Write as _;
use std::path::Path;

#[derive(Debug, Clone, Serialize)]
pub struct SweepPoint {
    /// Offered rate (requests/s).
    pub rate: f64,
    pub schedule_hash: String,
    /// Whether the SLO share was met (search mode, or whenever an SLO is given).
    pub meets_slo: Option<bool>,
    #[serde(flatten)]
    pub metrics: Metrics,
}

#[derive(Debug, Clone, Serialize)]
pub struct SweepResult {
    pub search: bool,
    pub slo: Option<crate::slo::Slo>,
    pub slo_share: f64,
    /// Highest rate found meeting the SLO share (search mode).
    pub best_rate: Option<f64>,
    pub points: Vec<SweepPoint>,
}

pub async fn sweep(
    client: &ApiClient,
    args: &SweepArgs,
    targets: Targets,
) -> Result<SweepResult, SetupError> {
    if args.load.concurrency.is_some() {
        return Err(SetupError::Invalid(
            "sweep varies --rate; it cannot be combined with --concurrency".into(),
        ));
    }
    let mut points: Vec<SweepPoint> = Vec::new();
    let mut best_rate = None;
    if args.search {
        if !(args.min_rate > 0.0 && args.max_rate >= args.min_rate) {
            return Err(SetupError::Invalid(
                "need 0 < --min-rate <= --max-rate".into(),
            ));
        }
        let (mut lo, mut hi) = (args.min_rate, None);
        if probe(client, args, &targets, lo, &mut points).await? {
            while hi.is_none() && lo < args.max_rate {
                let r = (lo * 2.0).min(args.max_rate);
                if probe(client, args, &targets, r, &mut points).await? {
                    lo = r;
                } else {
                    hi = Some(r);
                }
            }
            if let Some(mut h) = hi {
                for _ in 0..args.search_steps {
                    let mid = (lo * h).sqrt();
                    if probe(client, args, &targets, mid, &mut points).await? {
                        lo = mid;
                    } else {
                        h = mid;
                    }
                }
            }
            best_rate = Some(lo);
        }
    } else {
        for &rate in &args.rates {
            if !(rate > 0.0 && rate.is_finite()) {
                return Err(SetupError::Invalid(format!("rate {rate}")));
            }
            points.push(measure_at(client, args, targets.clone(), rate).await?);
        }
    }
    points.sort_by(|a, b| a.rate.total_cmp(&b.rate));
    Ok(SweepResult {
        search: args.search,
        slo: args.load.slo,
        slo_share: args.slo_share,
        best_rate,
        points,
    })
}

/// Runs at `rate`, records the point, and says whether it met the SLO share.
async fn probe(
    client: &ApiClient,
    args: &SweepArgs,
    targets: &Targets,
    rate: f64,
    points: &mut Vec<SweepPoint>,
) -> Result<bool, SetupError> {
    let p = measure_at(client, args, targets.clone(), rate).await?;
    let ok = p.meets_slo.unwrap_or(false);
    points.push(p);
    Ok(ok)
}

async fn measure_at(
    client: &ApiClient,
    args: &SweepArgs,
    targets: Targets,
    rate: f64,
) -> Result<SweepPoint, SetupError> {
    let spec = setup::schedule_spec(&args.load, targets, Some(Rate::Finite(rate)))?;
    let prepared = setup::prepare(client.base_url(), &args.load, spec)?;
    eprintln!("{}", setup::describe(&prepared));
    let (_, report) = setup::measure(client, &args.load, &prepared, None, false).await;
    let meets_slo = report.metrics.slo_attainment.map(|a| a >= args.slo_share);
    let m = &report.metrics;
    eprintln!(
        "  rate {rate:.2}: {:.2} req/s, {:.1} tok/s, p99 TTFT {:.1} ms{}",
        m.request_throughput,
        m.output_throughput,
        m.latency("ttft").p99,
        m.slo_attainment
            .map_or(String::new(), |a| format!(", SLO met by {:.1}%", a * 100.0))
    );
    Ok(SweepPoint {
        rate,
        schedule_hash: prepared.plan.schedule_hash,
        meets_slo,
        metrics: report.metrics,
    })
}

impl SweepResult {
    pub fn table(&self) -> String {
        let mut s = String::new();
        let _ = writeln!(
            s,
            "{:>9} {:>9} {:>10} {:>9} {:>7} {:>10} {:>10} {:>10} {:>10} {:>7}",
            "rate",
            "req/s",
            "out tok/s",
            "goodput",
            "SLO %",
            "p50 TTFT",
            "p99 TTFT",
            "p50 TPOT",
            "p99 E2EL",
            "errors"
        );
        for p in &self.points {
            let m = &p.metrics;
            let _ = writeln!(
                s,
                "{:>9.2} {:>9.2} {:>10.1} {:>9} {:>7} {:>10.1} {:>10.1} {:>10.2} {:>10.1} {:>7}",
                p.rate,
                m.request_throughput,
                m.output_throughput,
                m.request_goodput.map_or("-".into(), |g| format!("{g:.2}")),
                m.slo_attainment
                    .map_or("-".into(), |a| format!("{:.1}", a * 100.0)),
                m.latency("ttft").median,
                m.latency("ttft").p99,
                m.latency("tpot").median,
                m.latency("e2el").p99,
                m.failed
            );
        }
        if self.search {
            let _ = match self.best_rate {
                Some(r) => writeln!(
                    s,
                    "highest rate meeting the SLO for {:.0}% of requests: {r:.2} req/s",
                    self.slo_share * 100.0
                ),
                None => writeln!(
                    s,
                    "even the lowest rate misses the SLO for {:.0}% of requests",
                    self.slo_share * 100.0
                ),
            };
        }
        s
    }
}

/// The sweep curve: throughput, TTFT and TPOT against the offered rate.
pub fn plot_sweep(r: &SweepResult, path: &Path) -> Result<(), PlotError> {
    let line = |label: &str, f: &dyn Fn(&Metrics) -> f64| Series {
        label: label.into(),
        points: r.points.iter().map(|p| (p.rate, f(&p.metrics))).collect(),
    };
    let mut throughput = vec![
        Series {
            label: "offered".into(),
            points: r.points.iter().map(|p| (p.rate, p.rate)).collect(),
        },
        line("achieved", &|m| m.request_throughput),
    ];
    if r.points.iter().any(|p| p.metrics.request_goodput.is_some()) {
        throughput.push(line("goodput", &|m| m.request_goodput.unwrap_or(0.0)));
    }
    let panel = |title: &str, y: &str, series: Vec<Series>| Panel {
        title: title.into(),
        x_desc: "offered rate (req/s)".into(),
        y_desc: y.into(),
        series,
    };
    let panels = [
        panel("Throughput", "requests/s", throughput),
        panel(
            "Time to first token",
            "ms",
            vec![
                line("median", &|m| m.latency("ttft").median),
                line("p99", &|m| m.latency("ttft").p99),
            ],
        ),
        panel(
            "Time per output token",
            "ms",
            vec![
                line("median", &|m| m.latency("tpot").median),
                line("p99", &|m| m.latency("tpot").p99),
            ],
        ),
    ];
    draw_grid(path, "Rate sweep", 1, 3, &panels)
}
