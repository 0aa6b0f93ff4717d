//! The paged KV cache pool: one [`LayerKvCache`] per transformer layer, all sharing one block
//! numbering, so a sequence's block table is valid in every layer.

use caduceus_kernels::attention::{KvCacheShape, LayerKvCache};

/// KV blocks for every layer of one model.
pub struct KvCache {
    shape: KvCacheShape,
    layers: Vec<LayerKvCache>,
}

impl KvCache {
    /// Allocates `num_layers` zeroed layer caches of `shape`.
    pub fn new(num_layers: usize, shape: KvCacheShape) -> Self {
        Self {
            shape,
            layers: (0..num_layers).map(|_| LayerKvCache::new(shape)).collect(),
        }
    }

    /// The per-layer shape (blocks, block size, KV heads, head dim).
    pub fn shape(&self) -> KvCacheShape {
        self.shape
    }

    /// Number of blocks in the pool.
    pub fn num_blocks(&self) -> usize {
        self.shape.num_blocks
    }

    /// Tokens per block.
    pub fn block_size(&self) -> usize {
        self.shape.block_size
    }

    /// Mutable access to each layer's cache, in layer order.
    pub fn layers_mut(&mut self) -> impl Iterator<Item = &mut LayerKvCache> {
        self.layers.iter_mut()
    }

    /// Bytes of K and V storage per block over all layers.
    pub fn bytes_per_block(&self) -> usize {
        2 * self.layers.len()
            * self.shape.block_size
            * self.shape.num_kv_heads
            * self.shape.head_dim
            * 4
    }
}
