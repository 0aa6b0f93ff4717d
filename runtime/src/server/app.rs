//! The router: every route, the body limit and authentication (inference, admin and metrics
//! keys). Tests drive `app()`
//! in-process; `serve` binds it to a socket.

use axum::extract::{DefaultBodyLimit, Request};
use axum::middleware::{self, Next};
use axum::response::Response;
use axum::routing::{get, post};
use axum::Router;

use super::auth::{require_admin_key, require_api_key, require_metrics_key};
use super::json::BodyLimit;
use super::protocol::ApiError;
use super::rate_limit::limit_rate;
use super::request_id::client_request_id;
use super::request_log::count_early_responses;
use super::state::AppState;
use super::{adapters, chat, completions, models_page, routes, tokenize};

/// The whole HTTP API over `state`.
pub fn app(state: AppState) -> Router {
    let limit = state.settings.body_limit_bytes;
    let generation = Router::new()
        .route("/v1/chat/completions", post(chat::chat_completions))
        .route("/v1/completions", post(completions::completions))
        // Inside authentication, which tags the request with its key.
        .route_layer(middleware::from_fn_with_state(state.clone(), limit_rate))
        .route_layer(middleware::from_fn_with_state(
            state.clone(),
            require_api_key,
        ))
        // Outside authentication, so a 401 echoes the caller's id too.
        .route_layer(middleware::from_fn(client_request_id))
        // Outermost, so requests refused by authentication are counted too.
        .route_layer(middleware::from_fn(count_early_responses));
    let v1 = Router::new()
        .route("/v1/models", get(models_page::list_models))
        .route("/tokenize", post(tokenize::tokenize))
        .route("/detokenize", post(tokenize::detokenize))
        .route_layer(middleware::from_fn_with_state(
            state.clone(),
            require_api_key,
        ))
        .route_layer(middleware::from_fn(client_request_id));
    let admin = Router::new()
        .route("/v1/load_lora_adapter", post(adapters::load_lora_adapter))
        .route(
            "/v1/unload_lora_adapter",
            post(adapters::unload_lora_adapter),
        )
        .route_layer(middleware::from_fn_with_state(
            state.clone(),
            require_admin_key,
        ));
    let metrics = Router::new()
        .route("/metrics", get(routes::metrics))
        .route_layer(middleware::from_fn_with_state(
            state.clone(),
            require_metrics_key,
        ));
    Router::new()
        .merge(generation)
        .merge(v1)
        .merge(admin)
        .merge(metrics)
        .route("/health", get(routes::health))
        .route("/version", get(routes::version))
        .route("/openapi.json", get(routes::openapi))
        .fallback(not_found)
        .layer(DefaultBodyLimit::max(limit))
        .layer(middleware::from_fn(
            move |mut req: Request, next: Next| async move {
                req.extensions_mut().insert(BodyLimit(limit));
                next.run(req).await
            },
        ))
        .with_state(state)
}

async fn not_found(req: Request) -> Response {
    use axum::response::IntoResponse;
    let mut e = ApiError::invalid_request(
        format!("no route for {} {}", req.method(), req.uri().path()),
        None,
    );
    e.status = 404;
    e.into_response()
}
