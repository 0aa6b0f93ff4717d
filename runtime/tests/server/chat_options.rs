//! vLLM's chat-template options over HTTP, on the tiny model (ChatML, its fallback template):
//! `continue_final_message` ends the prompt inside the last assistant message (the answer
//! continues it), `add_generation_prompt: false` leaves the assistant's header out, and
//! `chat_template_kwargs` reach the template as variables, never as forged special tokens.

use std::sync::Arc;

use axum::http::StatusCode;
use axum::Router;
use caduceus_runtime::chat_template::ChatTemplate;
use caduceus_runtime::server::{app, AppState};
use serde_json::{json, Value};

use super::support::log_capture::{capture_global, text as log_text};
use super::support::server_app::{call, sse_chunks, with_fields, TestServer};
use super::{post, MODEL};

fn serve() -> (Router, AppState) {
    let state = TestServer::default().state();
    (app(state.clone()), state)
}

fn conversation(last: &str) -> Value {
    json!([{"role": "user", "content": "Hi"}, {"role": "assistant", "content": last}])
}

/// The ids `/tokenize` gives `messages` with `extra`, and their text (special tokens spelled).
async fn rendered(r: &Router, messages: Value, extra: Value) -> (Vec<u32>, String) {
    let body = with_fields(json!({"model": MODEL, "messages": messages}), extra);
    let (s, b) = post(r, "/tokenize", body).await;
    assert_eq!(s, StatusCode::OK, "{b}");
    let ids: Vec<u32> = serde_json::from_value(b["tokens"].clone()).unwrap();
    let (s, d) = post(r, "/detokenize", json!({"model": MODEL, "tokens": ids})).await;
    assert_eq!(s, StatusCode::OK, "{d}");
    (ids, d["prompt"].as_str().unwrap().to_owned())
}

#[tokio::test]
async fn continue_final_message_ends_the_prompt_inside_the_last_message() {
    let (r, state) = serve();
    for last in ["Dr. Lin here, I", "Dr. Lin here, ", "I said </s> and"] {
        let cont = json!({"continue_final_message": true});
        let (ids, text) = rendered(&r, conversation(last), cont.clone()).await;
        let (_, closed) = rendered(
            &r,
            conversation(last),
            json!({"add_generation_prompt": false}),
        )
        .await;
        // ChatML closes a turn with `<|im_end|>\n`: the continued prompt is the closed one
        // without it, ending with the message as sent (trailing space included).
        assert_eq!(format!("{text}<|im_end|>\n"), closed, "{last:?}");
        assert!(text.ends_with(last), "{text:?}");
        // A `</s>` the caller wrote is text, not the end-of-sequence token.
        let eos = state.tokenizer.eos_ids()[0];
        assert!(!ids.contains(&eos), "{last:?}: {ids:?}");

        // The chat endpoint answers from exactly these ids.
        let base = json!({"model": MODEL, "max_tokens": 6, "temperature": 0, "ignore_eos": true});
        let chat = with_fields(base.clone(), json!({"messages": conversation(last)}));
        let b = post(&r, "/v1/chat/completions", with_fields(chat, cont))
            .await
            .1;
        let by_ids = post(
            &r,
            "/v1/completions",
            with_fields(base, json!({"prompt": ids})),
        )
        .await
        .1;
        assert_eq!(
            b["usage"]["prompt_tokens"], by_ids["usage"]["prompt_tokens"],
            "{b}"
        );
        assert_eq!(
            b["choices"][0]["message"]["content"], by_ids["choices"][0]["text"],
            "{last:?}"
        );
    }
    // Without the generation prompt the conversation ends with the closed last turn; by
    // default it ends with the assistant's header.
    let (_, open) = rendered(&r, conversation("Ok."), json!({})).await;
    assert!(
        open.ends_with("Ok.<|im_end|>\n<|im_start|>assistant\n"),
        "{open:?}"
    );
}

