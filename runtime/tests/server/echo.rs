//! Prompt logprobs over HTTP: legacy completions' `echo` (the prompt before the completion, its
//! tokens leading `logprobs`) and vLLM's `prompt_logprobs`, checked against the generation's own
//! logprobs (a token scores the same echoed as generated), across both formats, streamed and
//! not; misuse is a 400 naming the field.

use axum::http::StatusCode;
use caduceus_runtime::server::app;
use serde_json::{json, Value};

use super::support::log_capture::{capture_global, text as log_text};
use super::support::server_app::{call, sse_chunks, with_fields, TestServer};
use super::{post, MODEL};

fn serve() -> axum::Router {
    app(TestServer::default().state())
}

const PROMPT: &str = "The heart pumps blood";

async fn complete(r: &axum::Router, extra: Value) -> Value {
    let body = json!({"model": MODEL, "prompt": PROMPT, "max_tokens": 4, "temperature": 0,
        "ignore_eos": true});
    let (s, b) = post(r, "/v1/completions", with_fields(body, extra)).await;
    assert_eq!(s, StatusCode::OK, "{b}");
    b
}

fn floats(v: &Value) -> Vec<Option<f64>> {
    v.as_array().unwrap().iter().map(Value::as_f64).collect()
}

#[tokio::test]
async fn echo_returns_the_prompt_before_the_completion_with_its_logprobs() {
    let r = serve();
    let plain = complete(&r, json!({"logprobs": 2})).await;
    let echoed = complete(&r, json!({"logprobs": 2, "echo": true})).await;
    let (p, e) = (&plain["choices"][0], &echoed["choices"][0]);
    let generated = p["text"].as_str().unwrap();
    assert_eq!(e["text"], format!("{PROMPT}{generated}"));
    let num_prompt = echoed["usage"]["prompt_tokens"].as_u64().unwrap() as usize;
    assert_eq!(echoed["usage"], plain["usage"], "echo changes no usage");

    let (plp, elp) = (&p["logprobs"], &e["logprobs"]);
    let tokens = elp["tokens"].as_array().unwrap();
    assert_eq!(tokens.len(), num_prompt + 4);
    assert_eq!(tokens[num_prompt..], plp["tokens"].as_array().unwrap()[..]);
    let lps = floats(&elp["token_logprobs"]);
    assert_eq!(lps[0], None, "nothing precedes the first token");
    assert_eq!(elp["top_logprobs"][0], Value::Null);
    for j in 1..num_prompt {
        let lp = lps[j].unwrap_or_else(|| panic!("prompt token {j} unscored: {elp}"));
        assert!(lp <= 0.0);
        // Keyed by text: alternatives spelled alike share an entry.
        let alternatives = elp["top_logprobs"][j].as_object().unwrap().len();
        assert!((1..=2).contains(&alternatives), "{elp}");
    }
    // The completion's own logprobs are unchanged behind the prompt's.
    for (a, b) in lps[num_prompt..].iter().zip(floats(&plp["token_logprobs"])) {
        assert!((a.unwrap() - b.unwrap()).abs() < 1e-5, "{a:?} vs {b:?}");
    }
    assert_eq!(
        elp["top_logprobs"].as_array().unwrap()[num_prompt..],
        plp["top_logprobs"].as_array().unwrap()[..]
    );
    let offsets: Vec<u64> = elp["text_offset"]
        .as_array()
        .unwrap()
        .iter()
        .map(|o| o.as_u64().unwrap())
        .collect();
    assert_eq!(offsets[0], 0);
    assert!(offsets.windows(2).all(|w| w[0] <= w[1]), "{offsets:?}");
    assert_eq!(offsets[num_prompt], PROMPT.len() as u64);

    // Without logprobs only the text is echoed; with n = 2 every choice is.
    let text_only = complete(&r, json!({"echo": true, "n": 2})).await;
    for c in text_only["choices"].as_array().unwrap() {
        assert_eq!(c["text"], format!("{PROMPT}{generated}"));
        assert_eq!(c["logprobs"], Value::Null);
    }
}

