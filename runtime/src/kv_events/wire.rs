//! vLLM's KV-event wire format: a msgpack array `[ts, [event, ...], dp_rank]` per message, each
//! event an array whose first element is its tag:
//! `["BlockStored", hashes, parent, token_ids, block_size, lora_id, medium, lora_name]`,
//! `["BlockRemoved", hashes, medium]`, `["AllBlocksCleared"]`.
//!
//! Block hashes go out as the low 64 bits of the engine's 128-bit chain hash: opaque to the
//! reader (llm-d recomputes its own keys from the tokens and the adapter) but the same in a
//! block's `BlockStored` and `BlockRemoved`.

use std::sync::Arc;

use caduceus_scheduler::{BlockHash, KvCacheEvent};
use rmpv::Value;

/// Sequence number of the message that ends a replay (`-1` as a signed 64-bit integer).
pub const REPLAY_END_SEQ: u64 = u64::MAX;

/// One event as published: the scheduler's event with the adapter's name resolved.
#[derive(Clone, Debug, PartialEq)]
pub struct WireEvent {
    pub event: KvCacheEvent,
    /// The registry name of the event's adapter (`BlockStored` only).
    pub lora_name: Option<Arc<str>>,
}

fn hash(h: &BlockHash) -> Value {
    Value::from(h.0 as u64)
}

fn hashes(hs: &[BlockHash]) -> Value {
    Value::Array(hs.iter().map(hash).collect())
}

fn event(e: &WireEvent, medium: &str) -> Value {
    match &e.event {
        KvCacheEvent::BlockStored {
            block_hashes,
            parent_block_hash,
            token_ids,
            block_size,
            adapter,
        } => Value::Array(vec![
            Value::from("BlockStored"),
            hashes(block_hashes),
            parent_block_hash.as_ref().map_or(Value::Nil, hash),
            Value::Array(token_ids.iter().map(|&t| Value::from(t)).collect()),
            Value::from(*block_size as u64),
            adapter.map_or(Value::Nil, |a| Value::from(a.id)),
            Value::from(medium),
            e.lora_name.as_deref().map_or(Value::Nil, Value::from),
        ]),
        KvCacheEvent::BlockRemoved { block_hashes } => Value::Array(vec![
            Value::from("BlockRemoved"),
            hashes(block_hashes),
            Value::from(medium),
        ]),
        KvCacheEvent::AllBlocksCleared => Value::Array(vec![Value::from("AllBlocksCleared")]),
    }
}

/// The msgpack payload of one message: `[ts, [events], dp_rank]`.
pub fn encode_batch(ts: f64, events: &[WireEvent], medium: &str, dp_rank: u32) -> Vec<u8> {
    let value = Value::Array(vec![
        Value::from(ts),
        Value::Array(events.iter().map(|e| event(e, medium)).collect()),
        Value::from(dp_rank),
    ]);
    let mut out = Vec::new();
    // Writing into a Vec cannot fail.
    let _ = rmpv::encode::write_value(&mut out, &value);
    out
}
