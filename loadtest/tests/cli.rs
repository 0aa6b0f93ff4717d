//! The binary end to end: `run` writes a report and plots, `compare` sets the exit code from its gates.

use caduceus_loadtest::mock::{MockConfig, MockServer};
use caduceus_loadtest::plot;
use std::path::PathBuf;
use std::process::Output;
use std::time::Duration;

const BIN: &str = env!("CARGO_BIN_EXE_caduceus-loadtest");

async fn loadtest(args: Vec<String>) -> Output {
    tokio::task::spawn_blocking(move || {
        std::process::Command::new(BIN).args(args).output().unwrap()
    })
    .await
    .unwrap()
}

fn owned(args: &[&str]) -> Vec<String> {
    args.iter().map(|s| s.to_string()).collect()
}

fn scratch(name: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!(
        "caduceus-loadtest-cli-{}-{name}",
        std::process::id()
    ));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

async fn quick_mock(ttft_ms: u64) -> MockServer {
    let cfg = MockConfig {
        ttft: Duration::from_millis(ttft_ms),
        itl: Duration::from_millis(2),
        output_tokens: Some(6),
        adapters: (0..5).map(|i| format!("doctor-{i:03}")).collect(),
        ..MockConfig::default()
    };
    MockServer::start(cfg).await.unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn run_writes_report_and_plots() {
    let server = quick_mock(5).await;
    let dir = scratch("run");
    let drawn = plot::font_available();
    if !drawn {
        eprintln!("NOTICE: no TrueType font on this machine; skipping the plot files (set CADUCEUS_PLOT_FONT)");
    }
    for ext in ["svg", "png"] {
        let out = dir.join("report.json");
        let fig = dir.join(format!("nested/report.{ext}"));
        let mut args = owned(&[
            "run",
            "--url",
            &server.url(),
            "--adapters",
            "discover",
            "--adapter-dist",
            "zipf:1.1",
            "--rate",
            "inf",
            "--num-requests",
            "30",
            "--seed",
            "5",
            "--slo",
            "ttft=1s",
            "--save-detailed",
            "--no-progress",
        ]);
        args.extend(owned(&["--out", out.to_str().unwrap()]));
        if drawn {
            args.extend(owned(&["--plot", fig.to_str().unwrap()]));
        }
        let o = loadtest(args).await;
        let stdout = String::from_utf8_lossy(&o.stdout);
        assert!(
            o.status.success(),
            "{stdout}\n{}",
            String::from_utf8_lossy(&o.stderr)
        );
        assert!(
            stdout.contains("Serving Benchmark Result") && stdout.contains("Successful requests:")
        );
        let report: serde_json::Value =
            serde_json::from_slice(&std::fs::read(&out).unwrap()).unwrap();
        assert_eq!(report["completed"], 30);
        assert_eq!(report["num_prompts"], 30);
        assert_eq!(report["request_rate"], "inf");
        assert_eq!(report["schedule_hash"].as_str().unwrap().len(), 16);
        assert!(report["median_ttft_ms"].as_f64().unwrap() > 0.0);
        assert_eq!(report["requests"].as_array().unwrap().len(), 30);
        assert!(
            report["by_popularity"]["head"]["completed"]
                .as_u64()
                .unwrap()
                > 0
        );
        assert!(!report["time_series"].as_array().unwrap().is_empty());
        if drawn {
            let bytes = std::fs::read(&fig).unwrap();
            match ext {
                "svg" => assert!(
                    String::from_utf8_lossy(&bytes).contains("<svg") && bytes.len() > 10_000
                ),
                _ => assert!(bytes.starts_with(b"\x89PNG\r\n\x1a\n") && bytes.len() > 10_000),
            }
        }
    }
    std::fs::remove_dir_all(&dir).unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn compare_gate_sets_the_exit_code() {
    let (a, b) = (quick_mock(5).await, quick_mock(40).await);
    let dir = scratch("compare");
    let out = dir.join("compare.json");
    let base = owned(&[
        "compare",
        "--url-a",
        &a.url(),
        "--url-b",
        &b.url(),
        "--model",
        "mock-base",
        "--num-requests",
        "8",
        "--rate",
        "inf",
        "--bootstrap",
        "50",
        "--no-progress",
        "--out",
        out.to_str().unwrap(),
    ]);
    let pass = loadtest([base.clone(), owned(&["--gate", "completed>=1.0"])].concat()).await;
    assert_eq!(
        pass.status.code(),
        Some(0),
        "{}",
        String::from_utf8_lossy(&pass.stderr)
    );
    let fail = loadtest(
        [
            base,
            owned(&["--gate", "completed>=1.0", "--gate", "median_ttft_ms<=1.0"]),
        ]
        .concat(),
    )
    .await;
    assert_eq!(
        fail.status.code(),
        Some(1),
        "{}",
        String::from_utf8_lossy(&fail.stderr)
    );
    let json: serde_json::Value = serde_json::from_slice(&std::fs::read(&out).unwrap()).unwrap();
    assert_eq!(json["gates"][1]["passed"], false);
    assert!(String::from_utf8_lossy(&fail.stdout).contains("gate median_ttft_ms<=1: FAIL"));

    let bad = loadtest(owned(&[
        "compare",
        "--url-a",
        &a.url(),
        "--url-b",
        &b.url(),
        "--gate",
        "nonsense",
    ]))
    .await;
    assert_eq!(bad.status.code(), Some(2));
    std::fs::remove_dir_all(&dir).unwrap();
}
