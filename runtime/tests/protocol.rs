//! OpenAI wire types: example bodies from the API reference parse, unknown fields are ignored,
//! wrong types are refused, every range check names its `param`, and responses, chunks and
//! errors serialize to OpenAI's exact shapes.

#[path = "protocol/responses.rs"]
mod responses;

use caduceus_runtime::chat_template::ChatMessage;
use caduceus_runtime::sampling::SamplingParams;
use caduceus_runtime::server::protocol::{
    validate_chat, validate_completion, ApiError, ChatCompletionRequest, CompletionRequest,
    PromptInput, SamplingDefaults, StreamUsage, ValidationError,
};
use serde_json::{json, Value};

fn chat(
    body: Value,
) -> Result<caduceus_runtime::server::protocol::ValidatedChatRequest, ValidationError> {
    validate_chat(
        serde_json::from_value::<ChatCompletionRequest>(body).unwrap(),
        &SamplingDefaults::default(),
    )
}

fn completion(
    body: Value,
) -> Result<caduceus_runtime::server::protocol::ValidatedCompletionRequest, ValidationError> {
    validate_completion(
        serde_json::from_value::<CompletionRequest>(body).unwrap(),
        &SamplingDefaults::default(),
    )
}

/// `base` with `field` set to `value`.
fn with(mut base: Value, field: &str, value: Value) -> Value {
    base[field] = value;
    base
}

fn chat_base() -> Value {
    json!({"model": "m", "messages": [{"role": "user", "content": "hi"}]})
}

#[test]
fn reference_chat_body_parses_and_validates() {
    // The shape of the API reference's chat example: system + user turns, streaming with usage,
    // logprobs with alternatives, a stop list and a seed.
    let body = json!({
        "model": "gpt-4o",
        "messages": [
            {"role": "system", "content": "You are a helpful assistant."},
            {"role": "user", "content": [
                {"type": "text", "text": "Hello!"},
                {"type": "text", "text": "How are you?"}
            ]},
            {"role": "assistant", "content": null},
        ],
        "max_completion_tokens": 100, "max_tokens": 5,
        "temperature": 0.7, "top_p": 0.9, "seed": -1,
        "stop": ["\n\n", "END"], "n": 2,
        "presence_penalty": 0.5, "frequency_penalty": -0.5,
        "logprobs": true, "top_logprobs": 3,
        "stream": true, "stream_options": {"include_usage": true},
        "user": "user-1234"
    });
    let v = chat(body).unwrap();
    assert_eq!(
        v.messages,
        [
            ChatMessage::new("system", "You are a helpful assistant."),
            ChatMessage::new("user", "Hello!\nHow are you?"),
            ChatMessage::new("assistant", ""),
        ]
    );
    let p = &v.params;
    assert_eq!(
        p.max_tokens,
        Some(100),
        "max_completion_tokens wins over max_tokens"
    );
    assert_eq!((p.sampling.temperature, p.sampling.top_p), (0.7, 0.9));
    assert_eq!(
        p.sampling.seed,
        Some(u64::MAX),
        "negative seeds keep their bit pattern"
    );
    assert_eq!(
        (p.sampling.presence_penalty, p.sampling.frequency_penalty),
        (0.5, -0.5)
    );
    assert_eq!(p.sampling.logprobs, Some(3));
    assert_eq!(p.stop, ["\n\n", "END"]);
    assert_eq!((p.n, p.stream, p.usage), (2, true, StreamUsage::Final));
    assert_eq!(p.user.as_deref(), Some("user-1234"));
    assert_eq!(p.model.as_deref(), Some("gpt-4o"));
}

#[test]
fn chat_defaults_fill_the_context_with_default_sampling() {
    let v = chat(json!({"messages": [{"role": "user", "content": "hi"}]})).unwrap();
    assert_eq!(v.params.model, None);
    assert_eq!(v.params.max_tokens, None);
    assert_eq!(v.params.sampling, SamplingParams::default());
    assert_eq!((v.params.n, v.params.min_tokens), (1, 0));
    assert!(!v.params.stream && !v.params.usage.included() && !v.params.ignore_eos);
    assert!(v.params.stop.is_empty());
    let v = chat(with(chat_base(), "logprobs", json!(true))).unwrap();
    assert_eq!(v.params.sampling.logprobs, Some(0));
    let v = chat(with(chat_base(), "max_tokens", json!(7))).unwrap();
    assert_eq!(v.params.max_tokens, Some(7));
}

