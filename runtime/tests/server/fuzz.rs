//! A short seeded fuzz run of the whole HTTP API in-process (the generator is the loadtest's
//! `fuzz`, which `caduceus-loadtest fuzz` runs at length against a real server): every answer
//! is below 500, nothing hangs, and the server is healthy afterwards.

use std::time::Duration;

use axum::body::{to_bytes, Body};
use axum::http::Request;
use caduceus_loadtest::fuzz::request;
use caduceus_runtime::server::app;
use tower::ServiceExt;

use crate::support::server_app::{TestServer, MODEL};

/// Requests in the CI run (a few seconds on the tiny model).
const NUM_REQUESTS: u64 = 400;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_seeded_fuzz_run_gets_no_5xx_and_leaves_the_server_healthy() {
    let root = tempfile::tempdir().unwrap();
    let from = crate::support::shared("reference/tiny-llama/adapters/doctor-b");
    for name in ["doctor-b", "fuzz-1"] {
        let to = root.path().join(name);
        std::fs::create_dir_all(&to).unwrap();
        for f in ["adapter_config.json", "adapter_model.safetensors"] {
            std::fs::copy(from.join(f), to.join(f)).unwrap();
        }
    }
    let state = TestServer {
        adapter_dir: Some(root.path().to_path_buf()),
        ..TestServer::default()
    }
    .state();
    let r = app(state.clone());
    let models = vec![MODEL.to_owned(), "doctor-b".to_owned()];
    let mut bad = Vec::new();
    for index in 0..NUM_REQUESTS {
        let fuzz = request(1, index, &models);
        let mut req = Request::builder().method(fuzz.method).uri(&fuzz.path);
        for (k, v) in &fuzz.headers {
            req = req.header(*k, v);
        }
        let req = req.body(Body::from(fuzz.body.clone())).unwrap();
        let answer = async {
            let resp = r.clone().oneshot(req).await.unwrap();
            let status = resp.status();
            // Read the whole body: a stream that fails midway must show here too.
            let body = to_bytes(resp.into_body(), 1 << 26).await;
            (status, body.is_ok())
        };
        let (status, read) = tokio::time::timeout(Duration::from_secs(30), answer)
            .await
            .unwrap_or_else(|_| panic!("request #{index} hung: {}", fuzz.summary(300)));
        if status.is_server_error() || !read {
            bad.push(format!("#{index} -> {status}: {}", fuzz.summary(300)));
        }
    }
    assert!(
        bad.is_empty(),
        "{} bad answers:\n{}",
        bad.len(),
        bad.join("\n")
    );
    let health = Request::get("/health").body(Body::empty()).unwrap();
    assert_eq!(r.clone().oneshot(health).await.unwrap().status(), 200);
    assert!(state.engine.is_alive());
}
