//! The `caduceus` binary end to end: generate/tokenize output formats and clear errors on bad input.

mod support;

use std::process::Command;

fn caduceus(args: &[&str]) -> std::process::Output {
    Command::new(env!("CARGO_BIN_EXE_caduceus"))
        .args(args)
        .args(["--threads", "2"])
        .output()
        .unwrap()
}

/// The JSON lines a successful run printed (fails with its stderr otherwise).
fn json_lines(out: std::process::Output) -> Vec<serde_json::Value> {
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout)
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect()
}

#[test]
fn generate_json_prints_one_object_per_prompt_in_order() {
    let model = support::shared("reference/tiny-llama/model");
    let expected: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(support::shared("reference/tiny-llama/expected.json")).unwrap(),
    )
    .unwrap();
    let m = model.to_str().unwrap();
    let out = caduceus(&[
        "generate",
        "--model",
        m,
        "--prompt",
        "fever and cough",
        "--prompt",
        "ok",
        "--max-tokens",
        "16",
        "--ignore-eos",
        "--json",
    ]);
    let lines = json_lines(out);
    assert_eq!(lines.len(), 2);
    for (line, idx) in lines.iter().zip([1, 3]) {
        assert_eq!(
            line["prompt_token_ids"],
            expected["prompts"][idx]["token_ids"]
        );
        assert_eq!(line["token_ids"], expected["base"][idx]["greedy_16"]);
        assert_eq!(line["finish_reason"], "length");
        assert!(line["text"].is_string());
    }
}

#[test]
fn tokenize_prints_token_ids() {
    let model = support::shared("reference/tiny-llama/model");
    let out = caduceus(&[
        "tokenize",
        "--model",
        model.to_str().unwrap(),
        "--text",
        "ok",
    ]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(v, serde_json::json!({"token_ids": [78, 74]}));
}

#[test]
fn missing_model_names_the_fetch_script() {
    let dir = tempfile::tempdir().unwrap();
    let out = Command::new(env!("CARGO_BIN_EXE_caduceus"))
        .current_dir(dir.path())
        .args(["generate", "--prompt", "hi"])
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("scripts/fetch-default-model"), "{err}");
    assert!(!err.contains("panicked"), "{err}");
}

#[test]
fn corrupt_model_file_is_a_clear_error() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("broken.gguf");
    std::fs::write(&path, b"GGUF\x03\x00\x00\x00garbage").unwrap();
    let out = caduceus(&[
        "generate",
        "--model",
        path.to_str().unwrap(),
        "--prompt",
        "hi",
    ]);
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("broken.gguf") && !err.contains("panicked"),
        "{err}"
    );
}

#[test]
fn prompt_longer_than_the_context_is_a_clear_error() {
    let model = support::shared("reference/tiny-llama/model");
    let long = "a".repeat(300); // max_position_embeddings is 256, one token per byte
    let out = caduceus(&[
        "generate",
        "--model",
        model.to_str().unwrap(),
        "--prompt",
        &long,
        "--max-tokens",
        "4",
    ]);
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("context length of 256"), "{err}");
}

#[test]
fn generate_with_adapters_matches_peft_per_prompt_in_one_batch() {
    let dir = support::shared("reference/tiny-llama");
    let expected: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(dir.join("expected.json")).unwrap()).unwrap();
    let model = dir.join("model");
    let (a, b) = (dir.join("adapters/doctor-a"), dir.join("adapters/doctor-b"));
    let prompt = expected["prompts"][0]["text"].as_str().unwrap();
    let out = caduceus(&[
        "generate",
        "--model",
        model.to_str().unwrap(),
        "--prompt",
        prompt,
        "--prompt",
        prompt,
        "--prompt",
        prompt,
        "--adapter",
        a.to_str().unwrap(),
        "--adapter",
        "none",
        "--adapter",
        b.to_str().unwrap(),
        "--max-tokens",
        "16",
        "--ignore-eos",
        "--json",
    ]);
    let lines = json_lines(out);
    for (line, key) in lines.iter().zip(["doctor-a", "base", "doctor-b"]) {
        assert_eq!(line["token_ids"], expected[key][0]["greedy_16"], "{key}");
    }
    // A broken adapter path is a clear error, not a panic.
    let out = caduceus(&[
        "generate",
        "--model",
        model.to_str().unwrap(),
        "--prompt",
        prompt,
        "--adapter",
        "/definitely/not/an/adapter",
    ]);
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("/definitely/not/an/adapter") && !err.contains("panicked"),
        "{err}"
    );
}

/// A log written to a pipe (a file, `docker logs`, a collector) carries no terminal colour codes.
#[test]
fn logs_to_a_pipe_have_no_colour_codes() {
    let model = support::shared("reference/tiny-llama/model");
    let out = caduceus(&[
        "--log-level",
        "debug",
        "generate",
        "--model",
        model.to_str().unwrap(),
        "--prompt",
        "ok",
        "--max-tokens",
        "2",
    ]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{err}");
    assert!(
        err.contains("DEBUG") || err.contains("INFO"),
        "nothing logged: {err}"
    );
    assert!(!err.contains('\u{1b}'), "{err}");
}
