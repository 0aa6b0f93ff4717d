//! The OpenAI-compatible HTTP server: `app()` builds the router over an [`AppState`] (tests drive
//! it in-process), `run_server` serves it with draining on shutdown.

mod adapters;
mod app;
mod auth;
mod chat;
mod completions;
mod error;
mod generation;
mod json;
pub mod protocol;
mod rate_limit;
mod request_log;
mod routes;
mod serve;
mod sse;
mod state;
mod tenant;
mod token_text;
mod tool_calls;

pub use app::app;
pub use error::request_error;
pub use rate_limit::{RateLimit, RateLimiter};
pub use routes::ApiDoc;
pub use serve::{run_server, shutdown_signal, ServeOutcome};
pub use state::{AppState, Lifecycle, Phase, ServerSettings};