#[test]
fn reference_completion_bodies_parse_every_prompt_form() {
    let v = completion(json!({
        "model": "gpt-3.5-turbo-instruct", "prompt": "Say this is a test",
        "max_tokens": 7, "temperature": 0, "logprobs": 2, "stop": "\n",
        "top_k": 40, "min_p": 0.05, "repetition_penalty": 1.1,
        "ignore_eos": true, "min_tokens": 3, "stop_token_ids": [2]
    }))
    .unwrap();
    assert_eq!(v.prompts, [PromptInput::Text("Say this is a test".into())]);
    let p = &v.params;
    assert_eq!(
        (p.max_tokens, p.min_tokens, p.ignore_eos),
        (Some(7), 3, true)
    );
    assert!(p.sampling.is_greedy());
    assert_eq!(
        (
            p.sampling.top_k,
            p.sampling.min_p,
            p.sampling.repetition_penalty
        ),
        (Some(40), 0.05, 1.1)
    );
    assert_eq!(p.sampling.logprobs, Some(2));
    assert_eq!(
        (p.stop.as_slice(), p.stop_token_ids.as_slice()),
        (["\n".to_string()].as_slice(), [2u32].as_slice())
    );

    let forms = [
        (
            json!(["a", "b"]),
            vec![PromptInput::Text("a".into()), PromptInput::Text("b".into())],
        ),
        (json!([1, 2, 3]), vec![PromptInput::Tokens(vec![1, 2, 3])]),
        (
            json!([[1], [2, 3]]),
            vec![
                PromptInput::Tokens(vec![1]),
                PromptInput::Tokens(vec![2, 3]),
            ],
        ),
    ];
    for (prompt, expected) in forms {
        let v = completion(json!({"model": "m", "prompt": prompt})).unwrap();
        assert_eq!(v.prompts, expected);
        assert_eq!(
            v.params.max_tokens,
            Some(16),
            "OpenAI's completions default"
        );
    }
}

#[test]
fn unknown_fields_are_ignored() {
    let body = json!({
        "model": "m", "messages": [{"role": "user", "content": "hi", "tool_call_id": null}],
        "tools": [], "response_format": {"type": "text"}, "parallel_tool_calls": false,
        "store": true, "metadata": {"k": "v"}, "future_field": 1
    });
    assert!(chat(body).is_ok());
    let body = json!({"model": "m", "prompt": "x", "echo": false, "best_of": 1, "suffix": null});
    assert!(completion(body).is_ok());
}

#[test]
fn wrong_types_are_rejected_by_serde() {
    let cases = [
        (
            with(chat_base(), "temperature", json!("hot")),
            "invalid type",
        ),
        (with(chat_base(), "n", json!(1.5)), "invalid type"),
        (with(chat_base(), "stream", json!("yes")), "invalid type"),
        (
            with(chat_base(), "stop", json!(5)),
            "`stop` must be a string or an array of strings",
        ),
        (json!({"model": "m", "messages": "hi"}), "invalid type"),
        (
            json!({"model": "m", "messages": [{"role": "user", "content": 42}]}),
            "`content` must be a string or an array of content parts",
        ),
        (json!({"model": "m"}), "missing field `messages`"),
    ];
    for (body, expected) in cases {
        let err = serde_json::from_value::<ChatCompletionRequest>(body.clone()).unwrap_err();
        assert!(err.to_string().contains(expected), "{body}: {err}");
    }
    let err =
        serde_json::from_value::<CompletionRequest>(json!({"prompt": {"text": "x"}})).unwrap_err();
    assert!(
        err.to_string().contains("`prompt` must be a string"),
        "{err}"
    );
    let err = serde_json::from_value::<CompletionRequest>(json!({"prompt": "x", "logprobs": true}))
        .unwrap_err();
    assert!(err.to_string().contains("invalid type"), "{err}");
}

