//! Inputs fetched before the tests (the default model), and the CI rule for them: absent, a test
//! skips with a notice on a developer's machine and fails under CI. Test binaries that need
//! nothing else from `support` include this file alone (`#[path]`), to stay quick to compile.

use std::path::{Path, PathBuf};

use caduceus_runtime::model::DEFAULT_MODEL_PATH;

/// The default model (where `caduceus serve` looks for it, from the workspace root), or `None`
/// (with a notice) when it has not been fetched.
pub fn default_model() -> Option<PathBuf> {
    let p = Path::new(concat!(env!("CARGO_MANIFEST_DIR"), "/..")).join(DEFAULT_MODEL_PATH);
    if p.exists() {
        return Some(p);
    }
    // CI must not pass by skipping: there the model is fetched first.
    assert!(
        !in_ci(),
        "{} is absent and CI=true: run scripts/fetch-default-model before the tests",
        p.display()
    );
    eprintln!(
        "SKIPPED: {} is absent; run scripts/fetch-default-model",
        p.display()
    );
    None
}

/// Whether the tests run under CI (`CI=true`, as GitHub Actions and most CI systems set), where
/// a missing input must fail the test instead of skipping it.
pub fn in_ci() -> bool {
    std::env::var("CI").is_ok_and(|v| v.eq_ignore_ascii_case("true") || v == "1")
}
