//! vLLM's output options over HTTP, on the tiny model: `allowed_token_ids`, stops with
//! `include_stop_str_in_output` and `stop_reason`, `skip_special_tokens`,
//! `truncate_prompt_tokens` and `return_tokens_as_token_ids`. Greedy answers restricted to one
//! token per lowercase letter give ASCII text whose characters are its tokens, so every
//! expectation is computed from a plain request's answer.

use axum::http::StatusCode;
use axum::Router;
use caduceus_runtime::server::{app, AppState};
use serde_json::{json, Value};

use super::support::server_app::{call, sse_chunks, with_fields, TestServer};
use super::{post, MODEL};

fn serve() -> (Router, AppState) {
    let state = TestServer::default().state();
    (app(state.clone()), state)
}

/// One id per lowercase letter (the first whose text is that letter alone), in letter order.
fn letter_ids(state: &AppState) -> Vec<u32> {
    let t = &state.tokenizer;
    ('a'..='z')
        .map(|c| {
            (0..t.vocab_size() as u32)
                .find(|&id| t.decode(&[id], false).is_ok_and(|s| s == c.to_string()))
                .unwrap_or_else(|| panic!("no token spells {c}"))
        })
        .collect()
}

/// A greedy completion of 24 letters.
fn letters_body(state: &AppState) -> Value {
    json!({"model": MODEL, "prompt": "Dr. Lin says", "max_tokens": 24, "temperature": 0,
           "ignore_eos": true, "allowed_token_ids": letter_ids(state)})
}

async fn ok(r: &Router, uri: &str, body: Value) -> Value {
    let (s, b) = post(r, uri, body).await;
    assert_eq!(s, StatusCode::OK, "{b}");
    b
}

/// The concatenated text deltas of a streamed completion and its last choice chunk.
async fn streamed(r: &Router, body: Value) -> (String, Value) {
    let body = with_fields(body, json!({"stream": true}));
    let (s, _, text) = call(r, "POST", "/v1/completions", Some(body), None).await;
    assert_eq!(s, StatusCode::OK, "{text}");
    let chunks = sse_chunks(&text);
    let joined = (chunks.iter())
        .map(|c| c["choices"][0]["text"].as_str().unwrap_or_default())
        .collect();
    let last = chunks.last().map(|c| c["choices"][0].clone());
    (joined, last.unwrap_or_default())
}

#[tokio::test]
async fn allowed_token_ids_restrict_every_sampled_token() {
    let (r, state) = serve();
    let letters = letter_ids(&state);
    let body = letters_body(&state);
    let b = ok(&r, "/v1/completions", body.clone()).await;
    let text = b["choices"][0]["text"].as_str().unwrap();
    assert_eq!(text.len(), 24, "{b}");
    assert!(text.bytes().all(|c| c.is_ascii_lowercase()), "{text:?}");
    // Sampled, two choices, logprobs naming ids: every token and alternative is allowed.
    let allowed: Vec<u32> = letters[..5].to_vec();
    let sampled = with_fields(
        body,
        json!({"temperature": 1.0, "seed": 7, "n": 2, "logprobs": 3,
               "return_tokens_as_token_ids": true, "allowed_token_ids": allowed}),
    );
    let b = ok(&r, "/v1/completions", sampled).await;
    let id_of = |name: &str| -> u32 {
        let id = name
            .strip_prefix("token_id:")
            .unwrap_or_else(|| panic!("{name}"));
        id.parse().unwrap()
    };
    for choice in b["choices"].as_array().unwrap() {
        let lp = &choice["logprobs"];
        let tokens = lp["tokens"].as_array().unwrap();
        assert_eq!(tokens.len(), 24);
        for (token, top) in tokens.iter().zip(lp["top_logprobs"].as_array().unwrap()) {
            assert!(allowed.contains(&id_of(token.as_str().unwrap())), "{token}");
            for name in top.as_object().unwrap().keys() {
                assert!(allowed.contains(&id_of(name)), "{name}");
            }
        }
    }
    // Chat applies them too.
    let chat = json!({"model": MODEL, "max_tokens": 6, "temperature": 0, "ignore_eos": true,
        "messages": [{"role": "user", "content": "Hi"}], "allowed_token_ids": [letters[2]]});
    let b = ok(&r, "/v1/chat/completions", chat).await;
    assert_eq!(b["choices"][0]["message"]["content"], "cccccc", "{b}");
}

