//! Admin is not inference: the adapter routes take their own keys (or are off), `/metrics` can
//! require a key, and the `Bearer` scheme is matched case-insensitively.

use axum::body::{to_bytes, Body};
use axum::http::Request;
use axum::Router;
use caduceus_runtime::server::app;
use serde_json::json;
use tower::ServiceExt;

use crate::support::server_app::TestServer;

const INFERENCE: &str = "sk-inference-0123456789";
const ADMIN: &str = "sk-admin-0123456789";

/// Status and body of one request with a raw `Authorization` header.
async fn send(r: &Router, method: &str, uri: &str, auth: Option<&str>) -> (u16, String) {
    let mut req = Request::builder().method(method).uri(uri);
    if let Some(a) = auth {
        req = req.header("authorization", a);
    }
    let body = match method {
        "POST" if uri.contains("lora") => json!({"lora_name": "x", "lora_path": "y"}),
        "POST" => json!({"prompt": "Hi", "max_tokens": 1}),
        _ => json!(null),
    };
    let req = req
        .header("content-type", "application/json")
        .body(Body::from(body.to_string()))
        .unwrap();
    let resp = r.clone().oneshot(req).await.unwrap();
    let status = resp.status().as_u16();
    let bytes = to_bytes(resp.into_body(), 1 << 20).await.unwrap();
    (status, String::from_utf8_lossy(&bytes).into_owned())
}

#[tokio::test]
async fn adapter_routes_need_an_admin_key_and_metrics_its_own() {
    let r = app(TestServer {
        api_keys: vec![INFERENCE.into()],
        admin_api_keys: vec![ADMIN.into()],
        allow_keyless_admin: false,
        metrics_api_key: Some("sk-metrics-0123456789".into()),
        ..TestServer::default()
    }
    .state());
    let load = "/v1/load_lora_adapter";
    let bearer = |k: &str| format!("Bearer {k}");
    // An inference key does not load adapters; an admin key gets past auth (to the 400 of a
    // server without adapters), whatever the case of the scheme.
    assert_eq!(
        send(&r, "POST", load, Some(&bearer(INFERENCE))).await.0,
        401
    );
    assert_eq!(send(&r, "POST", load, None).await.0, 401);
    let (s, b) = send(&r, "POST", load, Some(&format!("bearer {ADMIN}"))).await;
    assert_eq!(s, 400, "{b}");
    assert!(b.contains("serves no adapters"), "{b}");
    let (s, _) = send(&r, "POST", "/v1/unload_lora_adapter", Some(&bearer(ADMIN))).await;
    assert_eq!(s, 400);
    let completions = "/v1/completions";
    assert_eq!(
        send(
            &r,
            "POST",
            completions,
            Some(&format!("BEARER {INFERENCE}"))
        )
        .await
        .0,
        200
    );
    assert_eq!(
        send(&r, "POST", completions, Some(&format!("Basic {INFERENCE}")))
            .await
            .0,
        401
    );
    // /metrics wants its key; /health stays open.
    assert_eq!(send(&r, "GET", "/metrics", None).await.0, 401);
    assert_eq!(
        send(&r, "GET", "/metrics", Some(&bearer(INFERENCE)))
            .await
            .0,
        401
    );
    let (s, b) = send(&r, "GET", "/metrics", Some("Bearer sk-metrics-0123456789")).await;
    assert_eq!(s, 200, "{b}");
    assert_eq!(send(&r, "GET", "/health", None).await.0, 200);
}

#[tokio::test]
async fn adapter_routes_are_off_without_admin_keys_unless_allowed_on_loopback() {
    let off = app(TestServer {
        allow_keyless_admin: false,
        ..TestServer::default()
    }
    .state());
    let (s, b) = send(&off, "POST", "/v1/load_lora_adapter", None).await;
    assert_eq!(s, 403, "{b}");
    assert!(b.contains("server.admin_api_keys"), "{b}");
    // Allowed keyless (loopback): the inference keys still apply.
    let open = app(TestServer {
        api_keys: vec![INFERENCE.into()],
        ..TestServer::default()
    }
    .state());
    assert_eq!(
        send(&open, "POST", "/v1/load_lora_adapter", None).await.0,
        401
    );
    let auth = format!("Bearer {INFERENCE}");
    assert_eq!(
        send(&open, "POST", "/v1/load_lora_adapter", Some(&auth))
            .await
            .0,
        400
    );
}
