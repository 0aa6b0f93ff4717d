//! From command-line arguments to a schedule, a run and its report; shared by `run`, `sweep` and
//! `compare`.

use crate::arrival::{ArrivalError, ArrivalProcess, Horizon, Rate};
use crate::cli::LoadArgs;
use crate::client::{adapters_from_models, ApiClient, ClientError, RequestOptions};
use crate::dataset::{Dataset, DatasetError};
use crate::report::{Analysis, Plan, Report};
use crate::runner::{self, RunConfig, RunResult};
use crate::schedule::{self, Pacing, Schedule, ScheduleError, ScheduleSpec, Targets};
use std::sync::Arc;
use std::time::Duration;

#[derive(Debug, thiserror::Error)]
pub enum SetupError {
    #[error(transparent)]
    Client(#[from] ClientError),
    #[error(transparent)]
    Dataset(#[from] DatasetError),
    #[error(transparent)]
    Schedule(#[from] ScheduleError),
    #[error(transparent)]
    Arrival(#[from] ArrivalError),
    #[error("adapters: {0}")]
    Adapters(String),
    #[error("invalid option: {0}")]
    Invalid(String),
}

/// Default request count when neither --num-requests nor --duration is given.
pub const DEFAULT_NUM_REQUESTS: usize = 200;
const WARMUP_SEED_SALT: u64 = 0x5741_524d_5550; // "WARMUP": warm-up prompts never repeat measured ones

pub fn request_options(load: &LoadArgs) -> Result<RequestOptions, SetupError> {
    if !(load.timeout > 0.0 && load.timeout.is_finite()) {
        return Err(SetupError::Invalid(format!("--timeout {}", load.timeout)));
    }
    Ok(RequestOptions {
        endpoint: load.endpoint,
        ignore_eos: load.ignore_eos,
        temperature: load.temperature,
        timeout: Duration::from_secs_f64(load.timeout),
    })
}

pub fn client(url: &str, load: &LoadArgs) -> Result<ApiClient, SetupError> {
    Ok(ApiClient::new(
        url,
        load.api_key.clone(),
        request_options(load)?,
    )?)
}

/// Resolves `--model` / `--adapters` (asking the server when needed).
pub async fn resolve_targets(load: &LoadArgs, client: &ApiClient) -> Result<Targets, SetupError> {
    let Some(spec) = load.adapters.as_deref() else {
        if let Some(m) = &load.model {
            return Ok(Targets::Model(m.clone()));
        }
        let models = client.list_models().await?;
        let first = models
            .first()
            .ok_or_else(|| SetupError::Adapters("the server lists no models".into()))?;
        return Ok(Targets::Model(first.id.clone()));
    };
    let mut ids: Vec<String> = if spec == "discover" {
        adapters_from_models(&client.list_models().await?, load.model.as_deref())
    } else if let Some(path) = spec.strip_prefix('@') {
        let text = std::fs::read_to_string(path)
            .map_err(|e| SetupError::Adapters(format!("{path}: {e}")))?;
        text.lines()
            .map(str::trim)
            .filter(|l| !l.is_empty() && !l.starts_with('#'))
            .map(String::from)
            .collect()
    } else {
        spec.split(',')
            .map(str::trim)
            .filter(|s| !s.is_empty())
            .map(String::from)
            .collect()
    };
    if let Some(n) = load.num_adapters {
        if n > ids.len() {
            return Err(SetupError::Adapters(format!(
                "--num-adapters {n} but only {} available",
                ids.len()
            )));
        }
        ids.truncate(n);
    }
    if ids.is_empty() {
        return Err(SetupError::Adapters(format!("no adapters from {spec:?}")));
    }
    Ok(Targets::Adapters {
        ids,
        dist: load.adapter_dist,
    })
}

/// The schedule specification; `rate` overrides `--rate` (for sweeps).
pub fn schedule_spec(
    load: &LoadArgs,
    targets: Targets,
    rate: Option<Rate>,
) -> Result<ScheduleSpec, SetupError> {
    let pacing = match (load.concurrency, rate.or(load.rate)) {
        (Some(0), _) => {
            return Err(SetupError::Invalid(
                "--concurrency must be at least 1".into(),
            ))
        }
        (Some(c), _) => Pacing::Closed { concurrency: c },
        (None, r) => Pacing::Open(ArrivalProcess::new(
            r.unwrap_or(Rate::Infinite),
            load.burstiness,
            load.ramp,
        )?),
    };
    let horizon = match (load.duration, load.num_requests) {
        (Some(d), _) if !(d > 0.0 && d.is_finite()) => {
            return Err(SetupError::Invalid(format!("--duration {d}")))
        }
        (Some(d), _) => Horizon::Seconds(d),
        (None, n) => Horizon::Count(n.unwrap_or(DEFAULT_NUM_REQUESTS)),
    };
    if !(load.head_fraction > 0.0 && load.head_fraction <= 1.0) {
        return Err(SetupError::Invalid(
            "--head-fraction must be in (0, 1]".into(),
        ));
    }
    Ok(ScheduleSpec {
        seed: load.seed,
        horizon,
        closed_loop_cap: load.max_requests,
        pacing,
        targets,
        dataset: Dataset::from_spec(&load.dataset, load.input_len)?,
        output_len: load.output_len,
        request_key: request_options(load)?.key(),
    })
}

/// A schedule ready to run, with its description.
pub struct Prepared {
    pub spec: ScheduleSpec,
    pub schedule: Arc<Schedule>,
    pub plan: Plan,
}

pub fn prepare(url: &str, load: &LoadArgs, spec: ScheduleSpec) -> Result<Prepared, SetupError> {
    let schedule = Arc::new(schedule::build(&spec)?);
    let (request_rate, max_concurrency) = match spec.pacing {
        Pacing::Open(p) => (Some(p.rate.to_string()), None),
        Pacing::Closed { concurrency } => (None, Some(concurrency)),
    };
    let (model_id, adapter_dist) = match &spec.targets {
        Targets::Model(m) => (m.clone(), None),
        Targets::Adapters { ids, dist } => {
            (format!("{} adapters", ids.len()), Some(dist.to_string()))
        }
    };
    let plan = Plan {
        url: url.to_string(),
        endpoint: format!("{:?}", load.endpoint).to_lowercase(),
        model_id,
        seed: spec.seed,
        num_prompts: schedule.requests.len(),
        request_rate,
        burstiness: load.burstiness,
        ramp_s: load.ramp,
        max_concurrency,
        dataset: spec.dataset.name(),
        num_adapters: schedule.num_adapters,
        adapter_dist,
        output_len: load.output_len.to_string(),
        ignore_eos: load.ignore_eos,
        slo: load.slo,
        schedule_hash: schedule.hash_hex(),
    };
    Ok(Prepared {
        spec,
        schedule,
        plan,
    })
}

/// One line describing the schedule, printed before sending anything.
pub fn describe(p: &Prepared) -> String {
    let pl = &p.plan;
    let last = p.schedule.requests.last().map_or(0.0, |r| r.send_at_s);
    format!(
        "schedule {}: {}{} requests to {}, {}, dataset {}, output {}, seed {}, last send at {:.1} s",
        pl.schedule_hash,
        // Closed loop with a duration prepares a cap and stops at the deadline.
        if pl.max_concurrency.is_some() && load_has_duration(&p.spec) { "up to " } else { "" },
        pl.num_prompts,
        pl.model_id,
        match (&pl.request_rate, pl.max_concurrency) {
            (Some(r), _) => format!("rate {r}/s burstiness {}", pl.burstiness),
            (None, c) => format!("closed loop x{}", c.unwrap_or(1)),
        },
        pl.dataset,
        pl.output_len,
        pl.seed,
        last
    )
}

fn load_has_duration(spec: &ScheduleSpec) -> bool {
    matches!(spec.horizon, Horizon::Seconds(_))
}

pub fn run_config(
    load: &LoadArgs,
    spec: &ScheduleSpec,
    rename_model: Option<(String, String)>,
) -> RunConfig {
    RunConfig {
        pacing: spec.pacing,
        max_concurrency: load.max_concurrency,
        stop_after_s: match spec.pacing {
            Pacing::Closed { .. } => load.duration,
            Pacing::Open(_) => None,
        },
        rename_model,
        progress: !load.no_progress,
    }
}

/// Sends `load.warmup` requests from a separate seed stream and discards them.
pub async fn warmup(
    client: &ApiClient,
    load: &LoadArgs,
    p: &Prepared,
    rename_model: Option<(String, String)>,
) -> usize {
    if load.warmup == 0 {
        return 0;
    }
    let concurrency = load.concurrency.unwrap_or(4).clamp(1, load.warmup);
    let mut spec = p.spec.clone();
    spec.seed ^= WARMUP_SEED_SALT;
    spec.horizon = Horizon::Count(load.warmup);
    spec.pacing = Pacing::Closed { concurrency };
    let Ok(schedule) = schedule::build(&spec) else {
        return 0;
    };
    let cfg = RunConfig {
        pacing: spec.pacing,
        max_concurrency: concurrency,
        stop_after_s: None,
        rename_model,
        progress: false,
    };
    runner::run(client, Arc::new(schedule), &cfg)
        .await
        .outcomes
        .len()
}

/// Warm-up, the measured run, and its report.
pub async fn measure(
    client: &ApiClient,
    load: &LoadArgs,
    p: &Prepared,
    rename_model: Option<(String, String)>,
    detailed: bool,
) -> (RunResult, Report) {
    let warmed = warmup(client, load, p, rename_model.clone()).await;
    let cfg = run_config(load, &p.spec, rename_model);
    let result = runner::run(client, p.schedule.clone(), &cfg).await;
    let analysis = Analysis {
        slo: load.slo.as_ref(),
        head_fraction: load.head_fraction,
        num_adapters: p.schedule.num_adapters,
        open_loop: matches!(p.spec.pacing, Pacing::Open(_)),
        warmup_requests: warmed,
        detailed,
    };
    let report = Report::build(p.plan.clone(), &result, analysis);
    (result, report)
}
