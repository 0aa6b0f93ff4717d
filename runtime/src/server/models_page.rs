//! `GET /v1/models` in pages: with thousands of registered adapters one response listing every
//! one would grow without bound, so the list is cut at `limit` entries (default and maximum
//! [`MAX_MODELS_LIMIT`]) and continued with `?after=<last_id>`, as OpenAI's list endpoints
//! paginate. The base model always comes first, then adapters by name.

use axum::extract::rejection::QueryRejection;
use axum::extract::{Query, State};
use axum::Json;
use serde::{Deserialize, Serialize};

use super::protocol::{ApiError, ModelCard, ModelList};
use super::state::AppState;

/// Largest page, and the page size when `limit` is not given.
pub const MAX_MODELS_LIMIT: usize = 1000;

/// The query of `GET /v1/models`.
#[derive(Debug, Default, Deserialize, utoipa::IntoParams)]
pub struct ModelsQuery {
    /// Entries per page, 1 to 1000 (default 1000).
    pub limit: Option<usize>,
    /// Continue after the entry with this id (a previous page's `last_id`).
    pub after: Option<String>,
}

/// One page of `GET /v1/models`: OpenAI's list object plus its pagination fields.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct ModelPage {
    #[serde(flatten)]
    pub list: ModelList,
    /// Whether more entries follow `last_id`.
    pub has_more: bool,
    pub first_id: Option<String>,
    pub last_id: Option<String>,
}

/// Lists the served models (OpenAI's `GET /v1/models`), one page at a time.
#[utoipa::path(get, path = "/v1/models", params(ModelsQuery),
    responses((status = 200, body = ModelPage), (status = 400, body = super::protocol::ErrorResponse)))]
pub async fn list_models(
    State(state): State<AppState>,
    query: Result<Query<ModelsQuery>, QueryRejection>,
) -> Result<Json<ModelPage>, ApiError> {
    let Query(query) = query.map_err(|e| {
        ApiError::invalid_request(
            format!("bad query string: {}", e.body_text()),
            Some("limit"),
        )
    })?;
    let limit = query.limit.unwrap_or(MAX_MODELS_LIMIT);
    if !(1..=MAX_MODELS_LIMIT).contains(&limit) {
        return Err(ApiError::invalid_request(
            format!("limit must be between 1 and {MAX_MODELS_LIMIT}, got {limit}"),
            Some("limit"),
        ));
    }
    let s = &state.settings;
    let max_model_len = state.engine.limits().max_model_len;
    let base_name = s.served_model_name.as_str();
    let mut cards = Vec::new();
    let mut remaining = limit;
    // The base model is the first entry; a cursor naming it continues with the adapters.
    let adapters_after = match query.after.as_deref().filter(|a| !a.is_empty()) {
        None => {
            cards.push(ModelCard::base(
                base_name,
                &s.model_root,
                state.started,
                max_model_len,
            ));
            remaining -= 1;
            None
        }
        Some(after) if after == base_name => None,
        Some(after) => Some(after),
    };
    let mut has_more = false;
    if let Some(a) = &state.adapters {
        let registry = a.registry();
        let (page, more) = registry.page(adapters_after, remaining);
        has_more = more;
        cards.extend(page.iter().map(|e| {
            ModelCard::adapter(
                &e.name,
                base_name,
                &registry.client_path(e),
                e.created,
                max_model_len,
            )
        }));
    }
    Ok(Json(ModelPage {
        first_id: cards.first().map(|c| c.id.clone()),
        last_id: cards.last().map(|c| c.id.clone()),
        list: ModelList::new(cards),
        has_more,
    }))
}
