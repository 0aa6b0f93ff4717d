//! Faults stay small and visible (issue 18): a request whose logits turn NaN or whose adapter
//! cannot get a slot fails alone (500 / an SSE error event) while the others finish exactly as
//! they would have; a stuck step turns `/health` 503 until steps resume; a dying adapter loader
//! fails its parked requests at once and is restarted. Faults come from the engine's
//! fault-injection seam, aimed at requests by their sampling seed.

use std::path::Path;
use std::time::Duration;

use axum::http::StatusCode;
use axum::Router;
use caduceus_runtime::adapters::make::write_synthetic_adapters;
use caduceus_runtime::adapters::Projection;
use caduceus_runtime::engine::FaultPlan;
use caduceus_runtime::model::loader::LoadedModel;
use caduceus_runtime::server::{app, AppState};
use serde_json::{json, Value};

use crate::support::server_app::{call, sse_data, TestServer};

/// A greedy completion; `seed` singles it out for a fault (greedy ignores the seed otherwise).
fn completion(model: Option<&str>, seed: Option<u64>, stream: bool) -> Value {
    let mut body = json!({"prompt": "Hello there, doctor", "max_tokens": 6,
                          "temperature": 0, "ignore_eos": true, "stream": stream});
    if let Some(m) = model {
        body["model"] = json!(m);
    }
    if let Some(s) = seed {
        body["seed"] = json!(s);
    }
    body
}

async fn post(router: &Router, body: Value) -> (StatusCode, String) {
    let (s, _, b) = call(router, "POST", "/v1/completions", Some(body), None).await;
    (s, b)
}

fn json_of(body: &str) -> Value {
    serde_json::from_str(body).unwrap_or_else(|_| panic!("not JSON: {body}"))
}

fn text(body: &str) -> String {
    json_of(body)["choices"][0]["text"]
        .as_str()
        .unwrap()
        .to_owned()
}

