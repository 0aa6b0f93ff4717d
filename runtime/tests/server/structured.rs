//! Structured outputs and tools over the HTTP API (issue 20), on the tiny model: whatever the
//! model would say, every answer parses and validates against its schema (checked by the small
//! independent validator below, not by llguidance), on both endpoints, streamed and not, with
//! `n > 1`, seeds and logprobs; bad grammars are 400s naming the field; tool calls come back in
//! OpenAI's shapes, whole and streamed.

use axum::http::StatusCode;
use axum::Router;
use caduceus_runtime::server::app;
use serde_json::{json, Value};

use super::support::server_app::{sse_chunks, with_fields, TestServer, MODEL};
use super::{assert_error, post};

/// The tiny model with room for tool lists and whole documents (its random weights spell
/// strings as multi-byte characters, one byte per token).
fn server() -> Router {
    let state = TestServer {
        max_model_len: Some(1024),
        body_limit_bytes: 1 << 20,
        ..TestServer::default()
    }
    .state();
    app(state)
}

/// A JSON-schema check over the keywords these tests use, written from the spec.
fn validate(v: &Value, s: &Value) -> Result<(), String> {
    if let Some(any) = s.get("anyOf").and_then(Value::as_array) {
        if !any.iter().any(|a| validate(v, a).is_ok()) {
            return Err(format!("{v} matches no anyOf branch"));
        }
    }
    if let Some(e) = s.get("enum").and_then(Value::as_array) {
        if !e.contains(v) {
            return Err(format!("{v} not in enum"));
        }
    }
    if let Some(c) = s.get("const") {
        if c != v {
            return Err(format!("{v} is not {c}"));
        }
    }
    let ok_type = match s.get("type").and_then(Value::as_str) {
        None => true,
        Some("object") => v.is_object(),
        Some("array") => v.is_array(),
        Some("string") => v.is_string(),
        Some("integer") => v.is_i64() || v.is_u64(),
        Some("number") => v.is_number(),
        Some("boolean") => v.is_boolean(),
        Some("null") => v.is_null(),
        Some(other) => return Err(format!("test schema uses type {other}")),
    };
    if !ok_type {
        return Err(format!("{v} is not of type {}", s["type"]));
    }
    if let (Some(o), Some(props)) = (v.as_object(), s.get("properties")) {
        for r in s
            .get("required")
            .and_then(Value::as_array)
            .into_iter()
            .flatten()
        {
            if !o.contains_key(r.as_str().unwrap_or_default()) {
                return Err(format!("{v} lacks {r}"));
            }
        }
        for (k, x) in o {
            match props.get(k) {
                Some(ps) => validate(x, ps)?,
                None if s.get("additionalProperties") == Some(&Value::Bool(false)) => {
                    return Err(format!("{v} has extra key {k}"))
                }
                None => {}
            }
        }
    }
    if let Some(a) = v.as_array() {
        let n = a.len() as u64;
        if s.get("minItems")
            .and_then(Value::as_u64)
            .is_some_and(|m| n < m)
            || s.get("maxItems")
                .and_then(Value::as_u64)
                .is_some_and(|m| n > m)
        {
            return Err(format!("{v} has {n} items"));
        }
        if let Some(items) = s.get("items") {
            a.iter().try_for_each(|x| validate(x, items))?;
        }
    }
    if let (Some(t), Some(p)) = (v.as_str(), s.get("pattern").and_then(Value::as_str)) {
        if !regex::Regex::new(p).unwrap().is_match(t) {
            return Err(format!("{t:?} does not match {p}"));
        }
    }
    if let (Some(x), Some(min)) = (v.as_i64(), s.get("minimum").and_then(Value::as_i64)) {
        if x < min {
            return Err(format!("{x} < {min}"));
        }
    }
    if let (Some(x), Some(max)) = (v.as_i64(), s.get("maximum").and_then(Value::as_i64)) {
        if x > max {
            return Err(format!("{x} > {max}"));
        }
    }
    Ok(())
}

fn triage() -> Value {
    json!({"type": "object", "properties": {
        "urgent": {"type": "boolean"},
        "reason": {"type": "string", "maxLength": 12},
        "see_doctor_within_hours": {"type": "integer", "minimum": 0, "maximum": 720}},
        "required": ["urgent", "reason", "see_doctor_within_hours"], "additionalProperties": false})
}

