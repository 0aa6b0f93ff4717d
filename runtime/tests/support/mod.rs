//! Shared test support: an independent dense reference Llama and tiny random HF models.
#![allow(dead_code)]

pub mod bos_model;
pub mod fetched;
pub mod log_capture;
pub mod random_model;
pub mod reference_llama;
pub mod server_app;

use caduceus_kernels::attention::SeqAttention;
use caduceus_runtime::kv_cache::KvCache;
use caduceus_runtime::model::{ForwardBatch, LlamaModel, LoraBatch};
use std::path::PathBuf;

// Not every test binary that includes `support` uses both.
#[allow(unused_imports)]
pub use fetched::{default_model, in_ci};

/// `../shared/<rel>` next to the workspace, with a clear panic when the reference material is missing.
pub fn shared(rel: &str) -> PathBuf {
    let p = PathBuf::from(concat!(env!("CARGO_MANIFEST_DIR"), "/../../shared")).join(rel);
    assert!(
        p.exists(),
        "reference material {} is missing: the tests need ../shared/ beside the repo",
        p.display()
    );
    p
}

/// Index of the largest value (the first of equal ones is not guaranteed; logits rarely tie).
pub fn argmax(values: &[f32]) -> usize {
    values
        .iter()
        .enumerate()
        .max_by(|a, b| a.1.total_cmp(b.1))
        .expect("a non-empty row")
        .0
}

/// Logits of `prompt` run alone in one forward pass, one row per entry of `logits_indices`
/// (flattened). Its KV blocks of `block_size` are scattered in reverse order so paging is
/// exercised; `lora`, when given, assigns the prompt's tokens their adapter slots.
pub fn forward_prompt(
    model: &LlamaModel,
    prompt: &[u32],
    block_size: usize,
    logits_indices: &[usize],
    lora: Option<&LoraBatch<'_>>,
) -> Vec<f32> {
    let bs = block_size;
    let blocks = prompt.len().div_ceil(bs);
    let table: Vec<u32> = (0..blocks as u32).rev().collect();
    let mut kv = KvCache::new(model.config().num_layers, model.kv_cache_shape(blocks, bs));
    let positions: Vec<u32> = (0..prompt.len() as u32).collect();
    let slots: Vec<u32> = (0..prompt.len())
        .map(|p| table[p / bs] * bs as u32 + (p % bs) as u32)
        .collect();
    let seqs = [SeqAttention {
        query_start: 0,
        query_len: prompt.len(),
        context_len: prompt.len(),
        block_table: &table,
    }];
    let batch = ForwardBatch {
        token_ids: prompt,
        positions: &positions,
        slot_mapping: &slots,
        seqs: &seqs,
        logits_indices,
    };
    batch.check().unwrap();
    model.forward_with_lora(&batch, &mut kv, lora).unwrap()
}
