//! vLLM's dynamic adapter endpoints: `POST /v1/load_lora_adapter {"lora_name", "lora_path",
//! "load_inplace"?}` and `POST /v1/unload_lora_adapter {"lora_name"}`. Loading validates the
//! adapter fully (off the async workers) before it is registered; unloading lets requests in
//! flight finish on the weights they hold.

use axum::extract::State;
use axum::response::{IntoResponse, Response};
use serde::Deserialize;

use super::json::ApiJson;
use super::protocol::ApiError;
use super::state::AppState;
use crate::adapters::{AdapterService, LoadAdapterError, RegistryError};

/// Body of `POST /v1/load_lora_adapter`.
#[derive(Debug, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct LoadLoraAdapterRequest {
    /// Name requests will use in `model`.
    pub lora_name: String,
    /// Adapter folder, relative to `adapters.dir` (or absolute inside it).
    pub lora_path: String,
    /// Replace an adapter already loaded under this name (a new generation: prefix-cache entries
    /// of the old weights are never reused).
    #[serde(default)]
    pub load_inplace: bool,
}

/// Body of `POST /v1/unload_lora_adapter` (vLLM's optional `lora_int_id` is accepted and
/// ignored).
#[derive(Debug, Deserialize, utoipa::ToSchema)]
pub struct UnloadLoraAdapterRequest {
    /// The adapter to remove.
    pub lora_name: String,
}

fn service(state: &AppState) -> Result<&std::sync::Arc<AdapterService>, ApiError> {
    state.adapters.as_ref().ok_or_else(|| {
        ApiError::invalid_request(
            "this server serves no adapters: start it with `adapters.dir` (or --adapter-dir) set",
            None,
        )
    })
}

/// Loads (or with `load_inplace`, reloads) an adapter.
#[utoipa::path(post, path = "/v1/load_lora_adapter", request_body = LoadLoraAdapterRequest,
    responses((status = 200, description = "loaded"), (status = 400, body = super::protocol::ErrorResponse)))]
pub async fn load_lora_adapter(
    State(state): State<AppState>,
    ApiJson(req): ApiJson<LoadLoraAdapterRequest>,
) -> Result<Response, ApiError> {
    let service = service(&state)?.clone();
    if req.lora_name == state.settings.served_model_name {
        return Err(ApiError::invalid_request(
            format!("`{}` is the base model's name", req.lora_name),
            Some("lora_name"),
        ));
    }
    let name = req.lora_name.clone();
    // Held until the load finishes; a client that leaves while waiting gives its turn back.
    let _turn = state.adapter_loads.enter().await?;
    let loaded = tokio::task::spawn_blocking(move || {
        service.load_and_register(&req.lora_name, &req.lora_path, req.load_inplace)
    })
    .await
    .map_err(|_| ApiError::internal())?;
    match loaded {
        Ok(adapter) => {
            tracing::info!(
                adapter = %name,
                generation = format_args!("{:016x}", adapter.key.generation),
                rank = adapter.rank,
                "adapter loaded through the API"
            );
            Ok(format!("Success: LoRA adapter '{name}' added successfully.").into_response())
        }
        Err(e) => {
            let param = match &e {
                LoadAdapterError::Registry(
                    RegistryError::BadName(_) | RegistryError::AlreadyLoaded(_),
                ) => "lora_name",
                _ => "lora_path",
            };
            let message = state
                .adapters
                .as_ref()
                .map_or_else(|| e.to_string(), |a| a.registry().redact(&e.to_string()));
            Err(ApiError::invalid_request(message, Some(param)))
        }
    }
}

/// Unloads an adapter: new requests naming it get 404, those in flight finish.
#[utoipa::path(post, path = "/v1/unload_lora_adapter", request_body = UnloadLoraAdapterRequest,
    responses((status = 200, description = "unloaded"), (status = 404, body = super::protocol::ErrorResponse)))]
pub async fn unload_lora_adapter(
    State(state): State<AppState>,
    ApiJson(req): ApiJson<UnloadLoraAdapterRequest>,
) -> Result<Response, ApiError> {
    let service = service(&state)?;
    match service.unload(&req.lora_name) {
        Ok(_) => {
            tracing::info!(adapter = %req.lora_name, "adapter unloaded through the API");
            Ok(format!(
                "Success: LoRA adapter '{}' removed successfully.",
                req.lora_name
            )
            .into_response())
        }
        Err(e) => {
            let mut err = ApiError::invalid_request(e.to_string(), Some("lora_name"));
            err.status = 404;
            Err(err)
        }
    }
}
