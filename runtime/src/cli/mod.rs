//! Command-line interface: argument types and dispatch. Errors become `anyhow` only here, at the
//! binary's edge.

mod bench_lora;
mod bench_model;
mod bench_prefix;
mod bench_stop;
mod bench_throughput;
mod config_cmd;
mod generate;
#[cfg(any(feature = "cuda", feature = "gpu-emu"))]
mod gpu_bench;
mod gpu_parity;
mod make_adapters;
mod serve;
#[cfg(any(feature = "cuda", feature = "gpu-emu"))]
mod serve_gpu;
mod step_budget;
mod tokenize;

use std::io::IsTerminal;
use std::path::PathBuf;

use clap::{Parser, Subcommand};

use crate::model::loader::DEFAULT_MODEL_PATH;

/// Caduceus: an LLM inference server for many LoRA "doctor avatars" on one shared base model.
#[derive(Debug, Parser)]
#[command(name = "caduceus", version, about)]
pub struct Cli {
    /// Compute threads (default: all cores).
    #[arg(long, global = true)]
    pub threads: Option<usize>,
    /// Log filter (e.g. `info`, `caduceus_runtime=debug`; default `info`, or `logging.level` for
    /// `serve`); RUST_LOG overrides it.
    #[arg(long, global = true)]
    pub log_level: Option<String>,
    #[command(subcommand)]
    pub command: Command,
}

/// The model to load: a GGUF file or a Hugging Face model directory.
#[derive(Debug, clap::Args)]
pub struct ModelArg {
    /// GGUF file or Hugging Face model directory.
    #[arg(long, default_value = DEFAULT_MODEL_PATH)]
    pub model: PathBuf,
}

/// Subcommands.
#[derive(Debug, Subcommand)]
pub enum Command {
    /// Generate completions for one or more prompts (several prompts run as one batch).
    Generate(generate::GenerateArgs),
    /// Print the token ids of raw text (no chat template).
    Tokenize(tokenize::TokenizeArgs),
    /// Measure prompt and decode throughput of the model on this machine.
    BenchModel(bench_model::BenchModelArgs),
    /// Offline engine throughput: many random prompts through continuous batching.
    BenchThroughput(bench_throughput::BenchThroughputArgs),
    /// Time to first token of a request sharing a long prefix, prefix caching on vs off.
    BenchPrefixCache(bench_prefix::BenchPrefixArgs),
    /// Cost of many adapters: decode throughput vs base, cold loads, latency during a burst.
    BenchLora(bench_lora::BenchLoraArgs),
    /// How much one request with the most and longest stop strings slows other streams' steps.
    BenchStop(bench_stop::BenchStopArgs),
    /// Serve the OpenAI-compatible API (config file, environment and flags; see deploy/config).
    Serve(serve::ServeArgs),
    /// Validate (`check FILE`) or print (`print`) the server configuration.
    Config(config_cmd::ConfigArgs),
    /// Write deterministic synthetic PEFT LoRA adapters (doctor-0000, ...) for the base model.
    MakeAdapters(make_adapters::MakeAdaptersArgs),
    /// Benchmark a random-weight model (Llama-3-8B shape by default) on the GPU; one JSON.
    #[cfg(any(feature = "cuda", feature = "gpu-emu"))]
    GpuBench(gpu_bench::GpuBenchArgs),
    /// Last-position logits and greedy tokens of an HF model (+ PEFT adapters) as JSON, per
    /// request and in one mixed batch, for parity checks against transformers + peft.
    GpuParity(gpu_parity::GpuParityArgs),
}

/// Runs a parsed command line.
pub fn run(cli: Cli) -> anyhow::Result<()> {
    if let Command::Serve(mut args) = cli.command {
        args.overrides.log_level = cli.log_level;
        let config = serve::load_config(&args)?;
        init_logging(&config.logging.level, config.logging.json);
        init_threads(cli.threads)?;
        return serve::run(config);
    }
    init_logging(cli.log_level.as_deref().unwrap_or("info"), false);
    init_threads(cli.threads)?;
    match cli.command {
        Command::Serve(_) => Ok(()),
        Command::Generate(args) => generate::run(args),
        Command::Tokenize(args) => tokenize::run(args),
        Command::BenchModel(args) => bench_model::run(args),
        Command::BenchThroughput(args) => bench_throughput::run(args),
        Command::BenchPrefixCache(args) => bench_prefix::run(args),
        Command::BenchLora(args) => bench_lora::run(args),
        Command::BenchStop(args) => bench_stop::run(args),
        Command::Config(args) => config_cmd::run(args),
        Command::MakeAdapters(args) => make_adapters::run(args),
        #[cfg(any(feature = "cuda", feature = "gpu-emu"))]
        Command::GpuBench(args) => gpu_bench::run(args),
        Command::GpuParity(args) => gpu_parity::run(args),
    }
}

fn init_logging(level: &str, json: bool) {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .or_else(|_| tracing_subscriber::EnvFilter::try_new(level))
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    // Colours only for a person at a terminal: a log file, `docker logs` or a collector reading
    // a pipe would keep the escape codes in every line (and `NO_COLOR` turns them off anyway).
    let colour = std::io::stderr().is_terminal() && std::env::var_os("NO_COLOR").is_none();
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(colour)
        .with_writer(std::io::stderr);
    let _ = if json {
        builder.json().try_init()
    } else {
        builder.try_init()
    };
}

fn init_threads(threads: Option<usize>) -> anyhow::Result<()> {
    let n = threads.unwrap_or_else(|| std::thread::available_parallelism().map_or(1, |n| n.get()));
    anyhow::ensure!(n >= 1, "--threads must be at least 1");
    rayon::ThreadPoolBuilder::new()
        .num_threads(n)
        .build_global()
        .map_err(|e| anyhow::anyhow!("cannot start {n} compute threads: {e}"))
}
