//! The harness against its own mock server, whose delays, token counts and errors are known: the
//! computed metrics must match what was injected.

mod compare_sweep;
mod errors;
mod metrics;

use caduceus_loadtest::cli::{Cli, Command, CompareArgs, RunArgs, SweepArgs};
use caduceus_loadtest::mock::{MockConfig, MockServer};
use caduceus_loadtest::report::Report;
use caduceus_loadtest::runner::RunResult;
use caduceus_loadtest::setup;
use clap::Parser;
use std::time::Duration;

pub fn parse(argv: &[&str]) -> Command {
    let mut full = vec!["caduceus-loadtest"];
    full.extend_from_slice(argv);
    Cli::try_parse_from(full).unwrap().command
}

pub fn run_args(url: &str, extra: &[&str]) -> RunArgs {
    let mut argv = vec!["run", "--url", url, "--no-progress"];
    argv.extend_from_slice(extra);
    match parse(&argv) {
        Command::Run(a) => a,
        other => panic!("not a run command: {other:?}"),
    }
}

pub fn sweep_args(url: &str, extra: &[&str]) -> SweepArgs {
    let mut argv = vec!["sweep", "--url", url, "--no-progress"];
    argv.extend_from_slice(extra);
    match parse(&argv) {
        Command::Sweep(a) => a,
        other => panic!("not a sweep command: {other:?}"),
    }
}

pub fn compare_args(extra: &[&str]) -> CompareArgs {
    let mut argv = vec!["compare", "--no-progress"];
    argv.extend_from_slice(extra);
    match parse(&argv) {
        Command::Compare(a) => a,
        other => panic!("not a compare command: {other:?}"),
    }
}

/// Builds, runs and reports one schedule, as `caduceus-loadtest run` does.
pub async fn run_once(args: &RunArgs) -> (RunResult, Report) {
    let client = setup::client(&args.url, &args.load).unwrap();
    let targets = setup::resolve_targets(&args.load, &client).await.unwrap();
    let spec = setup::schedule_spec(&args.load, targets, None).unwrap();
    let prepared = setup::prepare(client.base_url(), &args.load, spec).unwrap();
    setup::measure(&client, &args.load, &prepared, None, true).await
}

pub async fn mock(ttft_ms: u64, itl_ms: u64, f: impl FnOnce(&mut MockConfig)) -> MockServer {
    let mut cfg = MockConfig {
        ttft: Duration::from_millis(ttft_ms),
        itl: Duration::from_millis(itl_ms),
        ..MockConfig::default()
    };
    f(&mut cfg);
    MockServer::start(cfg).await.unwrap()
}

/// |got - want| <= tol * want
#[track_caller]
pub fn assert_close(what: &str, got: f64, want: f64, tol: f64) {
    assert!(
        (got - want).abs() <= tol * want,
        "{what}: got {got:.3}, want {want:.3} within {:.0}%",
        tol * 100.0
    );
}