fn schemas() -> Vec<Value> {
    vec![
        triage(),
        json!({"type": "object", "properties": {
            "patient": {"type": "object", "properties": {
                "age": {"type": "integer", "minimum": 0, "maximum": 120},
                "sex": {"enum": ["female", "male", "other"]}},
                "required": ["age", "sex"], "additionalProperties": false},
            "symptoms": {"type": "array", "items": {"type": "string", "maxLength": 12},
                         "minItems": 1, "maxItems": 3}},
            "required": ["patient", "symptoms"], "additionalProperties": false}),
        json!({"type": "object", "properties": {
            "answer": {"anyOf": [{"type": "integer", "minimum": 0, "maximum": 9},
                                 {"type": "string", "pattern": "^[A-Z]{2}[0-9]$"}]},
            "code": {"type": "string", "pattern": "^ICD-[0-9]{3}$"}},
            "required": ["answer", "code"], "additionalProperties": false}),
    ]
}

fn chat(schema: &Value, extra: Value) -> Value {
    let body = json!({"model": MODEL, "max_tokens": 300, "temperature": 1.0, "seed": 3,
        "messages": [{"role": "user", "content": "I have chest pain, what should I do?"}],
        "response_format": {"type": "json_schema",
                            "json_schema": {"name": "triage", "schema": schema, "strict": true}}});
    with_fields(body, extra)
}

fn check_json(text: &str, schema: &Value) {
    let v: Value = serde_json::from_str(text).unwrap_or_else(|e| panic!("{text:?}: {e}"));
    validate(&v, schema).unwrap_or_else(|e| panic!("{text}: {e}"));
}

#[tokio::test]
async fn json_schema_answers_always_parse_and_validate() {
    let r = server();
    for (i, schema) in schemas().iter().enumerate() {
        // Non-streaming chat, n = 3 with a seed and logprobs.
        let body = chat(
            schema,
            json!({"n": 3, "logprobs": true, "top_logprobs": 2, "seed": i}),
        );
        let (s, b) = post(&r, "/v1/chat/completions", body).await;
        assert_eq!(s, StatusCode::OK, "{b}");
        for c in b["choices"].as_array().unwrap() {
            assert_eq!(c["finish_reason"], "stop", "{b}");
            check_json(c["message"]["content"].as_str().unwrap(), schema);
            assert!(!c["logprobs"]["content"].as_array().unwrap().is_empty());
        }
        // Streamed legacy completion: the concatenated deltas are the document.
        let body = json!({"model": MODEL, "prompt": "Triage:", "max_tokens": 300, "stream": true,
            "temperature": 0.8, "seed": 7,
            "structured_outputs": {"json": schema}});
        let (s, _, raw) =
            super::support::server_app::call(&r, "POST", "/v1/completions", Some(body), None).await;
        assert_eq!(s, StatusCode::OK, "{raw}");
        let mut text = String::new();
        for c in sse_chunks(&raw) {
            text.push_str(c["choices"][0]["text"].as_str().unwrap_or_default());
        }
        check_json(&text, schema);
    }
}

#[tokio::test]
async fn a_seeded_constrained_request_repeats_and_json_object_gives_an_object() {
    let r = server();
    let body = chat(&triage(), json!({}));
    let (_, a) = post(&r, "/v1/chat/completions", body.clone()).await;
    let (_, b) = post(&r, "/v1/chat/completions", body).await;
    assert_eq!(a["choices"][0]["message"], b["choices"][0]["message"]);
    let body = json!({"model": MODEL, "max_tokens": 40, "temperature": 0.7, "seed": 1,
        "messages": [{"role": "user", "content": "hi"}],
        "response_format": {"type": "json_object"}});
    let (s, b) = post(&r, "/v1/chat/completions", body).await;
    assert_eq!(s, StatusCode::OK, "{b}");
    let text = b["choices"][0]["message"]["content"].as_str().unwrap();
    if b["choices"][0]["finish_reason"] == "stop" {
        assert!(
            serde_json::from_str::<Value>(text).unwrap().is_object(),
            "{text}"
        );
    } else {
        assert!(text.starts_with('{'), "{text}");
    }
}

