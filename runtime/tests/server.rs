//! The HTTP API in-process (`app()` driven with `tower::ServiceExt::oneshot`): every route, the
//! OpenAI response shapes, streaming, and every error status with OpenAI's error body.

mod support;

#[path = "server/admin.rs"]
mod admin;
#[path = "server/admin_loads.rs"]
mod admin_loads;
#[path = "server/admission.rs"]
mod admission;
#[path = "server/bos.rs"]
mod bos;
#[path = "server/chat_options.rs"]
mod chat_options;
#[path = "server/echo.rs"]
mod echo;
#[path = "server/faults.rs"]
mod faults;
#[path = "server/fuzz.rs"]
mod fuzz;
#[path = "server/isolation.rs"]
mod isolation;
#[path = "server/limits.rs"]
mod limits;
#[path = "server/logit_bias.rs"]
mod logit_bias;
#[path = "server/models_page.rs"]
mod models_page;
#[path = "server/output_options.rs"]
mod output_options;
#[path = "server/priority.rs"]
mod priority;
#[path = "server/rate_limit.rs"]
mod rate_limit;
#[path = "server/request_id.rs"]
mod request_id;
#[path = "server/sampling_defaults.rs"]
mod sampling_defaults;
#[path = "server/special_tokens.rs"]
mod special_tokens;
#[path = "server/stream_usage.rs"]
mod stream_usage;
#[path = "server/structured.rs"]
mod structured;
#[path = "server/structured_compile.rs"]
mod structured_compile;
#[path = "server/structured_fields.rs"]
mod structured_fields;
#[path = "server/tokenize.rs"]
mod tokenize;

use axum::body::Body;
use axum::http::{Request, StatusCode};
use axum::Router;
use caduceus_runtime::server::{app, AppState, Phase};
use serde_json::{json, Value};
use support::server_app::{call, sse_data, TestServer, MODEL};
use tower::ServiceExt;

async fn post(router: &Router, uri: &str, body: Value) -> (StatusCode, Value) {
    let (s, _, b) = call(router, "POST", uri, Some(body), None).await;
    (s, serde_json::from_str(&b).unwrap_or(Value::String(b)))
}

fn server() -> (Router, AppState) {
    let state = TestServer::default().state();
    (app(state.clone()), state)
}

fn assert_error(body: &Value, kind: &str, param: Option<&str>) {
    let e = &body["error"];
    assert_eq!(e["type"], kind, "{body}");
    assert!(
        e["message"].as_str().is_some_and(|m| !m.is_empty()),
        "{body}"
    );
    assert_eq!(e["param"].as_str(), param, "{body}");
    assert!(e.as_object().unwrap().contains_key("code"), "{body}");
}

