//! The JSON body extractor: OpenAI-style errors for bodies that are too large (413), not JSON,
//! of the wrong shape (400 naming the field, via serde_path_to_error), or asking for a feature
//! the server does not implement (400 naming the field). The content type is not required, so
//! `curl -d` works. An oversized body is read and discarded up to a bound before the 413, so
//! ordinary clients see the response instead of a reset.

use axum::extract::{FromRequest, Request};
use axum::http::header::CONTENT_LENGTH;
use futures_util::StreamExt;
use serde::de::DeserializeOwned;

use super::protocol::{unsupported_error, unsupported_field, ApiError};

/// A JSON request body of type `T`.
pub struct ApiJson<T>(pub T);

impl<S, T> FromRequest<S> for ApiJson<T>
where
    S: Send + Sync,
    T: DeserializeOwned,
{
    type Rejection = ApiError;

    async fn from_request(req: Request, _state: &S) -> Result<Self, ApiError> {
        let limit = req
            .extensions()
            .get::<BodyLimit>()
            .map_or(usize::MAX, |l| l.0);
        let bytes = read_limited(req, limit).await?;
        if let Some(field) = unsupported_field(&bytes) {
            return Err(unsupported_error(field));
        }
        parse(&bytes).map(ApiJson)
    }
}

/// Bytes of a body past the limit the server still reads (and discards) before answering 413,
/// so a client that sends its whole body before reading sees the 413 rather than a reset
/// connection. Beyond it the connection is dropped.
pub const DRAIN_LIMIT_BYTES: usize = 16 << 20;

/// The body, or 413 once it passes `limit` (after draining up to [`DRAIN_LIMIT_BYTES`] more).
async fn read_limited(req: Request, limit: usize) -> Result<Vec<u8>, ApiError> {
    let declared = req
        .headers()
        .get(CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<usize>().ok());
    let mut stream = req.into_body().into_data_stream();
    let too_large = || ApiError::payload_too_large(limit as u64);
    if declared.is_some_and(|n| n > limit.saturating_add(DRAIN_LIMIT_BYTES)) {
        return Err(too_large());
    }
    let mut bytes = Vec::with_capacity(declared.unwrap_or(0).min(limit));
    while let Some(chunk) = stream.next().await {
        let chunk = chunk.map_err(|e| {
            ApiError::invalid_request(format!("could not read the request body: {e}"), None)
        })?;
        if bytes.len() + chunk.len() > limit {
            let mut drained = bytes.len() + chunk.len() - limit;
            while drained < DRAIN_LIMIT_BYTES {
                match stream.next().await {
                    Some(Ok(more)) => drained += more.len(),
                    _ => break,
                }
            }
            return Err(too_large());
        }
        bytes.extend_from_slice(&chunk);
    }
    Ok(bytes)
}

/// The configured body limit, attached to each request so the 413 message can name it.
#[derive(Clone, Copy, Debug)]
pub struct BodyLimit(pub usize);

/// Parses a body, naming the offending field on a type error.
pub fn parse<T: DeserializeOwned>(bytes: &[u8]) -> Result<T, ApiError> {
    let de = &mut serde_json::Deserializer::from_slice(bytes);
    serde_path_to_error::deserialize(de).map_err(|e| {
        let path = e.path().to_string();
        let inner = e.into_inner();
        if inner.is_syntax() || inner.is_eof() {
            ApiError::invalid_request(format!("the request body is not valid JSON: {inner}"), None)
        } else if path == "." {
            ApiError::invalid_request(format!("invalid request body: {inner}"), None)
        } else {
            ApiError::invalid_request(format!("invalid value for `{path}`: {inner}"), Some(&path))
        }
    })
}
