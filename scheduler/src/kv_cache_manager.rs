//! Maps requests onto KV blocks: prefix-cache lookups for new requests, slot allocation as
//! requests grow, caching of blocks once they are full and computed, and freeing.
//!
//! Back-pressure is a value: `allocate_slots` returns `None` when the pool cannot cover the
//! request, and the scheduler decides whether to preempt or to wait.

use crate::block_pool::{BlockKey, BlockPool, Evict, Hit};
use crate::ids::BlockId;
use crate::request::{Request, RequestStatus};

/// Leading blocks of a request already in the prefix cache.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ComputedBlocks {
    pub block_ids: Vec<BlockId>,
    /// `block_ids.len() * block_size`: tokens the request need not compute.
    pub num_computed_tokens: usize,
}

#[derive(Clone, Debug)]
pub struct KvCacheManager {
    pool: BlockPool,
    block_size: usize,
    prefix_cache_queries: u64,
    prefix_cache_hits: u64,
}

impl KvCacheManager {
    pub fn new(num_blocks: usize, block_size: usize, enable_caching: bool) -> Self {
        KvCacheManager {
            pool: BlockPool::new(num_blocks, enable_caching),
            block_size: block_size.max(1),
            prefix_cache_queries: 0,
            prefix_cache_hits: 0,
        }
    }

    pub fn block_pool(&self) -> &BlockPool {
        &self.pool
    }

    pub(crate) fn block_pool_mut(&mut self) -> &mut BlockPool {
        &mut self.pool
    }

    pub fn block_size(&self) -> usize {
        self.block_size
    }

    /// Blocks needed to hold `num_tokens` tokens.
    pub fn num_blocks_for(&self, num_tokens: usize) -> usize {
        num_tokens.div_ceil(self.block_size)
    }

    /// Tokens looked up in the prefix cache so far (counted when a lookup is committed).
    pub fn prefix_cache_queries(&self) -> u64 {
        self.prefix_cache_queries
    }

    /// Tokens found in the prefix cache so far.
    pub fn prefix_cache_hits(&self) -> u64 {
        self.prefix_cache_hits
    }

    /// The longest cached prefix of a request that holds no blocks yet, in whole blocks. Never
    /// the whole token list: the last token is always computed so the step yields its logits.
    /// Takes no references; `allocate_slots` commits the hit.
    pub fn get_computed_blocks(&self, request: &Request) -> ComputedBlocks {
        let mut computed = ComputedBlocks::default();
        // A request scoring its prompt needs every position's logits, so computes them all.
        if !self.pool.enable_caching()
            || request.scores_prompt
            || !request.block_table.is_empty()
            || request.num_computed_tokens > 0
        {
            return computed;
        }
        let bs = self.block_size;
        let max_blocks =
            (request.num_tokens().saturating_sub(1) / bs).min(request.block_hashes.len());
        for i in 0..max_blocks {
            let key = BlockKey {
                hash: request.block_hashes[i],
                parent: i.checked_sub(1).map(|p| request.block_hashes[p]),
                tokens: &request.token_ids[i * bs..(i + 1) * bs],
                extra: request.extra,
            };
            match self.pool.get_cached_block(&key) {
                Some(block) => computed.block_ids.push(block),
                None => break,
            }
        }
        computed.num_computed_tokens = computed.block_ids.len() * bs;
        computed
    }