#[tokio::test]
async fn models_health_version_openapi_and_metrics() {
    let (r, _) = server();
    let (s, body) = post(&r, "/v1/models", json!({})).await;
    assert_eq!(s, StatusCode::METHOD_NOT_ALLOWED, "{body}");
    let (s, _, b) = call(&r, "GET", "/v1/models", None, None).await;
    assert_eq!(s, StatusCode::OK);
    let v: Value = serde_json::from_str(&b).unwrap();
    assert_eq!(v["object"], "list");
    assert_eq!(v["data"][0]["id"], MODEL);
    assert_eq!(v["data"][0]["object"], "model");
    assert_eq!(v["data"][0]["max_model_len"], 256);
    let (s, _, b) = call(&r, "GET", "/health", None, None).await;
    assert_eq!((s, b.as_str()), (StatusCode::OK, r#"{"status":"ok"}"#));
    let (s, _, b) = call(&r, "GET", "/version", None, None).await;
    assert_eq!(s, StatusCode::OK);
    assert!(b.contains(env!("CARGO_PKG_VERSION")), "{b}");
    let (s, _, b) = call(&r, "GET", "/openapi.json", None, None).await;
    assert_eq!(s, StatusCode::OK);
    let v: Value = serde_json::from_str(&b).unwrap();
    for p in ["/v1/chat/completions", "/v1/completions", "/v1/models"] {
        assert!(
            v["paths"][p].is_object(),
            "{p} missing from the OpenAPI document"
        );
    }
    assert!(v["components"]["schemas"]["ChatCompletionRequest"].is_object());
    // One request, then the metrics carry the request counters and engine gauges.
    let (s, _) = post(
        &r,
        "/v1/completions",
        json!({"prompt": "Hi", "max_tokens": 2}),
    )
    .await;
    assert_eq!(s, StatusCode::OK);
    let (s, h, b) = call(&r, "GET", "/metrics", None, None).await;
    assert_eq!(s, StatusCode::OK);
    assert!(h["content-type"]
        .to_str()
        .unwrap()
        .starts_with("text/plain"));
    for name in [
        "caduceus_requests_total",
        "caduceus_prompt_tokens_total",
        "caduceus_generation_tokens_total",
        "caduceus_time_to_first_token_seconds_bucket",
        "caduceus_e2e_request_latency_seconds_bucket",
        "caduceus_request_queue_time_seconds_bucket",
        "caduceus_num_requests_running",
        "caduceus_num_requests_waiting",
        "caduceus_kv_cache_usage_perc",
        "caduceus_prefix_cache_queries_total",
        "caduceus_num_preemptions_total",
    ] {
        assert!(b.contains(name), "{name} missing from /metrics:\n{b}");
    }
    assert!(
        b.contains(r#"caduceus_requests_total{status="200",finish_reason="length"}"#),
        "{b}"
    );
    let (s, _, b) = call(&r, "GET", "/nope", None, None).await;
    assert_eq!(s, StatusCode::NOT_FOUND, "{b}");
}

#[tokio::test]
async fn chat_completion_has_the_openai_shape_and_counts_usage() {
    let (r, _) = server();
    let req = json!({
        "model": MODEL,
        "messages": [{"role": "system", "content": "Be brief."},
                     {"role": "user", "content": [{"type": "text", "text": "Hello"}]}],
        "max_tokens": 6, "ignore_eos": true, "temperature": 0, "unknown_field": {"x": 1}
    });
    let (s, v) = post(&r, "/v1/chat/completions", req.clone()).await;
    assert_eq!(s, StatusCode::OK, "{v}");
    assert!(v["id"].as_str().unwrap().starts_with("chatcmpl-"));
    assert_eq!(v["object"], "chat.completion");
    assert_eq!(v["model"], MODEL);
    assert!(v["created"].as_u64().unwrap() > 1_600_000_000);
    let c = &v["choices"][0];
    assert_eq!(c["index"], 0);
    assert_eq!(c["message"]["role"], "assistant");
    assert_eq!(c["finish_reason"], "length");
    assert!(c.as_object().unwrap().contains_key("logprobs"));
    let u = &v["usage"];
    assert_eq!(u["completion_tokens"], 6);
    assert_eq!(
        u["total_tokens"].as_u64().unwrap(),
        u["prompt_tokens"].as_u64().unwrap() + 6
    );
    // Greedy is reproducible; the streamed text is the same text.
    let (_, again) = post(&r, "/v1/chat/completions", req.clone()).await;
    assert_eq!(again["choices"][0]["message"], c["message"]);
    let mut sreq = req;
    sreq["stream"] = json!(true);
    sreq["stream_options"] = json!({"include_usage": true});
    let (s, _, body) = call(&r, "POST", "/v1/chat/completions", Some(sreq), None).await;
    assert_eq!(s, StatusCode::OK);
    let data = sse_data(&body);
    assert_eq!(data.last().unwrap(), "[DONE]");
    let chunks: Vec<Value> = data[..data.len() - 1]
        .iter()
        .map(|d| serde_json::from_str(d).unwrap())
        .collect();
    assert_eq!(chunks[0]["object"], "chat.completion.chunk");
    assert_eq!(chunks[0]["choices"][0]["delta"]["role"], "assistant");
    let usage = chunks.last().unwrap();
    assert_eq!(usage["choices"].as_array().unwrap().len(), 0);
    for k in ["prompt_tokens", "completion_tokens", "total_tokens"] {
        assert_eq!(usage["usage"][k], u[k], "{k}");
    }
    // The same prompt a third time: its full blocks come from the prefix cache.
    assert!(
        usage["usage"]["prompt_tokens_details"]["cached_tokens"]
            .as_u64()
            .unwrap()
            >= 16
    );
    let content: String = chunks[1..chunks.len() - 1]
        .iter()
        .map(|c| c["choices"][0]["delta"]["content"].as_str().unwrap_or(""))
        .collect();
    assert_eq!(content, c["message"]["content"].as_str().unwrap());
    let last = &chunks[chunks.len() - 2];
    assert_eq!(last["choices"][0]["finish_reason"], "length");
    assert!(chunks[1..chunks.len() - 1]
        .iter()
        .all(|c| c["usage"].is_null()));
    assert!(chunks.iter().all(|c| c["id"] == chunks[0]["id"]));
}

#[tokio::test]
async fn completions_with_several_prompts_and_n_and_logprobs() {
    let (r, _) = server();
    let (s, v) = post(
        &r,
        "/v1/completions",
        json!({"prompt": ["The doctor", "A fever"], "n": 2, "max_tokens": 4, "ignore_eos": true,
               "temperature": 0.8, "seed": 3, "logprobs": 2}),
    )
    .await;
    assert_eq!(s, StatusCode::OK, "{v}");
    assert_eq!(v["object"], "text_completion");
    assert!(v["id"].as_str().unwrap().starts_with("cmpl-"));
    let choices = v["choices"].as_array().unwrap();
    assert_eq!(choices.len(), 4);
    for (i, c) in choices.iter().enumerate() {
        assert_eq!(c["index"], i);
        assert_eq!(c["finish_reason"], "length");
        let lp = &c["logprobs"];
        assert_eq!(lp["tokens"].as_array().unwrap().len(), 4);
        assert_eq!(lp["token_logprobs"].as_array().unwrap().len(), 4);
        assert_eq!(lp["text_offset"][0], 0);
        for top in lp["top_logprobs"].as_array().unwrap() {
            assert_eq!(
                top.as_object().unwrap().len().max(1),
                top.as_object().unwrap().len()
            );
            assert!(top.as_object().unwrap().len() <= 2);
        }
        assert!(lp["token_logprobs"]
            .as_array()
            .unwrap()
            .iter()
            .all(|x| x.as_f64().unwrap() <= 0.0));
    }
    assert_eq!(v["usage"]["completion_tokens"], 16);
    assert_eq!(
        v["usage"]["prompt_tokens"],
        "The doctor".len() + "A fever".len()
    );
    // Chat logprobs with top_logprobs.
    let (s, v) = post(
        &r,
        "/v1/chat/completions",
        json!({"messages": [{"role": "user", "content": "Hi"}], "max_tokens": 3, "ignore_eos": true,
               "logprobs": true, "top_logprobs": 2, "temperature": 0}),
    )
    .await;
    assert_eq!(s, StatusCode::OK, "{v}");
    let content = v["choices"][0]["logprobs"]["content"].as_array().unwrap();
    assert_eq!(content.len(), 3);
    for t in content {
        assert_eq!(t["top_logprobs"].as_array().unwrap().len(), 2);
        assert!(t["bytes"].is_array());
        // Greedy: the sampled token is the most likely one.
        assert_eq!(t["token"], t["top_logprobs"][0]["token"]);
    }
}

#[tokio::test]
async fn a_stop_string_cuts_the_text() {
    let (r, _) = server();
    let base =
        json!({"prompt": "Patient notes:", "max_tokens": 24, "ignore_eos": true, "temperature": 0});
    let (_, v) = post(&r, "/v1/completions", base.clone()).await;
    let text = v["choices"][0]["text"].as_str().unwrap().to_string();
    let chars: Vec<char> = text.chars().collect();
    let at = (3..chars.len() - 2)
        .find(|&i| !chars[i..i + 2].contains(&'\u{FFFD}'))
        .unwrap();
    let stop: String = chars[at..at + 2].iter().collect();
    let mut req = base;
    req["stop"] = json!(stop);
    let (_, v) = post(&r, "/v1/completions", req).await;
    assert_eq!(
        v["choices"][0]["text"].as_str().unwrap(),
        &text[..text.find(&stop).unwrap()]
    );
    assert_eq!(v["choices"][0]["finish_reason"], "stop");
}

#[tokio::test]
async fn bad_requests_get_400_naming_the_field() {
    let (r, _) = server();
    let msgs = json!([{"role": "user", "content": "Hi"}]);
    for (body, param) in [
        (json!({"messages": msgs, "temperature": 3.5}), "temperature"),
        (json!({"messages": msgs, "top_p": 0}), "top_p"),
        (json!({"messages": msgs, "max_tokens": 0}), "max_tokens"),
        (json!({"messages": msgs, "n": 100}), "n"),
        (
            json!({"messages": msgs, "temperature": "hot"}),
            "temperature",
        ),
        (json!({"messages": []}), "messages"),
        (
            json!({"messages": [{"role": "wizard", "content": "x"}]}),
            "messages[0].role",
        ),
        (json!({"messages": msgs, "max_tokens": 100_000}), "messages"),
    ] {
        let (s, v) = post(&r, "/v1/chat/completions", body.clone()).await;
        assert_eq!(s, StatusCode::BAD_REQUEST, "{body} -> {v}");
        assert_error(&v, "invalid_request_error", Some(param));
    }
    let (s, v) = post(
        &r,
        "/v1/chat/completions",
        json!({"messages": msgs, "max_tokens": 100_000}),
    )
    .await;
    assert_eq!(s, StatusCode::BAD_REQUEST);
    let m = v["error"]["message"].as_str().unwrap();
    assert!(m.contains("256") && m.contains("max_tokens"), "{m}");
    let (s, v) = post(&r, "/v1/completions", json!({"prompt": [[1, 2, 99999]]})).await;
    assert_eq!(s, StatusCode::BAD_REQUEST, "{v}");
    let (s, _, b) = call(&r, "POST", "/v1/completions", None, None).await;
    assert_eq!(s, StatusCode::BAD_REQUEST, "{b}");
    let mut req = Request::builder().method("POST").uri("/v1/completions");
    req = req.header("content-type", "application/json");
    let resp = r
        .clone()
        .oneshot(req.body(Body::from("{not json")).unwrap())
        .await
        .unwrap();
    assert_eq!(resp.status(), StatusCode::BAD_REQUEST);
    let (s, v) = post(
        &r,
        "/v1/chat/completions",
        json!({"model": "dr-nobody", "messages": msgs}),
    )
    .await;
    assert_eq!(s, StatusCode::NOT_FOUND);
    assert_eq!(v["error"]["code"], "model_not_found");
}

#[tokio::test]
async fn body_limit_api_keys_queue_limit_and_draining() {
    let state = TestServer {
        body_limit_bytes: 1024,
        api_keys: vec!["sk-test-1".into()],
        ..TestServer::default()
    }
    .state();
    let r = app(state.clone());
    let big = json!({"prompt": "x".repeat(4000)});
    let (s, _, b) = call(&r, "POST", "/v1/completions", Some(big), Some("sk-test-1")).await;
    assert_eq!(s, StatusCode::PAYLOAD_TOO_LARGE, "{b}");
    assert!(
        serde_json::from_str::<Value>(&b).unwrap()["error"]["message"]
            .as_str()
            .unwrap()
            .contains("1024")
    );
    let ok = json!({"prompt": "Hi", "max_tokens": 1});
    let (s, _, b) = call(&r, "POST", "/v1/completions", Some(ok.clone()), None).await;
    assert_eq!(s, StatusCode::UNAUTHORIZED, "{b}");
    assert_error(
        &serde_json::from_str(&b).unwrap(),
        "authentication_error",
        None,
    );
    let (s, _, _) = call(
        &r,
        "POST",
        "/v1/completions",
        Some(ok.clone()),
        Some("sk-test-2"),
    )
    .await;
    assert_eq!(s, StatusCode::UNAUTHORIZED);
    let (s, _, b) = call(
        &r,
        "POST",
        "/v1/completions",
        Some(ok.clone()),
        Some("sk-test-1"),
    )
    .await;
    assert_eq!(s, StatusCode::OK, "{b}");
    // Health and metrics stay open without a key.
    assert_eq!(
        call(&r, "GET", "/health", None, None).await.0,
        StatusCode::OK
    );
    // A full queue answers 429 at once, with Retry-After.
    state.engine.set_max_queued(0);
    let (s, h, b) = call(
        &r,
        "POST",
        "/v1/completions",
        Some(ok.clone()),
        Some("sk-test-1"),
    )
    .await;
    assert_eq!(s, StatusCode::TOO_MANY_REQUESTS, "{b}");
    assert!(h.contains_key("retry-after"));
    state.engine.set_max_queued(100);
    // Draining: new work and health get 503.
    state.lifecycle.set_phase(Phase::Draining);
    let (s, _, b) = call(&r, "POST", "/v1/completions", Some(ok), Some("sk-test-1")).await;
    assert_eq!(s, StatusCode::SERVICE_UNAVAILABLE, "{b}");
    let (s, _, b) = call(&r, "GET", "/health", None, None).await;
    assert_eq!(
        (s, b.as_str()),
        (StatusCode::SERVICE_UNAVAILABLE, r#"{"status":"draining"}"#)
    );
}

#[tokio::test]
async fn odd_inputs_get_4xx_never_a_panic_or_a_hang() {
    let (r, state) = server();
    let bodies = [
        json!(null),
        json!([]),
        json!("text"),
        json!({"messages": null}),
        json!({"messages": "hello"}),
        json!({"messages": [{"role": "user"}]}),
        json!({"messages": [{"role": "user", "content": null}]}),
        json!({"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}]}),
        json!({"messages": [{"role": "user", "content": "x"}], "max_tokens": -5}),
        json!({"messages": [{"role": "user", "content": "x"}], "max_tokens": 1e300}),
        json!({"messages": [{"role": "user", "content": "x"}], "n": 0}),
        json!({"messages": [{"role": "user", "content": "x"}], "seed": -1}),
        json!({"messages": [{"role": "user", "content": "x"}], "top_logprobs": 1000, "logprobs": true}),
        json!({"messages": [{"role": "user", "content": "x"}], "stop": vec!["a"; 100]}),
        json!({"messages": [{"role": "user", "content": "x"}], "stop": [""]}),
        json!({"messages": [{"role": "user", "content": "x"}], "stream": "yes"}),
        json!({"messages": [{"role": "user", "content": "x"}], "min_tokens": 50, "max_tokens": 5}),
        json!({"messages": [{"role": "user", "content": "x"}], "frequency_penalty": f64::MAX}),
        json!({"prompt": ""}),
        json!({"prompt": []}),
        json!({"prompt": [[]]}),
        json!({"prompt": [1.5]}),
        json!({"prompt": "x", "logprobs": 99}),
        json!({"prompt": "x", "echo": true, "best_of": 3, "suffix": "y"}),
        json!({"prompt": "\u{0}\u{FFFF}\u{10FFFF}", "max_tokens": 2}),
    ];
    for body in bodies {
        for uri in ["/v1/chat/completions", "/v1/completions"] {
            let resp = tokio::time::timeout(
                std::time::Duration::from_secs(20),
                post(&r, uri, body.clone()),
            )
            .await
            .unwrap_or_else(|_| panic!("{uri} hung on {body}"));
            let (s, v) = resp;
            assert!(
                s.is_client_error() || s == StatusCode::OK,
                "{uri} {body} -> {s} {v}"
            );
            if s.is_client_error() {
                assert!(v["error"]["message"].is_string(), "{uri} {body} -> {v}");
            }
        }
    }
    // Deeply nested JSON.
    let deep = format!("{}{}", "[".repeat(5000), "]".repeat(5000));
    let req = Request::builder()
        .method("POST")
        .uri("/v1/completions")
        .body(Body::from(deep))
        .unwrap();
    let resp = r.clone().oneshot(req).await.unwrap();
    assert!(resp.status().is_client_error());
    assert!(state.engine.is_alive());
}
