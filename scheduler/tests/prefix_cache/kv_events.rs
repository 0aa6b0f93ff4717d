//! KV-cache events: a mirror rebuilt from the events alone equals the block pool's own view of
//! its cache after every step of a mixed-adapter workload that evicts, with each block
//! announced once and withdrawn only while announced.

use std::collections::HashMap;

use caduceus_scheduler::{
    AdapterKey, BlockHash, BlockId, KvCacheEvent, Scheduler, SchedulerConfig,
};

use super::common::{adapter, req, Driver};

/// What a subscriber knows of one cached block.
type Mirror = HashMap<BlockHash, (Vec<u32>, Option<AdapterKey>)>;

/// Applies events to the mirror, failing on a double announcement or an unknown removal.
fn apply(mirror: &mut Mirror, events: Vec<KvCacheEvent>, removed: &mut usize) {
    for e in events {
        match e {
            KvCacheEvent::BlockStored {
                block_hashes,
                parent_block_hash,
                token_ids,
                block_size,
                adapter,
            } => {
                assert_eq!(token_ids.len(), block_hashes.len() * block_size);
                if let Some(p) = parent_block_hash {
                    assert!(!block_hashes.contains(&p), "a block is not its own parent");
                }
                for (hash, tokens) in block_hashes.iter().zip(token_ids.chunks(block_size)) {
                    let old = mirror.insert(*hash, (tokens.to_vec(), adapter));
                    assert!(old.is_none(), "{hash:?} announced twice");
                }
            }
            KvCacheEvent::BlockRemoved { block_hashes } => {
                for hash in block_hashes {
                    assert!(
                        mirror.remove(&hash).is_some(),
                        "{hash:?} removed unannounced"
                    );
                    *removed += 1;
                }
            }
            KvCacheEvent::AllBlocksCleared => mirror.clear(),
        }
    }
}

/// The pool's own view: every cached block that is not keyed by a cache salt.
fn pool_view(sched: &Scheduler) -> Mirror {
    let pool = sched.kv_cache_manager().block_pool();
    (0..pool.num_blocks() as u32)
        .filter_map(|b| pool.cached_key(BlockId(b)))
        .filter(|k| k.extra.cache_salt.is_none())
        .map(|k| (k.hash, (k.tokens.to_vec(), k.extra.adapter)))
        .collect()
}

#[test]
fn events_rebuild_the_cache_of_a_mixed_adapter_workload() {
    let mut d = Driver::new(SchedulerConfig {
        block_size: 4,
        num_blocks: 24, // small: later requests evict earlier cached blocks
        max_model_len: 64,
        ..SchedulerConfig::default()
    });
    d.sched.enable_kv_cache_events();
    let mut mirror = Mirror::new();
    let mut removed = 0;
    let shared: Vec<u32> = (0..9).map(|i| (i * 7 + 3) % 31).collect();
    for id in 0..24u64 {
        let mut prompt = shared.clone();
        prompt.extend((0..id % 5).map(|i| (id + i) as u32 % 31));
        let mut r = req(id, &prompt, 3 + (id % 4) as usize);
        // Base, two adapters, a reloaded adapter (new generation) and a salted tenant, all on
        // the same leading tokens.
        r.adapter = match id % 5 {
            0 => None,
            1 | 3 => adapter(1),
            2 => adapter(2),
            _ => Some(AdapterKey {
                id: 1,
                generation: 1,
            }),
        };
        if id % 6 == 5 {
            r.cache_salt = Some(9);
        }
        d.add(r).unwrap();
        if id % 3 == 2 {
            for _ in 0..4 {
                d.step().unwrap();
                apply(&mut mirror, d.sched.take_kv_cache_events(), &mut removed);
                assert_eq!(mirror, pool_view(&d.sched));
            }
        }
    }
    for _ in 0..200 {
        if !d.sched.has_unfinished() {
            break;
        }
        d.step().unwrap();
        apply(&mut mirror, d.sched.take_kv_cache_events(), &mut removed);
        assert_eq!(mirror, pool_view(&d.sched));
    }
    d.run_until_idle(4).unwrap();
    apply(&mut mirror, d.sched.take_kv_cache_events(), &mut removed);
    assert_eq!(mirror, pool_view(&d.sched));
    assert!(removed > 0, "the workload must evict to test removals");
    // The same leading block under different adapters: distinct entries, never one.
    let first_block = &shared[..4];
    let adapters: std::collections::HashSet<_> = mirror
        .values()
        .filter(|(t, _)| t == first_block)
        .map(|(_, a)| *a)
        .collect();
    assert!(adapters.len() >= 2, "{adapters:?}");

    // A reset clears everything, only when no request holds a block.
    d.add(req(100, &shared, 2)).unwrap();
    d.step().unwrap();
    assert!(
        !d.sched.reset_prefix_cache(),
        "a running request holds blocks"
    );
    d.run_until_idle(10).unwrap();
    apply(&mut mirror, d.sched.take_kv_cache_events(), &mut removed);
    assert!(!mirror.is_empty());
    assert!(d.sched.reset_prefix_cache());
    let events = d.sched.take_kv_cache_events();
    assert_eq!(events, [KvCacheEvent::AllBlocksCleared]);
    apply(&mut mirror, events, &mut removed);
    assert_eq!(mirror, pool_view(&d.sched));
    assert!(mirror.is_empty());
}

#[test]
fn events_are_off_unless_enabled() {
    let mut d = Driver::new(SchedulerConfig {
        block_size: 4,
        ..SchedulerConfig::default()
    });
    d.add(req(1, &(0..13).collect::<Vec<_>>(), 2)).unwrap();
    d.run_until_idle(10).unwrap();
    assert!(d.sched.take_kv_cache_events().is_empty());
    assert!(!pool_view(&d.sched).is_empty());
}
