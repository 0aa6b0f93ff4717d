//! Chain hash of full KV blocks, the key of the prefix cache.
//!
//! A block's KV depends on every token before it and on the weights that produced it, so its key
//! is `hash(parent_hash, block_tokens, extra_keys)` where the extra keys name the adapter *and its
//! generation* (a reloaded adapter must never hit KV of its old weights) and the tenant's cache
//! salt. The hash is xxh3-128 seeded by `SchedulerConfig::hash_seed` over a canonical
//! little-endian byte encoding, so keys are stable across runs, platforms and Rust versions
//! (unlike `DefaultHasher`). 128 bits make an accidental chain collision negligible; the block
//! pool still confirms every hit against the block's stored tokens and keys.

use crate::ids::AdapterKey;
use xxhash_rust::xxh3::{xxh3_128_with_seed, Xxh3};

/// Key of one full block (and, through the chain, of its whole prefix).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct BlockHash(pub u128);

/// Everything besides the tokens that decides whether two blocks hold the same KV.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct ExtraKeys {
    pub adapter: Option<AdapterKey>,
    pub cache_salt: Option<u64>,
}

/// First byte of the encoding; bump it when the encoding changes so old keys cannot match.
pub const BLOCK_HASH_FORMAT: u8 = 1;

/// Tokens encoded per `update` call of the streaming path (keeps its buffer on the stack).
const TOKENS_PER_CHUNK: usize = 64;

/// Encodings up to this size (blocks of up to 48 tokens) are hashed in one shot.
const ONE_SHOT_MAX: usize = 240;

/// Hashes one block. Encoding, all integers little-endian:
/// `[format u8][has_parent u8][parent u128 or 0][num_tokens u64][tokens u32...]`
/// `[has_adapter u8][adapter id u32 or 0][generation u64 or 0][has_salt u8][salt u64 or 0]`.
/// The presence bytes keep `None` distinct from `Some(0)`.
pub fn hash_block_tokens(
    seed: u64,
    parent: Option<BlockHash>,
    tokens: &[u32],
    extra: &ExtraKeys,
) -> BlockHash {
    let head = encode_head(parent, tokens.len());
    let tail = encode_tail(extra);
    let len = head.len() + 4 * tokens.len() + tail.len();
    if len <= ONE_SHOT_MAX {
        // Short inputs: one-shot xxh3 uses the seed directly (~5x faster than the streaming
        // state, which derives a seeded secret). Same digest either way.
        let mut buf = [0u8; ONE_SHOT_MAX];
        buf[..head.len()].copy_from_slice(&head);
        let mut at = head.len();
        for token in tokens {
            buf[at..at + 4].copy_from_slice(&token.to_le_bytes());
            at += 4;
        }
        buf[at..len].copy_from_slice(&tail);
        return BlockHash(xxh3_128_with_seed(&buf[..len], seed));
    }
    let mut hasher = Xxh3::with_seed(seed);
    hasher.update(&head);
    let mut buf = [0u8; 4 * TOKENS_PER_CHUNK];
    for chunk in tokens.chunks(TOKENS_PER_CHUNK) {
        for (dst, token) in buf.chunks_exact_mut(4).zip(chunk) {
            dst.copy_from_slice(&token.to_le_bytes());
        }
        hasher.update(&buf[..4 * chunk.len()]);
    }
    hasher.update(&tail);
    BlockHash(hasher.digest128())
}

fn encode_head(parent: Option<BlockHash>, num_tokens: usize) -> [u8; 26] {
    let mut head = [0u8; 26];
    head[0] = BLOCK_HASH_FORMAT;
    head[1] = u8::from(parent.is_some());
    head[2..18].copy_from_slice(&parent.map_or(0, |p| p.0).to_le_bytes());
    head[18..26].copy_from_slice(&(num_tokens as u64).to_le_bytes());
    head
}

fn encode_tail(extra: &ExtraKeys) -> [u8; 22] {
    let mut tail = [0u8; 22];
    if let Some(adapter) = extra.adapter {
        tail[0] = 1;
        tail[1..5].copy_from_slice(&adapter.id.to_le_bytes());
        tail[5..13].copy_from_slice(&adapter.generation.to_le_bytes());
    }
    if let Some(salt) = extra.cache_salt {
        tail[13] = 1;
        tail[14..22].copy_from_slice(&salt.to_le_bytes());
    }
    tail
}

