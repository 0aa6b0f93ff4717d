//! `caduceus gpu-parity` on the shared tiny Llama and its PEFT doctors against transformers +
//! peft's `expected.json`: on the CPU (f32, every prompt and adapter, solo and mixed) and in the
//! GPU emulation (f16, one prompt).

use super::*;

/// The shared tiny Llama (`../shared/reference/tiny-llama`), as the other reference tests
/// find it.
fn tiny() -> PathBuf {
    let shared = std::env::var_os("CAD_SHARED_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| Path::new(env!("CARGO_MANIFEST_DIR")).join("../../shared"));
    shared.join("reference/tiny-llama")
}

fn args(device: &str, dtype: &str, max_tokens: usize) -> GpuParityArgs {
    let dir = tiny();
    assert!(
        dir.join("expected.json").is_file(),
        "{}: the shared reference material is missing",
        dir.display()
    );
    GpuParityArgs {
        model: dir.join("model"),
        adapters: ["doctor-a", "doctor-b"]
            .iter()
            .map(|n| (n.to_string(), dir.join("adapters").join(n)))
            .collect(),
        prompts: dir.join("expected.json"),
        device: device.into(),
        dtype: dtype.into(),
        max_tokens,
        no_mixed: false,
        out: None,
    }
}

/// Checks `got` (a `gpu-parity` JSON) against transformers + peft's expected.json: the first
/// 16 last-position logits within `tol`, and the greedy tokens (alone and mixed) equal when
/// `exact`.
fn check(got: &Value, tol: f32, exact: bool) {
    let text = std::fs::read_to_string(tiny().join("expected.json")).unwrap();
    let want: Value = serde_json::from_str(&text).unwrap();
    for key in got["keys"].as_array().unwrap() {
        let key = key.as_str().unwrap();
        let wants = want[key].as_array().unwrap();
        for run in ["solo", "mixed"] {
            if got[run].is_null() {
                continue;
            }
            let gots = got[run][key].as_array().unwrap();
            assert!(!gots.is_empty() && gots.len() <= wants.len());
            for (i, (g, w)) in gots.iter().zip(wants).enumerate() {
                let g16: Vec<f32> = serde_json::from_value(g["last_logits"].clone()).unwrap();
                let w16: Vec<f32> =
                    serde_json::from_value(w["last_logits_first16"].clone()).unwrap();
                for (t, (a, b)) in g16.iter().zip(&w16).enumerate() {
                    assert!(
                        (a - b).abs() <= tol,
                        "{run} {key} {i} logit {t}: {a} vs {b}"
                    );
                }
                let greedy: Vec<u32> = serde_json::from_value(g["greedy"].clone()).unwrap();
                let want_greedy: Vec<u32> = serde_json::from_value(w["greedy_16"].clone()).unwrap();
                assert_eq!(greedy[0], argmax(&g16_full(g)), "first token is the argmax");
                if exact {
                    assert_eq!(greedy[..], want_greedy[..greedy.len()], "{run} {key} {i}");
                }
            }
        }
    }
}

fn g16_full(g: &Value) -> Vec<f32> {
    serde_json::from_value(g["last_logits"].clone()).unwrap()
}

#[test]
fn cpu_parity_on_the_tiny_llama_matches_transformers_and_peft() {
    let got = parity_json(&args("cpu", "bf16", 16)).unwrap();
    assert_eq!(got["dtype"], "f32");
    assert_eq!(got["keys"], json!(["base", "doctor-a", "doctor-b"]));
    // f32 against torch f32: only summation order differs.
    check(&got, 2e-3, true);
    // A mixed batch gives each request its solo output.
    assert_eq!(got["solo"], got["mixed"]);
}

#[cfg(feature = "gpu-emu")]
#[test]
fn emulated_gpu_parity_on_the_tiny_llama_is_within_f16_tolerance() {
    // f16 keeps the tiny model's greedy tokens (gpu/backend/reference_tests.rs covers every
    // prompt, adapter and decode step there). One prompt, one adapter, the first token and no
    // mixed batch (the CPU test covers that, the batching code is shared) keep the emulation
    // fast while going through this command's GPU loading, slots and forward.
    let dir = tempfile::tempdir().unwrap();
    let prompts = dir.path().join("p.json");
    let first = &read_prompts(&tiny().join("expected.json")).unwrap()[0];
    std::fs::write(&prompts, json!([first]).to_string()).unwrap();
    let mut a = args("emu", "f16", 1);
    a.prompts = prompts;
    a.adapters.truncate(1);
    a.no_mixed = true;
    let got = parity_json(&a).unwrap();
    assert_eq!(got["dtype"], "f16");
    assert_eq!(got["keys"], json!(["base", "doctor-a"]));
    check(&got, 0.03, true);
}

#[test]
fn argmax_takes_the_lowest_index_on_ties_and_prompts_read_both_layouts() {
    assert_eq!(argmax(&[1.0, 3.0, 3.0, -1.0]), 1);
    let dir = tempfile::tempdir().unwrap();
    let a = dir.path().join("a.json");
    std::fs::write(&a, "[[1, 2], [3]]").unwrap();
    assert_eq!(read_prompts(&a).unwrap(), vec![vec![1, 2], vec![3]]);
    std::fs::write(&a, r#"{"prompts": [{"token_ids": [4, 5], "text": "x"}]}"#).unwrap();
    assert_eq!(read_prompts(&a).unwrap(), vec![vec![4, 5]]);
    std::fs::write(&a, "[[]]").unwrap();
    assert!(read_prompts(&a).is_err());
    assert!(parse_adapter("noequals").is_err());
}
