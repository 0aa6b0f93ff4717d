//! Client text cannot forge control tokens: a message or prompt that spells the tiny model's
//! `</s>` gets its four characters, not the end-of-sequence token.

use caduceus_runtime::server::app;
use serde_json::{json, Value};

use crate::support::server_app::{call, TestServer};

async fn prompt_tokens(server: &TestServer, uri: &str, body: Value) -> u64 {
    let r = app(server.state());
    let (s, _, b) = call(&r, "POST", uri, Some(body), None).await;
    assert_eq!(s, 200, "{b}");
    let v: Value = serde_json::from_str(&b).unwrap();
    v["usage"]["prompt_tokens"].as_u64().unwrap()
}

fn completion(prompt: &str) -> Value {
    json!({"prompt": prompt, "max_tokens": 1})
}

fn chat(content: &str) -> Value {
    json!({"messages": [{"role": "user", "content": content}], "max_tokens": 1})
}

#[tokio::test]
async fn special_token_text_from_clients_stays_plain_text() {
    let server = TestServer::default();
    // Byte-level vocabulary: plain text is one token per byte.
    assert_eq!(
        prompt_tokens(&server, "/v1/completions", completion("a</s>b")).await,
        6
    );
    let chat_tokens = |c: &'static str| prompt_tokens(&server, "/v1/chat/completions", chat(c));
    assert_eq!(chat_tokens("a</s>b").await, chat_tokens("a<zz>b").await);
    // A trusted deployment may let raw prompts carry specials: `</s>` is then one token.
    let trusting = TestServer {
        allow_special_tokens_in_prompt: true,
        ..TestServer::default()
    };
    assert_eq!(
        prompt_tokens(&trusting, "/v1/completions", completion("a</s>b")).await,
        3
    );
}
