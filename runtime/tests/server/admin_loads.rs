//! `server.max_concurrent_adapter_loads`: loads past the limit wait their turn, and past the
//! queue get 429 at once; a freed turn lets the waiting load finish.

use std::time::Duration;

use axum::http::StatusCode;
use caduceus_runtime::server::app;
use serde_json::{json, Value};

use crate::support::server_app::{call, copy_adapter, TestServer};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn adapter_loads_past_the_limit_wait_and_past_the_queue_get_429() {
    let root = tempfile::tempdir().unwrap();
    copy_adapter(root.path(), "doctor-b");
    let state = TestServer {
        adapter_dir: Some(root.path().to_path_buf()),
        max_concurrent_adapter_loads: 1,
        ..TestServer::default()
    }
    .state();
    let r = app(state.clone());
    let limit = state.adapter_loads.clone();
    assert_eq!(limit.max(), 1);
    let load = |name: &str| json!({"lora_name": name, "lora_path": "doctor-b"});
    // The one load allowed to run is held here, so the next one must wait.
    let running = limit.enter().await.unwrap();
    let queued = {
        let (r, body) = (r.clone(), load("dr-queued"));
        tokio::spawn(
            async move { call(&r, "POST", "/v1/load_lora_adapter", Some(body), None).await },
        )
    };
    for _ in 0..2000 {
        if limit.num_admitted() == 2 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    assert_eq!(limit.num_admitted(), 2, "the second load never queued");
    // The queue (one more than the limit) is full: the third load is refused at once.
    let (s, h, b) = call(
        &r,
        "POST",
        "/v1/load_lora_adapter",
        Some(load("dr-third")),
        None,
    )
    .await;
    assert_eq!(s, StatusCode::TOO_MANY_REQUESTS, "{b}");
    assert!(h.contains_key("retry-after"));
    let v: Value = serde_json::from_str(&b).unwrap();
    assert_eq!(v["error"]["code"], "rate_limit_exceeded");
    assert!(
        v["error"]["message"]
            .as_str()
            .unwrap()
            .contains("max_concurrent_adapter_loads"),
        "{b}"
    );
    assert!(!queued.is_finished(), "a load ran past the limit");
    // Its turn comes when the running load ends.
    drop(running);
    let (s, _, b) = tokio::time::timeout(Duration::from_secs(30), queued)
        .await
        .expect("the queued load never ran")
        .unwrap();
    assert_eq!(s, StatusCode::OK, "{b}");
    assert_eq!(limit.num_admitted(), 0);
    let (s, _, b) = call(
        &r,
        "POST",
        "/v1/load_lora_adapter",
        Some(load("dr-third")),
        None,
    )
    .await;
    assert_eq!(s, StatusCode::OK, "{b}");
    let registry = state.adapters.as_ref().unwrap().registry();
    assert!(registry.get("dr-queued").is_some() && registry.get("dr-third").is_some());
}