/// Each out-of-range chat value is refused naming its param and the limit.
#[test]
fn every_chat_range_check_names_its_param_and_limit() {
    let many_stops: Vec<String> = (0..17).map(|i| format!("s{i}")).collect();
    let cases: Vec<(&str, Value, &str, &str)> = vec![
        ("temperature", json!(2.5), "temperature", "[0, 2]"),
        ("temperature", json!(-0.1), "temperature", "[0, 2]"),
        ("top_p", json!(0.0), "top_p", "(0, 1]"),
        ("top_p", json!(1.01), "top_p", "(0, 1]"),
        ("top_k", json!(-2), "top_k", "at least 1"),
        ("min_p", json!(1.5), "min_p", "[0, 1]"),
        (
            "presence_penalty",
            json!(-2.5),
            "presence_penalty",
            "[-2, 2]",
        ),
        (
            "frequency_penalty",
            json!(3),
            "frequency_penalty",
            "[-2, 2]",
        ),
        (
            "repetition_penalty",
            json!(0),
            "repetition_penalty",
            "(0, 2]",
        ),
        (
            "repetition_penalty",
            json!(2.5),
            "repetition_penalty",
            "(0, 2]",
        ),
        ("n", json!(0), "n", "[1, 8]"),
        ("n", json!(9), "n", "[1, 8]"),
        ("max_tokens", json!(0), "max_tokens", "at least 1"),
        (
            "max_completion_tokens",
            json!(-5),
            "max_completion_tokens",
            "at least 1",
        ),
        ("min_tokens", json!(-1), "min_tokens", "at least 0"),
        ("stop", json!(many_stops), "stop", "at most 16"),
        ("stop", json!([""]), "stop", "empty"),
        ("messages", json!([]), "messages", "at least one"),
        (
            "messages",
            json!([{"role": "function", "content": "x"}]),
            "messages[0].role",
            "\"system\", \"user\", \"assistant\", \"tool\"",
        ),
        (
            "messages",
            json!([{"role": "user"}]),
            "messages[0].content",
            "required",
        ),
        (
            "messages",
            json!([{"role": "user", "content": "a"}, {"role": "user", "content": [{"type": "image_url"}]}]),
            "messages[1].content[0].type",
            "only text parts",
        ),
        (
            "messages",
            json!([{"role": "user", "content": [{"type": "text"}]}]),
            "messages[0].content[0].text",
            "required",
        ),
        (
            "stream_options",
            json!({"include_usage": true}),
            "stream_options",
            "`stream` is true",
        ),
    ];
    for (field, value, param, limit) in cases {
        let err = chat(with(chat_base(), field, value.clone())).unwrap_err();
        assert_eq!(err.param(), param, "{field}={value}");
        assert!(err.to_string().contains(limit), "{field}={value}: {err}");
        assert!(err.to_string().contains(param), "{err}");
    }
    let both = with(
        with(chat_base(), "logprobs", json!(true)),
        "top_logprobs",
        json!(21),
    );
    assert!(chat(both)
        .unwrap_err()
        .to_string()
        .contains("`top_logprobs` is 21, but it must be in [0, 20]"));
    let without = with(chat_base(), "top_logprobs", json!(2));
    assert_eq!(chat(without).unwrap_err().param(), "top_logprobs");
    let min_above_max = with(
        with(chat_base(), "max_tokens", json!(4)),
        "min_tokens",
        json!(5),
    );
    let err = chat(min_above_max).unwrap_err();
    assert_eq!(
        err.to_string(),
        "`min_tokens` is 5, but it must be at most `max_tokens` (4)"
    );
}

#[test]
fn completion_range_checks_name_their_param() {
    let base = json!({"model": "m", "prompt": "x"});
    let too_many: Vec<String> = (0..65).map(|i| i.to_string()).collect();
    let cases: Vec<(&str, Value, &str, &str)> = vec![
        ("logprobs", json!(21), "logprobs", "[0, 20]"),
        ("logprobs", json!(-1), "logprobs", "[0, 20]"),
        ("prompt", json!([]), "prompt", "must not be empty"),
        ("prompt", json!([[1], []]), "prompt", "empty token list"),
        ("prompt", json!(too_many), "prompt", "at most 64 prompts"),
        ("max_tokens", json!(0), "max_tokens", "at least 1"),
        ("temperature", json!(9), "temperature", "[0, 2]"),
    ];
    for (field, value, param, limit) in cases {
        let err = completion(with(base.clone(), field, value.clone())).unwrap_err();
        assert_eq!(err.param(), param, "{field}={value}");
        assert!(err.to_string().contains(limit), "{field}={value}: {err}");
    }
}

#[test]
fn top_k_follows_vllm_and_boundaries_are_accepted() {
    for (k, expected) in [
        (json!(-1), None),
        (json!(0), None),
        (json!(1), Some(1)),
        (json!(50), Some(50)),
    ] {
        let v = chat(with(chat_base(), "top_k", k)).unwrap();
        assert_eq!(v.params.sampling.top_k, expected);
    }
    let edges = json!({
        "messages": [{"role": "user", "content": "x"}], "temperature": 2, "top_p": 1, "min_p": 1,
        "presence_penalty": -2, "frequency_penalty": 2, "repetition_penalty": 2, "n": 8,
        "logprobs": true, "top_logprobs": 20, "stop": (0..16).map(|i| i.to_string()).collect::<Vec<_>>()
    });
    assert!(chat(edges).is_ok());
}

#[test]
fn validation_errors_become_400_bodies_with_param() {
    let err = chat(with(chat_base(), "temperature", json!(3))).unwrap_err();
    let api: ApiError = err.into();
    assert_eq!(api.status, 400);
    assert_eq!(
        serde_json::to_value(&api.body).unwrap(),
        json!({"error": {
            "message": "`temperature` is 3, but it must be in [0, 2]",
            "type": "invalid_request_error", "param": "temperature", "code": null
        }})
    );
}
