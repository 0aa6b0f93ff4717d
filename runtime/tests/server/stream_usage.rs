//! `stream_options`: `include_usage` ends a stream with the totals; vLLM's
//! `continuous_usage_stats` also puts on every chunk its choice's counts so far, checked against
//! what the chunks themselves carry (one logprobs entry per generated token) and `/tokenize`.

use axum::http::StatusCode;
use axum::Router;
use caduceus_runtime::server::app;
use serde_json::{json, Value};

use super::support::server_app::{call, sse_chunks, with_fields, TestServer};
use super::{post, MODEL};

const MAX_TOKENS: u64 = 6;

async fn streamed(r: &Router, uri: &str, body: Value) -> Vec<Value> {
    let (s, _, text) = call(r, "POST", uri, Some(body), None).await;
    assert_eq!(s, StatusCode::OK, "{text}");
    sse_chunks(&text)
}

fn count(v: &Value, key: &str) -> u64 {
    v["usage"][key]
        .as_u64()
        .unwrap_or_else(|| panic!("no usage.{key}: {v}"))
}

/// Checks the continuous counts of `chunks` (the usage chunk last): each choice's completion
/// tokens never fall, never trail the logprobs entries sent so far, and end at `MAX_TOKENS`; its
/// prompt tokens are `prompt_tokens(choice)`; the last chunk has the completion tokens of all and
/// `final_prompt` (each prompt once). `entries(choice)` counts a choice's logprobs entries.
fn check_continuous(
    chunks: &[Value],
    prompt_tokens: impl Fn(usize) -> u64,
    final_prompt: u64,
    entries: impl Fn(&Value) -> u64,
) {
    let (last, choice_chunks) = chunks.split_last().unwrap();
    let mut sent = std::collections::BTreeMap::<usize, (u64, u64)>::new();
    for chunk in choice_chunks {
        let choice = &chunk["choices"][0];
        let i = choice["index"].as_u64().unwrap() as usize;
        let (logprobs, before) = sent.entry(i).or_default();
        *logprobs += entries(choice);
        let (prompt, completion) = (
            count(chunk, "prompt_tokens"),
            count(chunk, "completion_tokens"),
        );
        assert_eq!(prompt, prompt_tokens(i), "{chunk}");
        assert_eq!(count(chunk, "total_tokens"), prompt + completion, "{chunk}");
        assert!(completion >= *before && completion >= *logprobs, "{chunk}");
        *before = completion;
        if !choice["finish_reason"].is_null() {
            assert_eq!((completion, *logprobs), (MAX_TOKENS, MAX_TOKENS), "{chunk}");
        }
    }
    let choices = sent.len() as u64;
    assert!(last["choices"].as_array().unwrap().is_empty(), "{last}");
    assert_eq!(count(last, "completion_tokens"), choices * MAX_TOKENS);
    assert_eq!(count(last, "prompt_tokens"), final_prompt, "{last}");
}

#[tokio::test]
async fn continuous_usage_counts_each_choice_on_every_chunk() {
    let r = app(TestServer::default().state());
    let options = json!({"stream": true, "n": 2, "max_tokens": MAX_TOKENS, "ignore_eos": true,
        "temperature": 1, "seed": 7,
        "stream_options": {"include_usage": true, "continuous_usage_stats": true}});
    let messages = json!([{"role": "user", "content": "Which vitamins help with fatigue?"}]);
    let (s, t) = post(
        &r,
        "/tokenize",
        json!({"model": MODEL, "messages": messages}),
    )
    .await;
    assert_eq!(s, StatusCode::OK, "{t}");
    let chat_prompt = t["count"].as_u64().unwrap();
    let chat = with_fields(
        json!({"model": MODEL, "messages": messages, "logprobs": true}),
        options.clone(),
    );
    let chunks = streamed(&r, "/v1/chat/completions", chat).await;
    // The role chunk of each choice counts no token yet.
    assert_eq!(count(&chunks[0], "completion_tokens"), 0, "{}", chunks[0]);
    check_continuous(
        &chunks,
        |_| chat_prompt,
        chat_prompt,
        |choice| {
            choice["logprobs"]["content"]
                .as_array()
                .map_or(0, |c| c.len() as u64)
        },
    );
}

/// Completions with two prompts: each choice counts its own prompt (streams are prompt-major,
/// `n` choices each), the totals count each prompt once.
#[tokio::test]
async fn continuous_usage_names_each_choices_own_prompt() {
    let r = app(TestServer::default().state());
    let prompts = [
        "Iron deficiency causes",
        "A persistent dry cough after a cold usually means",
    ];
    let mut lengths = Vec::new();
    for p in prompts {
        let (s, t) = post(&r, "/tokenize", json!({"model": MODEL, "prompt": p})).await;
        assert_eq!(s, StatusCode::OK, "{t}");
        lengths.push(t["count"].as_u64().unwrap());
    }
    assert_ne!(lengths[0], lengths[1]);
    let body = json!({"model": MODEL, "prompt": prompts, "logprobs": 0, "stream": true, "n": 2,
        "max_tokens": MAX_TOKENS, "ignore_eos": true, "temperature": 1, "seed": 7,
        "stream_options": {"include_usage": true, "continuous_usage_stats": true}});
    let chunks = streamed(&r, "/v1/completions", body).await;
    check_continuous(
        &chunks,
        |i| lengths[i / 2],
        lengths.iter().sum(),
        |choice| {
            choice["logprobs"]["tokens"]
                .as_array()
                .map_or(0, |t| t.len() as u64)
        },
    );
}

/// Without `continuous_usage_stats` only the last chunk counts (`"usage": null` before it); the
/// option without `include_usage` is a 400 naming it, not a stream without the counts asked for.
#[tokio::test]
async fn usage_is_final_only_unless_continuous_and_continuous_needs_include_usage() {
    let r = app(TestServer::default().state());
    let body = |options: Value| {
        json!({"model": MODEL, "prompt": "Fever in adults", "stream": true,
               "max_tokens": MAX_TOKENS, "ignore_eos": true, "stream_options": options})
    };
    let chunks = streamed(&r, "/v1/completions", body(json!({"include_usage": true}))).await;
    let (last, rest) = chunks.split_last().unwrap();
    assert_eq!(count(last, "completion_tokens"), MAX_TOKENS);
    assert!(rest.iter().all(|c| c["usage"].is_null()), "{rest:?}");
    for options in [
        json!({"continuous_usage_stats": true}),
        json!({"include_usage": false, "continuous_usage_stats": true}),
    ] {
        let (s, b) = post(&r, "/v1/completions", body(options)).await;
        assert_eq!(
            (s, &b["error"]["param"]),
            (
                StatusCode::BAD_REQUEST,
                &json!("stream_options.continuous_usage_stats")
            ),
            "{b}"
        );
    }
}