/// What lm-evaluation-harness relies on: a token's logprob echoed in a prompt equals its logprob
/// when it was generated from the same tokens, and the top alternative tells whether it was the
/// greedy pick.
#[tokio::test]
async fn a_token_scores_the_same_echoed_as_generated() {
    let state = TestServer::default().state();
    let r = app(state.clone());
    let tok = &state.tokenizer;
    let mut checked = 0;
    for text in [
        PROMPT,
        "Water is",
        "Fever and",
        "Take two",
        "Rest",
        "Sleep",
        "Eat",
    ] {
        let ids = tok.encode(text).unwrap();
        let first = complete(&r, json!({"prompt": ids, "max_tokens": 1, "logprobs": 1})).await;
        let lp = &first["choices"][0]["logprobs"];
        let token = lp["tokens"][0].as_str().unwrap().to_owned();
        let logprob = lp["token_logprobs"][0].as_f64().unwrap();
        // The generated id, where its text names it alone.
        let spelled: Vec<u32> = (0..tok.vocab_size() as u32)
            .filter(|&id| tok.decode(&[id], false).is_ok_and(|t| t == token))
            .collect();
        let [generated] = spelled[..] else {
            continue;
        };
        let mut extended = ids.clone();
        extended.push(generated);
        let echoed = complete(
            &r,
            json!({"prompt": extended, "max_tokens": 1, "logprobs": 1, "echo": true}),
        )
        .await;
        let elp = &echoed["choices"][0]["logprobs"];
        let at = ids.len();
        assert_eq!(elp["tokens"][at], token.as_str(), "{elp}");
        let echoed_lp = elp["token_logprobs"][at].as_f64().unwrap();
        assert!(
            (echoed_lp - logprob).abs() < 1e-4,
            "{text:?}: {echoed_lp} vs {logprob}"
        );
        let top = elp["top_logprobs"][at].as_object().unwrap();
        assert!(top.contains_key(&token), "{text:?}: greedy, yet {top:?}");
        checked += 1;
    }
    assert!(
        checked >= 2,
        "only {checked} prompts generated a token named by its text"
    );
}

#[tokio::test]
async fn prompt_logprobs_list_every_prompt_token_in_vllm_format() {
    let r = serve();
    let b = complete(
        &r,
        json!({"prompt_logprobs": 3, "logprobs": 1, "echo": true}),
    )
    .await;
    let c = &b["choices"][0];
    let listed = c["prompt_logprobs"].as_array().unwrap();
    let num_prompt = b["usage"]["prompt_tokens"].as_u64().unwrap() as usize;
    assert_eq!(listed.len(), num_prompt);
    assert_eq!(listed[0], Value::Null);
    let (s, t) = post(&r, "/tokenize", json!({"model": MODEL, "prompt": PROMPT})).await;
    assert_eq!(s, StatusCode::OK);
    let ids = t["tokens"].as_array().unwrap();
    let echoed = floats(&c["logprobs"]["token_logprobs"]);
    for (j, position) in listed.iter().enumerate().skip(1) {
        let position = position.as_object().unwrap();
        let own = &position[&ids[j].to_string()];
        // The same number in both formats, and the echo kept its own 1 alternative.
        assert!((own["logprob"].as_f64().unwrap() - echoed[j].unwrap()).abs() < 1e-6);
        assert_eq!(
            c["logprobs"]["top_logprobs"][j].as_object().unwrap().len(),
            1
        );
        assert!(own["decoded_token"].is_string());
        let mut ranks: Vec<u64> = position
            .values()
            .map(|e| e["rank"].as_u64().unwrap())
            .collect();
        ranks.sort_unstable();
        assert!(ranks.starts_with(&[1, 2, 3]), "{position:?}");
        assert!(position.len() <= 4, "{position:?}");
    }
    // 0 alternatives: the prompt token alone.
    let b = complete(&r, json!({"prompt_logprobs": 0})).await;
    let listed = b["choices"][0]["prompt_logprobs"].as_array().unwrap();
    assert!(listed[1..]
        .iter()
        .all(|p| p.as_object().unwrap().len() == 1));
    assert_eq!(b["choices"][0]["logprobs"], Value::Null);
    // Chat scores its rendered conversation, returned beside the choices.
    let body = json!({"model": MODEL, "max_tokens": 2, "prompt_logprobs": 1,
        "messages": [{"role": "user", "content": "Is water good for me?"}]});
    let (s, b) = post(&r, "/v1/chat/completions", body).await;
    assert_eq!(s, StatusCode::OK, "{b}");
    let listed = b["prompt_logprobs"].as_array().unwrap();
    assert_eq!(
        listed.len() as u64,
        b["usage"]["prompt_tokens"].as_u64().unwrap()
    );
    assert!(listed[1..]
        .iter()
        .all(|p| !p.as_object().unwrap().is_empty()));
}