/// Extends `hashes` with the chain hashes of every full block of `tokens` not yet hashed (the
/// request calls this as its tokens grow, so each block is hashed exactly once).
pub fn extend_block_hashes(
    seed: u64,
    block_size: usize,
    tokens: &[u32],
    extra: &ExtraKeys,
    hashes: &mut Vec<BlockHash>,
) {
    let num_full = tokens.len() / block_size;
    for i in hashes.len()..num_full {
        let parent = i.checked_sub(1).map(|p| hashes[p]);
        let block = &tokens[i * block_size..(i + 1) * block_size];
        hashes.push(hash_block_tokens(seed, parent, block, extra));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The documented encoding written out by hand, hashed in one shot.
    fn reference(seed: u64, parent: Option<u128>, tokens: &[u32], extra: &ExtraKeys) -> u128 {
        let mut bytes = vec![BLOCK_HASH_FORMAT, u8::from(parent.is_some())];
        bytes.extend(parent.unwrap_or(0).to_le_bytes());
        bytes.extend((tokens.len() as u64).to_le_bytes());
        for t in tokens {
            bytes.extend(t.to_le_bytes());
        }
        bytes.push(u8::from(extra.adapter.is_some()));
        bytes.extend(extra.adapter.map_or(0, |a| a.id).to_le_bytes());
        bytes.extend(extra.adapter.map_or(0, |a| a.generation).to_le_bytes());
        bytes.push(u8::from(extra.cache_salt.is_some()));
        bytes.extend(extra.cache_salt.unwrap_or(0).to_le_bytes());
        xxh3_128_with_seed(&bytes, seed)
    }

    const ADAPTER: ExtraKeys = ExtraKeys {
        adapter: Some(AdapterKey {
            id: 7,
            generation: 3,
        }),
        cache_salt: Some(42),
    };

    #[test]
    fn known_values_are_stable() {
        // Pinned with Python's `xxhash.xxh3_128_intdigest` over the documented encoding
        // (an independent xxh3 implementation); a change here invalidates every deployed key.
        let tokens: Vec<u32> = (1..=16).collect();
        let root = hash_block_tokens(0, None, &tokens, &ExtraKeys::default());
        assert_eq!(root.0, ROOT_KNOWN);
        let child = hash_block_tokens(1234, Some(root), &[5, 6, 7], &ADAPTER);
        assert_eq!(child.0, CHILD_KNOWN);
    }

    const ROOT_KNOWN: u128 = 0xbd41_7619_04c1_e50e_eae7_77a3_5e0d_82a9;
    const CHILD_KNOWN: u128 = 0x2cfa_6c0f_e935_9585_0820_2b4c_f540_2cb5;

    #[test]
    fn both_encoding_paths_match_the_one_shot_reference() {
        // 48 tokens is the largest one-shot encoding; 49 and 150 take the streaming path.
        for n in [0usize, 1, 16, 48, 49, 150] {
            let tokens: Vec<u32> = (0..n as u32)
                .map(|i| i.wrapping_mul(2_654_435_761))
                .collect();
            for extra in [ExtraKeys::default(), ADAPTER] {
                for parent in [None, Some(99u128 << 70 | 5)] {
                    let got = hash_block_tokens(77, parent.map(BlockHash), &tokens, &extra);
                    assert_eq!(got.0, reference(77, parent, &tokens, &extra), "{n} tokens");
                }
            }
        }
    }

    #[test]
    fn every_input_changes_the_hash() {
        let tokens = [1u32, 2, 3, 4];
        let base = hash_block_tokens(0, None, &tokens, &ADAPTER);
        let mut variants = vec![
            hash_block_tokens(1, None, &tokens, &ADAPTER),
            hash_block_tokens(0, Some(BlockHash(0)), &tokens, &ADAPTER),
            hash_block_tokens(0, None, &[1, 2, 3, 5], &ADAPTER),
            hash_block_tokens(0, None, &[1, 2, 3], &ADAPTER),
        ];
        let mut other_id = ADAPTER;
        other_id.adapter = Some(AdapterKey {
            id: 8,
            generation: 3,
        });
        let mut other_generation = ADAPTER;
        other_generation.adapter = Some(AdapterKey {
            id: 7,
            generation: 4,
        });
        let mut no_adapter = ADAPTER;
        no_adapter.adapter = None;
        let mut other_salt = ADAPTER;
        other_salt.cache_salt = Some(43);
        let mut no_salt = ADAPTER;
        no_salt.cache_salt = None;
        for extra in [other_id, other_generation, no_adapter, other_salt, no_salt] {
            variants.push(hash_block_tokens(0, None, &tokens, &extra));
        }
        // Some(0) must differ from None.
        let zero_salt = ExtraKeys {
            adapter: None,
            cache_salt: Some(0),
        };
        assert_ne!(
            hash_block_tokens(0, None, &tokens, &zero_salt),
            hash_block_tokens(0, None, &tokens, &ExtraKeys::default())
        );
        for (i, v) in variants.iter().enumerate() {
            assert_ne!(*v, base, "variant {i}");
        }
    }

    #[test]
    fn chain_covers_only_full_blocks_and_links_parents() {
        let tokens: Vec<u32> = (0..11).collect();
        let mut hashes = Vec::new();
        extend_block_hashes(5, 4, &tokens, &ADAPTER, &mut hashes);
        assert_eq!(hashes.len(), 2);
        assert_eq!(
            hashes[0],
            hash_block_tokens(5, None, &tokens[0..4], &ADAPTER)
        );
        assert_eq!(
            hashes[1],
            hash_block_tokens(5, Some(hashes[0]), &tokens[4..8], &ADAPTER)
        );
        // Growing the tokens hashes only the new block.
        let more: Vec<u32> = (0..12).collect();
        extend_block_hashes(5, 4, &more, &ADAPTER, &mut hashes);
        assert_eq!(hashes.len(), 3);
        assert_eq!(
            hashes[2],
            hash_block_tokens(5, Some(hashes[1]), &more[8..12], &ADAPTER)
        );
    }
}
