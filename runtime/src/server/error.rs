//! One mapping from every failure to an HTTP response with OpenAI's error body.

use axum::http::{header, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::Json;

use std::time::Duration;

use super::protocol::{ApiError, ErrorBody, ErrorResponse};
use crate::engine::{RequestError, RequestFailure};
use crate::sampling::SamplingError;

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let status = StatusCode::from_u16(self.status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
        let mut resp = (status, Json(self.body)).into_response();
        if let Some(secs) = self.retry_after_secs {
            if let Ok(v) = HeaderValue::from_str(&secs.to_string()) {
                resp.headers_mut().insert(header::RETRY_AFTER, v);
            }
        }
        resp
    }
}

/// A 400 naming `param` when any of `ids` lies outside a vocabulary of `vocab` ids; `what` is
/// the field as the message names it (`prompt[2]`, `tokens`, `logit_bias`).
pub fn check_token_ids(
    ids: impl IntoIterator<Item = u32>,
    vocab: usize,
    what: &str,
    param: &str,
) -> Result<(), ApiError> {
    match ids.into_iter().find(|&t| t as usize >= vocab) {
        None => Ok(()),
        Some(bad) => Err(ApiError::invalid_request(
            format!("`{what}` contains token id {bad}, outside the vocabulary of {vocab}"),
            Some(param),
        )),
    }
}

/// Maps an engine refusal to its HTTP error; `prompt_field` is `messages` or `prompt`,
/// `scoring_field` the one that asked for prompt logprobs (`echo` or `prompt_logprobs`).
pub fn request_error(err: RequestError, prompt_field: &str, scoring_field: &str) -> ApiError {
    let message = err.to_string();
    let param = match &err {
        RequestError::QueueFull { .. } => return ApiError::rate_limited(1),
        RequestError::EngineStopped => return ApiError::unavailable(message),
        RequestError::UnknownAdapter(name) => return ApiError::model_not_found(name),
        RequestError::NoTokenizer | RequestError::DuplicateId(_) => {
            tracing::error!(error = %message, "internal request error");
            return ApiError::internal();
        }
        RequestError::EmptyPrompt
        | RequestError::TooLong { .. }
        | RequestError::ExceedsKvPool { .. }
        | RequestError::BadToken { .. } => prompt_field,
        RequestError::ZeroMaxTokens => "max_tokens",
        RequestError::MinAboveMax { .. } => "min_tokens",
        RequestError::BadStop => "stop",
        RequestError::TooManyStopTokenIds => "stop_token_ids",
        RequestError::Sampling(SamplingError::OutOfRange { field, .. }) => field,
        RequestError::PromptLogprobsUnavailable | RequestError::TooManyPromptLogprobs(_) => {
            scoring_field
        }
    };
    ApiError::invalid_request(message, Some(param))
}

/// The HTTP error of a request the engine failed after accepting it (the other requests went
/// on). A broken adapter on the server's disk or a numerical failure is the operator's to fix: a
/// 500 whose `code` names the failure; a request refused once its adapter arrived gets the
/// refusal's own status (400 for a limit, ...), as if refused at the door.
pub fn failure_error(failure: &RequestFailure) -> ApiError {
    let param = match failure {
        RequestFailure::Rejected(e) => {
            return request_error(e.clone(), "prompt", "prompt_logprobs")
        }
        RequestFailure::AdapterLoad { .. }
        | RequestFailure::LoaderStopped { .. }
        | RequestFailure::AdapterSlot(_) => Some("model".into()),
        RequestFailure::NonFiniteLogits => None,
    };
    ApiError {
        status: 500,
        body: ErrorResponse {
            error: ErrorBody {
                message: failure.to_string(),
                kind: "server_error".into(),
                param,
                code: Some(failure.code().into()),
            },
        },
        retry_after_secs: None,
    }
}

/// 504: the request ran past `server.request_timeout` and was aborted.
pub fn timeout_error(limit: Duration) -> ApiError {
    ApiError {
        status: 504,
        body: ErrorResponse {
            error: ErrorBody {
                message: format!(
                    "the request did not finish within the server's request timeout of {:.1} s \
                     and was aborted; lower `max_tokens` or retry",
                    limit.as_secs_f64()
                ),
                kind: "timeout_error".into(),
                param: None,
                code: Some("timeout".into()),
            },
        },
        retry_after_secs: None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_engine_refusal_names_the_field_of_the_request_that_asked() {
        let refused = [
            RequestError::PromptLogprobsUnavailable,
            RequestError::TooManyPromptLogprobs(21),
        ];
        for field in ["echo", "prompt_logprobs"] {
            for e in refused.clone() {
                let api = request_error(e, "prompt", field);
                assert_eq!(api.status, 400);
                assert_eq!(api.body.error.param.as_deref(), Some(field));
            }
        }
        let api = request_error(RequestError::EmptyPrompt, "messages", "echo");
        assert_eq!(api.body.error.param.as_deref(), Some("messages"));
    }
}
