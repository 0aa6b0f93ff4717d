//! The pool of KV blocks: reference counts, the null block, the LRU free list and the
//! hash -> block map of the prefix cache.
//!
//! A block whose last holder lets go keeps its hash and tokens while it waits in the free list,
//! so a later request with the same prefix can take it back (a "hit on a free cached block",
//! which unlinks it from the free list in O(1)). Only when the block is handed out again is its
//! hash evicted. Every hit is confirmed against the stored tokens, parent hash and extra keys, so
//! a hash collision degrades to a miss, never to wrong KV.

use crate::block_hash::{BlockHash, ExtraKeys};
use crate::free_queue::FreeBlockQueue;
use crate::fx::FxHashMap;
use crate::ids::BlockId;
use crate::kv_events::{KvCacheEvent, KvEventLog};

/// The full identity of a cached block's content: what a hit must match.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct BlockKey<'a> {
    pub hash: BlockHash,
    pub parent: Option<BlockHash>,
    pub tokens: &'a [u32],
    pub extra: ExtraKeys,
}

#[derive(Clone, Copy, Debug)]
struct CachedMeta {
    hash: BlockHash,
    parent: Option<BlockHash>,
    extra: ExtraKeys,
}

#[derive(Clone, Debug, Default)]
struct BlockMeta {
    ref_cnt: u32,
    cached: Option<CachedMeta>,
    /// The block's tokens while it is cached (capacity reused across cachings).
    tokens: Vec<u32>,
}

#[derive(Clone, Debug)]
pub struct BlockPool {
    blocks: Vec<BlockMeta>,
    free: FreeBlockQueue,
    cached: FxHashMap<BlockHash, BlockId>,
    enable_caching: bool,
    events: KvEventLog,
}

impl BlockPool {
    /// `num_blocks` includes the null block 0, which is never allocated.
    pub fn new(num_blocks: usize, enable_caching: bool) -> Self {
        let mut free = FreeBlockQueue::new(num_blocks);
        for b in 1..num_blocks {
            free.push_back(BlockId(b as u32));
        }
        BlockPool {
            blocks: vec![BlockMeta::default(); num_blocks],
            free,
            cached: FxHashMap::default(),
            enable_caching,
            events: KvEventLog::default(),
        }
    }

    pub fn num_blocks(&self) -> usize {
        self.blocks.len()
    }

    /// Blocks a request can ever hold (all but the null block).
    pub fn num_usable_blocks(&self) -> usize {
        self.blocks.len().saturating_sub(1)
    }

    /// Free blocks, cached-but-free ones included (they are evictable).
    pub fn num_free_blocks(&self) -> usize {
        self.free.len()
    }

    /// Fraction of usable blocks held by requests, in `0..=1`.
    pub fn usage(&self) -> f32 {
        let usable = self.num_usable_blocks();
        if usable == 0 {
            return 0.0;
        }
        (usable - self.num_free_blocks()) as f32 / usable as f32
    }

    pub fn enable_caching(&self) -> bool {
        self.enable_caching
    }

    /// How many requests hold `block` (0 for free blocks and the null block).
    pub fn ref_cnt(&self, block: BlockId) -> u32 {
        self.blocks.get(block.index()).map_or(0, |m| m.ref_cnt)
    }

