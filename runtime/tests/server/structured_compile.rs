//! Grammar compiles on a busy server: the compile-time limit charges the compile's CPU time, not
//! the time its thread waited for a core (a delay injected before the compile stands in for
//! that wait); requests asking for the same new grammar at once share one compile; a compile
//! outlasting the request's timeout is a 504, not a 400, and still fills the cache; the cache
//! drops the least recently used grammar; a refused grammar is refused again without another
//! compile; a request waiting for a compile holds no thread; and all of it shows in `/metrics`.

use std::time::{Duration, Instant};

use axum::http::StatusCode;
use axum::Router;
use caduceus_runtime::server::{app, AppState};
use caduceus_runtime::structured::{CompileLimits, ConstraintCompiler};
use serde_json::{json, Value};

use super::support::server_app::{call, TestServer, MODEL};
use super::{assert_error, post};

/// A completion constrained to one of `choices` (room for the longest: the tiny model spells
/// these one byte per token).
fn constrained(choices: &[&str]) -> Value {
    json!({"model": MODEL, "max_tokens": 16, "prompt": "Answer:",
        "structured_outputs": {"choice": choices}})
}

fn serve(limits: CompileLimits, request_timeout: Duration) -> (Router, AppState) {
    let state = TestServer {
        compile_limits: limits,
        request_timeout,
        ..TestServer::default()
    }
    .state();
    (app(state.clone()), state)
}

/// The server's grammar compiler.
fn compiler(state: &AppState) -> &ConstraintCompiler {
    state
        .structured
        .as_deref()
        .expect("the tiny model has a compiler")
}

/// What the compiler has done so far: (compiles started, grammars cached).
fn compiler_counts(state: &AppState) -> (u64, usize) {
    let c = compiler(state);
    (c.num_compiles(), c.num_cached())
}

