//! `caduceus-loadtest`: load generator for OpenAI-compatible servers (Caduceus, vLLM, llama.cpp's server).
//! Exit codes: 0 success, 1 a `compare --gate` failed, 2 an error.

use anyhow::Context;
use caduceus_loadtest::cli::{Cli, Command, CompareArgs, FuzzArgs, MockArgs, RunArgs, SweepArgs};
use caduceus_loadtest::mock::{MockConfig, MockServer};
use caduceus_loadtest::{compare, fuzz_run, plot, setup, sweep};
use clap::Parser;
use std::path::Path;
use std::process::ExitCode;
use std::time::Duration;

fn main() -> ExitCode {
    let cli = Cli::parse();
    let rt = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("error: cannot start the async runtime: {e}");
            return ExitCode::from(2);
        }
    };
    match rt.block_on(dispatch(cli.command)) {
        Ok(true) => ExitCode::SUCCESS,
        Ok(false) => ExitCode::from(1),
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::from(2)
        }
    }
}

/// Runs a command; `Ok(false)` means a gate failed.
async fn dispatch(command: Command) -> anyhow::Result<bool> {
    match command {
        Command::Run(args) => run(args).await.map(|()| true),
        Command::Sweep(args) => sweep_cmd(args).await.map(|()| true),
        Command::Compare(args) => compare_cmd(args).await,
        Command::Fuzz(args) => fuzz_cmd(args).await,
        Command::MockServer(args) => mock_server(args).await.map(|()| true),
    }
}

fn write_json(path: &Path, value: &impl serde::Serialize) -> anyhow::Result<()> {
    if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
        std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    }
    let text = serde_json::to_string_pretty(value)?;
    std::fs::write(path, text).with_context(|| format!("writing {}", path.display()))?;
    eprintln!("report written to {}", path.display());
    Ok(())
}

fn ensure_parent(path: &Path) -> anyhow::Result<()> {
    if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
        std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    }
    Ok(())
}

async fn run(args: RunArgs) -> anyhow::Result<()> {
    let client = setup::client(&args.url, &args.load)?.with_replicas(&args.replica_urls)?;
    let targets = setup::resolve_targets(&args.load, &client).await?;
    let spec = setup::schedule_spec(&args.load, targets, None)?;
    let prepared = setup::prepare(client.base_url(), &args.load, spec)?;
    eprintln!("{}", setup::describe(&prepared));
    let (result, report) =
        setup::measure(&client, &args.load, &prepared, None, args.save_detailed).await;
    println!("{}", report.summary());
    if let Some(out) = &args.out {
        write_json(out, &report)?;
    }
    for path in &args.plot {
        ensure_parent(path)?;
        plot::plot_run(&report, &result.outcomes, path)?;
        eprintln!("plot written to {}", path.display());
    }
    Ok(())
}

async fn sweep_cmd(args: SweepArgs) -> anyhow::Result<()> {
    let client = setup::client(&args.url, &args.load)?;
    let targets = setup::resolve_targets(&args.load, &client).await?;
    let result = sweep::sweep(&client, &args, targets).await?;
    println!("{}", result.table());
    if let Some(out) = &args.out {
        write_json(out, &result)?;
    }
    if let Some(path) = &args.plot {
        ensure_parent(path)?;
        sweep::plot_sweep(&result, path)?;
        eprintln!("plot written to {}", path.display());
    }
    Ok(())
}

async fn compare_cmd(args: CompareArgs) -> anyhow::Result<bool> {
    let gates = args
        .gates
        .iter()
        .map(|g| g.parse::<compare::Gate>())
        .collect::<Result<Vec<_>, _>>()?;
    let result = compare::compare(&args).await?;
    let verdicts = compare::judge(&result, &gates);
    println!("{}", result.table(&verdicts));
    if let Some(out) = &args.out {
        write_json(out, &compare::with_verdicts(&result, &verdicts))?;
    }
    if let Some(path) = &args.plot {
        ensure_parent(path)?;
        compare::plot_compare(&result, path)?;
        eprintln!("plot written to {}", path.display());
    }
    Ok(verdicts.iter().all(|v| v.passed))
}

async fn fuzz_cmd(args: FuzzArgs) -> anyhow::Result<bool> {
    let addr = tokio::net::lookup_host(&args.addr)
        .await
        .with_context(|| format!("resolving {}", args.addr))?
        .next()
        .with_context(|| format!("{} resolves to no address", args.addr))?;
    let mut models = args.models.clone();
    if models.is_empty() {
        let base = format!("http://{}", args.addr);
        let client = caduceus_loadtest::client::ApiClient::new(
            &base,
            args.api_key.clone(),
            caduceus_loadtest::client::RequestOptions {
                endpoint: caduceus_loadtest::client::Endpoint::Chat,
                ignore_eos: false,
                temperature: None,
                timeout: Duration::from_secs_f64(args.timeout),
            },
        )?;
        models = client
            .list_models()
            .await?
            .into_iter()
            .map(|m| m.id)
            .collect();
    }
    let plan = fuzz_run::FuzzPlan {
        addr,
        seed: args.seed,
        num_requests: args.num_requests,
        concurrency: args.concurrency,
        models,
        api_key: args.api_key,
        timeout: Duration::from_secs_f64(args.timeout),
    };
    eprintln!(
        "fuzzing {} with {} requests (seed {}, {} at once) over models {:?}",
        addr, plan.num_requests, plan.seed, plan.concurrency, plan.models
    );
    let report = fuzz_run::run(&plan).await;
    println!("{}", report.summary());
    Ok(report.passed())
}

async fn mock_server(args: MockArgs) -> anyhow::Result<()> {
    let cfg = MockConfig {
        ttft: Duration::from_secs_f64(args.ttft_ms.max(0.0) / 1000.0),
        itl: Duration::from_secs_f64(args.itl_ms.max(0.0) / 1000.0),
        output_tokens: args.output_tokens,
        error_rate: args.error_rate,
        error_status: args.error_status,
        disconnect_rate: args.disconnect_rate,
        base_model: args.model.clone(),
        adapters: (0..args.adapters)
            .map(|i| format!("doctor-{i:03}"))
            .collect(),
        seed: 0,
        max_concurrency: args.max_concurrency,
    };
    let server = MockServer::bind(cfg, args.port).await?;
    println!("mock OpenAI server listening on {}", server.url());
    tokio::signal::ctrl_c()
        .await
        .context("waiting for Ctrl-C")?;
    server.shutdown();
    Ok(())
}
