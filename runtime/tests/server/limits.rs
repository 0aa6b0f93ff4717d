//! Bounded work per request: stop-string and stop-token limits, and fields the server does not
//! implement refused with a 400 naming them instead of a silent 200.

use caduceus_runtime::engine::{MAX_STOP_STRING_BYTES, MAX_STOP_TOKEN_IDS};
use caduceus_runtime::server::app;
use caduceus_runtime::server::protocol::UNSUPPORTED_FIELDS;
use serde_json::{json, Value};

use crate::support::server_app::{call, with_fields, TestServer};

#[tokio::test]
async fn unimplemented_fields_and_oversized_stops_get_a_400_naming_the_field() {
    let r = app(TestServer::default().state());
    let chat = |extra: Value| {
        let body = json!({"messages": [{"role": "user", "content": "Hi"}], "max_tokens": 1});
        with_fields(body, extra)
    };
    let cases = [
        (json!({"functions": [{"name": "f"}]}), "functions"),
        (
            json!({"guided_whitespace_pattern": "[ ]?"}),
            "guided_whitespace_pattern",
        ),
        (json!({"best_of": 2}), "best_of"),
        (json!({"use_beam_search": true}), "use_beam_search"),
        (
            json!({"spaces_between_special_tokens": false}),
            "spaces_between_special_tokens",
        ),
        (
            json!({"stop": ["x".repeat(MAX_STOP_STRING_BYTES + 1)]}),
            "stop",
        ),
        (
            json!({"stop_token_ids": vec![3; MAX_STOP_TOKEN_IDS + 1]}),
            "stop_token_ids",
        ),
    ];
    for (extra, field) in cases {
        let (s, _, b) = call(&r, "POST", "/v1/chat/completions", Some(chat(extra)), None).await;
        assert_eq!(s, 400, "{field}: {b}");
        let v: Value = serde_json::from_str(&b).unwrap();
        assert_eq!(v["error"]["param"], field, "{b}");
    }
    assert!(UNSUPPORTED_FIELDS.contains(&"best_of"));
    let (s, _, b) = call(
        &r,
        "POST",
        "/v1/completions",
        Some(json!({"prompt": "Hi", "max_tokens": 1, "best_of": 2})),
        None,
    )
    .await;
    assert_eq!(s, 400, "{b}");
    // Explicit defaults ask for nothing and pass, as do the limits themselves.
    let fine = chat(
        json!({"tools": [], "logit_bias": {}, "response_format": null, "skip_special_tokens": true,
                           "stop": ["y".repeat(MAX_STOP_STRING_BYTES)],
                           "stop_token_ids": vec![3; MAX_STOP_TOKEN_IDS]}),
    );
    let (s, _, b) = call(&r, "POST", "/v1/chat/completions", Some(fine), None).await;
    assert_eq!(s, 200, "{b}");
}

/// The value of `caduceus_requests_total` for one status with `finish_reason="none"`.
fn early_count(metrics: &str, status: u16) -> u64 {
    let label = format!("status=\"{status}\"");
    metrics
        .lines()
        .filter(|l| l.starts_with("caduceus_requests_total{") && l.contains(&label))
        .filter(|l| l.contains("finish_reason=\"none\""))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<u64>().ok())
        .sum()
}

#[tokio::test]
async fn requests_refused_before_generation_are_counted() {
    let r = app(TestServer {
        api_keys: vec!["sk-count-0123456789".into()],
        body_limit_bytes: 2048,
        ..TestServer::default()
    }
    .state());
    let metrics = |r: axum::Router| async move { call(&r, "GET", "/metrics", None, None).await.2 };
    let before = metrics(r.clone()).await;
    let key = Some("sk-count-0123456789");
    let ok = json!({"prompt": "Hi", "max_tokens": 1});
    assert_eq!(
        call(&r, "POST", "/v1/completions", Some(ok), None).await.0,
        401
    );
    let big = json!({"prompt": "x".repeat(4096)});
    assert_eq!(
        call(&r, "POST", "/v1/completions", Some(big), key).await.0,
        413
    );
    let bad = json!({"prompt": "Hi", "temperature": 9});
    assert_eq!(
        call(&r, "POST", "/v1/completions", Some(bad), key).await.0,
        400
    );
    let after = metrics(r.clone()).await;
    // Other tests in this binary share the recorder, so each count grew by at least one.
    for status in [401, 413, 400] {
        assert!(
            early_count(&after, status) > early_count(&before, status),
            "status {status} not counted:\n{after}"
        );
    }
}