#[tokio::test]
async fn a_streamed_echo_starts_with_the_prompt_and_adds_up_to_the_whole_response() {
    let r = serve();
    let whole = complete(&r, json!({"logprobs": 1, "echo": true})).await;
    let body = json!({"model": MODEL, "prompt": PROMPT, "max_tokens": 4, "temperature": 0,
        "ignore_eos": true, "logprobs": 1, "echo": true, "stream": true});
    let (s, _, text) = call(&r, "POST", "/v1/completions", Some(body), None).await;
    assert_eq!(s, StatusCode::OK, "{text}");
    let chunks = sse_chunks(&text);
    let first = chunks[0]["choices"][0]["text"].as_str().unwrap();
    assert!(first.starts_with(PROMPT), "{first:?}");
    let mut joined = String::new();
    let (mut tokens, mut lps, mut offsets) = (Vec::new(), Vec::new(), Vec::new());
    for c in &chunks {
        let choice = &c["choices"][0];
        joined.push_str(choice["text"].as_str().unwrap());
        if let Some(lp) = choice["logprobs"].as_object() {
            tokens.extend(lp["tokens"].as_array().unwrap().clone());
            lps.extend(lp["token_logprobs"].as_array().unwrap().clone());
            offsets.extend(lp["text_offset"].as_array().unwrap().clone());
        }
    }
    let w = &whole["choices"][0];
    assert_eq!(joined, w["text"].as_str().unwrap());
    assert_eq!(tokens, w["logprobs"]["tokens"].as_array().unwrap()[..]);
    assert_eq!(
        offsets,
        w["logprobs"]["text_offset"].as_array().unwrap()[..]
    );
    assert_eq!(lps[0], Value::Null);
    assert_eq!(lps.len(), tokens.len());
}

/// OpenAI's legacy scoring call: `echo` with `max_tokens: 0` returns the prompt alone, with its
/// logprobs, no completion tokens in `usage`, streamed or not; without `echo` 0 stays a 400.
#[tokio::test]
async fn echo_with_max_tokens_0_scores_the_prompt_alone() {
    let r = serve();
    let longer = complete(&r, json!({"logprobs": 1, "echo": true})).await;
    let only = complete(&r, json!({"logprobs": 1, "echo": true, "max_tokens": 0})).await;
    let n = only["usage"]["prompt_tokens"].as_u64().unwrap() as usize;
    let c = &only["choices"][0];
    assert_eq!(c["text"], PROMPT);
    assert_eq!(c["finish_reason"], "length");
    assert_eq!(only["usage"]["completion_tokens"], 0);
    assert_eq!(only["usage"]["total_tokens"].as_u64(), Some(n as u64));
    for field in ["tokens", "token_logprobs", "top_logprobs", "text_offset"] {
        let want = &longer["choices"][0]["logprobs"][field].as_array().unwrap()[..n];
        assert_eq!(
            c["logprobs"][field].as_array().unwrap()[..],
            *want,
            "{field}"
        );
    }
    let body = json!({"model": MODEL, "prompt": PROMPT, "max_tokens": 0, "echo": true,
        "logprobs": 1, "stream": true, "stream_options": {"include_usage": true}});
    let (s, _, text) = call(&r, "POST", "/v1/completions", Some(body), None).await;
    assert_eq!(s, StatusCode::OK, "{text}");
    let chunks = sse_chunks(&text);
    let streamed: String = chunks
        .iter()
        .filter_map(|c| c["choices"].get(0)?["text"].as_str().map(str::to_owned))
        .collect();
    assert_eq!(streamed, PROMPT);
    let usage = &chunks.last().unwrap()["usage"];
    assert_eq!(usage["completion_tokens"], 0, "{usage}");
    assert_eq!(usage["total_tokens"].as_u64(), Some(n as u64), "{usage}");
    let (s, b) = post(
        &r,
        "/v1/completions",
        json!({"model": MODEL, "prompt": PROMPT, "max_tokens": 0}),
    )
    .await;
    assert_eq!(s, StatusCode::BAD_REQUEST, "{b}");
    assert_eq!(b["error"]["param"], "max_tokens");
}

#[tokio::test]
async fn misused_prompt_logprobs_and_echo_are_400s_naming_the_field() {
    let r = serve();
    let completion = |extra: Value| {
        with_fields(
            json!({"model": MODEL, "prompt": PROMPT, "max_tokens": 1}),
            extra,
        )
    };
    let chat = |extra: Value| {
        let body = json!({"model": MODEL, "max_tokens": 1,
            "messages": [{"role": "user", "content": "Hi"}]});
        with_fields(body, extra)
    };
    let cases = [
        (
            "/v1/completions",
            completion(json!({"prompt_logprobs": 1, "stream": true})),
            "prompt_logprobs",
        ),
        (
            "/v1/completions",
            completion(json!({"prompt_logprobs": 21})),
            "prompt_logprobs",
        ),
        (
            "/v1/completions",
            completion(json!({"prompt_logprobs": -1})),
            "prompt_logprobs",
        ),
        (
            "/v1/completions",
            completion(json!({"echo": true, "logprobs": 21})),
            "logprobs",
        ),
        (
            "/v1/chat/completions",
            chat(json!({"prompt_logprobs": 2, "stream": true})),
            "prompt_logprobs",
        ),
        (
            "/v1/chat/completions",
            chat(json!({"echo": true, "tools": [{"type": "function", "function": {"name": "f"}}]})),
            "echo",
        ),
    ];
    for (uri, body, field) in cases {
        let (s, b) = post(&r, uri, body.clone()).await;
        assert_eq!(s, StatusCode::BAD_REQUEST, "{uri} {body}: {b}");
        assert_eq!(b["error"]["param"], field, "{b}");
    }
    let (s, b) = post(&r, "/v1/chat/completions", chat(json!({"echo": false}))).await;
    assert_eq!(s, StatusCode::OK, "{b}");
}

