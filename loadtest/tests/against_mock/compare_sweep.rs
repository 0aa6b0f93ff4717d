//! `compare` and `sweep` end to end against mocks.

use super::*;
use caduceus_loadtest::compare;
use caduceus_loadtest::sweep;
use std::sync::atomic::Ordering;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn compare_sends_identical_load_and_gates_on_ratios() {
    let a = mock(50, 5, |_| {}).await;
    let b = mock(100, 5, |_| {}).await;
    let args = compare_args(&[
        "--url-a",
        &a.url(),
        "--url-b",
        &b.url(),
        "--model",
        "mock-base",
        "--num-requests",
        "20",
        "--rate",
        "40",
        "--output-len",
        "5",
        "--bootstrap",
        "200",
        "--warmup",
        "2",
    ]);
    let result = compare::compare(&args).await.unwrap();
    // Both servers saw the same bodies (2 warm-ups + 20 requests, twice each).
    assert_eq!(a.stats().requests.load(Ordering::Relaxed), 44);
    assert_eq!(b.stats().requests.load(Ordering::Relaxed), 44);
    assert_eq!(
        a.stats().body_digest.load(Ordering::Relaxed),
        b.stats().body_digest.load(Ordering::Relaxed)
    );
    assert_eq!(result.a.runs.len(), 2);
    assert_eq!(result.a.pooled.completed, 40);
    let row = |k: &str| {
        result
            .ratios
            .iter()
            .find(|r| r.metric == k)
            .unwrap()
            .clone()
    };
    let ttft = row("mean_ttft_ms");
    assert_close("TTFT ratio", ttft.ratio.unwrap(), 2.0, 0.1);
    assert!(
        ttft.ci_lo.unwrap() <= ttft.ratio.unwrap() && ttft.ratio.unwrap() <= ttft.ci_hi.unwrap()
    );
    assert_close("TPOT ratio", row("median_tpot_ms").ratio.unwrap(), 1.0, 0.1);

    let gates: Vec<compare::Gate> = ["mean_ttft_ms<=1.0", "completed>=1.0", "no_such_metric>=1"]
        .iter()
        .map(|g| g.parse().unwrap())
        .collect();
    let verdicts = compare::judge(&result, &gates);
    assert_eq!(
        verdicts.iter().map(|v| v.passed).collect::<Vec<_>>(),
        vec![false, true, false]
    );
    let json = compare::with_verdicts(&result, &verdicts);
    assert_eq!(json["order"], serde_json::json!(["A", "B", "B", "A"]));
    assert_eq!(json["gates"][1]["passed"], true);
    assert!(result.table(&verdicts).contains("FAIL"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sweep_over_listed_rates_keeps_the_prompts() {
    let server = mock(2, 1, |c| c.output_tokens = Some(2)).await;
    let args = sweep_args(
        &server.url(),
        &[
            "--rates",
            "20,10",
            "--num-requests",
            "15",
            "--slo",
            "ttft=1s",
        ],
    );
    let client = setup::client(&args.url, &args.load).unwrap();
    let targets = setup::resolve_targets(&args.load, &client).await.unwrap();
    let r = sweep::sweep(&client, &args, targets).await.unwrap();
    assert_eq!(
        r.points.iter().map(|p| p.rate).collect::<Vec<_>>(),
        vec![10.0, 20.0]
    );
    assert_ne!(r.points[0].schedule_hash, r.points[1].schedule_hash);
    assert!(r
        .points
        .iter()
        .all(|p| p.metrics.completed == 15 && p.meets_slo == Some(true)));
    assert!(r.table().lines().count() >= 3);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sweep_search_finds_the_capacity_of_a_limited_server() {
    // 2 slots, each answer ~ 20 + 4 * 5 = 40 ms: about 50 requests/s before queueing takes off.
    let server = mock(20, 5, |c| {
        c.output_tokens = Some(5);
        c.max_concurrency = Some(2);
    })
    .await;
    let args = sweep_args(
        &server.url(),
        &[
            "--search",
            "--slo",
            "ttft=150ms",
            "--slo-share",
            "0.9",
            "--min-rate",
            "10",
            "--max-rate",
            "160",
            "--search-steps",
            "2",
            "--duration",
            "1.5",
            "--seed",
            "2",
        ],
    );
    let client = setup::client(&args.url, &args.load).unwrap();
    let targets = setup::resolve_targets(&args.load, &client).await.unwrap();
    let r = sweep::sweep(&client, &args, targets).await.unwrap();
    let best = r.best_rate.expect("10 req/s is well within capacity");
    assert!((10.0..=80.0).contains(&best), "best {best}: {}", r.table());
    assert!(
        r.points.iter().any(|p| p.meets_slo == Some(false)),
        "160 req/s must fail: {}",
        r.table()
    );
    assert!(
        r.points
            .iter()
            .filter(|p| p.rate <= best)
            .all(|p| p.meets_slo == Some(true)),
        "{}",
        r.table()
    );
}
