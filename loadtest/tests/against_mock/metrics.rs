//! Timings: TTFT, TPOT, ITL and E2E latency against injected delays; arrival rate; mock throughput.

use super::*;
use caduceus_loadtest::stats::{mean, std_dev};

/// Delays large enough that scheduler noise on a loaded 2-core machine stays well inside 5%.
const TTFT_MS: f64 = 200.0;
const ITL_MS: f64 = 20.0;
const TOKENS: u64 = 10;

fn check_latencies(report: &Report, result: &RunResult, n: usize) {
    let m = &report.metrics;
    assert_eq!((m.completed, m.failed), (n, 0), "{:?}", m.errors);
    assert_eq!(m.total_output_tokens, n as u64 * TOKENS);
    for o in &result.outcomes {
        assert_eq!(o.output_tokens, TOKENS);
        assert_eq!(
            o.itl_s.len(),
            TOKENS as usize - 1,
            "one ITL per token chunk after the first"
        );
    }
    // The role-only first chunk of a chat stream arrives at once; TTFT must wait for text.
    assert_close("mean TTFT", m.latency("ttft").mean, TTFT_MS, 0.05);
    assert_close("median TTFT", m.latency("ttft").median, TTFT_MS, 0.05);
    assert_close("median TPOT", m.latency("tpot").median, ITL_MS, 0.05);
    assert_close("mean TPOT", m.latency("tpot").mean, ITL_MS, 0.05);
    assert_close("mean ITL", m.latency("itl").mean, ITL_MS, 0.05);
    let e2e = TTFT_MS + (TOKENS - 1) as f64 * ITL_MS;
    assert_close("median E2EL", m.latency("e2el").median, e2e, 0.05);
    assert_close("mean E2EL", m.latency("e2el").mean, e2e, 0.05);
    // Throughput is consistent with its own definition.
    assert_close(
        "output throughput",
        m.output_throughput,
        m.total_output_tokens as f64 / m.duration,
        1e-9,
    );
    let ts_tokens: f64 = report.time_series.iter().map(|s| s.output_tokens).sum();
    assert_close(
        "time-series tokens",
        ts_tokens,
        m.total_output_tokens as f64,
        1e-9,
    );
    assert_eq!(report.time_series.iter().map(|s| s.sent).sum::<usize>(), n);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn chat_metrics_match_injected_delays() {
    let server = mock(TTFT_MS as u64, ITL_MS as u64, |_| {}).await;
    let args = run_args(
        &server.url(),
        &[
            "--rate",
            "20",
            "--num-requests",
            "40",
            "--output-len",
            "10",
            "--seed",
            "1",
        ],
    );
    let (result, report) = run_once(&args).await;
    check_latencies(&report, &result, 40);
    assert_eq!(
        server
            .stats()
            .requests
            .load(std::sync::atomic::Ordering::Relaxed),
        40
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn completions_metrics_match_injected_delays() {
    let server = mock(TTFT_MS as u64, ITL_MS as u64, |_| {}).await;
    let args = run_args(
        &server.url(),
        &[
            "--endpoint",
            "completions",
            "--concurrency",
            "5",
            "--num-requests",
            "20",
            "--output-len",
            "10",
        ],
    );
    let (result, report) = run_once(&args).await;
    check_latencies(&report, &result, 20);
    // Closed loop: about 5 in flight on average while the run lasts.
    let busy: Vec<f64> = report
        .time_series
        .iter()
        .filter(|s| s.width_s == 1.0)
        .map(|s| s.in_flight)
        .collect();
    assert!(busy.iter().all(|&x| x > 3.0 && x <= 5.0 + 1e-9), "{busy:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sends_follow_the_schedule_rate_and_variability() {
    let server = mock(1, 1, |c| c.output_tokens = Some(2)).await;
    let args = run_args(
        &server.url(),
        &[
            "--rate",
            "100",
            "--num-requests",
            "300",
            "--dataset",
            "random",
            "--input-len",
            "16",
            "--seed",
            "3",
        ],
    );
    let (result, _) = run_once(&args).await;
    let gaps = |t: Vec<f64>| -> Vec<f64> { t.windows(2).map(|w| w[1] - w[0]).collect() };
    let sched = gaps(result.outcomes.iter().map(|o| o.scheduled_s).collect());
    let mut starts: Vec<f64> = result.outcomes.iter().map(|o| o.start_s).collect();
    starts.sort_by(f64::total_cmp);
    let actual = gaps(starts);
    // The schedule has the requested rate and Poisson variability (CV^2 = 1 / burstiness = 1) ...
    assert_close("scheduled rate", 1.0 / mean(&sched), 100.0, 0.15);
    let cv2 = |g: &[f64]| (std_dev(g) / mean(g)).powi(2);
    assert_close("scheduled CV^2", cv2(&sched), 1.0, 0.2);
    // ... and the harness sends on it.
    assert_close("sent rate", 1.0 / mean(&actual), 1.0 / mean(&sched), 0.05);
    assert_close("sent CV^2", cv2(&actual), cv2(&sched), 0.1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mock_absorbs_thousands_of_requests_per_second() {
    let server = mock(0, 0, |c| c.output_tokens = Some(4)).await;
    let n = 4000;
    let args = run_args(
        &server.url(),
        &[
            "--concurrency",
            "64",
            "--num-requests",
            "4000",
            "--dataset",
            "random",
            "--input-len",
            "8",
        ],
    );
    let (_, report) = run_once(&args).await;
    let m = &report.metrics;
    assert_eq!((m.completed, m.failed), (n, 0), "{:?}", m.errors);
    // Reported, not asserted: the figure depends on the machine and its load.
    eprintln!(
        "mock throughput: {:.0} requests/s ({:.0} streamed tokens/s) with 64 clients, harness and mock sharing this process",
        m.request_throughput, m.output_throughput
    );
}
