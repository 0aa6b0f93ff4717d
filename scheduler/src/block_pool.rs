//! The pool of KV blocks: reference counts, the null block, the segmented-LRU free list and
//! the hash -> block map of the prefix cache.
//!
//! A block whose last holder lets go keeps its hash and tokens while it waits in the free list,
//! so a later request with the same prefix can take it back (a "hit on a free cached block",
//! which unlinks it from the free list in O(1)). Only when the block is handed out again is its
//! hash evicted. Every hit is confirmed against the stored tokens, parent hash and extra keys, so
//! a hash collision degrades to a miss, never to wrong KV.
//!
//! Eviction is segmented LRU: a freed block whose cached content was reused by a later request
//! since it was allocated (a prefix hit) waits in the protected segment, any other in probation,
//! and probation is evicted first. So a flood of one-off prompt tails cannot push out a prefix
//! that many requests share, such as a doctor's system prompt, which plain LRU evicts as soon as
//! it has gone unused for one pool's worth of traffic. Protected holds at most half the pool:
//! past that its least recently freed block moves to the probation tail, so prefixes nobody asks
//! for any more still age out. The scheduler can also keep an allocation from evicting
//! protected blocks at all ([`Evict::SpareReused`]), and counts them per adapter.

use crate::block_hash::{BlockHash, ExtraKeys};
use crate::free_queue::{Segment, SegmentedFreeList};
use crate::fx::FxHashMap;
use crate::ids::BlockId;
use crate::kv_events::{KvCacheEvent, KvEventLog};

/// Reused (prefix-hit) free blocks may fill at most 1/`PROTECTED_DIVISOR` of the pool before the
/// oldest of them become ordinary LRU victims again.
const PROTECTED_DIVISOR: usize = 2;

/// Which free blocks an allocation may evict.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Evict {
    /// Any free block, probation first.
    Any,
    /// Only probation blocks: reused prefixes stay cached (the scheduler's rule for a request
    /// over its adapter's fair share).
    SpareReused,
}

/// Whose cached blocks a prefix hit takes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Hit {
    /// A request reusing what others computed: the blocks count as reused (protected once free).
    Reuse,
    /// A preempted request taking back its own blocks: not a reuse, so a flood's preempted
    /// requests cannot fill the protected segment with their one-off prompts.
    Resume,
}

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
    /// A prefix-cache hit took this block since it was last allocated: when freed it joins the
    /// protected segment of the free list.
    reused: bool,
}

#[derive(Clone, Debug)]
pub struct BlockPool {
    blocks: Vec<BlockMeta>,
    free: SegmentedFreeList,
    cached: FxHashMap<BlockHash, BlockId>,
    enable_caching: bool,
    events: KvEventLog,
    protected_cap: usize,
    /// Free protected blocks per adapter id of their cache key (`None`: the base model).
    protected_by_adapter: FxHashMap<Option<u32>, usize>,
}

