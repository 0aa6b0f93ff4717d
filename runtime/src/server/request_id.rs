//! The caller's `X-Request-Id` (what gateways such as Envoy, and so llm-d's, set on every request
//! they route): echoed on the response and written on the request's log line, so one request can
//! be followed from the gateway's log to this server's. It is the caller's label, not the
//! response `id`, which stays the server's own random one.

use axum::extract::Request;
use axum::http::HeaderValue;
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};

use super::protocol::ApiError;

/// The header, in HTTP/2's lower case (HTTP/1 matches it case-insensitively).
pub const HEADER: &str = "x-request-id";

/// Longest id taken (a UUID is 36 characters; trace ids are 32 hex digits).
pub const MAX_LEN: usize = 128;

tokio::task_local! {
    /// The id of the request being served, read by its [`super::request_log::RequestLog`].
    static CLIENT_ID: Option<String>;
}

/// The caller's id of the request being served, if it sent one.
pub fn current() -> Option<String> {
    CLIENT_ID.try_with(Clone::clone).ok().flatten()
}

/// Whether `id` can go into a log line as it is: 1 to [`MAX_LEN`] ASCII letters, digits and
/// `-_.:+/=` (UUIDs, hex trace ids, base64), so no space, quote or newline can forge a field.
fn acceptable(id: &str) -> bool {
    (1..=MAX_LEN).contains(&id.len())
        && id
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"-_.:+/=".contains(&b))
}

/// Takes the request's `X-Request-Id` (a 400 when it is not one [`acceptable`] id) and echoes it
/// on the response.
pub async fn client_request_id(req: Request, next: Next) -> Response {
    let id = match req.headers().get(HEADER).map(HeaderValue::to_str) {
        None => None,
        Some(Ok(id)) if acceptable(id) => Some(id.to_owned()),
        Some(_) => {
            return ApiError::invalid_request(
                format!(
                    "the X-Request-Id header must be 1 to {MAX_LEN} ASCII letters, digits or \
                     -_.:+/= characters"
                ),
                None,
            )
            .into_response()
        }
    };
    let echo = id.as_deref().and_then(|id| HeaderValue::from_str(id).ok());
    let mut response = CLIENT_ID.scope(id, next.run(req)).await;
    if let Some(echo) = echo {
        response.headers_mut().insert(HEADER, echo);
    }
    response
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids_that_could_forge_a_log_field_are_refused() {
        for ok in [
            "a",
            "0f8fad5b-d9cb-469f-a165-70867728950e",
            "ab+/=",
            &"x".repeat(MAX_LEN),
        ] {
            assert!(acceptable(ok), "{ok}");
        }
        let long = "x".repeat(MAX_LEN + 1);
        for bad in [
            "",
            "a b",
            "a\"b",
            "a\nb",
            "é",
            "a=b status=500 x",
            long.as_str(),
        ] {
            assert!(!acceptable(bad), "{bad}");
        }
    }
}