    /// Blocks in eviction order (head of the free list first).
    pub fn free_blocks_in_eviction_order(&self) -> impl Iterator<Item = BlockId> + '_ {
        self.free.iter()
    }

    /// The content key of `block` if it is in the prefix cache.
    pub fn cached_key(&self, block: BlockId) -> Option<BlockKey<'_>> {
        let meta = self.blocks.get(block.index())?;
        let cached = meta.cached?;
        Some(BlockKey {
            hash: cached.hash,
            parent: cached.parent,
            tokens: &meta.tokens,
            extra: cached.extra,
        })
    }

    /// Looks `key` up; a block is returned only if its stored content equals `key` exactly.
    pub fn get_cached_block(&self, key: &BlockKey<'_>) -> Option<BlockId> {
        let &block = self.cached.get(&key.hash)?;
        (self.cached_key(block).as_ref() == Some(key)).then_some(block)
    }

    /// Takes one more reference on each block; a free (cached) block leaves the free list.
    pub fn touch(&mut self, blocks: &[BlockId]) {
        for &block in blocks {
            if block == BlockId::NULL || block.index() >= self.blocks.len() {
                debug_assert!(false, "touch of invalid block {block:?}");
                continue;
            }
            let meta = &mut self.blocks[block.index()];
            if meta.ref_cnt == 0 {
                self.free.remove(block);
            }
            meta.ref_cnt += 1;
        }
    }

    /// Appends `n` blocks from the head of the free list to `out` with one reference each,
    /// evicting their cached hashes. Takes nothing and returns false if fewer than `n` are free.
    pub fn try_allocate(&mut self, n: usize, out: &mut Vec<BlockId>) -> bool {
        if n > self.free.len() {
            return false;
        }
        for _ in 0..n {
            let Some(block) = self.free.pop_front() else {
                return false; // unreachable: length checked above
            };
            self.evict(block);
            self.blocks[block.index()].ref_cnt = 1;
            out.push(block);
        }
        true
    }

    /// Drops one reference per block, in the given order; blocks reaching zero join the tail of
    /// the free list (callers pass a request's blocks tail-first so its last blocks go first).
    pub fn free_blocks(&mut self, blocks: impl IntoIterator<Item = BlockId>) {
        for block in blocks {
            let Some(meta) = self.blocks.get_mut(block.index()) else {
                debug_assert!(false, "free of unknown block {block:?}");
                continue;
            };
            if block == BlockId::NULL || meta.ref_cnt == 0 {
                debug_assert!(false, "free of unheld block {block:?}");
                continue;
            }
            meta.ref_cnt -= 1;
            if meta.ref_cnt == 0 {
                self.free.push_back(block);
            }
        }
    }

    /// Registers a held, full, computed block under `key`. Returns false (and caches nothing)
    /// when caching is off, the block is already cached, or another block already holds the key
    /// (two requests computed the same content; the first one stays the cached copy).
    pub fn cache_block(&mut self, block: BlockId, key: &BlockKey<'_>) -> bool {
        if !self.enable_caching || block == BlockId::NULL || self.cached.contains_key(&key.hash) {
            return false;
        }
        let Some(meta) = self.blocks.get_mut(block.index()) else {
            return false;
        };
        if meta.ref_cnt == 0 || meta.cached.is_some() {
            return false;
        }
        meta.cached = Some(CachedMeta {
            hash: key.hash,
            parent: key.parent,
            extra: key.extra,
        });
        meta.tokens.clear();
        meta.tokens.extend_from_slice(key.tokens);
        self.cached.insert(key.hash, block);
        if key.extra.cache_salt.is_none() {
            self.events
                .stored(key.hash, key.parent, key.tokens, key.extra.adapter);
        }
        true
    }

    /// Records [`KvCacheEvent`]s from now on (off by default: nobody drains them).
    pub fn set_events_enabled(&mut self, enabled: bool) {
        self.events.set_enabled(enabled);
    }

    /// The cache changes since the last call, oldest first.
    pub fn take_events(&mut self) -> Vec<KvCacheEvent> {
        self.events.take()
    }

    /// Forgets every cached block (after new weights, or on an operator's request). Only when
    /// no request holds a block, as vLLM's reset does: a held block's hash must stay valid for
    /// its holder's later blocks. Returns whether the cache was cleared.
    pub fn reset_prefix_cache(&mut self) -> bool {
        if self.num_free_blocks() != self.num_usable_blocks() {
            return false;
        }
        for meta in &mut self.blocks {
            meta.cached = None;
            meta.tokens.clear();
        }
        self.cached.clear();
        self.events.cleared();
        true
    }

    fn evict(&mut self, block: BlockId) {
        let meta = &mut self.blocks[block.index()];
        if let Some(cached) = meta.cached.take() {
            meta.tokens.clear();
            if self.cached.get(&cached.hash) == Some(&block) {
                self.cached.remove(&cached.hash);
                if cached.extra.cache_salt.is_none() {
                    self.events.removed(cached.hash);
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::block_hash::hash_block_tokens;

    fn key(tokens: &[u32]) -> BlockKey<'_> {
        BlockKey {
            hash: hash_block_tokens(0, None, tokens, &ExtraKeys::default()),
            parent: None,
            tokens,
            extra: ExtraKeys::default(),
        }
    }

    fn alloc(pool: &mut BlockPool, n: usize) -> Vec<BlockId> {
        let mut out = Vec::new();
        assert!(pool.try_allocate(n, &mut out));
        out
    }

    #[test]
    fn null_block_is_never_handed_out_and_counts_follow_holders() {
        let mut pool = BlockPool::new(5, true);
        assert_eq!((pool.num_usable_blocks(), pool.num_free_blocks()), (4, 4));
        let blocks = alloc(&mut pool, 4);
        assert_eq!(blocks, [BlockId(1), BlockId(2), BlockId(3), BlockId(4)]);
        assert_eq!(pool.usage(), 1.0);
        let mut out = Vec::new();
        assert!(!pool.try_allocate(1, &mut out), "pool is exhausted");
        assert!(out.is_empty(), "a failed allocation takes nothing");
        pool.touch(&blocks[..2]);
        assert_eq!(pool.ref_cnt(BlockId(1)), 2);
        pool.free_blocks(blocks.iter().rev().copied());
        assert_eq!(pool.num_free_blocks(), 2);
        assert_eq!(pool.ref_cnt(BlockId(1)), 1);
        // Freed tail-first, so block 4 is evicted first.
        let order: Vec<_> = pool.free_blocks_in_eviction_order().collect();
        assert_eq!(order, [BlockId(4), BlockId(3)]);
        pool.free_blocks([BlockId(2), BlockId(1)]);
        assert_eq!(pool.num_free_blocks(), 4);
        assert_eq!(pool.usage(), 0.0);
    }

    #[test]
    fn free_cached_block_stays_findable_until_reallocated() {
        let mut pool = BlockPool::new(4, true);
        let blocks = alloc(&mut pool, 3);
        let k = key(&[1, 2]);
        assert!(pool.cache_block(blocks[1], &k));
        assert!(!pool.cache_block(blocks[2], &k), "one cached copy per key");
        pool.free_blocks(blocks.iter().rev().copied());
        assert_eq!(pool.get_cached_block(&k), Some(blocks[1]));
        // A hit on the free cached block takes it out of the free list (from the middle).
        pool.touch(&[blocks[1]]);
        assert_eq!(pool.ref_cnt(blocks[1]), 1);
        let order: Vec<_> = pool.free_blocks_in_eviction_order().collect();
        assert_eq!(order, [blocks[2], blocks[0]]);
        pool.free_blocks([blocks[1]]);
        // Reallocating every block evicts the hash.
        let again = alloc(&mut pool, 3);
        assert_eq!(again, [blocks[2], blocks[0], blocks[1]]);
        assert_eq!(pool.get_cached_block(&k), None);
        assert!(pool.cached_key(blocks[1]).is_none());
    }

    #[test]
    fn hit_requires_identical_content_not_just_hash() {
        let mut pool = BlockPool::new(3, true);
        let blocks = alloc(&mut pool, 1);
        let stored = key(&[1, 2]);
        assert!(pool.cache_block(blocks[0], &stored));
        // Same hash, different tokens: a forged collision must miss.
        let collision = BlockKey {
            tokens: &[1, 3],
            ..stored
        };
        assert_eq!(pool.get_cached_block(&collision), None);
        let other_parent = BlockKey {
            parent: Some(BlockHash(1)),
            ..stored
        };
        assert_eq!(pool.get_cached_block(&other_parent), None);
        let other_salt = BlockKey {
            extra: ExtraKeys {
                adapter: None,
                cache_salt: Some(1),
            },
            ..stored
        };
        assert_eq!(pool.get_cached_block(&other_salt), None);
        assert_eq!(pool.get_cached_block(&stored), Some(blocks[0]));
    }

    #[test]
    fn caching_disabled_caches_nothing() {
        let mut pool = BlockPool::new(3, false);
        let blocks = alloc(&mut pool, 1);
        assert!(!pool.cache_block(blocks[0], &key(&[1])));
        assert_eq!(pool.get_cached_block(&key(&[1])), None);
    }
}
