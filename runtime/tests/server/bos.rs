//! vLLM's `add_special_tokens` on a model whose tokenizer adds BOS the way Llama 3's does (a
//! post-processor, and a chat template that writes `bos_token`): a text prompt gets one BOS
//! unless the request says `false`; a chat prompt has the template's one BOS either way, as
//! transformers renders it; the engine is fed the ids `/tokenize` reports.

use axum::http::StatusCode;
use axum::Router;
use caduceus_runtime::server::app;
use serde_json::{json, Value};

use super::post;
use super::support::bos_model::{write_tiny_llama_with_bos, TemplateIn, HF_CHAT_HI, HF_HI_THERE};
use super::support::server_app::{with_fields, TestServer};

fn bos_server(dir: &tempfile::TempDir, template: TemplateIn) -> Router {
    write_tiny_llama_with_bos(dir.path(), template);
    app(TestServer {
        model_dir: Some(dir.path().to_owned()),
        allow_special_tokens_in_prompt: true,
        ..TestServer::default()
    }
    .state())
}

async fn tokens(r: &Router, body: Value) -> Vec<u32> {
    let (s, b) = post(r, "/tokenize", body.clone()).await;
    assert_eq!(s, StatusCode::OK, "{body}: {b}");
    serde_json::from_value(b["tokens"].clone()).unwrap()
}

/// `usage.prompt_tokens` and the text of a greedy answer.
async fn answer(r: &Router, uri: &str, body: Value) -> (u64, Value) {
    let (s, b) = post(r, uri, body.clone()).await;
    assert_eq!(s, StatusCode::OK, "{body}: {b}");
    let choice = &b["choices"][0];
    let text = choice.get("text").unwrap_or(&choice["message"]["content"]);
    (b["usage"]["prompt_tokens"].as_u64().unwrap(), text.clone())
}

#[tokio::test]
async fn add_special_tokens_decides_the_bos_of_a_text_prompt() {
    let dir = tempfile::tempdir().unwrap();
    let r = bos_server(&dir, TemplateIn::Config);
    let with_bos = HF_HI_THERE.to_vec();
    let without = HF_HI_THERE[1..].to_vec();
    let cases = [
        ("hi there", json!({}), &with_bos),
        ("hi there", json!({"add_special_tokens": true}), &with_bos),
        ("hi there", json!({"add_special_tokens": false}), &without),
        // A prompt that spells BOS keeps one, whatever the field says.
        ("<s>hi there", json!({}), &with_bos),
        (
            "<s>hi there",
            json!({"add_special_tokens": false}),
            &with_bos,
        ),
    ];
    for (prompt, fields, want) in cases {
        let body = with_fields(json!({"prompt": prompt}), fields.clone());
        assert_eq!(&tokens(&r, body).await, want, "{prompt:?} {fields}");
        // The completion of the text is the completion of those ids.
        let greedy = json!({"max_tokens": 6, "temperature": 0});
        let text = with_fields(
            greedy.clone(),
            with_fields(json!({"prompt": prompt}), fields),
        );
        let ids = with_fields(greedy, json!({"prompt": want}));
        let from_text = answer(&r, "/v1/completions", text).await;
        assert_eq!(from_text.0, want.len() as u64, "{prompt:?}");
        assert_eq!(from_text, answer(&r, "/v1/completions", ids).await);
    }
}

/// Either place transformers keeps the template in: with the template ignored (ChatML), the
/// prompt would not be transformers' ids.
#[tokio::test]
async fn a_chat_prompt_has_the_template_bos_once() {
    for template in [TemplateIn::Config, TemplateIn::File] {
        let dir = tempfile::tempdir().unwrap();
        let r = bos_server(&dir, template);
        chat_prompt_is_transformers(&r).await;
    }
}

async fn chat_prompt_is_transformers(r: &Router) {
    let messages = json!([{"role": "user", "content": "hi"}]);
    for fields in [
        json!({}),
        json!({"add_special_tokens": true}),
        json!({"add_special_tokens": false}),
    ] {
        let body = with_fields(json!({"messages": messages}), fields.clone());
        assert_eq!(tokens(r, body.clone()).await, HF_CHAT_HI, "{fields}");
        let chat = with_fields(body, json!({"max_tokens": 2}));
        let (prompt_tokens, _) = answer(r, "/v1/chat/completions", chat).await;
        assert_eq!(prompt_tokens, HF_CHAT_HI.len() as u64, "{fields}");
    }
}
