//! Response, chunk, model-list and error bodies against JSON written from OpenAI's reference.

use caduceus_runtime::server::protocol::{
    random_id, ApiError, ChatChoice, ChatChunkChoice, ChatCompletionChunk, ChatCompletionResponse,
    ChatLogprobs, ChatTokenLogprob, CompletionChoice, CompletionChunk, CompletionLogprobs,
    CompletionResponse, FinishReason, ModelCard, ModelList, PromptTokenLogprob, StopReason,
    TopLogprob, Usage,
};
use serde_json::{json, Value};

fn to_json<T: serde::Serialize>(value: &T) -> Value {
    serde_json::to_value(value).unwrap()
}

#[test]
fn chat_completion_has_openais_fields() {
    let choice = ChatChoice::new(0, "Hello there!".into(), None, FinishReason::Stop);
    let usage = Usage::new(9, 12).with_cached_tokens(4);
    let resp = ChatCompletionResponse::new(
        "chatcmpl-abc".into(),
        1_700_000_000,
        "m".into(),
        vec![choice],
        usage,
    );
    assert_eq!(
        to_json(&resp),
        json!({
            "id": "chatcmpl-abc", "object": "chat.completion", "created": 1_700_000_000, "model": "m",
            "choices": [{
                "index": 0,
                "message": {"role": "assistant", "content": "Hello there!"},
                "logprobs": null, "finish_reason": "stop"
            }],
            "usage": {"prompt_tokens": 9, "completion_tokens": 12, "total_tokens": 21,
                      "prompt_tokens_details": {"cached_tokens": 4}}
        })
    );
    assert_eq!(
        to_json(&Usage::new(1, 2)),
        json!({"prompt_tokens": 1, "completion_tokens": 2, "total_tokens": 3})
    );
}

#[test]
fn chat_logprobs_have_token_bytes_and_alternatives() {
    let top = vec![
        TopLogprob::new(b"Hi", -0.25),
        TopLogprob::new(b"Hey", f32::NEG_INFINITY),
    ];
    let lp = ChatLogprobs {
        content: Some(vec![ChatTokenLogprob::new(b"Hi", -0.25, top)]),
    };
    assert_eq!(
        to_json(&lp),
        json!({"content": [{
            "token": "Hi", "logprob": -0.25, "bytes": [72, 105],
            "top_logprobs": [
                {"token": "Hi", "logprob": -0.25, "bytes": [72, 105]},
                {"token": "Hey", "logprob": -9999.0, "bytes": [72, 101, 121]}
            ]
        }]})
    );
    // Half a UTF-8 character: the text is lossy, the bytes are exact.
    let partial = TopLogprob::new(&[0xE2, 0x82], -1.0);
    assert_eq!(partial.bytes.as_deref(), Some(&[0xE2, 0x82][..]));
    assert_eq!(partial.token, "\u{FFFD}");
}

#[test]
fn chat_stream_chunks_role_first_then_content_then_usage() {
    let first =
        ChatCompletionChunk::new("chatcmpl-1", 7, "m", vec![ChatChunkChoice::role(0)], false);
    assert_eq!(
        to_json(&first),
        json!({"id": "chatcmpl-1", "object": "chat.completion.chunk", "created": 7, "model": "m",
               "choices": [{"index": 0, "delta": {"role": "assistant", "content": ""},
                            "logprobs": null, "finish_reason": null}]})
    );
    let last = ChatChunkChoice::content(1, "!".into(), None, Some(FinishReason::Length));
    let chunk = ChatCompletionChunk::new("chatcmpl-1", 7, "m", vec![last], true);
    assert_eq!(
        to_json(&chunk),
        json!({"id": "chatcmpl-1", "object": "chat.completion.chunk", "created": 7, "model": "m",
               "choices": [{"index": 1, "delta": {"content": "!"}, "logprobs": null, "finish_reason": "length"}],
               "usage": null})
    );
    // vLLM's `stop_reason`: a stop token's id as a number.
    let mut stopped = ChatChunkChoice::content(0, String::new(), None, Some(FinishReason::Stop));
    stopped.stop_reason = Some(StopReason::TokenId(13));
    let chunk = to_json(&ChatCompletionChunk::new("c", 7, "m", vec![stopped], false));
    assert_eq!(chunk["choices"][0]["stop_reason"], json!(13));
    let usage = ChatCompletionChunk::usage("chatcmpl-1", 7, "m", Usage::new(3, 4));
    assert_eq!(
        to_json(&usage),
        json!({"id": "chatcmpl-1", "object": "chat.completion.chunk", "created": 7, "model": "m", "choices": [],
               "usage": {"prompt_tokens": 3, "completion_tokens": 4, "total_tokens": 7}})
    );
}