/// A request to `endpoint` saying "Answer:" (as its prompt or a user message), with `fields`.
fn answer(endpoint: &str, fields: Value) -> Value {
    let mut body = with_fields(json!({"model": MODEL}), fields);
    if endpoint == "/v1/completions" {
        body["prompt"] = json!("Answer:");
    } else {
        body["messages"] = json!([{"role": "user", "content": "Answer:"}]);
    }
    body
}

#[tokio::test]
async fn regex_choice_and_lark_constrain_the_text() {
    let r = server();
    let cases = [
        (
            json!({"regex": "(yes|no), [0-9]{1,3} hours"}),
            "^(yes|no), [0-9]{1,3} hours$",
        ),
        (
            json!({"choice": ["urgent", "routine", "self-care"]}),
            "^(urgent|routine|self-care)$",
        ),
        (
            json!({"grammar": "start: \"risk=\" LEVEL\nLEVEL: \"low\" | \"high\""}),
            "^risk=(low|high)$",
        ),
    ];
    for (so, want) in cases {
        for endpoint in ["/v1/completions", "/v1/chat/completions"] {
            let body = answer(
                endpoint,
                json!({"max_tokens": 20, "temperature": 1.0, "seed": 5, "n": 2,
                       "structured_outputs": so}),
            );
            let (s, b) = post(&r, endpoint, body).await;
            assert_eq!(s, StatusCode::OK, "{b}");
            for c in b["choices"].as_array().unwrap() {
                let t = c["text"]
                    .as_str()
                    .or(c["message"]["content"].as_str())
                    .unwrap();
                assert!(
                    regex::Regex::new(want).unwrap().is_match(t),
                    "{t:?} vs {want}"
                );
            }
        }
    }
}

/// `min_tokens` never breaks a grammar: once the grammar is complete, the end of the answer is
/// the only token it allows, and the answer ends there even below `min_tokens`.
#[tokio::test]
async fn a_complete_grammar_ends_the_answer_below_min_tokens() {
    let r = server();
    for endpoint in ["/v1/completions", "/v1/chat/completions"] {
        let body = answer(
            endpoint,
            json!({"max_tokens": 40, "min_tokens": 30, "temperature": 1.0, "seed": 3, "n": 3,
                   "structured_outputs": {"choice": ["urgent", "routine"]}}),
        );
        let (s, b) = post(&r, endpoint, body).await;
        assert_eq!(s, StatusCode::OK, "{b}");
        for c in b["choices"].as_array().unwrap() {
            let t = c["text"].as_str().or(c["message"]["content"].as_str());
            assert!(matches!(t, Some("urgent" | "routine")), "{endpoint}: {c}");
            assert_eq!(c["finish_reason"], "stop", "{endpoint}: {c}");
        }
    }
}

#[tokio::test]
async fn the_configured_compile_limits_bound_each_request() {
    use caduceus_runtime::structured::CompileLimits;
    use std::time::Duration;
    let body = |so: Value| json!({"model": MODEL, "max_tokens": 8, "prompt": "Answer:", "structured_outputs": so});
    let choice = json!({"choice": ["urgent", "routine"]});
    // Text past `max_grammar_bytes` is refused before compiling; text within it is served
    // (the list's JSON: 20 bytes here, 32 below).
    let limits = CompileLimits {
        max_text_bytes: 24,
        ..CompileLimits::default()
    };
    let r = app(TestServer {
        compile_limits: limits,
        ..TestServer::default()
    }
    .state());
    let (s, b) = post(&r, "/v1/completions", body(choice.clone())).await;
    assert_eq!(s, StatusCode::OK, "{b}");
    let longer = json!({"choice": ["urgent", "routine", "self-care"]});
    let (s, b) = post(&r, "/v1/completions", body(longer)).await;
    assert_eq!(s, StatusCode::BAD_REQUEST, "{b}");
    assert_error(&b, "invalid_request_error", Some("structured_outputs"));
    let message = b["error"]["message"].as_str().unwrap();
    assert!(
        message.contains("the choice list is 32 bytes; at most 24 bytes"),
        "{b}"
    );
    // A compile past `compile_timeout` is a 400 naming the limit (no compile takes 0 ms of CPU).
    let r = app(TestServer {
        compile_limits: CompileLimits {
            timeout: Duration::ZERO,
            ..CompileLimits::default()
        },
        ..TestServer::default()
    }
    .state());
    let (s, b) = post(&r, "/v1/completions", body(choice)).await;
    assert_eq!(s, StatusCode::BAD_REQUEST, "{b}");
    assert_error(&b, "invalid_request_error", Some("structured_outputs"));
    let message = b["error"]["message"].as_str().unwrap();
    assert!(message.contains("took more than 0 ms of CPU time"), "{b}");
    // The server keeps serving unconstrained requests.
    let (s, b) = post(
        &r,
        "/v1/completions",
        json!({"model": MODEL, "max_tokens": 4,
        "prompt": "Hi"}),
    )
    .await;
    assert_eq!(s, StatusCode::OK, "{b}");
}

