//! A caller's `X-Request-Id` comes back on the response (streamed or not, refused or not) and
//! on the request's log line; one that could forge a log field is a 400 naming the header.

use axum::http::StatusCode;
use caduceus_runtime::server::app;
use serde_json::{json, Value};

use super::support::log_capture::{capture_global, text as log_text};
use super::support::server_app::{call_with_headers, sse_chunks, TestServer};
use super::MODEL;

fn completion(stream: bool) -> Value {
    json!({"model": MODEL, "prompt": "Blood pressure of 150/95 means", "max_tokens": 3,
           "stream": stream})
}

/// The `caduceus::request` line of response `id` (the log is the whole test binary's).
async fn log_line(log: &super::support::log_capture::LogBuffer, id: &str) -> String {
    let id = format!("id={id}");
    for _ in 0..500 {
        let text = log_text(log);
        if let Some(line) = text
            .lines()
            .find(|l| l.contains("caduceus::request") && l.contains(&id))
        {
            return line.to_owned();
        }
        tokio::time::sleep(std::time::Duration::from_millis(10)).await;
    }
    panic!("no request log line with {id}")
}

#[tokio::test]
async fn the_callers_request_id_is_echoed_and_logged() {
    let log = capture_global();
    let r = app(TestServer::default().state());
    for (stream, sent) in [(false, "gw-0f8fad5b-d9cb"), (true, "trace:4bf92f35+A/x=")] {
        let headers = [("X-Request-Id", sent)];
        let (s, h, body) = call_with_headers(
            &r,
            "POST",
            "/v1/completions",
            Some(completion(stream)),
            &headers,
        )
        .await;
        assert_eq!(s, StatusCode::OK, "{body}");
        assert_eq!(h["x-request-id"], sent);
        let reply = match stream {
            true => sse_chunks(&body).swap_remove(0),
            false => serde_json::from_str(&body).unwrap(),
        };
        let id = reply["id"].as_str().unwrap();
        assert_ne!(id, sent, "the response id stays the server's own");
        let line = log_line(&log, id).await;
        assert!(line.contains(&format!("request_id={sent} ")), "{line}");
    }
    // Without the header: none on the response, none in the log.
    let (s, h, body) =
        call_with_headers(&r, "POST", "/v1/completions", Some(completion(false)), &[]).await;
    assert_eq!(s, StatusCode::OK, "{body}");
    assert!(h.get("x-request-id").is_none());
    let id: Value = serde_json::from_str(&body).unwrap();
    let line = log_line(&log, id["id"].as_str().unwrap()).await;
    assert!(!line.contains("request_id="), "{line}");
    // `/tokenize` echoes it too.
    let tokenize = json!({"model": MODEL, "prompt": "Hi"});
    let headers = [("x-request-id", "tok-1")];
    let (s, h, _) = call_with_headers(&r, "POST", "/tokenize", Some(tokenize), &headers).await;
    assert_eq!(
        (s, &h["x-request-id"]),
        (StatusCode::OK, &"tok-1".parse().unwrap())
    );
}

#[tokio::test]
async fn refusals_echo_it_and_an_unloggable_id_is_a_400() {
    let r = app(TestServer {
        api_keys: vec!["k".into()],
        ..TestServer::default()
    }
    .state());
    let headers = [("x-request-id", "gw-401")];
    let (s, h, _) = call_with_headers(
        &r,
        "POST",
        "/v1/chat/completions",
        Some(json!({})),
        &headers,
    )
    .await;
    assert_eq!(
        (s, &h["x-request-id"]),
        (StatusCode::UNAUTHORIZED, &"gw-401".parse().unwrap())
    );
    let long = "x".repeat(129);
    for bad in ["a b", "a\"b", "status=500,x", long.as_str()] {
        let headers = [("authorization", "Bearer k"), ("x-request-id", bad)];
        let (s, h, body) = call_with_headers(
            &r,
            "POST",
            "/v1/completions",
            Some(completion(false)),
            &headers,
        )
        .await;
        assert_eq!(s, StatusCode::BAD_REQUEST, "{bad}: {body}");
        assert!(body.contains("X-Request-Id"), "{body}");
        assert!(h.get("x-request-id").is_none());
    }
}
