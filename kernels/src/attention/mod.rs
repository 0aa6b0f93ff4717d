//! Paged KV cache and attention over it (vLLM-style).
//!
//! The KV cache of a layer is a pool of fixed-size blocks; each sequence owns a list of blocks
//! (its block table), so memory is allocated per block instead of per maximum sequence length.
//! [`write_kv`] stores this step's keys/values into their slots, and [`paged_attention`] attends
//! a flattened batch of query tokens (mixed prefill chunks and decodes) over those blocks.

mod cache_write;
mod paged;
mod reference;

pub use cache_write::write_kv;
pub use paged::paged_attention;
pub use reference::paged_attention_reference;

/// Dimensions of one layer's paged KV cache.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct KvCacheShape {
    pub num_blocks: usize,
    pub block_size: usize,
    pub num_kv_heads: usize,
    pub head_dim: usize,
}

impl KvCacheShape {
    /// Number of f32 elements in each of the K and V arrays.
    pub fn elems(&self) -> usize {
        self.num_slots() * self.row_len()
    }

    /// Number of token slots (`num_blocks * block_size`).
    pub fn num_slots(&self) -> usize {
        self.num_blocks * self.block_size
    }

    /// Elements per slot: all KV heads of one token.
    pub(crate) fn row_len(&self) -> usize {
        self.num_kv_heads * self.head_dim
    }
}

/// One layer's paged KV cache: `k` and `v` each laid out
/// `[num_blocks, block_size, num_kv_heads, head_dim]` f32.
pub struct LayerKvCache {
    pub shape: KvCacheShape,
    pub k: Vec<f32>,
    pub v: Vec<f32>,
}

impl LayerKvCache {
    /// Allocates a zero-filled cache.
    pub fn new(shape: KvCacheShape) -> Self {
        let n = shape.elems();
        LayerKvCache {
            shape,
            k: vec![0.0; n],
            v: vec![0.0; n],
        }
    }
}

/// Slot index that means "do not write" (padding tokens in a batch).
///
/// A slot index is `block_id * block_size + offset_in_block`.
pub const PAD_SLOT: u32 = u32::MAX;

/// One sequence of a flattened batch.
///
/// Its query tokens are rows `query_start..query_start + query_len` of `q`/`out`. `context_len`
/// counts the tokens in its KV cache *including* this step's query tokens (already written), so
/// query token `i` sits at absolute position `context_len - query_len + i` and attends causally
/// to positions `0..=that`. `block_table[j]` is the block holding positions
/// `j * block_size..(j + 1) * block_size`.
#[derive(Clone, Copy, Debug)]
pub struct SeqAttention<'a> {
    pub query_start: usize,
    pub query_len: usize,
    pub context_len: usize,
    pub block_table: &'a [u32],
}

/// Head layout and softmax scale of an attention layer.
#[derive(Clone, Copy, Debug)]
pub struct AttentionParams {
    pub num_heads: usize,
    pub num_kv_heads: usize,
    pub head_dim: usize,
    pub scale: f32,
}

impl AttentionParams {
    /// Query heads sharing one KV head (GQA group size).
    pub(crate) fn group_size(&self) -> usize {
        self.num_heads / self.num_kv_heads
    }
}

/// Panics with a clear message if the inputs of an attention call are inconsistent.
///
/// These are programmer errors: the runtime validates request-influenced values (block tables,
/// context lengths) before building the batch.
pub(crate) fn check_attention_shapes(
    q: &[f32],
    cache: &LayerKvCache,
    seqs: &[SeqAttention<'_>],
    params: &AttentionParams,
    out: &[f32],
) {
    let shape = &cache.shape;
    assert!(
        params.num_kv_heads > 0 && params.num_heads.is_multiple_of(params.num_kv_heads),
        "num_heads ({}) must be a positive multiple of num_kv_heads ({})",
        params.num_heads,
        params.num_kv_heads
    );
    assert_eq!(
        params.num_kv_heads, shape.num_kv_heads,
        "num_kv_heads differs from the cache"
    );
    assert_eq!(
        params.head_dim, shape.head_dim,
        "head_dim differs from the cache"
    );
    assert!(shape.block_size > 0, "block_size must be positive");
    assert_eq!(
        cache.k.len(),
        shape.elems(),
        "cache.k length does not match its shape"
    );
    assert_eq!(
        cache.v.len(),
        shape.elems(),
        "cache.v length does not match its shape"
    );
    let q_row = params.num_heads * params.head_dim;
    assert!(q_row > 0, "num_heads * head_dim must be positive");
    assert_eq!(
        q.len() % q_row,
        0,
        "q length is not a multiple of num_heads * head_dim"
    );
    assert_eq!(out.len(), q.len(), "out must have the same shape as q");
    let num_tokens = q.len() / q_row;
    for (i, s) in seqs.iter().enumerate() {
        assert!(
            s.query_start + s.query_len <= num_tokens,
            "sequence {i}: query rows {}..{} exceed the {num_tokens} tokens of q",
            s.query_start,
            s.query_start + s.query_len
        );
        assert!(
            s.query_len <= s.context_len,
            "sequence {i}: query_len {} exceeds context_len {}",
            s.query_len,
            s.context_len
        );
        let blocks_needed = s.context_len.div_ceil(shape.block_size);
        assert!(
            s.block_table.len() >= blocks_needed,
            "sequence {i}: block table has {} blocks, context of {} needs {blocks_needed}",
            s.block_table.len(),
            s.context_len
        );
        for &b in &s.block_table[..blocks_needed] {
            assert!(
                (b as usize) < shape.num_blocks,
                "sequence {i}: block id {b} out of range ({} blocks)",
                shape.num_blocks
            );
        }
    }
    let mut ranges: Vec<(usize, usize)> = seqs
        .iter()
        .map(|s| (s.query_start, s.query_start + s.query_len))
        .filter(|r| r.0 < r.1)
        .collect();
    ranges.sort_unstable();
    for w in ranges.windows(2) {
        assert!(
            w[0].1 <= w[1].0,
            "sequences overlap in query rows: {:?} and {:?}",
            w[0],
            w[1]
        );
    }
}
