//! Shared test support: an independent dense reference Llama and tiny random HF models.
#![allow(dead_code)]

pub mod random_model;
pub mod reference_llama;
pub mod server_app;

use std::path::PathBuf;

/// `../shared/<rel>` next to the workspace, with a clear panic when the reference material is missing.
pub fn shared(rel: &str) -> PathBuf {
    let p = PathBuf::from(concat!(env!("CARGO_MANIFEST_DIR"), "/../../shared")).join(rel);
    assert!(
        p.exists(),
        "reference material {} is missing: the tests need ../shared/ beside the repo",
        p.display()
    );
    p
}

/// The default model, or `None` (with a notice) when it has not been fetched.
pub fn default_model() -> Option<PathBuf> {
    let p = PathBuf::from(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../models/SmolLM2-135M-Instruct.Q4_1.gguf"
    ));
    if p.exists() {
        Some(p)
    } else {
        eprintln!(
            "SKIPPED: {} is absent; run scripts/fetch-default-model",
            p.display()
        );
        None
    }
}