#[tokio::test]
async fn a_stop_string_ends_the_text_before_it_or_with_it_and_is_named() {
    let (r, state) = serve();
    let body = letters_body(&state);
    let b = ok(&r, "/v1/completions", body.clone()).await;
    let text = b["choices"][0]["text"].as_str().unwrap().to_owned();
    assert!(b["choices"][0].get("stop_reason").is_none(), "{b}");
    // A two-letter stop string first found at its own place, at least 4 letters in.
    let (at, stop) = (4..text.len() - 2)
        .map(|p| (p, &text[p..p + 2]))
        .find(|&(p, s)| text.find(s) == Some(p))
        .unwrap_or_else(|| panic!("no fresh pair in {text:?}"));
    for (include, want) in [(false, &text[..at]), (true, &text[..at + 2])] {
        let asked = with_fields(
            body.clone(),
            json!({"stop": [stop, "zzzzzz"], "include_stop_str_in_output": include}),
        );
        let b = ok(&r, "/v1/completions", asked.clone()).await;
        let choice = &b["choices"][0];
        assert_eq!(choice["text"], want, "include {include}: {b}");
        assert_eq!(choice["finish_reason"], "stop");
        assert_eq!(choice["stop_reason"], stop);
        let (joined, last) = streamed(&r, asked).await;
        assert_eq!(joined, want, "streamed, include {include}");
        assert_eq!(
            (&last["finish_reason"], &last["stop_reason"]),
            (&json!("stop"), &json!(stop))
        );
    }
    // Chat names it too.
    let chat = json!({"model": MODEL, "max_tokens": 24, "temperature": 0, "ignore_eos": true,
        "messages": [{"role": "user", "content": "Hi"}], "allowed_token_ids": letter_ids(&state)});
    let b = ok(&r, "/v1/chat/completions", chat.clone()).await;
    let answer = b["choices"][0]["message"]["content"]
        .as_str()
        .unwrap()
        .to_owned();
    let stop = &answer[3..5];
    let at = answer.find(stop).unwrap();
    let asked = with_fields(
        chat,
        json!({"stop": stop, "include_stop_str_in_output": true}),
    );
    let b = ok(&r, "/v1/chat/completions", asked).await;
    assert_eq!(b["choices"][0]["message"]["content"], &answer[..at + 2]);
    assert_eq!(b["choices"][0]["stop_reason"], stop, "{b}");
}

#[tokio::test]
async fn bad_words_are_never_generated() {
    let (r, state) = serve();
    let body = letters_body(&state);
    let answer = |b: Value| b["choices"][0]["text"].as_str().unwrap().to_owned();
    let text = answer(ok(&r, "/v1/completions", body.clone()).await);
    // A one-letter word is banned everywhere.
    let first = &text[..1];
    let got = answer(
        ok(
            &r,
            "/v1/completions",
            with_fields(body.clone(), json!({"bad_words": [first]})),
        )
        .await,
    );
    assert!(
        got.len() == 24 && !got.contains(first),
        "{got:?} still has {first:?}"
    );
    // A two-letter word first met at `at`: the answer is the same up to its first letter, then
    // turns elsewhere, and never spells it.
    let (at, word) = (4..text.len() - 2)
        .map(|p| (p, &text[p..p + 2]))
        .find(|&(p, w)| text.find(w) == Some(p))
        .unwrap_or_else(|| panic!("no fresh pair in {text:?}"));
    let got = answer(
        ok(
            &r,
            "/v1/completions",
            with_fields(body, json!({"bad_words": [word]})),
        )
        .await,
    );
    assert_eq!(got[..=at], text[..=at], "{got:?} vs {text:?}");
    assert!(!got.contains(word), "{got:?} spells {word:?}");
}

