//! OpenAI's error body and the status each kind of failure maps to. Messages are meant for the
//! API caller: 500s never carry internals, which go to the log instead.

use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

/// `{"error": {...}}`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct ErrorResponse {
    pub error: ErrorBody,
}

/// The fields OpenAI clients read; `param` and `code` are `null` when they do not apply.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct ErrorBody {
    pub message: String,
    #[serde(rename = "type")]
    pub kind: String,
    pub param: Option<String>,
    pub code: Option<String>,
}

/// An error response ready to send: status, body, and for 429 the `Retry-After` seconds.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("{status} {}", body.error.message)]
pub struct ApiError {
    pub status: u16,
    pub body: ErrorResponse,
    pub retry_after_secs: Option<u64>,
}

impl ApiError {
    fn new(
        status: u16,
        kind: &str,
        message: String,
        param: Option<&str>,
        code: Option<&str>,
    ) -> Self {
        ApiError {
            status,
            body: ErrorResponse {
                error: ErrorBody {
                    message,
                    kind: kind.into(),
                    param: param.map(Into::into),
                    code: code.map(Into::into),
                },
            },
            retry_after_secs: None,
        }
    }

    /// 400: the request is malformed or a value is out of range; `param` names the field.
    pub fn invalid_request(message: impl Into<String>, param: Option<&str>) -> Self {
        Self::new(400, "invalid_request_error", message.into(), param, None)
    }

    /// 401: missing or wrong API key.
    pub fn unauthorized() -> Self {
        let message = "invalid or missing API key; send `Authorization: Bearer <key>`".into();
        Self::new(
            401,
            "authentication_error",
            message,
            None,
            Some("invalid_api_key"),
        )
    }

    /// 403: the route exists but is switched off by configuration; the message names the key.
    pub fn forbidden(message: impl Into<String>) -> Self {
        Self::new(
            403,
            "permission_error",
            message.into(),
            None,
            Some("forbidden"),
        )
    }

    /// 404: the `model` is neither the base model nor a known adapter.
    pub fn model_not_found(model: &str) -> Self {
        let message = format!("the model `{model}` does not exist");
        Self::new(
            404,
            "invalid_request_error",
            message,
            Some("model"),
            Some("model_not_found"),
        )
    }

    /// 413: the body exceeds `server.body_limit`.
    pub fn payload_too_large(limit_bytes: u64) -> Self {
        let message = format!("the request body exceeds the limit of {limit_bytes} bytes");
        Self::new(
            413,
            "invalid_request_error",
            message,
            None,
            Some("request_too_large"),
        )
    }

    /// 429: the queue is full; clients should retry after `retry_after_secs`.
    pub fn rate_limited(retry_after_secs: u64) -> Self {
        let message = format!("the server is at capacity; retry after {retry_after_secs} s");
        let mut err = Self::new(
            429,
            "rate_limit_error",
            message,
            None,
            Some("rate_limit_exceeded"),
        );
        err.retry_after_secs = Some(retry_after_secs);
        err
    }

    /// 503: not ready yet (model loading) or shutting down.
    pub fn unavailable(message: impl Into<String>) -> Self {
        Self::new(
            503,
            "server_error",
            message.into(),
            None,
            Some("service_unavailable"),
        )
    }

    /// 500: a fixed message; the cause belongs in the server log, not the response.
    pub fn internal() -> Self {
        let message = "the server had an error while processing the request".into();
        Self::new(500, "server_error", message, None, None)
    }
}
