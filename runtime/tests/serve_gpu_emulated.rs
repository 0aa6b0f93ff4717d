//! `caduceus serve` on the GPU engine, end to end, in the kernels' host emulation:
//! `scripts/serve-parity.py` starts this test build of the binary (feature `gpu-emu`) with
//! `model.device = "cuda:0"` and `CAD_TEST_EMULATED_GPU=1`, which makes that device the emulation,
//! on the shared tiny Llama in f16 with both PEFT doctors in two device slots, and the same binary
//! on the CPU (f32) as the reference. Nine greedy completions over the base model and the two
//! doctors go in at once, so batches mix adapters on the device; each must come back with the
//! CPU server's text, tokens and (within f16 rounding) logprobs; then each scores each prompt
//! (`echo` with `logprobs`) as the CPU server does. The GPU server's start (memory plan, graphs,
//! adapter slots), `/metrics` and drain on SIGTERM are checked too.
//!
//! The script is the one definition of this check: `scripts/gpu-check serve` runs it against the
//! carried release binary on a real GPU.

mod support;

use std::process::Command;

#[test]
fn serve_on_the_gpu_engine_answers_as_the_cpu_server_with_mixed_adapters() {
    let script = concat!(env!("CARGO_MANIFEST_DIR"), "/../scripts/serve-parity.py");
    let tiny = support::shared("reference/tiny-llama");
    let out = Command::new("python3")
        .arg(script)
        .args(["--bin", env!("CARGO_BIN_EXE_caduceus")])
        .arg("--tiny")
        .arg(&tiny)
        .args(["--device", "cuda:0", "--dtype", "f16", "--emulated"])
        .output();
    let out = match out {
        Ok(out) => out,
        // CI must not pass by skipping (it has python3: scripts/openai-sdk-check needs it).
        Err(e) if !support::in_ci() => {
            eprintln!("SKIPPED: python3 could not run ({e})");
            return;
        }
        Err(e) => panic!("python3 could not run under CI: {e}"),
    };
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "serve parity failed:\n{stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let summary: serde_json::Value = serde_json::from_str(&stdout).unwrap();
    assert_eq!(summary["pass"], true);
    assert_eq!(summary["rows"].as_array().map(Vec::len), Some(9));
    // Each model scored each prompt (`echo` with `logprobs`) as the CPU server does.
    assert_eq!(
        summary["echo_with_logprobs"].as_array().map(Vec::len),
        Some(9)
    );
}
