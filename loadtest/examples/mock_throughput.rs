//! How many requests per second the mock server absorbs from the harness (both in this process).
//! `cargo run --release -p caduceus-loadtest --example mock_throughput`
//!
//! Closed loop at several client counts, then open loop at a fixed 2,000 requests/s to show the harness
//! keeps that schedule (send lag) while the mock keeps up.

use caduceus_loadtest::cli::{Cli, Command};
use caduceus_loadtest::mock::{MockConfig, MockServer};
use caduceus_loadtest::setup;
use clap::Parser;
use std::time::Duration;

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let cfg = MockConfig {
        ttft: Duration::ZERO,
        itl: Duration::ZERO,
        output_tokens: Some(4),
        ..MockConfig::default()
    };
    let server = MockServer::start(cfg).await?;
    let url = server.url();
    let common = [
        "--dataset",
        "random",
        "--input-len",
        "16",
        "--no-progress",
        "--seed",
        "1",
    ];
    let scenarios: Vec<(String, Vec<&str>)> = vec![
        (
            "closed loop, 16 clients".into(),
            vec!["--concurrency", "16", "--num-requests", "20000"],
        ),
        (
            "closed loop, 64 clients".into(),
            vec!["--concurrency", "64", "--num-requests", "20000"],
        ),
        (
            "closed loop, 256 clients".into(),
            vec!["--concurrency", "256", "--num-requests", "20000"],
        ),
        (
            "open loop, Poisson 2000/s for 5 s".into(),
            vec!["--rate", "2000", "--duration", "5"],
        ),
    ];
    println!(
        "{:<36}{:>10}{:>12}{:>10}{:>16}",
        "scenario", "requests", "req/s", "failed", "max lag (ms)"
    );
    for (name, extra) in scenarios {
        let argv = ["caduceus-loadtest", "run", "--url", &url]
            .into_iter()
            .chain(common)
            .chain(extra);
        let Command::Run(args) = Cli::try_parse_from(argv)?.command else {
            anyhow::bail!("not a run command");
        };
        let client = setup::client(&args.url, &args.load)?;
        let targets = setup::resolve_targets(&args.load, &client).await?;
        let spec = setup::schedule_spec(&args.load, targets, None)?;
        let prepared = setup::prepare(client.base_url(), &args.load, spec)?;
        let (_, report) = setup::measure(&client, &args.load, &prepared, None, false).await;
        let m = &report.metrics;
        println!(
            "{name:<36}{:>10}{:>12.0}{:>10}{:>16.1}",
            m.completed + m.failed,
            m.request_throughput,
            m.failed,
            report.harness.max_send_lag_ms
        );
    }
    server.shutdown();
    Ok(())
}