#[tokio::test]
async fn a_stop_token_is_named_and_its_text_kept_only_when_asked() {
    let (r, state) = serve();
    let letters = letter_ids(&state);
    let body = letters_body(&state);
    let b = ok(&r, "/v1/completions", body.clone()).await;
    let text = b["choices"][0]["text"].as_str().unwrap().to_owned();
    // The letter the answer has at position 4, first met at `at`.
    let c = text.as_bytes()[4];
    let at = text.bytes().position(|b| b == c).unwrap();
    let id = letters[usize::from(c - b'a')];
    for (include, want) in [(false, &text[..at]), (true, &text[..at + 1])] {
        let asked = with_fields(
            body.clone(),
            json!({"stop_token_ids": [id], "include_stop_str_in_output": include}),
        );
        let b = ok(&r, "/v1/completions", asked.clone()).await;
        let choice = &b["choices"][0];
        assert_eq!(choice["text"], want, "include {include}: {b}");
        assert_eq!(
            (&choice["finish_reason"], &choice["stop_reason"]),
            (&json!("stop"), &json!(id))
        );
        assert_eq!(
            b["usage"]["completion_tokens"],
            at + 1,
            "the stop token counts"
        );
        let (joined, last) = streamed(&r, asked).await;
        assert_eq!(joined, want, "streamed, include {include}");
        assert_eq!(last["stop_reason"], id);
    }
}

/// `min_tokens` never forces a token `allowed_token_ids` forbids: when the list allows only
/// stop tokens, the answer ends with one at once, named as usual; while it allows others, the
/// stop tokens stay banned until `min_tokens`.
#[tokio::test]
async fn min_tokens_yield_to_allowed_token_ids() {
    let (r, state) = serve();
    let eos = state.tokenizer.eos_ids()[0];
    let a = letter_ids(&state)[0];
    let base = json!({"model": MODEL, "prompt": "Dr. Lin says", "max_tokens": 8,
                      "min_tokens": 5, "temperature": 0});
    for (fields, stop_reason) in [
        (json!({"allowed_token_ids": [eos]}), Value::Null),
        (
            json!({"allowed_token_ids": [a], "stop_token_ids": [a]}),
            json!(a),
        ),
    ] {
        let body = with_fields(base.clone(), fields);
        let b = ok(&r, "/v1/completions", body.clone()).await;
        let choice = &b["choices"][0];
        assert_eq!(choice["text"], "", "{b}");
        assert_eq!(choice["finish_reason"], "stop", "{b}");
        assert_eq!(choice["stop_reason"], stop_reason, "{b}");
        assert_eq!(b["usage"]["completion_tokens"], 1, "{b}");
        let (joined, last) = streamed(&r, body).await;
        assert_eq!(
            (joined.as_str(), &last["finish_reason"]),
            ("", &json!("stop"))
        );
    }
    let held = with_fields(
        base,
        json!({"allowed_token_ids": [eos, a], "min_tokens": 3, "max_tokens": 3}),
    );
    let b = ok(&r, "/v1/completions", held).await;
    assert_eq!(
        (&b["choices"][0]["text"], &b["choices"][0]["finish_reason"]),
        (&json!("aaa"), &json!("length"))
    );
}

#[tokio::test]
async fn special_tokens_are_text_only_when_skip_special_tokens_is_false() {
    let (r, state) = serve();
    let eos = state.tokenizer.eos_ids()[0];
    let eos_text = state.tokenizer.decode(&[eos], false).unwrap();
    let body = json!({"model": MODEL, "prompt": "Hi", "max_tokens": 3, "temperature": 0,
                      "ignore_eos": true, "allowed_token_ids": [eos]});
    let text = |b: &Value| b["choices"][0]["text"].as_str().unwrap().to_owned();
    assert_eq!(text(&ok(&r, "/v1/completions", body.clone()).await), "");
    let shown = with_fields(body.clone(), json!({"skip_special_tokens": false}));
    assert_eq!(
        text(&ok(&r, "/v1/completions", shown).await),
        eos_text.repeat(3)
    );
    // EOS ends the request: its text is left out unless stops are kept, and it is not one of
    // the request's own stops (no `stop_reason`).
    let ending = with_fields(
        body,
        json!({"ignore_eos": false, "skip_special_tokens": false}),
    );
    let b = ok(&r, "/v1/completions", ending.clone()).await;
    assert_eq!(
        (text(&b), &b["choices"][0]["finish_reason"]),
        (String::new(), &json!("stop"))
    );
    assert!(b["choices"][0].get("stop_reason").is_none(), "{b}");
    let kept = with_fields(ending, json!({"include_stop_str_in_output": true}));
    assert_eq!(text(&ok(&r, "/v1/completions", kept).await), eos_text);
}

