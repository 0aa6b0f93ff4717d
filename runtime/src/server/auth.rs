//! Bearer-token authentication: inference keys for the `/v1` generation routes, separate admin
//! keys for the adapter load/unload routes (a patient-facing key must not change what the server
//! serves), and an optional key for `/metrics`.

use axum::extract::{Request, State};
use axum::http::header::AUTHORIZATION;
use axum::http::HeaderMap;
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};

use super::protocol::ApiError;
use super::state::AppState;
use super::tenant::Tenant;

/// Rejects requests without `Authorization: Bearer <key>` naming a configured key (401); an
/// accepted request carries its [`Tenant`] (for prefix-cache isolation).
pub async fn require_api_key(
    State(state): State<AppState>,
    mut req: Request,
    next: Next,
) -> Response {
    let keys = &state.settings.api_keys;
    if keys.is_empty() {
        return next.run(req).await;
    }
    match bearer(req.headers()) {
        Some(key) if matches_any(keys, key) => {
            let tenant = Tenant::from_api_key(key);
            req.extensions_mut().insert(tenant);
            next.run(req).await
        }
        _ => ApiError::unauthorized().into_response(),
    }
}

/// Guards the adapter load/unload routes: with `server.admin_api_keys` set only those keys pass
/// (inference keys do not); without them the routes are off (403) unless keyless admin was
/// allowed (`allow_runtime_lora_updating` on a loopback bind), where the inference keys, if
/// any, still apply.
pub async fn require_admin_key(
    State(state): State<AppState>,
    req: Request,
    next: Next,
) -> Response {
    let s = &state.settings;
    let keys = if !s.admin_api_keys.is_empty() {
        &s.admin_api_keys
    } else if s.allow_keyless_admin {
        &s.api_keys
    } else {
        return ApiError::forbidden(
            "runtime adapter loading is disabled: set server.admin_api_keys (or \
             server.allow_runtime_lora_updating = true with a loopback server.host)",
        )
        .into_response();
    };
    if keys.is_empty() || bearer(req.headers()).is_some_and(|k| matches_any(keys, k)) {
        next.run(req).await
    } else {
        ApiError::unauthorized().into_response()
    }
}

/// Guards `/metrics` when `server.metrics_api_key` is set.
pub async fn require_metrics_key(
    State(state): State<AppState>,
    req: Request,
    next: Next,
) -> Response {
    match &state.settings.metrics_api_key {
        Some(key)
            if !bearer(req.headers())
                .is_some_and(|k| matches_any(std::slice::from_ref(key), k)) =>
        {
            ApiError::unauthorized().into_response()
        }
        _ => next.run(req).await,
    }
}

/// The token of an `Authorization: Bearer <token>` header; the scheme is case-insensitive
/// (RFC 7235).
fn bearer(headers: &HeaderMap) -> Option<&str> {
    let value = headers.get(AUTHORIZATION)?.to_str().ok()?;
    let (scheme, token) = value.trim().split_once(' ')?;
    scheme
        .eq_ignore_ascii_case("bearer")
        .then(|| token.trim())
        .filter(|t| !t.is_empty())
}

/// Whether `presented` is one of `keys`, comparing against every key without an early exit, so
/// the response time says neither how much of a key matched nor which key did.
fn matches_any(keys: &[String], presented: &str) -> bool {
    keys.iter().fold(false, |found, k| {
        found | constant_time_eq(k.as_bytes(), presented.as_bytes())
    })
}

/// Compares without an early exit, so response time does not reveal how much of a key matched.
fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    let mut diff = a.len() ^ b.len();
    for i in 0..a.len().max(b.len()) {
        let x = a.get(i).copied().unwrap_or(0);
        let y = b.get(i).copied().unwrap_or(0);
        diff |= usize::from(x ^ y);
    }
    diff == 0
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_match_only_when_identical() {
        assert!(constant_time_eq(b"sk-abc", b"sk-abc"));
        assert!(!constant_time_eq(b"sk-abc", b"sk-abd"));
        assert!(!constant_time_eq(b"sk-abc", b"sk-ab"));
        assert!(!constant_time_eq(b"sk-ab", b"sk-abc"));
        assert!(!constant_time_eq(b"", b"x"));
        let keys = ["sk-1".to_string(), "sk-2".to_string()];
        assert!(matches_any(&keys, "sk-2") && !matches_any(&keys, "sk-3"));
    }

    #[test]
    fn the_bearer_scheme_is_case_insensitive() {
        let mut h = HeaderMap::new();
        for (value, token) in [
            ("Bearer sk-1", Some("sk-1")),
            ("bearer sk-1", Some("sk-1")),
            ("BEARER  sk-1 ", Some("sk-1")),
            ("Basic sk-1", None),
            ("Bearer", None),
            ("Bearersk-1", None),
        ] {
            h.insert(AUTHORIZATION, value.parse().unwrap());
            assert_eq!(bearer(&h), token, "{value}");
        }
    }
}
