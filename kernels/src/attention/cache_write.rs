//! Storing this step's keys and values into their cache slots.

use super::{LayerKvCache, PAD_SLOT};

/// Writes `k`/`v` rows (`[num_tokens, num_kv_heads * head_dim]` each) into the slots given by
/// `slot_mapping` (one per token). Tokens mapped to [`PAD_SLOT`] are skipped, so padded batches
/// need no special casing by the caller.
///
/// Panics on shape mismatches or a slot outside the cache.
pub fn write_kv(cache: &mut LayerKvCache, k: &[f32], v: &[f32], slot_mapping: &[u32]) {
    let row = cache.shape.row_len();
    let num_slots = cache.shape.num_slots();
    assert!(row > 0, "cache rows must be non-empty");
    assert_eq!(
        k.len(),
        slot_mapping.len() * row,
        "k must be [num_tokens, num_kv_heads * head_dim] with one slot per token"
    );
    assert_eq!(v.len(), k.len(), "v must have the same shape as k");
    for ((&slot, k_row), v_row) in slot_mapping
        .iter()
        .zip(k.chunks_exact(row))
        .zip(v.chunks_exact(row))
    {
        if slot == PAD_SLOT {
            continue;
        }
        let slot = slot as usize;
        assert!(
            slot < num_slots,
            "slot {slot} out of range ({num_slots} slots)"
        );
        let dst = slot * row..(slot + 1) * row;
        cache.k[dst.clone()].copy_from_slice(k_row);
        cache.v[dst].copy_from_slice(v_row);
    }
}
