//! The small routes (`/v1/models`, `/health`, `/version`, `/metrics`, `/openapi.json`) and the
//! admission checks every generation request passes first.

use axum::extract::State;
use axum::http::{header, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::Json;
use utoipa::OpenApi;

use super::protocol::ApiError;
use super::state::{AppState, InFlight, Phase};

/// Refuses new work while draining or after an engine failure (503); counts the request in.
pub fn admit(state: &AppState) -> Result<InFlight, ApiError> {
    match state.lifecycle.phase() {
        Phase::Ready if state.engine.is_alive() => Ok(state.lifecycle.enter()),
        Phase::Ready | Phase::Failed => Err(ApiError::unavailable(
            "the inference engine is not running; retry on another replica",
        )),
        Phase::Draining => Err(ApiError::unavailable(
            "the server is shutting down; retry on another replica",
        )),
    }
}

/// The served name of the model a request asked for, or 404 when it names an unknown model.
pub fn check_model(state: &AppState, model: Option<&str>) -> Result<String, ApiError> {
    let served = &state.settings.served_model_name;
    match model {
        None => Ok(served.clone()),
        Some(m) if m == served => Ok(served.clone()),
        Some(m) => match &state.adapters {
            Some(a) if a.registry().get(m).is_some() => Ok(m.to_owned()),
            _ => Err(ApiError::model_not_found(m)),
        },
    }
}

/// 200 while the engine is alive, making progress and the server accepts work; 503 while
/// draining, after an engine failure, or while the engine has work but finished no step within
/// `server.engine_stall_timeout` (so load balancers and Kubernetes stop routing here; it
/// recovers when steps resume).
pub async fn health(State(state): State<AppState>) -> Response {
    let unavailable = StatusCode::SERVICE_UNAVAILABLE;
    let (code, status, reason) = match state.lifecycle.phase() {
        Phase::Ready if state.engine.is_alive() => {
            match state.engine.stall(state.settings.engine_stall_timeout) {
                None => (StatusCode::OK, "ok", None),
                Some(stall) => (unavailable, "engine_stalled", Some(stall.to_string())),
            }
        }
        Phase::Ready | Phase::Failed => (unavailable, "engine_failed", None),
        Phase::Draining => (unavailable, "draining", None),
    };
    let body = match reason {
        None => serde_json::json!({ "status": status }),
        Some(reason) => serde_json::json!({ "status": status, "reason": reason }),
    };
    (code, Json(body)).into_response()
}

/// Build and model identification.
pub async fn version(State(state): State<AppState>) -> Json<serde_json::Value> {
    Json(serde_json::json!({
        "name": "caduceus",
        "version": env!("CARGO_PKG_VERSION"),
        "model": state.settings.served_model_name,
    }))
}

/// Prometheus text exposition.
pub async fn metrics(State(state): State<AppState>) -> Response {
    match &state.metrics {
        Some(handle) => (
            [(header::CONTENT_TYPE, "text/plain; version=0.0.4")],
            crate::metrics::render(handle),
        )
            .into_response(),
        None => ApiError::unavailable("metrics are not available in this process").into_response(),
    }
}

/// The OpenAPI document of the HTTP API.
#[derive(OpenApi)]
#[openapi(
    info(
        title = "Caduceus",
        description = "OpenAI-compatible LLM serving with per-request LoRA adapters."
    ),
    paths(
        super::chat::chat_completions,
        super::completions::completions,
        super::models_page::list_models,
        super::tokenize::tokenize,
        super::tokenize::detokenize,
        super::adapters::load_lora_adapter,
        super::adapters::unload_lora_adapter
    )
)]
pub struct ApiDoc;

/// Serves the OpenAPI document.
pub async fn openapi() -> Json<utoipa::openapi::OpenApi> {
    Json(ApiDoc::openapi())
}