#[tokio::test]
async fn time_a_compile_waits_off_the_cpu_does_not_count_against_its_limit() {
    let limit = Duration::from_millis(500);
    let (r, state) = serve(
        CompileLimits {
            timeout: limit,
            ..CompileLimits::default()
        },
        Duration::from_secs(60),
    );
    let delay = limit * 3;
    compiler(&state).delay_compiles(delay);
    let start = Instant::now();
    let (s, b) = post(&r, "/v1/completions", constrained(&["urgent", "routine"])).await;
    // A wall-clock limit would have refused this grammar with a 400 after 500 ms.
    assert_eq!(s, StatusCode::OK, "{b}");
    assert!(start.elapsed() >= delay, "the injected delay was skipped");
    let text = b["choices"][0]["text"].as_str().unwrap();
    assert!(["urgent", "routine"].contains(&text), "{text:?}");
    assert_eq!(compiler_counts(&state), (1, 1));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn requests_for_one_new_grammar_at_once_share_one_compile() {
    let (r, state) = serve(CompileLimits::default(), Duration::from_secs(60));
    compiler(&state).delay_compiles(Duration::from_millis(400));
    let body = constrained(&["yes", "no"]);
    let requests: Vec<_> = (0..8)
        .map(|_| {
            let (r, body) = (r.clone(), body.clone());
            tokio::spawn(async move { post(&r, "/v1/completions", body).await })
        })
        .collect();
    for request in requests {
        let (s, b) = request.await.unwrap();
        assert_eq!(s, StatusCode::OK, "{b}");
    }
    assert_eq!(compiler_counts(&state), (1, 1), "(compiles, cached)");
    // A different grammar is compiled on its own.
    let (s, b) = post(&r, "/v1/completions", constrained(&["maybe", "no"])).await;
    assert_eq!(s, StatusCode::OK, "{b}");
    assert_eq!(compiler_counts(&state), (2, 2), "(compiles, cached)");
}

#[tokio::test]
async fn a_compile_outlasting_the_request_timeout_is_a_504_and_still_fills_the_cache() {
    let timeout = Duration::from_secs(1);
    let (r, state) = serve(CompileLimits::default(), timeout);
    compiler(&state).delay_compiles(Duration::from_secs(3));
    let body = constrained(&["urgent", "routine"]);
    let start = Instant::now();
    let (s, b) = post(&r, "/v1/completions", body.clone()).await;
    assert_eq!(s, StatusCode::GATEWAY_TIMEOUT, "{b}");
    assert_error(&b, "timeout_error", None);
    assert!(
        start.elapsed() < Duration::from_secs(3),
        "the request waited for the compile"
    );
    // The compile goes on and the next request for the grammar finds it compiled.
    let until = Instant::now() + Duration::from_secs(30);
    while compiler_counts(&state).1 == 0 {
        assert!(
            Instant::now() < until,
            "the abandoned compile never finished"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let (s, b) = post(&r, "/v1/completions", body).await;
    assert_eq!(s, StatusCode::OK, "{b}");
    assert_eq!(compiler_counts(&state), (1, 1));
}

#[tokio::test]
async fn the_cache_drops_the_least_recently_used_grammar() {
    let (r, state) = serve(
        CompileLimits {
            cache_entries: 2,
            ..CompileLimits::default()
        },
        Duration::from_secs(60),
    );
    let (a, b, c) = (&["a1", "a2"][..], &["b1", "b2"][..], &["c1", "c2"][..]);
    for (choices, compiles) in [(a, 1), (b, 2), (a, 2), (c, 3), (a, 3), (b, 4)] {
        let (s, body) = post(&r, "/v1/completions", constrained(choices)).await;
        assert_eq!(s, StatusCode::OK, "{body}");
        assert_eq!(compiler_counts(&state).0, compiles, "after {choices:?}");
    }
    assert_eq!(compiler_counts(&state).1, 2);
}

/// A completion constrained by `structured_outputs` (any kind).
fn constrained_by(spec: Value) -> Value {
    json!({"model": MODEL, "max_tokens": 8, "prompt": "Answer:", "structured_outputs": spec})
}

#[tokio::test]
async fn a_refused_grammar_is_refused_again_without_another_compile() {
    let (r, state) = serve(
        CompileLimits {
            cache_entries: 1,
            ..CompileLimits::default()
        },
        Duration::from_secs(60),
    );
    let c = compiler(&state);
    let good = constrained(&["g1", "g2"]);
    let (s, b) = post(&r, "/v1/completions", good.clone()).await;
    assert_eq!(s, StatusCode::OK, "{b}");
    // Refused: a bad regex, a Lark syntax error, a schema of an unknown type.
    let refused = [
        json!({"regex": "(unclosed"}),
        json!({"grammar": "start: ("}),
        json!({"json": {"type": "no-such-type"}}),
    ];
    for (i, spec) in refused.iter().enumerate() {
        let (s, first) = post(&r, "/v1/completions", constrained_by(spec.clone())).await;
        assert_eq!(s, StatusCode::BAD_REQUEST, "{first}");
        assert_error(&first, "invalid_request_error", Some("structured_outputs"));
        for _ in 0..3 {
            let (s, again) = post(&r, "/v1/completions", constrained_by(spec.clone())).await;
            assert_eq!((s, &again), (StatusCode::BAD_REQUEST, &first), "{spec}");
        }
        assert_eq!(c.num_compiles(), 2 + i as u64, "{spec} was compiled again");
    }
    // Refusals are kept beside the compiled grammars, not in their place.
    assert_eq!((c.num_cached(), c.num_refused()), (1, 1));
    let (s, b) = post(&r, "/v1/completions", good).await;
    assert_eq!(s, StatusCode::OK, "{b}");
    assert_eq!(
        c.num_compiles(),
        4,
        "the refusals evicted the compiled grammar"
    );

    // A compile over its CPU-time limit would be over it again.
    let zero = CompileLimits {
        timeout: Duration::ZERO,
        ..CompileLimits::default()
    };
    let (r, state) = serve(zero, Duration::from_secs(60));
    let mut answers = Vec::new();
    for _ in 0..3 {
        let (s, b) = post(&r, "/v1/completions", constrained(&["t1", "t2"])).await;
        assert_eq!(s, StatusCode::BAD_REQUEST, "{b}");
        answers.push(b);
    }
    assert!(answers.iter().all(|b| b == &answers[0]), "{answers:?}");
    assert_eq!(compiler_counts(&state), (1, 0), "(compiles, cached)");
}

#[tokio::test]
async fn compiles_and_cache_hits_show_in_the_metrics() {
    let (r, _) = serve(CompileLimits::default(), Duration::from_secs(60));
    for _ in 0..2 {
        let (s, b) = post(&r, "/v1/completions", constrained(&["m1", "m2"])).await;
        assert_eq!(s, StatusCode::OK, "{b}");
    }
    let zero = CompileLimits {
        timeout: Duration::ZERO,
        ..CompileLimits::default()
    };
    let (r, _) = serve(zero, Duration::from_secs(60));
    for _ in 0..2 {
        let (s, b) = post(&r, "/v1/completions", constrained(&["t1", "t2"])).await;
        assert_eq!(s, StatusCode::BAD_REQUEST, "{b}");
    }
    let (s, _, metrics) = call(&r, "GET", "/metrics", None, None).await;
    assert_eq!(s, StatusCode::OK);
    let value = |series: &str| -> f64 {
        metrics
            .lines()
            .find_map(|l| l.strip_prefix(series)?.trim().parse().ok())
            .unwrap_or_else(|| panic!("{series} missing from /metrics:\n{metrics}"))
    };
    // The recorder is process-wide: other tests in this binary add to the same series.
    assert!(value("caduceus_grammar_compiles_total{result=\"ok\"}") >= 1.0);
    assert!(value("caduceus_grammar_compiles_total{result=\"timeout\"}") >= 1.0);
    assert!(value("caduceus_grammar_cache_hits_total") >= 1.0);
    assert!(value("caduceus_grammar_cached_refusals_total") >= 1.0);
    assert!(value("caduceus_grammar_compile_cpu_seconds_count") >= 1.0);
}

#[test]
fn a_request_waiting_for_a_compile_holds_no_thread_of_the_blocking_pool() {
    // One blocking thread: prompts are tokenized there, so a wait parked on it would hold every
    // other request up until the compile ends.
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .max_blocking_threads(1)
        .enable_all()
        .build()
        .unwrap();
    runtime.block_on(async {
        let (r, state) = serve(CompileLimits::default(), Duration::from_secs(60));
        let c = compiler(&state);
        c.delay_compiles(Duration::from_secs(4));
        let waiting = tokio::spawn({
            let r = r.clone();
            async move { post(&r, "/v1/completions", constrained(&["x1", "x2"])).await }
        });
        while c.num_compiles() == 0 {
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        let plain = json!({"model": MODEL, "max_tokens": 4, "prompt": "Hi"});
        let (s, b) = post(&r, "/v1/completions", plain).await;
        assert_eq!(s, StatusCode::OK, "{b}");
        assert_eq!(
            c.num_cached(),
            0,
            "the plain request waited for the compile"
        );
        let (s, b) = waiting.await.unwrap();
        assert_eq!(s, StatusCode::OK, "{b}");
    });
}
