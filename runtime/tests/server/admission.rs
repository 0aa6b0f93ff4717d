//! One admission rule at the boundary: the server's default `max_tokens`, the engine handle's
//! check and the scheduler agree on prompt + max_tokens == max_model_len (accepted) and one more
//! (refused), and on the KV pool's last slot (the last sampled token needs none).

use axum::Router;
use caduceus_runtime::server::app;
use serde_json::{json, Value};

use crate::support::server_app::{call, TestServer};

/// 20 byte-level tokens.
const PROMPT: &str = "Is 5 mg too much?...";
/// The tiny model's context.
const MAX_MODEL_LEN: u64 = 256;

async fn complete(r: &Router, max_tokens: Option<u64>) -> (u16, Value) {
    let mut body = json!({"prompt": PROMPT, "temperature": 0, "ignore_eos": true});
    if let Some(m) = max_tokens {
        body["max_tokens"] = json!(m);
    }
    let (s, _, b) = call(r, "POST", "/v1/completions", Some(body), None).await;
    (
        s.as_u16(),
        serde_json::from_str(&b).unwrap_or(Value::String(b)),
    )
}

async fn prompt_tokens(r: &Router) -> u64 {
    let (s, v) = complete(r, Some(1)).await;
    assert_eq!(s, 200, "{v}");
    v["usage"]["prompt_tokens"].as_u64().unwrap()
}

#[tokio::test]
async fn max_tokens_up_to_the_context_is_accepted_and_one_more_refused() {
    let r = app(TestServer::default().state());
    let p = prompt_tokens(&r).await;
    let (s, v) = complete(&r, Some(MAX_MODEL_LEN - p)).await;
    assert_eq!(s, 200, "{v}");
    assert_eq!(v["usage"]["completion_tokens"], MAX_MODEL_LEN - p);
    let (s, v) = complete(&r, Some(MAX_MODEL_LEN - p + 1)).await;
    assert_eq!(s, 400, "{v}");
    assert_eq!(v["error"]["param"], "prompt", "{v}");
}

#[tokio::test]
async fn the_kv_pools_last_slot_counts_the_same_everywhere() {
    // 4 usable blocks of 16 = 64 KV slots; prompt + max_tokens - 1 of them are needed.
    let r = app(TestServer {
        num_blocks: 5,
        ..TestServer::default()
    }
    .state());
    let p = prompt_tokens(&r).await;
    let fits = 64 + 1 - p;
    let (s, v) = complete(&r, Some(fits)).await;
    assert_eq!(s, 200, "{v}");
    assert_eq!(v["usage"]["completion_tokens"], fits);
    let (s, v) = complete(&r, Some(fits + 1)).await;
    assert_eq!(s, 400, "{v}");
    assert!(
        v["error"]["message"]
            .as_str()
            .unwrap()
            .contains("KV-cache blocks"),
        "{v}"
    );
    // A chat request without max_tokens (completions default to 16) gets exactly the room the
    // rule leaves, not a refusal.
    let chat = json!({
        "messages": [{"role": "user", "content": PROMPT}],
        "temperature": 0,
        "ignore_eos": true,
    });
    // The chat template's markup makes the prompt longer: a pool of 8 blocks (128 slots).
    let r = app(TestServer {
        num_blocks: 9,
        ..TestServer::default()
    }
    .state());
    let (s, _, b) = call(&r, "POST", "/v1/chat/completions", Some(chat), None).await;
    assert_eq!(s, 200, "{b}");
    let v: Value = serde_json::from_str(&b).unwrap();
    let p = v["usage"]["prompt_tokens"].as_u64().unwrap();
    assert!(128 + 1 - p < MAX_MODEL_LEN - p, "the pool must bind");
    assert_eq!(v["usage"]["completion_tokens"], 128 + 1 - p, "{v}");
}
