//! KV-cache events: what the prefix cache gained and lost, as plain data.
//!
//! An inference gateway that routes by prefix (llm-d's precise prefix-cache scorer) mirrors
//! each replica's cache from these events, so they come from the one place that knows: the
//! block pool. A block is announced (`BlockStored`) once, when it enters the hash map of the
//! prefix cache, and withdrawn (`BlockRemoved`) exactly when its hash leaves it (the block is
//! handed out again); `AllBlocksCleared` follows a reset. The scheduler stays pure: events
//! pile up here and the engine drains them after each step and hands them to a publisher.
//!
//! Blocks keyed by a cache salt are never announced: only requests with the same salt can hit
//! them, which a router cannot know, and their content belongs to one tenant.

use crate::block_hash::BlockHash;
use crate::ids::AdapterKey;

/// One change of the prefix cache's content.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum KvCacheEvent {
    /// Consecutive full blocks of one sequence entered the cache: `block_hashes[i]` holds
    /// `token_ids[i * block_size..(i + 1) * block_size]`, each block's parent is the one
    /// before it and the first block's parent is `parent_block_hash` (`None` at a sequence
    /// start).
    BlockStored {
        block_hashes: Vec<BlockHash>,
        parent_block_hash: Option<BlockHash>,
        token_ids: Vec<u32>,
        block_size: usize,
        /// The adapter (and its generation) whose weights produced the KV.
        adapter: Option<AdapterKey>,
    },
    /// These blocks left the cache.
    BlockRemoved { block_hashes: Vec<BlockHash> },
    /// Every cached block left the cache.
    AllBlocksCleared,
}

/// The pending events of one block pool, coalesced as they arrive: a stored block that
/// continues the last `BlockStored` (same adapter, parent = its last hash) joins it, and
/// removals in a row share one `BlockRemoved`, so a long prompt is one event, not one per block.
#[derive(Clone, Debug, Default)]
pub(crate) struct KvEventLog {
    enabled: bool,
    events: Vec<KvCacheEvent>,
}

impl KvEventLog {
    pub(crate) fn set_enabled(&mut self, enabled: bool) {
        self.enabled = enabled;
        if !enabled {
            self.events.clear();
        }
    }

    pub(crate) fn stored(
        &mut self,
        hash: BlockHash,
        parent: Option<BlockHash>,
        tokens: &[u32],
        adapter: Option<AdapterKey>,
    ) {
        if !self.enabled {
            return;
        }
        if let Some(KvCacheEvent::BlockStored {
            block_hashes,
            token_ids,
            block_size,
            adapter: last_adapter,
            ..
        }) = self.events.last_mut()
        {
            if *last_adapter == adapter
                && *block_size == tokens.len()
                && parent.is_some()
                && block_hashes.last() == parent.as_ref()
            {
                block_hashes.push(hash);
                token_ids.extend_from_slice(tokens);
                return;
            }
        }
        self.events.push(KvCacheEvent::BlockStored {
            block_hashes: vec![hash],
            parent_block_hash: parent,
            token_ids: tokens.to_vec(),
            block_size: tokens.len(),
            adapter,
        });
    }

    pub(crate) fn removed(&mut self, hash: BlockHash) {
        if !self.enabled {
            return;
        }
        if let Some(KvCacheEvent::BlockRemoved { block_hashes }) = self.events.last_mut() {
            block_hashes.push(hash);
            return;
        }
        self.events.push(KvCacheEvent::BlockRemoved {
            block_hashes: vec![hash],
        });
    }

    pub(crate) fn cleared(&mut self) {
        if self.enabled {
            self.events.push(KvCacheEvent::AllBlocksCleared);
        }
    }

    pub(crate) fn take(&mut self) -> Vec<KvCacheEvent> {
        std::mem::take(&mut self.events)
    }
}