impl BlockPool {
    /// `num_blocks` includes the null block 0, which is never allocated.
    pub fn new(num_blocks: usize, enable_caching: bool) -> Self {
        let mut free = SegmentedFreeList::new(num_blocks);
        for b in 1..num_blocks {
            free.push_back(BlockId(b as u32), Segment::Probation);
        }
        BlockPool {
            blocks: vec![BlockMeta::default(); num_blocks],
            free,
            cached: FxHashMap::default(),
            enable_caching,
            events: KvEventLog::default(),
            protected_cap: num_blocks.saturating_sub(1) / PROTECTED_DIVISOR,
            protected_by_adapter: FxHashMap::default(),
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

    /// Free blocks an allocation under `evict` may take.
    pub fn num_evictable(&self, evict: Evict) -> usize {
        match evict {
            Evict::Any => self.free.len(),
            Evict::SpareReused => self.free.len_of(Segment::Probation),
        }
    }

    /// Whether taking free `block` (a prefix hit) uses up a block an allocation under `evict`
    /// could have taken.
    pub fn is_evictable(&self, block: BlockId, evict: Evict) -> bool {
        match (self.free.segment_of(block), evict) {
            (None, _) => false,
            (Some(_), Evict::Any) => true,
            (Some(segment), Evict::SpareReused) => segment == Segment::Probation,
        }
    }

    /// Free protected (reused) blocks per adapter id of their cache key, `None` for the base.
    pub fn protected_free_blocks(&self) -> impl Iterator<Item = (Option<u32>, usize)> + '_ {
        self.protected_by_adapter.iter().map(|(&a, &n)| (a, n))
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

    /// Takes one more reference on each block (a prefix-cache hit); a free (cached) block leaves
    /// the free list, and under [`Hit::Reuse`] a cached block is marked reused.
    pub fn touch(&mut self, blocks: &[BlockId], hit: Hit) {
        for &block in blocks {
            if block == BlockId::NULL || block.index() >= self.blocks.len() {
                debug_assert!(false, "touch of invalid block {block:?}");
                continue;
            }
            if self.blocks[block.index()].ref_cnt == 0
                && self.free.remove(block) == Some(Segment::Protected)
            {
                self.count_protected(block, false);
            }
            let meta = &mut self.blocks[block.index()];
            meta.reused |= hit == Hit::Reuse && meta.cached.is_some();
            meta.ref_cnt += 1;
        }
    }

    /// Appends `n` blocks from the head of the free list to `out` with one reference each,
    /// evicting their cached hashes. Takes nothing and returns false if fewer than `n` may be
    /// evicted under `evict`.
    pub fn try_allocate(&mut self, n: usize, out: &mut Vec<BlockId>, evict: Evict) -> bool {
        if n > self.num_evictable(evict) {
            return false;
        }
        for _ in 0..n {
            // Probation is popped first, so under `SpareReused` this never reaches protected.
            let Some((block, segment)) = self.free.pop_front() else {
                return false; // unreachable: length checked above
            };
            if segment == Segment::Protected {
                self.count_protected(block, false);
            }
            self.evict(block);
            let meta = &mut self.blocks[block.index()];
            meta.ref_cnt = 1;
            meta.reused = false;
            out.push(block);
        }
        true
    }

    /// Drops one reference per block, in the given order; blocks reaching zero join the tail of
    /// their free-list segment (callers pass a request's blocks tail-first so its last blocks go
    /// first).
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
            if meta.ref_cnt > 0 {
                continue;
            }
            if meta.reused && meta.cached.is_some() {
                self.free.push_back(block, Segment::Protected);
                self.count_protected(block, true);
                while self.free.len_of(Segment::Protected) > self.protected_cap {
                    let Some(oldest) = self.free.demote_oldest() else {
                        break;
                    };
                    self.count_protected(oldest, false);
                }
            } else {
                self.free.push_back(block, Segment::Probation);
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
            meta.reused = false;
        }
        let order: Vec<BlockId> = self.free.iter().collect();
        for block in order {
            self.free.remove(block);
            self.free.push_back(block, Segment::Probation);
        }
        self.protected_by_adapter.clear();
        self.cached.clear();
        self.events.cleared();
        true
    }

    /// Counts protected free `block` in (`joined`) or out of its adapter's tally.
    fn count_protected(&mut self, block: BlockId, joined: bool) {
        let Some(cached) = self.blocks.get(block.index()).and_then(|m| m.cached) else {
            debug_assert!(false, "protected block {block:?} is not cached");
            return;
        };
        let adapter = cached.extra.adapter.map(|a| a.id);
        if joined {
            *self.protected_by_adapter.entry(adapter).or_default() += 1;
        } else if let Some(n) = self.protected_by_adapter.get_mut(&adapter) {
            *n -= 1;
            if *n == 0 {
                self.protected_by_adapter.remove(&adapter);
            }
        }
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
        assert!(pool.try_allocate(n, &mut out, Evict::Any));
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
        assert!(
            !pool.try_allocate(1, &mut out, Evict::Any),
            "pool is exhausted"
        );
        assert!(out.is_empty(), "a failed allocation takes nothing");
        pool.touch(&blocks[..2], Hit::Reuse);
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
        pool.touch(&[blocks[1]], Hit::Reuse);
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

    /// A prefix that was hit once outlives a stream of one-off blocks that plain LRU would have
    /// evicted it for; a prefix never hit ages out as before.
    #[test]
    fn a_reused_prefix_outlives_a_stream_of_one_off_blocks() {
        let mut pool = BlockPool::new(9, true); // 8 usable, at most 4 protected
        let (hot, cold) = (key(&[1]), key(&[2]));
        let blocks = alloc(&mut pool, 2);
        assert!(pool.cache_block(blocks[0], &hot));
        assert!(pool.cache_block(blocks[1], &cold));
        pool.touch(&blocks[..1], Hit::Reuse); // a second request hits the hot prefix
        pool.free_blocks([blocks[0], blocks[1], blocks[0]]);
        // One-off requests take and return blocks many times the pool's size.
        for i in 0..40u32 {
            let held = alloc(&mut pool, 3);
            assert!(
                !held.contains(&blocks[0]),
                "round {i} evicted the hot prefix"
            );
            pool.free_blocks(held.iter().rev().copied());
        }
        assert_eq!(pool.get_cached_block(&hot), Some(blocks[0]));
        assert_eq!(
            pool.get_cached_block(&cold),
            None,
            "LRU evicts the unused one"
        );
        // Only when every other block is needed does the hot prefix go too.
        let all = alloc(&mut pool, 8);
        assert_eq!(all.last(), Some(&blocks[0]));
        assert_eq!(pool.get_cached_block(&hot), None);
        pool.free_blocks(all.iter().rev().copied());
        // Reallocation cleared the mark: freed again, it is an ordinary block.
        assert_eq!(pool.free_blocks_in_eviction_order().last(), Some(all[0]));
    }

    #[test]
    fn reset_forgets_which_blocks_were_reused() {
        let mut pool = BlockPool::new(4, true);
        let blocks = alloc(&mut pool, 3);
        assert!(pool.cache_block(blocks[0], &key(&[1])));
        pool.touch(&blocks[..1], Hit::Reuse);
        pool.free_blocks([blocks[0], blocks[0], blocks[2], blocks[1]]);
        let before: Vec<_> = pool.free_blocks_in_eviction_order().collect();
        assert_eq!(before, [blocks[2], blocks[1], blocks[0]]);
        assert!(pool.reset_prefix_cache());
        assert_eq!(pool.get_cached_block(&key(&[1])), None);
        // Still in the same order, all ordinary: a newly freed block goes behind them.
        let mut one = Vec::new();
        assert!(pool.try_allocate(1, &mut one, Evict::Any));
        assert_eq!(one, [blocks[2]]);
        pool.free_blocks(one.iter().copied());
        let after: Vec<_> = pool.free_blocks_in_eviction_order().collect();
        assert_eq!(after, [blocks[1], blocks[0], blocks[2]]);
    }

    /// Protected blocks are counted per adapter as they come and go, `SpareReused` never takes
    /// them, and past the cap the oldest is demoted to an ordinary block.
    #[test]
    fn protected_blocks_are_counted_per_adapter_and_spared_on_request() {
        use crate::ids::AdapterKey;
        let keyed = |tokens: &'static [u32], adapter: Option<u32>| BlockKey {
            extra: ExtraKeys {
                adapter: adapter.map(|id| AdapterKey { id, generation: 0 }),
                cache_salt: None,
            },
            hash: hash_block_tokens(u64::from(tokens[0]), None, tokens, &ExtraKeys::default()),
            ..key(tokens)
        };
        let counts = |pool: &BlockPool| {
            let mut v: Vec<_> = pool.protected_free_blocks().collect();
            v.sort_unstable();
            v
        };
        let mut pool = BlockPool::new(7, true); // 6 usable, at most 3 protected
        let blocks = alloc(&mut pool, 4);
        for (b, k) in blocks.iter().zip([
            keyed(&[1], Some(7)),
            keyed(&[2], Some(7)),
            keyed(&[3], None),
            keyed(&[4], Some(9)),
        ]) {
            assert!(pool.cache_block(*b, &k));
        }
        pool.touch(&blocks, Hit::Reuse);
        pool.free_blocks(blocks.iter().rev().copied()); // still held once
        assert!(counts(&pool).is_empty(), "held blocks are not free");
        pool.free_blocks(blocks.iter().rev().copied());
        // Freed 4, 3, 2, 1 into a cap of 3: the first freed (block 4, adapter 9) is demoted.
        assert_eq!(counts(&pool), [(None, 1), (Some(7), 2)]);
        assert_eq!(pool.num_evictable(Evict::Any), 6);
        assert_eq!(pool.num_evictable(Evict::SpareReused), 3);
        assert!(pool.is_evictable(blocks[3], Evict::SpareReused));
        assert!(!pool.is_evictable(blocks[0], Evict::SpareReused));
        assert!(pool.is_evictable(blocks[0], Evict::Any));
        let mut out = Vec::new();
        assert!(!pool.try_allocate(4, &mut out, Evict::SpareReused));
        assert!(out.is_empty());
        assert!(pool.try_allocate(3, &mut out, Evict::SpareReused));
        assert_eq!(
            out[2], blocks[3],
            "the demoted block goes last of the ordinary ones"
        );
        assert_eq!(counts(&pool), [(None, 1), (Some(7), 2)]);
        // A hit takes a protected block out of its adapter's count; `Any` evicts the rest.
        pool.touch(&blocks[..1], Hit::Reuse);
        assert_eq!(counts(&pool), [(None, 1), (Some(7), 1)]);
        assert!(pool.try_allocate(2, &mut out, Evict::Any));
        assert!(counts(&pool).is_empty());
        assert_eq!(pool.num_free_blocks(), 0);
    }
}
