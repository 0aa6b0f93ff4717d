//! Every spelling of an output constraint constrains alike: vLLM's older top-level `guided_*`
//! fields give, for one seed, the answers `structured_outputs` gives; a second constraint, a
//! `structured_outputs` key the server does not know or implement, and a bad guided grammar are
//! 400s naming the field, so no constraint is silently dropped.

use axum::http::StatusCode;
use axum::Router;
use caduceus_runtime::server::app;
use serde_json::{json, Value};

use super::support::server_app::{with_fields, TestServer, MODEL};
use super::{assert_error, post};

const ENDPOINTS: [&str; 2] = ["/v1/completions", "/v1/chat/completions"];

fn server() -> Router {
    app(TestServer {
        max_model_len: Some(1024),
        ..TestServer::default()
    }
    .state())
}

/// A request to `endpoint` saying "Answer:" (as its prompt or a user message), with `fields`.
fn answer(endpoint: &str, fields: Value) -> Value {
    let mut body = with_fields(
        json!({"model": MODEL, "max_tokens": 60, "temperature": 1.0, "seed": 11, "n": 3}),
        fields,
    );
    if endpoint == "/v1/completions" {
        body["prompt"] = json!("Answer:");
    } else {
        body["messages"] = json!([{"role": "user", "content": "Answer:"}]);
    }
    body
}

/// Each choice's text and finish reason.
async fn answers(r: &Router, endpoint: &str, fields: Value) -> Vec<(String, String)> {
    let (s, b) = post(r, endpoint, answer(endpoint, fields.clone())).await;
    assert_eq!(s, StatusCode::OK, "{endpoint} {fields}: {b}");
    b["choices"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| {
            let text = c["text"].as_str().or(c["message"]["content"].as_str());
            let reason = c["finish_reason"].as_str().unwrap_or_default();
            (text.unwrap_or_default().to_owned(), reason.to_owned())
        })
        .collect()
}

#[tokio::test]
async fn guided_fields_answer_as_structured_outputs_does() {
    let r = server();
    let schema = json!({"type": "object", "properties": {
        "urgent": {"type": "boolean"}, "hours": {"type": "integer", "minimum": 0, "maximum": 72}},
        "required": ["urgent", "hours"], "additionalProperties": false});
    let json_text = r#"^\{"urgent": (true|false), "hours": (0|[1-9][0-9]?)\}$"#;
    let cases = [
        ("guided_json", "json", schema.clone(), json_text),
        (
            "guided_json",
            "json",
            Value::from(schema.to_string()),
            json_text,
        ),
        (
            "guided_regex",
            "regex",
            json!("(yes|no), [0-9]{1,3} hours"),
            "^(yes|no), [0-9]{1,3} hours$",
        ),
        (
            "guided_choice",
            "choice",
            json!(["urgent", "routine", "self-care"]),
            "^(urgent|routine|self-care)$",
        ),
        (
            "guided_grammar",
            "grammar",
            json!("start: \"risk=\" LEVEL\nLEVEL: \"low\" | \"high\""),
            "^risk=(low|high)$",
        ),
    ];
    for endpoint in ENDPOINTS {
        let free = answers(&r, endpoint, json!({})).await;
        for (legacy, key, value, want) in &cases {
            let want = regex::Regex::new(want).unwrap();
            let new = answers(&r, endpoint, json!({"structured_outputs": {*key: value}})).await;
            let old = answers(&r, endpoint, json!({*legacy: value})).await;
            assert_eq!(old, new, "{endpoint} {legacy}");
            for (text, reason) in &old {
                assert!(want.is_match(text), "{endpoint} {legacy}: {text:?}");
                assert_eq!(reason, "stop", "{endpoint} {legacy}: {text:?}");
            }
            // Unconstrained, the same seed says something else: the field was not ignored.
            assert!(
                !free.iter().any(|(t, _)| want.is_match(t)),
                "{endpoint}: {free:?}"
            );
        }
    }
}

#[tokio::test]
async fn a_second_constraint_or_an_unknown_key_is_a_400_naming_the_field() {
    let r = server();
    let object = json!({"type": "object"});
    let tools = json!([{"type": "function", "function": {"name": "triage"}}]);
    let bad = [
        (json!({"guided_regex": "(unclosed"}), "guided_regex"),
        (json!({"guided_grammar": "start: ("}), "guided_grammar"),
        (json!({"guided_json": "{not json"}), "guided_json"),
        (json!({"guided_json": [1]}), "guided_json"),
        (json!({"guided_choice": []}), "guided_choice"),
        (json!({"guided_choice": "urgent"}), "guided_choice"),
        (
            json!({"guided_regex": "a", "guided_choice": ["a"]}),
            "guided_choice",
        ),
        (
            json!({"structured_outputs": {"regex": "a"}, "guided_json": object}),
            "guided_json",
        ),
        (
            json!({"response_format": {"type": "json_object"}, "guided_regex": "a"}),
            "guided_regex",
        ),
        (
            json!({"guided_regex": "a", "guided_whitespace_pattern": "[ ]?"}),
            "guided_whitespace_pattern",
        ),
        (
            json!({"structured_outputs": {"jsn": object}}),
            "structured_outputs.jsn",
        ),
        (
            json!({"structured_outputs": {"regex": "a", "whitespace_pattern": "[ ]?"}}),
            "structured_outputs.whitespace_pattern",
        ),
        (
            json!({"structured_outputs": {"structural_tag": {"type": "structural_tag"}}}),
            "structured_outputs.structural_tag",
        ),
        (
            json!({"structured_outputs": {"json": object, "disable_additional_properties": true}}),
            "structured_outputs.disable_additional_properties",
        ),
    ];
    for endpoint in ENDPOINTS {
        for (fields, param) in &bad {
            let (s, b) = post(&r, endpoint, answer(endpoint, fields.clone())).await;
            assert_eq!(s, StatusCode::BAD_REQUEST, "{endpoint} {fields}: {b}");
            assert_error(&b, "invalid_request_error", Some(param));
        }
    }
    let chat = "/v1/chat/completions";
    let (s, b) = post(
        &r,
        chat,
        answer(chat, json!({"tools": tools, "guided_regex": "a"})),
    )
    .await;
    assert_eq!(s, StatusCode::BAD_REQUEST, "{b}");
    assert_error(&b, "invalid_request_error", Some("guided_regex"));
    // The options that change nothing here are accepted, and the constraint holds.
    let options = json!({"structured_outputs": {"regex": "(yes|no)", "disable_fallback": true,
        "disable_any_whitespace": true, "disable_additional_properties": false}});
    for endpoint in ENDPOINTS {
        for (text, _) in answers(&r, endpoint, options.clone()).await {
            assert!(text == "yes" || text == "no", "{endpoint}: {text:?}");
        }
    }
}
