//! The OpenAI-compatible HTTP server: `app()` builds the router over an [`AppState`] (tests drive
//! it in-process), `run_server` serves it with draining on shutdown.

mod adapters;
mod admin_loads;
mod app;
mod auth;
mod chat;
mod completions;
mod error;
mod generation;
mod json;
mod models_page;
pub mod protocol;
mod rate_limit;
mod request_id;
mod request_log;
mod routes;
mod serve;
mod sse;
mod state;
mod tenant;
mod token_text;
mod tokenize;
mod tool_calls;

pub use admin_loads::{AdapterLoadLimit, LoadPermit};
pub use app::app;
pub use error::request_error;
pub use models_page::{ModelPage, MAX_MODELS_LIMIT};
pub use rate_limit::{RateLimit, RateLimiter};
pub use routes::ApiDoc;
pub use serve::{run_server, shutdown_signal, ServeOutcome};
pub use state::{AppState, Lifecycle, Phase, ServerSettings};