#[tokio::test]
async fn bad_grammars_are_400s_naming_the_field_and_the_server_keeps_serving() {
    let r = server();
    let recursive = json!({"$ref": "#/$defs/a", "$defs": {"a": {"$ref": "#/$defs/a"}}});
    let huge = json!({"type": "object", "properties": (0..4000)
        .map(|i| (format!("field_{i}"), json!({"type": "string"})))
        .collect::<serde_json::Map<_, _>>()});
    let bad = [
        (
            json!({"response_format": {"type": "json_schema",
            "json_schema": {"name": "x", "schema": {"type": "strin"}}}}),
            "response_format",
        ),
        (
            json!({"response_format": {"type": "json_schema",
            "json_schema": {"name": "x", "schema": {"$ref": "#/$defs/missing"}}}}),
            "response_format",
        ),
        (
            json!({"response_format": {"type": "json_schema",
            "json_schema": {"name": "x", "schema": recursive}}}),
            "response_format",
        ),
        (
            json!({"response_format": {"type": "json_schema",
            "json_schema": {"name": "x", "schema": huge}}}),
            "response_format",
        ),
        (
            json!({"response_format": {"type": "json_schema",
            "json_schema": {"name": "x", "schema": [1]}}}),
            "response_format",
        ),
        (
            json!({"structured_outputs": {"regex": "(unclosed"}}),
            "structured_outputs",
        ),
        (
            json!({"structured_outputs": {"grammar": "start: ("}}),
            "structured_outputs",
        ),
        (
            json!({"structured_outputs": {"choice": []}}),
            "structured_outputs",
        ),
        (
            json!({"structured_outputs": {"regex": "a", "choice": ["a"]}}),
            "structured_outputs",
        ),
        (
            json!({"structured_outputs": {"regex": "a"},
                "response_format": {"type": "json_object"}}),
            "structured_outputs",
        ),
        (
            json!({"response_format": {"type": "json_object"}, "ignore_eos": true}),
            "ignore_eos",
        ),
    ];
    for (extra, param) in bad {
        let body = json!({"model": MODEL, "max_tokens": 5,
            "messages": [{"role": "user", "content": "hi"}]});
        let (s, b) = post(&r, "/v1/chat/completions", with_fields(body, extra.clone())).await;
        let shown: String = extra.to_string().chars().take(200).collect();
        assert_eq!(s, StatusCode::BAD_REQUEST, "{shown}: {b}");
        assert_error(&b, "invalid_request_error", Some(param));
    }
    let ok =
        json!({"model": MODEL, "max_tokens": 3, "messages": [{"role": "user", "content": "hi"}]});
    assert_eq!(post(&r, "/v1/chat/completions", ok).await.0, StatusCode::OK);
}

fn tools() -> Value {
    json!([
        {"type": "function", "function": {"name": "book_visit", "description": "Book a visit",
         "parameters": {"type": "object", "properties": {
             "within_hours": {"type": "integer", "minimum": 1, "maximum": 72},
             "department": {"enum": ["cardiology", "general"]}},
             "required": ["within_hours", "department"], "additionalProperties": false}}},
        {"type": "function", "function": {"name": "escalate",
         "parameters": {"type": "object", "properties": {"reason": {"type": "string", "maxLength": 8}},
             "required": ["reason"], "additionalProperties": false}}}
    ])
}

fn tool_chat(choice: Value, stream: bool) -> Value {
    json!({"model": MODEL, "max_tokens": 200, "temperature": 0.9, "seed": 11, "stream": stream,
        "messages": [{"role": "user", "content": "Chest pain since this morning."}],
        "tools": tools(), "tool_choice": choice, "parallel_tool_calls": false})
}