    /// Makes room for `num_new_tokens` more tokens after the request's computed ones, first
    /// taking `computed` (a prefix hit from `get_computed_blocks`, only for a request without
    /// blocks), evicting only what `evict` allows. Returns the newly allocated blocks, or `None`
    /// with nothing changed when the free list cannot cover them (free cached blocks of the hit
    /// count against it, since taking them removes them from the free list).
    pub fn allocate_slots(
        &mut self,
        request: &mut Request,
        num_new_tokens: usize,
        computed: Option<&ComputedBlocks>,
        evict: Evict,
    ) -> Option<Vec<BlockId>> {
        let (hit_blocks, hit_tokens) = computed.map_or((&[][..], 0), |c| {
            (c.block_ids.as_slice(), c.num_computed_tokens)
        });
        if !hit_blocks.is_empty() && !request.block_table.is_empty() {
            debug_assert!(false, "prefix hit for a request that already holds blocks");
            return None;
        }
        let num_tokens = request.num_computed_tokens + hit_tokens + num_new_tokens;
        let num_held = request.block_table.len() + hit_blocks.len();
        if hit_blocks.is_empty() && num_tokens <= num_held * self.block_size {
            return Some(Vec::new()); // decode within the last block: the common case
        }
        let num_new_blocks = self.num_blocks_for(num_tokens).saturating_sub(num_held);
        let num_free_hits = hit_blocks
            .iter()
            .filter(|&&b| self.pool.is_evictable(b, evict))
            .count();
        if num_new_blocks + num_free_hits > self.pool.num_evictable(evict) {
            return None;
        }
        if let Some(computed) = computed {
            let hit = if request.status == RequestStatus::Preempted {
                Hit::Resume
            } else {
                Hit::Reuse
            };
            self.pool.touch(hit_blocks, hit);
            request.block_table.extend_from_slice(hit_blocks);
            request.num_cached_blocks = hit_blocks.len();
            if self.pool.enable_caching() {
                self.prefix_cache_queries += request.num_tokens() as u64;
                self.prefix_cache_hits += computed.num_computed_tokens as u64;
            }
        }
        let mut new_blocks = Vec::with_capacity(num_new_blocks);
        if !self
            .pool
            .try_allocate(num_new_blocks, &mut new_blocks, evict)
        {
            return None; // unreachable: checked above
        }
        request.block_table.extend_from_slice(&new_blocks);
        Some(new_blocks)
    }

    /// Registers every block of the request that is now full and computed (prompt and output
    /// blocks alike), so later requests, or this one after a preemption, can reuse it.
    pub fn cache_full_blocks(&mut self, request: &mut Request) {
        if !self.pool.enable_caching() {
            return;
        }
        let bs = self.block_size;
        if request.num_computed_tokens < (request.num_cached_blocks + 1) * bs {
            return; // no newly full block (most decode steps): skip the division
        }
        let num_full = (request.num_computed_tokens / bs)
            .min(request.block_hashes.len())
            .min(request.block_table.len());
        for i in request.num_cached_blocks..num_full {
            let key = BlockKey {
                hash: request.block_hashes[i],
                parent: i.checked_sub(1).map(|p| request.block_hashes[p]),
                tokens: &request.token_ids[i * bs..(i + 1) * bs],
                extra: request.extra,
            };
            self.pool.cache_block(request.block_table[i], &key);
        }
        request.num_cached_blocks = request.num_cached_blocks.max(num_full);
    }

