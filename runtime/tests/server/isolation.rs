//! Prefix-cache isolation: a cache hit is visible in `cached_tokens`, so one tenant must never
//! hit blocks another tenant's prompt filled. The same holds for compiled grammars, whose cache
//! hits show in the response time.

use axum::Router;
use caduceus_runtime::config::PrefixCacheIsolation;
use caduceus_runtime::server::{app, AppState};
use serde_json::{json, Value};

use crate::support::server_app::{call, TestServer};

const KEY_A: &str = "sk-tenant-a-0123456789";
const KEY_B: &str = "sk-tenant-b-0123456789";
/// 48 byte-level tokens: three full 16-token blocks.
const PROMPT: &str = "Patient 7 asks about the dosage of metformin....";

fn serve(isolation: PrefixCacheIsolation) -> AppState {
    TestServer {
        api_keys: vec![KEY_A.into(), KEY_B.into()],
        prefix_cache_isolation: isolation,
        ..TestServer::default()
    }
    .state()
}

fn router(isolation: PrefixCacheIsolation) -> Router {
    app(serve(isolation))
}

/// `cached_tokens` of one completion of [`PROMPT`] sent with `key` (and `cache_salt`).
async fn cached_tokens(r: &Router, key: &str, salt: Option<&str>) -> u64 {
    let mut body = json!({"prompt": PROMPT, "max_tokens": 1, "temperature": 0});
    if let Some(s) = salt {
        body["cache_salt"] = json!(s);
    }
    let (s, _, b) = call(r, "POST", "/v1/completions", Some(body), Some(key)).await;
    assert_eq!(s, 200, "{b}");
    let v: Value = serde_json::from_str(&b).unwrap();
    v["usage"]["prompt_tokens_details"]["cached_tokens"]
        .as_u64()
        .unwrap()
}

#[tokio::test]
async fn per_key_isolation_keeps_one_tenants_prefix_cache_from_another() {
    let r = router(PrefixCacheIsolation::PerKey);
    assert_eq!(cached_tokens(&r, KEY_A, None).await, 0);
    // The same tenant reuses its blocks (all full blocks but the last prompt token's).
    assert_eq!(cached_tokens(&r, KEY_A, None).await, 32);
    // Another tenant sending the same prompt learns nothing.
    assert_eq!(cached_tokens(&r, KEY_B, None).await, 0);
    // A request's own cache_salt separates it even within one tenant.
    assert_eq!(cached_tokens(&r, KEY_A, Some("visit-1")).await, 0);
    assert_eq!(cached_tokens(&r, KEY_A, Some("visit-1")).await, 32);
    assert_eq!(cached_tokens(&r, KEY_B, Some("visit-1")).await, 0);
}

#[tokio::test]
async fn shared_isolation_shares_between_keys_but_not_across_salts() {
    let r = router(PrefixCacheIsolation::Shared);
    assert_eq!(cached_tokens(&r, KEY_A, None).await, 0);
    assert_eq!(cached_tokens(&r, KEY_B, None).await, 32);
    assert_eq!(cached_tokens(&r, KEY_B, Some("s")).await, 0);
    assert_eq!(cached_tokens(&r, KEY_A, Some("s")).await, 32);
    let (s, _, b) = call(
        &r,
        "POST",
        "/v1/completions",
        Some(json!({"prompt": PROMPT, "cache_salt": ""})),
        Some(KEY_A),
    )
    .await;
    assert_eq!(s, 400, "{b}");
    assert!(b.contains("cache_salt"), "{b}");
}

#[tokio::test]
async fn compiled_grammars_are_shared_only_as_far_as_the_prefix_cache_is() {
    use PrefixCacheIsolation::{PerKey, Shared};
    // Patient-derived choices: whether another tenant compiled them must not show.
    let choices = json!({"choice": ["metformin 500 mg", "insulin glargine"]});
    let bad = json!({"regex": "(metformin"});
    for (isolation, separate) in [(PerKey, true), (Shared, false)] {
        let state = serve(isolation);
        let r = app(state.clone());
        let compiler = state.structured.as_deref().expect("a compiler");
        let other_key = u64::from(separate);
        let sends = [
            (KEY_A, None, &choices, 1),
            (KEY_A, None, &choices, 1),
            (KEY_B, None, &choices, 1 + other_key),
            // A request's cache_salt is the patient's; grammars are the calling service's.
            (KEY_A, Some("visit-1"), &choices, 1 + other_key),
            (KEY_A, None, &bad, 2 + other_key),
            (KEY_B, None, &bad, 2 + 2 * other_key),
        ];
        for (key, salt, spec, compiles) in sends {
            let mut body = json!({"prompt": "Prescribed:", "max_tokens": 20,
                "structured_outputs": spec});
            if let Some(salt) = salt {
                body["cache_salt"] = json!(salt);
            }
            let (s, _, b) = call(&r, "POST", "/v1/completions", Some(body), Some(key)).await;
            let want = if spec == &bad { 400 } else { 200 };
            assert_eq!(s, want, "{b}");
            assert_eq!(
                compiler.num_compiles(),
                compiles,
                "{isolation:?}: {spec} sent with {key} and salt {salt:?}"
            );
        }
    }
}
