//! Failures are counted by kind and match what the mock injected.

use super::*;
use std::sync::atomic::Ordering;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn injected_statuses_and_disconnects_are_counted_by_kind() {
    let server = mock(5, 2, |c| {
        c.error_rate = 0.2;
        c.error_status = 503;
        c.disconnect_rate = 0.1;
        c.output_tokens = Some(8);
        c.seed = 9;
    })
    .await;
    let args = run_args(
        &server.url(),
        &[
            "--concurrency",
            "16",
            "--num-requests",
            "300",
            "--slo",
            "ttft=1s",
        ],
    );
    let (result, report) = run_once(&args).await;
    let m = &report.metrics;
    let injected_errors = server.stats().errors.load(Ordering::Relaxed) as usize;
    let injected_disconnects = server.stats().disconnects.load(Ordering::Relaxed) as usize;
    assert_eq!(
        m.errors.get("http_503").copied().unwrap_or(0),
        injected_errors
    );
    assert_eq!(
        m.errors.get("disconnect").copied().unwrap_or(0),
        injected_disconnects
    );
    assert_eq!(m.failed, injected_errors + injected_disconnects);
    assert_eq!(m.completed + m.failed, 300);
    assert!((40..=80).contains(&injected_errors), "{injected_errors}");
    assert!(
        (15..=50).contains(&injected_disconnects),
        "{injected_disconnects}"
    );
    // Failed requests never count as good.
    assert_eq!(m.slo_attainment, Some(m.completed as f64 / 300.0));
    // Cut-off streams still recorded the tokens they got before the cut (the mock sends 4 of 8
    // first; one left in a busy server's buffer at the cut may never arrive, so not every
    // stream need have all 4, but none has more and they are not all lost).
    let cut: Vec<u64> = result
        .outcomes
        .iter()
        .filter(|o| o.error.map(|e| e.to_string()) == Some("disconnect".into()))
        .map(|o| o.output_tokens)
        .collect();
    assert_eq!(cut.len(), injected_disconnects);
    assert!(cut.iter().all(|&n| n <= 4), "{cut:?}");
    assert_eq!(cut.iter().max(), Some(&4), "{cut:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn slow_answers_time_out() {
    let server = mock(3000, 1, |_| {}).await;
    let args = run_args(
        &server.url(),
        &[
            "--concurrency",
            "4",
            "--num-requests",
            "4",
            "--timeout",
            "0.3",
        ],
    );
    let (_, report) = run_once(&args).await;
    assert_eq!(report.metrics.errors.get("timeout"), Some(&4));
    assert_eq!(report.metrics.completed, 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unknown_model_and_closed_port_are_distinct_errors() {
    let server = mock(1, 1, |_| {}).await;
    let args = run_args(
        &server.url(),
        &["--model", "no-such-model", "--num-requests", "3"],
    );
    let (_, report) = run_once(&args).await;
    assert_eq!(report.metrics.errors.get("http_404"), Some(&3));

    let port = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        l.local_addr().unwrap().port()
    };
    let url = format!("http://127.0.0.1:{port}");
    let args = run_args(&url, &["--model", "m", "--num-requests", "3"]);
    let (_, report) = run_once(&args).await;
    assert_eq!(report.metrics.errors.get("connect"), Some(&3));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn adapters_are_discovered_and_split_by_popularity() {
    let server = mock(2, 1, |c| {
        c.adapters = (0..10).map(|i| format!("doctor-{i:03}")).collect();
        c.output_tokens = Some(3);
    })
    .await;
    let args = run_args(
        &server.url(),
        &[
            "--adapters",
            "discover",
            "--adapter-dist",
            "slora:3",
            "--concurrency",
            "8",
            "--num-requests",
            "400",
        ],
    );
    let (result, report) = run_once(&args).await;
    assert_eq!(report.metrics.completed, 400, "{:?}", report.metrics.errors);
    assert!(result
        .outcomes
        .iter()
        .all(|o| o.model == format!("doctor-{:03}", o.adapter_rank.unwrap())));
    let split = report.by_popularity.unwrap();
    assert_eq!((split.head_adapters, split.num_adapters), (2, 10));
    // slora:3 over 10 adapters: P(rank < 2) = 0.2^(1/3) = 0.585
    let head_share = split.head.completed as f64 / 400.0;
    assert!((head_share - 0.585).abs() < 0.08, "{head_share}");
}