#[tokio::test]
async fn truncate_prompt_tokens_keeps_the_prompts_last_tokens() {
    let (r, state) = serve();
    let prompt = "The patient reports a mild fever since yesterday evening.";
    let ids = ok(&r, "/tokenize", json!({"model": MODEL, "prompt": prompt})).await["tokens"]
        .as_array()
        .unwrap()
        .clone();
    assert!(ids.len() > 12);
    let base = json!({"model": MODEL, "max_tokens": 8, "temperature": 0, "ignore_eos": true});
    let truncated = ok(
        &r,
        "/v1/completions",
        with_fields(
            base.clone(),
            json!({"prompt": prompt, "truncate_prompt_tokens": 12, "echo": true}),
        ),
    )
    .await;
    let last12 = Value::Array(ids[ids.len() - 12..].to_vec());
    let by_ids = ok(
        &r,
        "/v1/completions",
        with_fields(base.clone(), json!({"prompt": last12})),
    )
    .await;
    assert_eq!(truncated["usage"]["prompt_tokens"], 12, "{truncated}");
    // Echoed: the text the kept tokens spell, then the same answer as the kept tokens sent.
    let echoed = truncated["choices"][0]["text"].as_str().unwrap();
    let answer = by_ids["choices"][0]["text"].as_str().unwrap();
    let kept = echoed
        .strip_suffix(answer)
        .unwrap_or_else(|| panic!("{echoed:?} / {answer:?}"));
    let kept_ids: Vec<u32> = (ids[ids.len() - 12..].iter())
        .map(|v| v.as_u64().unwrap() as u32)
        .collect();
    assert_eq!(kept, state.tokenizer.decode(&kept_ids, false).unwrap());
    assert!(
        prompt.ends_with(kept) && kept.len() < prompt.len(),
        "{kept:?}"
    );
    // -1 keeps up to the context length: this prompt whole.
    let whole = with_fields(
        base.clone(),
        json!({"prompt": prompt, "truncate_prompt_tokens": -1}),
    );
    assert_eq!(
        ok(&r, "/v1/completions", whole).await["usage"]["prompt_tokens"],
        ids.len()
    );
    let chat = json!({"model": MODEL, "max_tokens": 1, "truncate_prompt_tokens": 5,
                      "messages": [{"role": "user", "content": prompt}]});
    assert_eq!(
        ok(&r, "/v1/chat/completions", chat).await["usage"]["prompt_tokens"],
        5
    );
    for k in [0, -2] {
        let bad = with_fields(
            base.clone(),
            json!({"prompt": prompt, "truncate_prompt_tokens": k}),
        );
        let (s, b) = post(&r, "/v1/completions", bad).await;
        assert_eq!(
            (s, &b["error"]["param"]),
            (StatusCode::BAD_REQUEST, &json!("truncate_prompt_tokens"))
        );
    }
}

