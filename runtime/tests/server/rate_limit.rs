//! The per-key request-rate limit: a key over its burst gets 429 with `Retry-After` before
//! anything reaches the engine, other keys are unaffected, and refusals are counted.

use caduceus_runtime::server::{app, RateLimit};
use serde_json::{json, Value};

use crate::support::server_app::{call, TestServer};

const KEY_A: &str = "sk-rate-a-0123456789";
const KEY_B: &str = "sk-rate-b-0123456789";

#[tokio::test]
async fn a_key_over_its_burst_gets_429_with_retry_after_and_others_do_not() {
    let server = TestServer {
        api_keys: vec![KEY_A.into(), KEY_B.into()],
        // 1 request per 100 s after a burst of 2: the test cannot refill a token in time.
        rate_limit: Some(RateLimit {
            per_second: 0.01,
            burst: 2,
        }),
        ..TestServer::default()
    };
    let r = app(server.state());
    let body = json!({"prompt": "hello", "max_tokens": 1, "temperature": 0});
    for _ in 0..2 {
        let (s, _, b) = call(
            &r,
            "POST",
            "/v1/completions",
            Some(body.clone()),
            Some(KEY_A),
        )
        .await;
        assert_eq!(s, 200, "{b}");
    }
    let (s, headers, b) = call(
        &r,
        "POST",
        "/v1/completions",
        Some(body.clone()),
        Some(KEY_A),
    )
    .await;
    assert_eq!(s, 429, "{b}");
    let retry: u64 = headers["retry-after"].to_str().unwrap().parse().unwrap();
    assert!((99..=100).contains(&retry), "Retry-After {retry}");
    let v: Value = serde_json::from_str(&b).unwrap();
    assert_eq!(v["error"]["type"], "rate_limit_error", "{b}");
    assert!(
        v["error"]["message"].as_str().unwrap().contains("API key"),
        "{b}"
    );
    // Chat shares the key's bucket.
    let chat = json!({"messages": [{"role": "user", "content": "hi"}], "max_tokens": 1});
    let (s, _, _) = call(&r, "POST", "/v1/chat/completions", Some(chat), Some(KEY_A)).await;
    assert_eq!(s, 429);
    // Another key has its own bucket; a wrong key is still 401, not 429.
    let (s, _, b) = call(
        &r,
        "POST",
        "/v1/completions",
        Some(body.clone()),
        Some(KEY_B),
    )
    .await;
    assert_eq!(s, 200, "{b}");
    let (s, _, _) = call(
        &r,
        "POST",
        "/v1/completions",
        Some(body),
        Some("sk-wrong-0123456789"),
    )
    .await;
    assert_eq!(s, 401);
    // Listing models is not rate limited.
    let (s, _, _) = call(&r, "GET", "/v1/models", None, Some(KEY_A)).await;
    assert_eq!(s, 200);
}
