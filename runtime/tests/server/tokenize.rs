//! `/tokenize` and `/detokenize`: the count is what the generation endpoints report as
//! `usage.prompt_tokens` for the same prompt or conversation, ids round-trip to text, and bad
//! requests are 4xx naming the field.

use axum::http::StatusCode;
use serde_json::{json, Value};

use super::support::server_app::{call, TestServer};
use super::{post, server, MODEL};

/// A prompt that spells a control token: both endpoints must read it as plain text.
const PROMPT: &str = "Patient asks: is <|im_start|> a dose?";

#[tokio::test]
async fn counts_are_the_prompt_tokens_the_generation_endpoints_use() {
    let (r, _) = server();
    let (s, t) = post(&r, "/tokenize", json!({"model": MODEL, "prompt": PROMPT})).await;
    assert_eq!(s, StatusCode::OK, "{t}");
    let (s, c) = post(
        &r,
        "/v1/completions",
        json!({"model": MODEL, "prompt": PROMPT, "max_tokens": 1}),
    )
    .await;
    assert_eq!(s, StatusCode::OK, "{c}");
    assert_eq!(t["count"], c["usage"]["prompt_tokens"], "{t} {c}");
    assert_eq!(
        t["tokens"].as_array().unwrap().len(),
        t["count"].as_u64().unwrap() as usize
    );
    assert!(t["max_model_len"].as_u64().unwrap() > 0);
    assert!(t["token_strs"].is_null());

    let messages = json!([{"role": "system", "content": "Be brief."},
                          {"role": "user", "content": PROMPT}]);
    let (s, tc) = post(&r, "/tokenize", json!({"messages": messages})).await;
    assert_eq!(s, StatusCode::OK, "{tc}");
    let (s, cc) = post(
        &r,
        "/v1/chat/completions",
        json!({"model": MODEL, "messages": messages, "max_tokens": 1}),
    )
    .await;
    assert_eq!(s, StatusCode::OK, "{cc}");
    assert_eq!(tc["count"], cc["usage"]["prompt_tokens"], "{tc} {cc}");
    // Without the assistant header the conversation is a strict prefix.
    let (s, bare) = post(
        &r,
        "/tokenize",
        json!({"messages": messages, "add_generation_prompt": false}),
    )
    .await;
    assert_eq!(s, StatusCode::OK, "{bare}");
    let (full, bare) = (
        tc["tokens"].as_array().unwrap(),
        bare["tokens"].as_array().unwrap(),
    );
    assert!(
        bare.len() < full.len() && full.starts_with(bare),
        "{bare:?} vs {full:?}"
    );
}

#[tokio::test]
async fn ids_round_trip_to_the_text_and_name_their_vocabulary_entries() {
    let (r, state) = server();
    let body = json!({"prompt": PROMPT, "return_token_strs": true});
    let (s, t) = post(&r, "/tokenize", body).await;
    assert_eq!(s, StatusCode::OK, "{t}");
    let ids: Vec<u32> = serde_json::from_value(t["tokens"].clone()).unwrap();
    let strs: Vec<String> = serde_json::from_value(t["token_strs"].clone()).unwrap();
    assert_eq!(strs.len(), ids.len());
    for (id, s) in ids.iter().zip(&strs) {
        assert_eq!(state.tokenizer.id_to_token(*id).as_ref(), Some(s));
    }
    let (s, d) = post(&r, "/detokenize", json!({"model": MODEL, "tokens": ids})).await;
    assert_eq!(s, StatusCode::OK, "{d}");
    // The model's BOS, if it adds one, is spelled out in front.
    let text = d["prompt"].as_str().unwrap();
    assert!(text.ends_with(PROMPT), "{text:?}");
}

#[tokio::test]
async fn bad_requests_are_refused_naming_the_field() {
    let (r, state) = server();
    let vocab = state.tokenizer.vocab_size();
    let m = json!([{"role": "user", "content": "hi"}]);
    let cases: [(&str, Value, u16, &str); 8] = [
        (
            "/tokenize",
            json!({"prompt": "a", "messages": m}),
            400,
            "prompt",
        ),
        ("/tokenize", json!({"model": MODEL}), 400, "prompt"),
        (
            "/tokenize",
            json!({"prompt": "a", "add_generation_prompt": true}),
            400,
            "add_generation_prompt",
        ),
        (
            "/tokenize",
            json!({"prompt": "a", "add_bos": false}),
            400,
            "",
        ),
        (
            "/tokenize",
            json!({"messages": [{"role": "doctor", "content": "x"}]}),
            400,
            "messages[0].role",
        ),
        (
            "/tokenize",
            json!({"model": "dr-nobody", "prompt": "a"}),
            404,
            "model",
        ),
        ("/detokenize", json!({"tokens": [0, vocab]}), 400, "tokens"),
        ("/detokenize", json!({"tokens": "abc"}), 400, "tokens"),
    ];
    for (path, body, status, param) in cases {
        let (s, b) = post(&r, path, body.clone()).await;
        assert_eq!(s.as_u16(), status, "{path} {body}: {b}");
        assert_eq!(
            b["error"]["type"].as_str().map(|t| t.ends_with("error")),
            Some(true),
            "{b}"
        );
        if !param.is_empty() {
            assert_eq!(b["error"]["param"], param, "{path} {body}: {b}");
        }
    }
}

#[tokio::test]
async fn both_routes_need_an_api_key_when_keys_are_set() {
    let r = caduceus_runtime::server::app(
        TestServer {
            api_keys: vec!["sk-test-0123456789".into()],
            ..TestServer::default()
        }
        .state(),
    );
    for (path, body) in [
        ("/tokenize", json!({"prompt": "hi"})),
        ("/detokenize", json!({"tokens": [1, 2]})),
    ] {
        let (s, _, b) = call(&r, "POST", path, Some(body.clone()), None).await;
        assert_eq!(s, StatusCode::UNAUTHORIZED, "{path}: {b}");
        let (s, _, b) = call(&r, "POST", path, Some(body), Some("sk-test-0123456789")).await;
        assert_eq!(s, StatusCode::OK, "{path}: {b}");
    }
}