fn check_call(call: &Value, want_name: Option<&str>) {
    assert!(call["id"].as_str().unwrap().starts_with("call_"), "{call}");
    assert_eq!(call["type"], "function");
    let name = call["function"]["name"].as_str().unwrap();
    if let Some(w) = want_name {
        assert_eq!(name, w);
    }
    let tools = tools();
    let def = tools
        .as_array()
        .unwrap()
        .iter()
        .find(|t| t["function"]["name"] == name)
        .unwrap();
    let args: Value =
        serde_json::from_str(call["function"]["arguments"].as_str().unwrap()).unwrap();
    validate(&args, &def["function"]["parameters"]).unwrap();
}

#[tokio::test]
async fn tool_calls_come_back_whole_and_streamed() {
    let r = server();
    let named = json!({"type": "function", "function": {"name": "escalate"}});
    for (choice, want) in [(json!("required"), None), (named, Some("escalate"))] {
        let (s, b) = post(&r, "/v1/chat/completions", tool_chat(choice.clone(), false)).await;
        assert_eq!(s, StatusCode::OK, "{b}");
        let c = &b["choices"][0];
        assert_eq!(c["finish_reason"], "tool_calls", "{b}");
        assert!(c["message"]["content"].is_null(), "{b}");
        let calls = c["message"]["tool_calls"].as_array().unwrap();
        assert_eq!(calls.len(), 1, "parallel_tool_calls: false");
        check_call(&calls[0], want);
        // The same request streamed: deltas reassemble into the same call (ids are fresh).
        let (s, _, raw) = super::support::server_app::call(
            &r,
            "POST",
            "/v1/chat/completions",
            Some(tool_chat(choice, true)),
            None,
        )
        .await;
        assert_eq!(s, StatusCode::OK);
        let (mut id, mut name, mut args, mut finish) = (None, String::new(), String::new(), None);
        for chunk in sse_chunks(&raw) {
            let ch = &chunk["choices"][0];
            if let Some(f) = ch["finish_reason"].as_str() {
                finish = Some(f.to_owned());
            }
            for tc in ch["delta"]["tool_calls"].as_array().into_iter().flatten() {
                assert_eq!(tc["index"], 0);
                if let Some(i) = tc["id"].as_str() {
                    assert!(id.replace(i.to_owned()).is_none(), "one id per call");
                    name = tc["function"]["name"].as_str().unwrap().to_owned();
                }
                args.push_str(tc["function"]["arguments"].as_str().unwrap_or_default());
            }
        }
        assert_eq!(finish.as_deref(), Some("tool_calls"), "{raw}");
        assert_eq!(name, calls[0]["function"]["name"]);
        assert_eq!(args, calls[0]["function"]["arguments"].as_str().unwrap());
    }
    // A round trip: the call and its result go back, `tool_choice: none` answers in text.
    let (_, b) = post(
        &r,
        "/v1/chat/completions",
        tool_chat(json!("required"), false),
    )
    .await;
    let call = b["choices"][0]["message"]["tool_calls"][0].clone();
    let body = json!({"model": MODEL, "max_tokens": 8, "tools": tools(), "tool_choice": "none",
        "messages": [{"role": "user", "content": "Chest pain since this morning."},
                     {"role": "assistant", "content": null, "tool_calls": [call.clone()]},
                     {"role": "tool", "tool_call_id": call["id"], "content": "booked"}]});
    let (s, b) = post(&r, "/v1/chat/completions", body).await;
    assert_eq!(s, StatusCode::OK, "{b}");
    assert!(b["choices"][0]["message"]["content"].is_string());
    // auto: either text or a valid call.
    let (s, b) = post(&r, "/v1/chat/completions", tool_chat(json!("auto"), false)).await;
    assert_eq!(s, StatusCode::OK, "{b}");
    let c = &b["choices"][0];
    match c["message"]["tool_calls"].as_array() {
        Some(calls) => calls.iter().for_each(|call| check_call(call, None)),
        None => assert!(!c["message"]["content"].as_str().unwrap().starts_with('<')),
    }
    let bad = json!({"model": MODEL, "messages": [{"role": "user", "content": "x"}],
        "tools": tools(), "tool_choice": {"type": "function", "function": {"name": "nope"}}});
    let (s, b) = post(&r, "/v1/chat/completions", bad).await;
    assert_eq!(s, StatusCode::BAD_REQUEST);
    assert_error(
        &b,
        "invalid_request_error",
        Some("tool_choice.function.name"),
    );
}