#[tokio::test]
async fn echo_leads_the_answer_with_the_assistant_message_it_continues() {
    let (r, _) = serve();
    let body = json!({"model": MODEL, "max_tokens": 6, "temperature": 0, "ignore_eos": true,
                      "messages": conversation("Dr. Lin here. First,"),
                      "continue_final_message": true});
    let content = |b: &Value| {
        b["choices"][0]["message"]["content"]
            .as_str()
            .unwrap()
            .to_owned()
    };
    let plain = content(&post(&r, "/v1/chat/completions", body.clone()).await.1);
    let echoed = post(
        &r,
        "/v1/chat/completions",
        with_fields(body.clone(), json!({"echo": true})),
    )
    .await
    .1;
    assert_eq!(content(&echoed), format!("Dr. Lin here. First,{plain}"));
    // Streamed: the message comes with the role, then the same continuation.
    let stream = with_fields(body, json!({"echo": true, "stream": true}));
    let (s, _, text) = call(&r, "POST", "/v1/chat/completions", Some(stream), None).await;
    assert_eq!(s, StatusCode::OK, "{text}");
    let chunks = sse_chunks(&text);
    assert_eq!(
        chunks[0]["choices"][0]["delta"]["content"],
        "Dr. Lin here. First,"
    );
    let joined: String = (chunks.iter())
        .filter_map(|c| c["choices"][0]["delta"]["content"].as_str())
        .collect();
    assert_eq!(joined, content(&echoed));
    // A last message of the user's is not the answer's to lead.
    let user_last = json!({"model": MODEL, "max_tokens": 4, "temperature": 0, "ignore_eos": true,
                           "messages": [{"role": "user", "content": "Hi"}]});
    let plain = content(&post(&r, "/v1/chat/completions", user_last.clone()).await.1);
    let echoed = post(
        &r,
        "/v1/chat/completions",
        with_fields(user_last, json!({"echo": true})),
    )
    .await
    .1;
    assert_eq!(content(&echoed), plain);
}

#[tokio::test]
async fn chat_template_kwargs_reach_the_template_as_variables() {
    let (_, mut state) = serve();
    let source = "{% for m in messages %}[{{ m['content'] }}]{% endfor %}\
                  {% if enable_thinking %}<think>{{ depth }}{% endif %}";
    state.chat_template = Arc::new(ChatTemplate::new(source, None, None).unwrap());
    let r = app(state);
    let messages = json!([{"role": "user", "content": "Hi"}]);
    let kwargs = json!({"chat_template_kwargs": {"enable_thinking": true, "depth": 2}});
    assert!(rendered(&r, messages.clone(), kwargs.clone())
        .await
        .1
        .ends_with("[Hi]<think>2"));
    assert!(rendered(&r, messages.clone(), json!({}))
        .await
        .1
        .ends_with("[Hi]"));
    let chat = json!({"model": MODEL, "max_tokens": 1, "messages": messages});
    let (s, b) = post(&r, "/v1/chat/completions", with_fields(chat, kwargs)).await;
    assert_eq!(s, StatusCode::OK, "{b}");
}

#[tokio::test]
async fn unusable_chat_template_options_are_400s_naming_the_field() {
    let (r, _) = serve();
    let chat = |messages: Value, extra: Value| {
        with_fields(
            json!({"model": MODEL, "max_tokens": 1, "messages": messages}),
            extra,
        )
    };
    let user_last = json!([{"role": "user", "content": "Hi"}]);
    let cases = [
        (
            chat(user_last.clone(), json!({"continue_final_message": true})),
            "continue_final_message",
        ),
        (
            chat(
                conversation("Dr."),
                json!({"continue_final_message": true, "add_generation_prompt": true}),
            ),
            "continue_final_message",
        ),
        // An empty last message leaves nothing to continue.
        (
            chat(conversation(""), json!({"continue_final_message": true})),
            "continue_final_message",
        ),
        (
            chat(
                user_last.clone(),
                json!({"chat_template_kwargs": {"messages": []}}),
            ),
            "chat_template_kwargs.messages",
        ),
        (
            chat(
                user_last.clone(),
                json!({"chat_template_kwargs": {"note": ["ok", "</s>"]}}),
            ),
            "chat_template_kwargs",
        ),
        (
            chat(user_last.clone(), json!({"documents": [{"text": "</s>"}]})),
            "documents",
        ),
        (
            chat(
                user_last.clone(),
                json!({"documents": [{"text": "ok"}, {"title": "t", "page": 3}]}),
            ),
            "documents[1].page",
        ),
        (
            chat(
                user_last.clone(),
                json!({"chat_template_kwargs": {"documents": [{"text": "ok"}]}}),
            ),
            "chat_template_kwargs.documents",
        ),
        (
            chat(user_last.clone(), json!({"documents": "ok"})),
            "documents",
        ),
    ];
    for (body, field) in cases {
        for uri in ["/v1/chat/completions", "/tokenize"] {
            let mut body = body.clone();
            if uri == "/tokenize" {
                body.as_object_mut().unwrap().remove("max_tokens");
            }
            let (s, b) = post(&r, uri, body).await;
            assert_eq!(
                (s, &b["error"]["param"]),
                (StatusCode::BAD_REQUEST, &json!(field)),
                "{uri}: {b}"
            );
        }
    }
    // A value of the wrong JSON type is named.
    let body = chat(user_last.clone(), json!({"chat_template_kwargs": 3}));
    let (s, b) = post(&r, "/v1/chat/completions", body).await;
    assert_eq!(
        (s, &b["error"]["param"]),
        (StatusCode::BAD_REQUEST, &json!("chat_template_kwargs")),
        "{b}"
    );
    // A prompt takes none of them.
    for field in ["continue_final_message", "documents"] {
        let prompt = json!({"model": MODEL, "prompt": "Hi", field: []});
        let (s, b) = post(&r, "/tokenize", prompt).await;
        assert_eq!(
            (s, &b["error"]["param"]),
            (StatusCode::BAD_REQUEST, &json!(field)),
            "{b}"
        );
    }
}

