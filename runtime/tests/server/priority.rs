//! A request's `priority` (vLLM's: lower is served first): with one running slot, an urgent
//! request queued after a routine one is served first; SREs can turn the field off.

use std::time::{Duration, Instant};

use axum::http::StatusCode;
use axum::Router;
use caduceus_runtime::engine::FaultPlan;
use caduceus_runtime::server::app;
use serde_json::{json, Value};

use super::post;
use super::support::server_app::TestServer;

fn completion(priority: i64, seed: u64, max_tokens: u32) -> Value {
    json!({"prompt": "Chest pain?", "max_tokens": max_tokens, "temperature": 0,
        "ignore_eos": true, "seed": seed, "priority": priority})
}

/// Sends `body` now; resolves once it is answered (200).
fn send(r: &Router, body: Value) -> tokio::task::JoinHandle<()> {
    let r = r.clone();
    tokio::spawn(async move {
        let (s, b) = post(&r, "/v1/completions", body).await;
        assert_eq!(s, StatusCode::OK, "{b}");
    })
}

/// Polls `ready` every millisecond for at most 30 s.
async fn until(what: &str, ready: impl Fn() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(30);
    while !ready() {
        assert!(Instant::now() < deadline, "never: {what}");
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_urgent_request_is_served_before_routine_ones_queued_earlier() {
    // Every step of a request with seed 99 waits on the latch; the urgent request (seed 2) never
    // does. So once the first request is done, the routine one (seed 99 too) cannot finish
    // until the test releases it: the urgent one finishes first only if it is served first,
    // whatever the machine's load (no race between wall clocks).
    let (faults, latch) = FaultPlan::hold_steps_of(99);
    let state = TestServer {
        max_num_seqs: 1,
        faults,
        ..TestServer::default()
    }
    .state();
    let r = app(state.clone());
    // A routine request holds the only running slot (its steps wait on the latch) while two
    // more queue: routine first, then urgent.
    let running = send(&r, completion(0, 99, 8));
    until("the first request runs", || latch.is_waiting()).await;
    // The count is as of the last finished step, so the held one may still be in it.
    let before = state.engine.num_queued();
    let routine = send(&r, completion(0, 99, 32));
    until("the routine request queues", || {
        state.engine.num_queued() == before + 1
    })
    .await;
    let urgent = send(&r, completion(-10, 2, 4));
    until("the urgent request queues", || {
        state.engine.num_queued() == before + 2
    })
    .await;
    // Step the first request to its end (a pass or two may reach the routine request's steps
    // before its end is seen: far fewer than the routine answer's 32).
    // One pass per step that reached the latch, so no pass is left over for later steps.
    let deadline = Instant::now() + Duration::from_secs(30);
    let mut passed = 0;
    while !running.is_finished() {
        assert!(
            Instant::now() < deadline,
            "the first request never finished"
        );
        if latch.num_held() > passed {
            latch.pass_one();
            passed += 1;
        }
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
    tokio::time::timeout(Duration::from_secs(30), urgent)
        .await
        .expect("the urgent request waits behind the routine one")
        .unwrap();
    assert!(!routine.is_finished(), "the routine request finished first");
    latch.release();
    routine.await.unwrap();
    running.await.unwrap();
}

#[tokio::test]
async fn priority_can_be_turned_off_and_must_fit_32_bits() {
    let r = app(TestServer {
        allow_request_priority: false,
        ..TestServer::default()
    }
    .state());
    let (s, b) = post(&r, "/v1/completions", completion(-10, 1, 2)).await;
    assert_eq!(s, StatusCode::BAD_REQUEST, "{b}");
    assert_eq!(b["error"]["param"], "priority", "{b}");
    assert!(b["error"]["message"]
        .as_str()
        .unwrap()
        .contains("allow_request_priority"));
    let (s, b) = post(&r, "/v1/completions", completion(0, 1, 2)).await;
    assert_eq!(s, StatusCode::OK, "{b}");

    let r = app(TestServer::default().state());
    let (s, b) = post(&r, "/v1/completions", completion(1 << 40, 1, 2)).await;
    assert_eq!(s, StatusCode::BAD_REQUEST, "{b}");
    assert_eq!(b["error"]["param"], "priority", "{b}");
    let chat = json!({"messages": [{"role": "user", "content": "Hi"}], "max_tokens": 2,
        "priority": 5});
    let (s, b) = post(&r, "/v1/chat/completions", chat).await;
    assert_eq!(s, StatusCode::OK, "{b}");
}
