//! `/health` keeps answering while several ~1 MiB prompts are read, rendered and tokenized: that
//! work runs on the blocking pool, not on the (here two) async workers.

use std::time::Duration;

use serde_json::json;

use super::{http, start};
use crate::support::server_app::TestServer;

const NUM_PROMPTS: usize = 3;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn health_answers_while_one_mib_prompts_arrive() {
    let srv = start(
        TestServer {
            body_limit_bytes: 4 << 20,
            ..TestServer::default()
        },
        Duration::from_secs(5),
    )
    .await;
    let text = "My head hurts and I have a fever since Monday. ".repeat((1 << 20) / 48);
    let big: Vec<_> = (0..NUM_PROMPTS)
        .map(|i| {
            let body = if i % 2 == 0 {
                json!({"messages": [{"role": "user", "content": text}], "max_tokens": 1})
            } else {
                json!({"prompt": text, "max_tokens": 1})
            };
            let path = if i % 2 == 0 {
                "/v1/chat/completions"
            } else {
                "/v1/completions"
            };
            let addr = srv.addr;
            tokio::spawn(async move { http(addr, "POST", path, Some(&body)).await })
        })
        .collect();
    // Once a big request is inside its handler, health must still answer.
    for _ in 0..2000 {
        if srv.state.lifecycle.in_flight() > 0 || big.iter().all(|t| t.is_finished()) {
            break;
        }
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
    let health = tokio::time::timeout(
        Duration::from_secs(60),
        http(srv.addr, "GET", "/health", None),
    )
    .await
    .expect("/health hung while large prompts were processed");
    assert_eq!(health.0, 200, "{health:?}");
    for t in big {
        let (status, body) = tokio::time::timeout(Duration::from_secs(120), t)
            .await
            .expect("a large prompt was never answered")
            .unwrap();
        // A ~250k-token prompt is far past the tiny model's 256-token context.
        assert_eq!(status, 400, "{body}");
        assert!(body.contains("context length"), "{body}");
    }
}
