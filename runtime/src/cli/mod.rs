//! Command-line interface: argument types and dispatch. Errors become `anyhow` only here, at the
//! binary's edge.

mod bench_model;
mod generate;
mod tokenize;

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
    /// Log filter (e.g. `info`, `caduceus_runtime=debug`); RUST_LOG overrides it.
    #[arg(long, global = true, default_value = "info")]
    pub log_level: String,
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
}

/// Runs a parsed command line.
pub fn run(cli: Cli) -> anyhow::Result<()> {
    init_logging(&cli.log_level);
    init_threads(cli.threads)?;
    match cli.command {
        Command::Generate(args) => generate::run(args),
        Command::Tokenize(args) => tokenize::run(args),
        Command::BenchModel(args) => bench_model::run(args),
    }
}

fn init_logging(level: &str) {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .or_else(|_| tracing_subscriber::EnvFilter::try_new(level))
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let _ = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .try_init();
}

fn init_threads(threads: Option<usize>) -> anyhow::Result<()> {
    let n = threads.unwrap_or_else(|| std::thread::available_parallelism().map_or(1, |n| n.get()));
    anyhow::ensure!(n >= 1, "--threads must be at least 1");
    rayon::ThreadPoolBuilder::new()
        .num_threads(n)
        .build_global()
        .map_err(|e| anyhow::anyhow!("cannot start {n} compute threads: {e}"))
}