/// vLLM's `documents` reach the template as `documents`, each with its fields in the order sent;
/// without them `documents` is none, as Hugging Face renders (`is not none` tells them apart); a
/// template that does not read them (the tiny model's ChatML) renders as without.
#[tokio::test]
async fn documents_reach_the_template_in_the_order_sent() {
    let messages = json!([{"role": "user", "content": "Hi"}]);
    let documents = json!({"documents": [
        {"title": "Lab 2026-11", "text": "HbA1c 6.1%"},
        {"text": "Metformin 500 mg", "id": "7"},
    ]});
    let (chatml, _) = serve();
    assert_eq!(
        rendered(&chatml, messages.clone(), documents.clone()).await,
        rendered(&chatml, messages.clone(), json!({})).await
    );

    let (_, mut state) = serve();
    let source = "{% if documents is not none %}{% for d in documents %}[{% for k, v in \
                  d.items() %}{{ k }}={{ v }};{% endfor %}]{% endfor %}{% else %}none {% endif %}\
                  {% for m in messages %}{{ m['content'] }}{% endfor %}";
    state.chat_template = Arc::new(ChatTemplate::new(source, None, None).unwrap());
    let r = app(state);
    let (ids, text) = rendered(&r, messages.clone(), documents.clone()).await;
    assert_eq!(
        text,
        "[title=Lab 2026-11;text=HbA1c 6.1%;][text=Metformin 500 mg;id=7;]Hi"
    );
    assert_eq!(rendered(&r, messages.clone(), json!({})).await.1, "none Hi");
    // The chat endpoint answers from exactly these ids.
    let chat = json!({"model": MODEL, "max_tokens": 4, "temperature": 0, "ignore_eos": true,
                      "messages": messages});
    let (s, b) = post(&r, "/v1/chat/completions", with_fields(chat, documents)).await;
    assert_eq!(s, StatusCode::OK, "{b}");
    let by_ids = json!({"model": MODEL, "max_tokens": 4, "temperature": 0, "ignore_eos": true,
                        "prompt": ids});
    let by_ids = post(&r, "/v1/completions", by_ids).await.1;
    assert_eq!(
        b["choices"][0]["message"]["content"],
        by_ids["choices"][0]["text"]
    );
}

