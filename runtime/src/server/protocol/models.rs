//! `GET /v1/models`: the base model and any LoRA adapters served on it.

use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

/// The response of `GET /v1/models`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct ModelList {
    /// Always `"list"`.
    pub object: String,
    pub data: Vec<ModelCard>,
}

impl ModelList {
    pub fn new(data: Vec<ModelCard>) -> ModelList {
        ModelList {
            object: "list".into(),
            data,
        }
    }
}

/// One servable model. `root` is where it was loaded from; `parent` names the base model of an
/// adapter (vLLM's convention), so clients can tell adapters from the base.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct ModelCard {
    pub id: String,
    /// Always `"model"`.
    pub object: String,
    pub created: u64,
    pub owned_by: String,
    pub root: Option<String>,
    pub parent: Option<String>,
    pub max_model_len: Option<usize>,
}

/// `owned_by` of every card.
pub const OWNED_BY: &str = "caduceus";

impl ModelCard {
    /// The base model.
    pub fn base(id: &str, root: &str, created: u64, max_model_len: usize) -> ModelCard {
        ModelCard {
            id: id.into(),
            object: "model".into(),
            created,
            owned_by: OWNED_BY.into(),
            root: Some(root.into()),
            parent: None,
            max_model_len: Some(max_model_len),
        }
    }

    /// An adapter served on top of `parent`.
    pub fn adapter(
        id: &str,
        parent: &str,
        root: &str,
        created: u64,
        max_model_len: usize,
    ) -> ModelCard {
        ModelCard {
            parent: Some(parent.into()),
            ..ModelCard::base(id, root, created, max_model_len)
        }
    }
}
