//! The model's recommended sampling settings (`model.generation_config = "auto"`) are the
//! defaults of requests that leave those fields out, and only of those.

use axum::http::StatusCode;
use axum::Router;
use caduceus_runtime::server::app;
use caduceus_runtime::server::protocol::SamplingDefaults;
use serde_json::{json, Value};

use super::post;
use super::support::server_app::{with_fields, TestServer};

/// Each choice's text.
async fn texts(r: &Router, uri: &str, body: Value) -> Vec<String> {
    let (s, b) = post(r, uri, body.clone()).await;
    assert_eq!(s, StatusCode::OK, "{body}: {b}");
    (b["choices"].as_array().unwrap().iter())
        .map(|c| {
            let text = c.get("text").unwrap_or(&c["message"]["content"]);
            text.as_str().unwrap().to_owned()
        })
        .collect()
}

#[tokio::test]
async fn a_request_takes_the_model_defaults_only_for_fields_it_leaves_out() {
    // top_k 1 keeps only the most likely token: with it, an answer is the greedy one.
    let defaults = SamplingDefaults {
        temperature: Some(0.5),
        top_k: Some(1),
        ..SamplingDefaults::default()
    };
    let with = app(TestServer {
        sampling_defaults: defaults,
        ..TestServer::default()
    }
    .state());
    let without = app(TestServer::default().state());
    for (uri, body) in [
        ("/v1/completions", json!({"prompt": "Chest pain?"})),
        (
            "/v1/chat/completions",
            json!({"messages": [{"role": "user", "content": "Chest pain?"}]}),
        ),
    ] {
        let body = with_fields(body, json!({"max_tokens": 12, "seed": 3, "n": 2}));
        let greedy = texts(
            &without,
            uri,
            with_fields(body.clone(), json!({"temperature": 0})),
        )
        .await;
        let sampled = texts(&without, uri, body.clone()).await;
        assert_ne!(
            sampled, greedy,
            "{uri}: seed 3 at temperature 1 is not greedy"
        );
        assert_eq!(texts(&with, uri, body.clone()).await, greedy, "{uri}");
        // Fields the request sets win over the model's.
        let own = with_fields(body, json!({"temperature": 1.0, "top_k": -1}));
        assert_eq!(texts(&with, uri, own).await, sampled, "{uri}");
    }
}