#[tokio::test]
async fn tokens_as_ids_name_the_same_tokens_at_the_same_offsets() {
    let (r, state) = serve();
    let body = json!({"model": MODEL, "prompt": "Hello", "max_tokens": 6, "temperature": 0,
                      "ignore_eos": true, "logprobs": 2, "echo": true});
    let plain = ok(&r, "/v1/completions", body.clone()).await;
    let named = ok(
        &r,
        "/v1/completions",
        with_fields(body, json!({"return_tokens_as_token_ids": true})),
    )
    .await;
    let (p, n) = (
        &plain["choices"][0]["logprobs"],
        &named["choices"][0]["logprobs"],
    );
    assert_eq!(p["text_offset"], n["text_offset"]);
    assert_eq!(p["token_logprobs"], n["token_logprobs"]);
    let tok = &state.tokenizer;
    let spelled = |name: &Value| -> String {
        let id = name.as_str().unwrap().strip_prefix("token_id:").unwrap();
        tok.decode(&[id.parse().unwrap()], false).unwrap()
    };
    let texts: Vec<String> = n["tokens"]
        .as_array()
        .unwrap()
        .iter()
        .map(spelled)
        .collect();
    assert_eq!(Value::from(texts), p["tokens"]);
    // Chat: names change, bytes stay the tokens' own.
    let chat = json!({"model": MODEL, "max_tokens": 4, "temperature": 0, "ignore_eos": true,
        "messages": [{"role": "user", "content": "Hi"}], "logprobs": true, "top_logprobs": 2});
    let plain = ok(&r, "/v1/chat/completions", chat.clone()).await;
    let named = ok(
        &r,
        "/v1/chat/completions",
        with_fields(chat, json!({"return_tokens_as_token_ids": true})),
    )
    .await;
    let content = |b: &Value| {
        b["choices"][0]["logprobs"]["content"]
            .as_array()
            .unwrap()
            .clone()
    };
    for (p, n) in content(&plain).iter().zip(content(&named)) {
        assert_eq!((&p["bytes"], &p["logprob"]), (&n["bytes"], &n["logprob"]));
        assert_eq!(spelled(&n["token"]), p["token"].as_str().unwrap());
    }
}

#[tokio::test]
async fn unusable_allowed_token_ids_are_400s_naming_the_field() {
    let (r, state) = serve();
    let vocab = state.tokenizer.vocab_size();
    let base = json!({"model": MODEL, "prompt": "Hi", "max_tokens": 1});
    for extra in [
        json!({"allowed_token_ids": []}),
        json!({"allowed_token_ids": [1, vocab]}),
        json!({"allowed_token_ids": [1], "response_format": {"type": "json_object"}}),
    ] {
        let (s, b) = post(
            &r,
            "/v1/completions",
            with_fields(base.clone(), extra.clone()),
        )
        .await;
        assert_eq!(s, StatusCode::BAD_REQUEST, "{extra}: {b}");
        assert_eq!(b["error"]["param"], "allowed_token_ids", "{extra}: {b}");
    }
    // A word of more tokens than a bad-word sequence may hold (the tiny vocabulary spells one
    // letter per token).
    let long = with_fields(base.clone(), json!({"bad_words": ["x".repeat(65)]}));
    let (s, b) = post(&r, "/v1/completions", long).await;
    assert_eq!(
        (s, &b["error"]["param"]),
        (StatusCode::BAD_REQUEST, &json!("bad_words")),
        "{b}"
    );
    assert!(
        b["error"]["message"]
            .as_str()
            .unwrap()
            .contains("65 tokens"),
        "{b}"
    );
    // A value of the wrong JSON type is named too, on both endpoints.
    let chat = json!({"model": MODEL, "messages": [{"role": "user", "content": "Hi"}]});
    for (field, value) in [
        ("allowed_token_ids", json!([-1])),
        ("truncate_prompt_tokens", json!("a")),
        ("bad_words", json!("x")),
        ("include_stop_str_in_output", json!(1)),
    ] {
        for (uri, body) in [("/v1/completions", &base), ("/v1/chat/completions", &chat)] {
            let (s, b) = post(&r, uri, with_fields(body.clone(), json!({field: value}))).await;
            let param = b["error"]["param"].as_str().unwrap_or_default();
            assert!(
                s == StatusCode::BAD_REQUEST && param.starts_with(field),
                "{uri} {field}: {b}"
            );
        }
    }
    let tools = json!({"model": MODEL, "messages": [{"role": "user", "content": "Hi"}],
        "allowed_token_ids": [1], "tools": [{"type": "function", "function": {"name": "f"}}]});
    let (s, b) = post(&r, "/v1/chat/completions", tools).await;
    assert_eq!(
        (s, &b["error"]["param"]),
        (StatusCode::BAD_REQUEST, &json!("allowed_token_ids")),
        "{b}"
    );
}
