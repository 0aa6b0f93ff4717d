//! Command-line interface (clap). Parsing only; `setup` turns these into schedules and runs.

use crate::arrival::Rate;
use crate::client::Endpoint;
use crate::lengths::LengthDist;
use crate::popularity::AdapterDist;
use crate::slo::Slo;
use clap::{Args, Parser, Subcommand};
use std::path::PathBuf;

#[derive(Debug, Parser)]
#[command(
    name = "caduceus-loadtest",
    version,
    about = "Load generator for OpenAI-compatible LLM servers"
)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Replay one seeded schedule against a server and report serving metrics.
    Run(RunArgs),
    /// Run the same schedule at several rates, or search for the highest rate meeting the SLO.
    Sweep(SweepArgs),
    /// Run the same schedule against two servers in A-B-B-A order and compare every metric.
    Compare(CompareArgs),
    /// Send random and mutated requests to every endpoint; fail on any 5xx, unanswered request
    /// or an unhealthy server afterwards.
    Fuzz(FuzzArgs),
    /// Start the mock OpenAI server used by the tests (for manual trials).
    #[command(hide = true)]
    MockServer(MockArgs),
}

/// Everything that defines the load (and so the schedule hash), plus how to talk to the server.
#[derive(Debug, Clone, Args)]
pub struct LoadArgs {
    /// API key sent as `Authorization: Bearer KEY`.
    #[arg(long, env = "OPENAI_API_KEY", hide_env_values = true)]
    pub api_key: Option<String>,
    #[arg(long, value_enum, default_value_t = Endpoint::Chat)]
    pub endpoint: Endpoint,
    /// Model to address (the base model). Default: the first model the server lists.
    #[arg(long, conflicts_with = "adapters")]
    pub model: Option<String>,
    /// Adapters to address: `discover` (from /v1/models), `@FILE` (one id per line) or `a,b,c`.
    #[arg(long)]
    pub adapters: Option<String>,
    /// Use only the first N adapters (in sorted order).
    #[arg(long)]
    pub num_adapters: Option<usize>,
    /// How requests spread over adapters: uniform, zipf:S or slora:ALPHA.
    #[arg(long, default_value = "uniform")]
    pub adapter_dist: AdapterDist,
    /// Number of requests in the schedule.
    #[arg(long, conflicts_with = "duration")]
    pub num_requests: Option<usize>,
    /// Generate arrivals for this many seconds instead of a fixed count.
    #[arg(long)]
    pub duration: Option<f64>,
    /// Open loop: requests per second, or `inf` to send everything at once.
    #[arg(long, conflicts_with = "concurrency")]
    pub rate: Option<Rate>,
    /// Gamma shape of the gaps between arrivals: 1 = Poisson, < 1 burstier, > 1 more regular.
    #[arg(long, default_value_t = 1.0)]
    pub burstiness: f64,
    /// Closed loop: this many clients, each sending when its previous request ends.
    #[arg(long)]
    pub concurrency: Option<usize>,
    /// Open loop: never more than this many requests in flight (the send lag is reported).
    #[arg(long, default_value_t = 1024)]
    pub max_concurrency: usize,
    /// Seconds over which the rate rises linearly from 0 to --rate.
    #[arg(long, default_value_t = 0.0)]
    pub ramp: f64,
    /// `patients` (built-in), `random` (token lengths from --input-len) or a JSONL file of prompts.
    #[arg(long, default_value = "patients")]
    pub dataset: String,
    /// Prompt length for the random dataset: N, uniform:A-B or normal:MEAN,SD.
    #[arg(long, default_value = "256")]
    pub input_len: LengthDist,
    /// `max_tokens` of each request: N, uniform:A-B or normal:MEAN,SD.
    #[arg(long, default_value = "128")]
    pub output_len: LengthDist,
    /// Ask the server to ignore end-of-sequence so outputs are exactly max_tokens long.
    #[arg(long)]
    pub ignore_eos: bool,
    #[arg(long)]
    pub temperature: Option<f64>,
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    /// Objectives for goodput, e.g. ttft=1000ms,tpot=50ms,e2el=10s.
    #[arg(long)]
    pub slo: Option<Slo>,
    /// Requests sent (and discarded) before the measured run.
    #[arg(long, default_value_t = 0)]
    pub warmup: usize,
    /// Per-request timeout in seconds.
    #[arg(long, default_value_t = 600.0)]
    pub timeout: f64,
    /// Share of adapters (most popular first) reported as the head.
    #[arg(long, default_value_t = 0.2)]
    pub head_fraction: f64,
    /// Closed loop with --duration: requests prepared up front.
    #[arg(long, default_value_t = 100_000)]
    pub max_requests: usize,
    #[arg(long)]
    pub no_progress: bool,
}