/// A request's own `chat_template` (vLLM's): a 400 naming it unless the server trusts callers
/// with one; then it renders the conversation instead of the model's, on chat and `/tokenize`,
/// and what goes wrong in it is a 400 naming it (its `raise_exception`, `messages`).
#[tokio::test]
async fn a_request_chat_template_is_rendered_only_where_trusted() {
    let source = "{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}\
                  {% if add_generation_prompt %}assistant:{% endif %}";
    let own = |t: &str| json!({"chat_template": t});
    let messages = json!([{"role": "user", "content": "Hi"}]);
    let chat = |extra: Value| {
        let body = json!({"model": MODEL, "max_tokens": 6, "temperature": 0,
                          "ignore_eos": true, "messages": messages});
        with_fields(body, extra)
    };
    // `/tokenize` takes the conversation and the template only.
    let to = |uri: &str, body: Value| {
        let mut body = body;
        if uri == "/tokenize" {
            for field in ["max_tokens", "temperature", "ignore_eos"] {
                body.as_object_mut().unwrap().remove(field);
            }
        }
        body
    };
    let param = |b: &Value| b["error"]["param"].clone();

    let (untrusting, _) = serve();
    for uri in ["/v1/chat/completions", "/tokenize"] {
        let (s, b) = post(&untrusting, uri, to(uri, chat(own(source)))).await;
        assert_eq!(
            (s, param(&b)),
            (StatusCode::BAD_REQUEST, json!("chat_template"))
        );
        assert!(b["error"]["message"]
            .as_str()
            .unwrap()
            .contains("trust_request_chat_template"));
    }

    let state = TestServer {
        trust_request_chat_template: true,
        // Room for the longest template a request may send.
        body_limit_bytes: 1 << 20,
        ..TestServer::default()
    }
    .state();
    let r = app(state);
    let (ids, text) = rendered(&r, messages.clone(), own(source)).await;
    assert!(text.ends_with("user: Hi\nassistant:"), "{text:?}");
    let (_, model_text) = rendered(&r, messages.clone(), json!({})).await;
    assert!(
        model_text.ends_with("<|im_start|>assistant\n"),
        "the model's is kept"
    );
    // The chat endpoint answers from exactly these ids.
    let (s, b) = post(&r, "/v1/chat/completions", chat(own(source))).await;
    assert_eq!(s, StatusCode::OK, "{b}");
    let by_ids = json!({"model": MODEL, "max_tokens": 6, "temperature": 0, "ignore_eos": true,
                        "prompt": ids});
    let by_ids = post(&r, "/v1/completions", by_ids).await.1;
    assert_eq!(
        b["choices"][0]["message"]["content"],
        by_ids["choices"][0]["text"]
    );

    let endless =
        "{% for i in range(100000) %}{% for j in range(100000) %}{% endfor %}{% endfor %}";
    let too_long = "x".repeat(64 * 1024 + 1);
    for (template, field, says) in [
        ("{% for m in messages %}", "chat_template", "parse"),
        (endless, "chat_template", "fuel"),
        ("{{ 'x' * 9000000 }}", "chat_template", "bytes"),
        (too_long.as_str(), "chat_template", "bytes"),
        (
            "{{ raise_exception('roles must alternate') }}",
            "messages",
            "alternate",
        ),
    ] {
        for uri in ["/v1/chat/completions", "/tokenize"] {
            let (s, b) = post(&r, uri, to(uri, chat(own(template)))).await;
            let message = b["error"]["message"].as_str().unwrap_or_default();
            assert_eq!(
                (s, param(&b)),
                (StatusCode::BAD_REQUEST, json!(field)),
                "{b}"
            );
            assert!(message.contains(says), "{uri}: {message}");
        }
    }
    // A prompt takes no template.
    let prompt = json!({"model": MODEL, "prompt": "Hi", "chat_template": source});
    let (s, b) = post(&r, "/tokenize", prompt).await;
    assert_eq!(
        (s, param(&b)),
        (StatusCode::BAD_REQUEST, json!("chat_template"))
    );
}

/// The model's own template failing on a conversation is a 400 that quotes nothing, and the log
/// names the kind of failure and the template line but not minijinja's words, which can quote
/// what the template read: an `include` names its argument, an overflow prints its operands.
#[tokio::test]
async fn a_failing_model_template_logs_no_message_text() {
    let log = capture_global();
    let secret = "HIV test 4711 came back positive";
    let number = "12345678901234567890123";
    for (source, says) in [
        (
            "{% for m in messages %}\n{% include m['content'] %}{% endfor %}",
            "TemplateNotFound at template line 2",
        ),
        (
            "{% for m in messages %}\n\n{{ (m['content'] | int) * 10 ** 30 }}{% endfor %}",
            "InvalidOperation at template line 3",
        ),
    ] {
        let (_, mut state) = serve();
        state.chat_template = Arc::new(ChatTemplate::new(source, None, None).unwrap());
        let r = app(state);
        let content = match says.starts_with("Invalid") {
            true => number,
            false => secret,
        };
        let messages = json!([{"role": "user", "content": content}]);
        for uri in ["/v1/chat/completions", "/tokenize"] {
            let (s, b) = post(&r, uri, json!({"model": MODEL, "messages": messages})).await;
            assert_eq!(s, StatusCode::BAD_REQUEST, "{b}");
            assert_eq!(b["error"]["param"], "messages", "{b}");
            assert!(!b.to_string().contains(content), "{b}");
        }
        let log = log_text(&log);
        let failed: Vec<&str> = log
            .lines()
            .filter(|l| l.contains("the model's chat template failed") && l.contains(says))
            .collect();
        assert_eq!(failed.len(), 2, "{log}");
        assert!(!log.contains(content), "{log}");
    }
}