#[test]
fn completions_and_their_chunks_are_text_completion_objects() {
    // An echoed prompt token first: nothing came before it, so it has no logprobs.
    let mut lp = CompletionLogprobs::default();
    lp.push("Hi".into(), None, 0);
    lp.push(
        " a".into(),
        Some((-0.5, &[(" a".into(), -0.5), (" b".into(), -1.5)])),
        2,
    );
    lp.push("!".into(), Some((f32::NEG_INFINITY, &[])), 4);
    let listed = vec![
        None,
        Some(std::collections::BTreeMap::from([(
            "7".to_string(),
            PromptTokenLogprob::new(-2.5, 3, " a".into()),
        )])),
    ];
    let choice = CompletionChoice {
        text: "Hi a!".into(),
        index: 0,
        logprobs: Some(lp),
        finish_reason: Some(FinishReason::Stop),
        stop_reason: Some(StopReason::Text("\nUser:".into())),
        prompt_logprobs: Some(listed),
    };
    let resp = CompletionResponse::new(
        "cmpl-1".into(),
        5,
        "m".into(),
        vec![choice],
        Usage::new(2, 2),
    );
    assert_eq!(
        to_json(&resp),
        json!({"id": "cmpl-1", "object": "text_completion", "created": 5, "model": "m",
               "choices": [{"text": "Hi a!", "index": 0, "finish_reason": "stop",
                   "stop_reason": "\nUser:", "logprobs": {
                   "tokens": ["Hi", " a", "!"], "token_logprobs": [null, -0.5, -9999.0],
                   "top_logprobs": [null, {" a": -0.5, " b": -1.5}, {}], "text_offset": [0, 2, 4]},
                   "prompt_logprobs": [null, {"7": {"logprob": -2.5, "rank": 3, "decoded_token": " a"}}]}],
               "usage": {"prompt_tokens": 2, "completion_tokens": 2, "total_tokens": 4}})
    );
    let delta = CompletionChoice {
        text: "x".into(),
        index: 3,
        logprobs: None,
        finish_reason: None,
        stop_reason: None,
        prompt_logprobs: None,
    };
    let chunk = CompletionChunk::new("cmpl-1", 5, "m", vec![delta], false);
    assert_eq!(
        to_json(&chunk),
        json!({"id": "cmpl-1", "object": "text_completion", "created": 5, "model": "m",
               "choices": [{"text": "x", "index": 3, "logprobs": null, "finish_reason": null}]})
    );
    let usage = to_json(&CompletionChunk::usage("cmpl-1", 5, "m", Usage::new(1, 1)));
    assert_eq!(
        (
            usage["choices"].clone(),
            usage["usage"]["total_tokens"].clone()
        ),
        (json!([]), json!(2))
    );
}

#[test]
fn model_list_shape() {
    let list = ModelList::new(vec![
        ModelCard::base("smol", "models/smol.gguf", 9, 2048),
        ModelCard::adapter("cardiologist", "smol", "adapters/cardiologist", 9, 2048),
    ]);
    assert_eq!(
        to_json(&list),
        json!({"object": "list", "data": [
            {"id": "smol", "object": "model", "created": 9, "owned_by": "caduceus",
             "root": "models/smol.gguf", "parent": null, "max_model_len": 2048},
            {"id": "cardiologist", "object": "model", "created": 9, "owned_by": "caduceus",
             "root": "adapters/cardiologist", "parent": "smol", "max_model_len": 2048}
        ]})
    );
}

#[test]
fn error_constructors_map_to_status_type_and_code() {
    let cases = [
        (
            ApiError::invalid_request("bad", Some("n")),
            400,
            "invalid_request_error",
            json!("n"),
            json!(null),
        ),
        (
            ApiError::unauthorized(),
            401,
            "authentication_error",
            json!(null),
            json!("invalid_api_key"),
        ),
        (
            ApiError::model_not_found("gpt-5"),
            404,
            "invalid_request_error",
            json!("model"),
            json!("model_not_found"),
        ),
        (
            ApiError::payload_too_large(1024),
            413,
            "invalid_request_error",
            json!(null),
            json!("request_too_large"),
        ),
        (
            ApiError::rate_limited(2),
            429,
            "rate_limit_error",
            json!(null),
            json!("rate_limit_exceeded"),
        ),
        (
            ApiError::unavailable("loading"),
            503,
            "server_error",
            json!(null),
            json!("service_unavailable"),
        ),
        (
            ApiError::internal(),
            500,
            "server_error",
            json!(null),
            json!(null),
        ),
    ];
    for (err, status, kind, param, code) in cases {
        assert_eq!(err.status, status);
        let body = to_json(&err.body);
        assert_eq!(body.as_object().unwrap().len(), 1);
        let mut keys: Vec<&String> = body["error"].as_object().unwrap().keys().collect();
        // serde_json keeps insertion order (llguidance enables `preserve_order`).
        keys.sort();
        assert_eq!(keys, ["code", "message", "param", "type"]);
        assert_eq!(
            (
                &body["error"]["type"],
                &body["error"]["param"],
                &body["error"]["code"]
            ),
            (&json!(kind), &param, &code)
        );
        assert_eq!(err.retry_after_secs.is_some(), status == 429);
    }
    let not_found = to_json(&ApiError::model_not_found("gpt-5").body);
    assert_eq!(
        not_found["error"]["message"],
        "the model `gpt-5` does not exist"
    );
    assert!(ApiError::payload_too_large(1024)
        .body
        .error
        .message
        .contains("1024"));
}

#[test]
fn ids_are_prefixed_and_unique() {
    let (a, b) = (random_id("chatcmpl"), random_id("chatcmpl"));
    assert!(a.starts_with("chatcmpl-") && a.len() == "chatcmpl-".len() + 24);
    assert_ne!(a, b);
}

#[test]
fn openapi_components_come_from_the_same_types() {
    use utoipa::OpenApi;
    #[derive(OpenApi)]
    #[openapi(components(schemas(
        caduceus_runtime::server::protocol::ChatCompletionRequest,
        caduceus_runtime::server::protocol::CompletionRequest,
        ChatCompletionResponse,
        ChatCompletionChunk,
        CompletionResponse,
        CompletionChunk,
        ModelList,
        caduceus_runtime::server::protocol::ErrorResponse
    )))]
    struct Doc;
    let doc = serde_json::to_value(Doc::openapi()).unwrap();
    let schemas = &doc["components"]["schemas"];
    let req = &schemas["ChatCompletionRequest"];
    assert!(req["properties"]["messages"].is_object(), "{req}");
    assert!(req["properties"]["allowed_token_ids"].is_object(), "{req}");
    assert_eq!(req["required"], json!(["messages"]));
    assert!(schemas["ErrorResponse"]["properties"]["error"].is_object());
}