/// The request log line of each of `bodies` (chat requests where they have `messages`), sent to
/// a server with `log_prompts` on or off (a streamed request logs when its stream ends). The log
/// is the test binary's (tests run in parallel): a request's line is the one with its response
/// id.
async fn logged(log_prompts: bool, bodies: &[Value]) -> Vec<String> {
    let log = capture_global();
    let r = app(TestServer {
        log_prompts,
        ..TestServer::default()
    }
    .state());
    let mut lines = Vec::new();
    for body in bodies {
        let uri = match body.get("messages") {
            Some(_) => "/v1/chat/completions",
            None => "/v1/completions",
        };
        let (s, _, text) = call(&r, "POST", uri, Some(body.clone()), None).await;
        assert_eq!(s, StatusCode::OK, "{text}");
        let reply = match body["stream"].as_bool() {
            Some(true) => sse_chunks(&text).swap_remove(0),
            _ => serde_json::from_str::<Value>(&text).unwrap(),
        };
        let id = format!("id={}", reply["id"].as_str().unwrap());
        let mut line = None;
        for _ in 0..500 {
            line = log_text(&log)
                .lines()
                .find(|l| l.contains("caduceus::request") && l.contains(&id))
                .map(str::to_owned);
            if line.is_some() {
                break;
            }
            tokio::time::sleep(std::time::Duration::from_millis(10)).await;
        }
        lines.push(line.unwrap_or_else(|| panic!("no request log line with {id}")));
    }
    lines
}

/// The request log (and the metrics it feeds) of `echo` with `max_tokens: 0` counts no
/// completion token, streamed or not: the one the engine computed is not the answer's. With
/// `log_prompts` on, an echoing request logs its completion without the prompt before it, as
/// a plain one does; off (the default), no text at all.
#[tokio::test]
async fn echo_is_logged_as_the_completion_it_answers() {
    let body = |extra: Value| {
        with_fields(
            json!({"model": MODEL, "prompt": PROMPT, "temperature": 0, "max_tokens": 3}),
            extra,
        )
    };
    let only = [
        body(json!({"max_tokens": 0, "echo": true})),
        body(json!({"max_tokens": 0, "echo": true, "stream": true})),
    ];
    for line in logged(false, &only).await {
        assert!(line.contains("status=200"), "{line}");
        assert!(line.contains("completion_tokens=0"), "{line}");
        assert!(
            !line.contains("prompt=") && !line.contains("completion="),
            "{line}"
        );
    }
    let echoed = [
        body(json!({})),
        body(json!({"echo": true})),
        body(json!({"echo": true, "stream": true})),
        body(json!({"max_tokens": 0, "echo": true})),
    ];
    let lines = logged(true, &echoed).await;
    let completion = |l: &str| l.split("completion=").nth(1).map(str::to_owned);
    let plain = completion(&lines[0]).expect("the completion is logged");
    assert!(
        lines[0].contains(&format!("prompt={PROMPT:?}")),
        "{}",
        lines[0]
    );
    for line in &lines[1..3] {
        assert_eq!(completion(line).as_deref(), Some(plain.as_str()), "{line}");
    }
    assert!(
        !lines[3].contains(&format!("completion=\"{PROMPT}")),
        "{}",
        lines[3]
    );
    // Chat's `echo` (the assistant message it continues) is not logged as the completion; the
    // rendered prompt's newlines are escaped, so each record is one line.
    let chat = |extra: Value| {
        let messages = [
            json!({"role": "user", "content": "Hi"}),
            json!({"role": "assistant", "content": "Dr. Lin here,"}),
        ];
        let body = json!({"model": MODEL, "messages": messages, "temperature": 0,
                          "max_tokens": 3, "continue_final_message": true});
        with_fields(body, extra)
    };
    let bodies = [
        chat(json!({})),
        chat(json!({"echo": true})),
        chat(json!({"echo": true, "stream": true})),
    ];
    let lines = logged(true, &bodies).await;
    let plain = completion(&lines[0]).unwrap_or_else(|| panic!("no completion: {lines:?}"));
    for line in &lines[1..] {
        assert_eq!(completion(line).as_deref(), Some(plain.as_str()), "{line}");
    }
}