    /// Returns the request's blocks to the pool, last block first, so the tail of a sequence
    /// (the part least likely to be shared) is evicted before its prefix.
    pub fn free(&mut self, request: &mut Request) {
        self.pool
            .free_blocks(request.block_table.iter().rev().copied());
        request.block_table.clear();
        request.num_cached_blocks = 0;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ids::RequestId;
    use crate::request::NewRequest;

    fn request(id: u64, prompt: &[u32], salt: Option<u64>) -> Request {
        let new = NewRequest {
            id: RequestId(id),
            prompt_token_ids: prompt.to_vec(),
            max_tokens: 4,
            min_tokens: 0,
            stop_token_ids: vec![],
            priority: 0,
            arrival_seq: id,
            adapter: None,
            cache_salt: salt,
            scores_prompt: false,
        };
        Request::new(new, 4, Some(0))
    }

    /// Admits `req` with its prefix hit and computes its whole prompt in one step.
    fn prefill(kv: &mut KvCacheManager, req: &mut Request) -> Option<ComputedBlocks> {
        let computed = kv.get_computed_blocks(req);
        let n = req.num_tokens() - computed.num_computed_tokens;
        kv.allocate_slots(req, n, Some(&computed), Evict::Any)?;
        req.num_computed_tokens = req.num_tokens();
        kv.cache_full_blocks(req);
        Some(computed)
    }

    #[test]
    fn lookup_never_covers_the_last_token() {
        let mut kv = KvCacheManager::new(16, 4, true);
        let prompt: Vec<u32> = (0..8).collect();
        let mut a = request(1, &prompt, None);
        prefill(&mut kv, &mut a).unwrap();
        assert_eq!(a.block_table.len(), 2);
        // Same 8 tokens: both blocks are cached but only the first may be reused.
        let mut b = request(2, &prompt, None);
        let hit = prefill(&mut kv, &mut b).unwrap();
        assert_eq!(hit.num_computed_tokens, 4);
        assert_eq!(b.block_table[0], a.block_table[0]);
        assert_ne!(b.block_table[1], a.block_table[1]);
        assert_eq!(kv.block_pool().ref_cnt(a.block_table[0]), 2);
        // One more token: both blocks hit.
        let mut c = request(3, &(0..9).collect::<Vec<_>>(), None);
        assert_eq!(prefill(&mut kv, &mut c).unwrap().num_computed_tokens, 8);
        assert_eq!(c.block_table[..2], a.block_table[..]);
        assert_eq!(
            (kv.prefix_cache_queries(), kv.prefix_cache_hits()),
            (25, 12)
        );
        // A different salt isolates the tenant.
        let mut d = request(4, &(0..9).collect::<Vec<_>>(), Some(7));
        assert_eq!(prefill(&mut kv, &mut d).unwrap().num_computed_tokens, 0);
    }

    /// Only a hit by another request makes blocks reused (protected once free): a preempted
    /// request taking its own blocks back does not.
    #[test]
    fn a_resumed_request_does_not_mark_its_own_blocks_reused() {
        let protected = |kv: &KvCacheManager| -> usize {
            kv.block_pool()
                .protected_free_blocks()
                .map(|(_, n)| n)
                .sum()
        };
        let mut kv = KvCacheManager::new(16, 4, true);
        let prompt: Vec<u32> = (0..9).collect();
        let mut a = request(1, &prompt, None);
        prefill(&mut kv, &mut a).unwrap();
        kv.free(&mut a);
        a.num_computed_tokens = 0;
        a.status = RequestStatus::Preempted;
        assert_eq!(prefill(&mut kv, &mut a).unwrap().num_computed_tokens, 8);
        kv.free(&mut a);
        assert_eq!(protected(&kv), 0, "its own blocks came back as a reuse");
        // Another request with the same prefix does reuse them.
        let mut b = request(2, &prompt, None);
        assert_eq!(prefill(&mut kv, &mut b).unwrap().num_computed_tokens, 8);
        kv.free(&mut b);
        assert_eq!(protected(&kv), 2);
    }

    #[test]
    fn failed_allocation_changes_nothing() {
        let mut kv = KvCacheManager::new(4, 4, true); // 3 usable blocks
        let mut a = request(1, &(0..9).collect::<Vec<_>>(), None);
        prefill(&mut kv, &mut a).unwrap();
        kv.free(&mut a);
        assert_eq!(kv.block_pool().num_free_blocks(), 3);
        // 13 tokens: 2 cached (free) blocks hit + 2 new blocks = 4 > 3 free.
        let mut b = request(2, &(0..13).collect::<Vec<_>>(), None);
        let computed = kv.get_computed_blocks(&b);
        assert_eq!(computed.block_ids.len(), 2);
        assert_eq!(
            kv.allocate_slots(&mut b, 5, Some(&computed), Evict::Any),
            None
        );
        assert!(b.block_table.is_empty());
        assert_eq!(kv.block_pool().num_free_blocks(), 3);
        assert!(kv.block_pool().cached_key(computed.block_ids[0]).is_some());
        assert_eq!(
            kv.prefix_cache_queries(),
            9,
            "a failed admission is not counted"
        );
        // 12 tokens fit: 2 hits + 1 new block.
        let mut c = request(3, &(0..12).collect::<Vec<_>>(), None);
        let hit = prefill(&mut kv, &mut c).unwrap();
        assert_eq!(hit.block_ids, computed.block_ids);
        assert_eq!(kv.block_pool().num_free_blocks(), 0);
    }

    #[test]
    fn free_releases_tail_first() {
        let mut kv = KvCacheManager::new(8, 4, false);
        let mut a = request(1, &(0..12).collect::<Vec<_>>(), None);
        let blocks = kv.allocate_slots(&mut a, 12, None, Evict::Any).unwrap();
        assert_eq!(blocks.len(), 3);
        // Growing inside the last block allocates nothing; crossing into a new one does.
        a.num_computed_tokens = 12;
        assert_eq!(
            kv.allocate_slots(&mut a, 1, None, Evict::Any),
            Some(vec![BlockId(4)])
        );
        let held = a.block_table.clone();
        kv.free(&mut a);
        let order: Vec<_> = kv.block_pool().free_blocks_in_eviction_order().collect();
        let mut expected: Vec<_> = (5..8).map(BlockId).collect();
        expected.extend(held.iter().rev());
        assert_eq!(order, expected);
    }
}
