//! A short seeded fuzz run of the whole HTTP API in-process (the generator is the loadtest's
//! `fuzz`, which `caduceus-loadtest fuzz` runs at length against a real server): every answer
//! is below 500, nothing hangs, and the server is healthy afterwards.

use std::time::Duration;

use axum::body::{to_bytes, Body};
use axum::http::Request;
use caduceus_loadtest::fuzz::request;
use caduceus_runtime::server::app;
use tower::ServiceExt;

use crate::support::server_app::{copy_adapter, TestServer, MODEL};

/// Requests in the CI run (under a second on the tiny model); `CAD_FUZZ_REQUESTS` and
/// `CAD_FUZZ_SEED` run longer or other seeds in-process.
const NUM_REQUESTS: u64 = 1000;

fn env_u64(name: &str, default: u64) -> u64 {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_seeded_fuzz_run_gets_no_5xx_and_leaves_the_server_healthy() {
    let root = tempfile::tempdir().unwrap();
    for name in ["doctor-b", "fuzz-1"] {
        copy_adapter(root.path(), name);
    }
    let state = TestServer {
        adapter_dir: Some(root.path().to_path_buf()),
        // Fuzzed strings reach the template engine as requests' own templates.
        trust_request_chat_template: true,
        ..TestServer::default()
    }
    .state();
    let r = app(state.clone());
    let models = vec![MODEL.to_owned(), "doctor-b".to_owned()];
    let mut bad = Vec::new();
    let mut by_status = std::collections::BTreeMap::<u16, usize>::new();
    let seed = env_u64("CAD_FUZZ_SEED", 1);
    for index in 0..env_u64("CAD_FUZZ_REQUESTS", NUM_REQUESTS) {
        let fuzz = request(seed, index, &models);
        let mut req = Request::builder().method(fuzz.method).uri(&fuzz.path);
        for (k, v) in &fuzz.headers {
            req = req.header(*k, v);
        }
        // A target past the `http` crate's 64 KiB cannot be built in-process (over a socket
        // the server answers it 414); nothing else is refused here.
        let Ok(req) = req.body(Body::from(fuzz.body.clone())) else {
            assert!(fuzz.path.len() > 65_000, "#{index}: {}", fuzz.summary(300));
            continue;
        };
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
        *by_status.entry(status.as_u16()).or_default() += 1;
        if status.is_server_error() || !read {
            bad.push(format!(
                "seed {seed} #{index} -> {status}: {}",
                fuzz.summary(300)
            ));
        }
    }
    assert!(
        bad.is_empty(),
        "{} bad answers:\n{}",
        bad.len(),
        bad.join("\n")
    );
    eprintln!("fuzz answers by status: {by_status:?}");
    // The run reached generation as well as every kind of refusal.
    let count = |s: u16| by_status.get(&s).copied().unwrap_or(0);
    assert!(count(200) >= 40, "{by_status:?}");
    for s in [400, 404, 405, 413] {
        assert!(count(s) > 0, "no {s} in {by_status:?}");
    }
    let health = Request::get("/health").body(Body::empty()).unwrap();
    assert_eq!(r.clone().oneshot(health).await.unwrap().status(), 200);
    assert!(state.engine.is_alive());
}
