//! The JSON body extractor: OpenAI-style errors for bodies that are too large (413), not JSON,
//! of the wrong shape (400 naming the field, via serde_path_to_error), or asking for a feature
//! the server does not implement (400 naming the field). The content type is
//! not required, so `curl -d` works.

use axum::body::Bytes;
use axum::extract::{FromRequest, Request};
use axum::http::StatusCode;
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

    async fn from_request(req: Request, state: &S) -> Result<Self, ApiError> {
        let limit = req.extensions().get::<BodyLimit>().map(|l| l.0);
        let bytes = Bytes::from_request(req, state).await.map_err(|e| {
            if e.status() == StatusCode::PAYLOAD_TOO_LARGE {
                ApiError::payload_too_large(limit.unwrap_or(0) as u64)
            } else {
                ApiError::invalid_request(format!("could not read the request body: {e}"), None)
            }
        })?;
        if let Some(field) = unsupported_field(&bytes) {
            return Err(unsupported_error(field));
        }
        parse(&bytes).map(ApiJson)
    }
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