/// The engine holds nothing once every request has ended: no request, every block free.
async fn wait_idle(state: &AppState) {
    for _ in 0..500 {
        let s = state.engine.stats();
        if s.num_running + s.num_waiting == 0 && s.num_free_blocks == s.num_usable_blocks {
            return;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    panic!("engine not idle: {:?}", state.engine.stats());
}

async fn health(router: &Router) -> (StatusCode, Value) {
    let (s, _, b) = call(router, "GET", "/health", None, None).await;
    (s, json_of(&b))
}

/// `count` synthetic adapters (doctor-0000, ...) for the tiny model under `dir`.
fn adapters(dir: &Path, count: usize) {
    let model = LoadedModel::load(&crate::support::shared("reference/tiny-llama/model")).unwrap();
    let config = model.model.config();
    write_synthetic_adapters(config, dir, count, 8, &Projection::ALL, 3, 16.0).unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nan_logits_fail_that_request_alone() {
    let state = TestServer {
        faults: FaultPlan {
            nan_logits: Some(FaultPlan::seed(4242)),
            ..FaultPlan::default()
        },
        ..TestServer::default()
    }
    .state();
    let r = app(state.clone());
    let (s, solo) = post(&r, completion(None, None, false)).await;
    assert_eq!(s, StatusCode::OK, "{solo}");
    // One poisoned request of each kind alongside a healthy one, in the same batches.
    let (bad, bad_stream, good) = tokio::join!(
        post(&r, completion(None, Some(4242), false)),
        post(&r, completion(None, Some(4242), true)),
        post(&r, completion(None, None, false)),
    );
    assert_eq!(bad.0, StatusCode::INTERNAL_SERVER_ERROR, "{}", bad.1);
    let e = &json_of(&bad.1)["error"];
    assert_eq!(e["code"], "non_finite_logits", "{e}");
    assert_eq!(e["type"], "server_error", "{e}");
    // Streaming: an error event, then the stream closes without [DONE].
    let events = sse_data(&bad_stream.1);
    let last = events.last().expect("no events");
    assert_eq!(
        json_of(last)["error"]["code"],
        "non_finite_logits",
        "{events:?}"
    );
    assert!(!events.iter().any(|e| e == "[DONE]"), "{events:?}");
    // The healthy request is untouched: exactly its solo output.
    assert_eq!(good.0, StatusCode::OK, "{}", good.1);
    assert_eq!(text(&good.1), text(&solo));
    // The failed requests' blocks are back, the engine serves on, and metrics saw the errors.
    wait_idle(&state).await;
    assert_eq!(health(&r).await.0, StatusCode::OK);
    assert_eq!(
        post(&r, completion(None, None, false)).await.0,
        StatusCode::OK
    );
    let (_, _, page) = call(&r, "GET", "/metrics", None, None).await;
    assert!(
        page.lines()
            .any(|l| l.starts_with("caduceus_requests_total")
                && l.contains(r#"status="500""#)
                && l.contains(r#"finish_reason="error""#)),
        "{page}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failed_adapter_slot_fails_that_request_alone() {
    let tmp = tempfile::tempdir().unwrap();
    adapters(tmp.path(), 2);
    let state = TestServer {
        adapter_dir: Some(tmp.path().to_path_buf()),
        max_loras: 1,
        faults: FaultPlan {
            slot_failure: Some(FaultPlan::seed(77)),
            ..FaultPlan::default()
        },
        ..TestServer::default()
    }
    .state();
    let r = app(state.clone());
    let doctor = Some("doctor-0000");
    let (s, solo) = post(&r, completion(doctor, None, false)).await;
    assert_eq!(s, StatusCode::OK, "{solo}");
    let (bad, good) = tokio::join!(
        post(&r, completion(doctor, Some(77), false)),
        post(&r, completion(doctor, None, false)),
    );
    assert_eq!(bad.0, StatusCode::INTERNAL_SERVER_ERROR, "{}", bad.1);
    let e = &json_of(&bad.1)["error"];
    assert_eq!(e["code"], "adapter_slot_failed", "{e}");
    assert_eq!(good.0, StatusCode::OK, "{}", good.1);
    assert_eq!(text(&good.1), text(&solo));
    // Its blocks and its claim on the one slot are released: another adapter can take it.
    wait_idle(&state).await;
    let (s, b) = post(&r, completion(Some("doctor-0001"), None, false)).await;
    assert_eq!(s, StatusCode::OK, "{b}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stuck_step_turns_health_503_until_steps_resume() {
    let (faults, latch) = FaultPlan::hold_steps_of(99);
    let state = TestServer {
        engine_stall_timeout: Duration::from_millis(20),
        faults,
        ..TestServer::default()
    }
    .state();
    let r = app(state.clone());
    // Idle for longer than the timeout is not a stall.
    tokio::time::sleep(Duration::from_millis(40)).await;
    assert_eq!(health(&r).await.0, StatusCode::OK);
    let stuck = {
        let r = r.clone();
        tokio::spawn(async move { post(&r, completion(None, Some(99), false)).await })
    };
    let mut seen = None;
    for _ in 0..1000 {
        let (s, body) = health(&r).await;
        if latch.num_held() > 0 && s == StatusCode::SERVICE_UNAVAILABLE {
            seen = Some(body);
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let body = seen.expect("/health never reported the stuck engine");
    assert_eq!(body["status"], "engine_stalled", "{body}");
    assert!(
        body["reason"]
            .as_str()
            .is_some_and(|r| r.contains("engine_stall_timeout")),
        "{body}"
    );
    latch.release();
    let (s, b) = stuck.await.unwrap();
    assert_eq!(s, StatusCode::OK, "{b}");
    let mut status = StatusCode::SERVICE_UNAVAILABLE;
    for _ in 0..500 {
        status = health(&r).await.0;
        if status == StatusCode::OK {
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert_eq!(status, StatusCode::OK, "health did not recover");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dead_adapter_loader_fails_its_waiters_fast_and_is_restarted() {
    let tmp = tempfile::tempdir().unwrap();
    adapters(tmp.path(), 1);
    let state = TestServer {
        adapter_dir: Some(tmp.path().to_path_buf()),
        // Without supervision the parked request would wait for this, then get 504.
        request_timeout: Duration::from_secs(20),
        faults: FaultPlan {
            loader_panic: Some("doctor-0000".into()),
            ..FaultPlan::default()
        },
        ..TestServer::default()
    }
    .state();
    let r = app(state.clone());
    let (s, b) = post(&r, completion(Some("doctor-0000"), None, false)).await;
    assert_eq!(s, StatusCode::INTERNAL_SERVER_ERROR, "{b}");
    let e = &json_of(&b)["error"];
    assert_eq!(e["code"], "adapter_load_failed", "{e}");
    assert!(
        e["message"]
            .as_str()
            .is_some_and(|m| m.contains("loader stopped") && m.contains("restarted")),
        "{e}"
    );
    // The restarted loader serves the same adapter, and the dead one's job left the loader
    // gate (the panic struck inside it) unheld.
    let (s, b) = post(&r, completion(Some("doctor-0000"), None, false)).await;
    assert_eq!(s, StatusCode::OK, "{b}");
    wait_idle(&state).await;
    assert!(!state.adapters.as_ref().unwrap().loader_gate().is_busy());
    let (_, _, page) = call(&r, "GET", "/metrics", None, None).await;
    assert!(
        page.lines()
            .any(|l| l.starts_with("caduceus_lora_loader_restarts_total ")),
        "{page}"
    );
}
