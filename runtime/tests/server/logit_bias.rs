//! `logit_bias` over HTTP: +100 makes greedy decoding repeat one token, -100 bans a token the
//! model would pick, on both endpoints; malformed maps are 400s naming the field.

use axum::http::StatusCode;
use caduceus_runtime::server::{app, AppState};
use serde_json::{json, Value};

use super::support::server_app::TestServer;
use super::{post, MODEL};

fn serve() -> (axum::Router, AppState) {
    let state = TestServer::default().state();
    (app(state.clone()), state)
}

/// Greedy completion text of `prompt` with `bias`.
async fn greedy(r: &axum::Router, prompt: &str, max_tokens: u32, bias: Value) -> String {
    let body = json!({"model": MODEL, "prompt": prompt, "max_tokens": max_tokens,
        "temperature": 0, "ignore_eos": true, "logit_bias": bias});
    let (s, b) = post(r, "/v1/completions", body).await;
    assert_eq!(s, StatusCode::OK, "{b}");
    b["choices"][0]["text"].as_str().unwrap().to_owned()
}

/// The ids whose text is exactly `text`.
fn ids_spelling(state: &AppState, text: &str) -> Vec<u32> {
    let t = &state.tokenizer;
    (0..t.vocab_size() as u32)
        .filter(|&id| t.decode(&[id], false).is_ok_and(|s| s == text))
        .collect()
}

#[tokio::test]
async fn a_plus_100_bias_repeats_its_token_and_a_minus_100_bias_bans_one() {
    let (r, state) = serve();
    let forced = *ids_spelling(&state, "Z")
        .first()
        .expect("a token spelling Z");
    let text = greedy(&r, "Hello", 5, json!({forced.to_string(): 100})).await;
    assert_eq!(text, "ZZZZZ");

    // The model's own first pick, then the same request with every id spelling it banned.
    let first = greedy(&r, "Hello", 1, json!({})).await;
    let banned = ids_spelling(&state, &first);
    assert!(!banned.is_empty(), "no id spells {first:?}");
    let ban: serde_json::Map<String, Value> = banned
        .iter()
        .map(|id| (id.to_string(), json!(-100)))
        .collect();
    let second = greedy(&r, "Hello", 1, Value::Object(ban)).await;
    assert_ne!(second, first, "a banned token was picked");

    // Chat applies it too.
    let body = json!({"model": MODEL, "max_tokens": 3, "temperature": 0,
        "messages": [{"role": "user", "content": "Hi"}],
        "logit_bias": {forced.to_string(): 100}});
    let (s, b) = post(&r, "/v1/chat/completions", body).await;
    assert_eq!(s, StatusCode::OK, "{b}");
    assert_eq!(b["choices"][0]["message"]["content"], "ZZZ", "{b}");
}

#[tokio::test]
async fn malformed_logit_bias_is_a_400_naming_the_field() {
    let (r, state) = serve();
    let vocab = state.tokenizer.vocab_size();
    let too_many: serde_json::Map<String, Value> =
        (0..1025).map(|id| (id.to_string(), json!(1))).collect();
    for bias in [
        json!({"hello": 1}),
        json!({"-3": 1}),
        json!({"5": 100.5}),
        json!({"5": -101}),
        json!({"5": "high"}),
        json!({"5": 1, "05": 2}),
        json!({vocab.to_string(): 1}),
        Value::Object(too_many),
        json!([1, 2]),
    ] {
        let body = json!({"model": MODEL, "prompt": "Hi", "max_tokens": 1, "logit_bias": bias});
        let (s, b) = post(&r, "/v1/completions", body).await;
        let shown: String = bias.to_string().chars().take(80).collect();
        assert_eq!(s, StatusCode::BAD_REQUEST, "{shown}: {b}");
        // A value of the wrong JSON type is named down to its key (`logit_bias.5`).
        let param = b["error"]["param"].as_str().unwrap_or_default();
        let named = param.split('.').next() == Some("logit_bias");
        assert!(
            named && b["error"]["type"] == "invalid_request_error",
            "{shown}: {b}"
        );
    }
    let fine = json!({"model": MODEL, "prompt": "Hi", "max_tokens": 1,
        "logit_bias": {"0": -100, (vocab - 1).to_string(): 100}});
    assert_eq!(post(&r, "/v1/completions", fine).await.0, StatusCode::OK);
}