#[derive(Debug, Clone, Args)]
pub struct RunArgs {
    #[arg(long, default_value = "http://127.0.0.1:8000")]
    pub url: String,
    #[command(flatten)]
    pub load: LoadArgs,
    /// Write the JSON report here.
    #[arg(long)]
    pub out: Option<PathBuf>,
    /// Write the figure here (.svg or .png); repeat for both.
    #[arg(long)]
    pub plot: Vec<PathBuf>,
    /// Include every request's timings in the JSON report.
    #[arg(long)]
    pub save_detailed: bool,
    /// More servers (repeat the flag): each adapter always goes to the same one of --url and
    /// these, by a hash of its name, as an adapter-affinity gateway routes (local scale-out runs).
    #[arg(long = "replica-url")]
    pub replica_urls: Vec<String>,
}

#[derive(Debug, Clone, Args)]
pub struct SweepArgs {
    #[arg(long, default_value = "http://127.0.0.1:8000")]
    pub url: String,
    #[command(flatten)]
    pub load: LoadArgs,
    /// Rates to run, e.g. 5,10,20,40.
    #[arg(long, value_delimiter = ',', required_unless_present = "search")]
    pub rates: Vec<f64>,
    /// Search for the highest rate at which --slo-share of requests meet --slo.
    #[arg(long, requires = "slo")]
    pub search: bool,
    #[arg(long, default_value_t = 0.9)]
    pub slo_share: f64,
    #[arg(long, default_value_t = 1.0)]
    pub min_rate: f64,
    #[arg(long, default_value_t = 512.0)]
    pub max_rate: f64,
    /// Bisection steps after bracketing.
    #[arg(long, default_value_t = 5)]
    pub search_steps: usize,
    #[arg(long)]
    pub out: Option<PathBuf>,
    #[arg(long)]
    pub plot: Option<PathBuf>,
}

#[derive(Debug, Clone, Args)]
pub struct CompareArgs {
    #[arg(long)]
    pub url_a: String,
    #[arg(long)]
    pub url_b: String,
    /// The base model's name on server B, when it differs from A's (--model).
    #[arg(long)]
    pub model_b: Option<String>,
    #[command(flatten)]
    pub load: LoadArgs,
    /// Pass/fail conditions on the B/A ratio, e.g. output_throughput>=1.0 or p99_ttft_ms<=1.1.
    #[arg(long = "gate")]
    pub gates: Vec<String>,
    /// Bootstrap resamples for the confidence intervals.
    #[arg(long, default_value_t = 1000)]
    pub bootstrap: usize,
    #[arg(long)]
    pub out: Option<PathBuf>,
    #[arg(long)]
    pub plot: Option<PathBuf>,
}

#[derive(Debug, Clone, Args)]
pub struct MockArgs {
    /// Port on 127.0.0.1 (0 = any free port).
    #[arg(long, default_value_t = 0)]
    pub port: u16,
    #[arg(long, default_value_t = 200.0)]
    pub ttft_ms: f64,
    #[arg(long, default_value_t = 20.0)]
    pub itl_ms: f64,
    /// Tokens per answer (default: each request's max_tokens).
    #[arg(long)]
    pub output_tokens: Option<u32>,
    #[arg(long, default_value_t = 0.0)]
    pub error_rate: f64,
    #[arg(long, default_value_t = 503)]
    pub error_status: u16,
    #[arg(long, default_value_t = 0.0)]
    pub disconnect_rate: f64,
    #[arg(long, default_value = "mock-base")]
    pub model: String,
    /// Serve this many adapters named doctor-000, doctor-001, ...
    #[arg(long, default_value_t = 0)]
    pub adapters: usize,
    /// Answer at most this many requests at once (the rest queue).
    #[arg(long)]
    pub max_concurrency: Option<usize>,
}

#[derive(Debug, Clone, Args)]
pub struct FuzzArgs {
    /// The server, as host:port.
    #[arg(long, default_value = "127.0.0.1:8000")]
    pub addr: String,
    #[arg(long, default_value_t = 10_000)]
    pub num_requests: u64,
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    #[arg(long, default_value_t = 8)]
    pub concurrency: usize,
    /// Served names to address (base and adapters), comma-separated. Default: what
    /// `GET /v1/models` lists.
    #[arg(long, value_delimiter = ',')]
    pub models: Vec<String>,
    /// API key for requests that do not set their own `Authorization`.
    #[arg(long, env = "OPENAI_API_KEY", hide_env_values = true)]
    pub api_key: Option<String>,
    /// Seconds to wait for one answer.
    #[arg(long, default_value_t = 120.0)]
    pub timeout: f64,
}
