//! `write_kv` stores rows at `slot * row_len` of the documented layout and skips `PAD_SLOT`.

use caduceus_kernels::attention::{write_kv, KvCacheShape, LayerKvCache, PAD_SLOT};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

const SENTINEL: f32 = -1234.5;

fn shape() -> KvCacheShape {
    KvCacheShape {
        num_blocks: 5,
        block_size: 4,
        num_kv_heads: 3,
        head_dim: 8,
    }
}

#[test]
fn shape_sizes() {
    let s = shape();
    assert_eq!(s.num_slots(), 20);
    assert_eq!(s.elems(), 5 * 4 * 3 * 8);
    let c = LayerKvCache::new(s);
    assert_eq!(c.k.len(), s.elems());
    assert!(c.k.iter().chain(&c.v).all(|&x| x == 0.0));
}

#[test]
fn write_then_read_round_trips_and_pad_writes_nothing() {
    let s = shape();
    let row = s.num_kv_heads * s.head_dim;
    let mut cache = LayerKvCache::new(s);
    cache.k.fill(SENTINEL);
    cache.v.fill(SENTINEL);
    let mut rng = ChaCha8Rng::seed_from_u64(7);
    // Slots across several blocks, out of order, with padding interleaved.
    let slots = [13u32, PAD_SLOT, 2, 19, PAD_SLOT, 0, 8, 7];
    let n = slots.len();
    let k: Vec<f32> = (0..n * row).map(|_| rng.random_range(-1.0..1.0)).collect();
    let v: Vec<f32> = (0..n * row).map(|_| rng.random_range(-1.0..1.0)).collect();
    write_kv(&mut cache, &k, &v, &slots);

    for (t, &slot) in slots.iter().enumerate() {
        if slot == PAD_SLOT {
            continue;
        }
        // Layout [num_blocks, block_size, num_kv_heads, head_dim], slot = block * block_size + off.
        let (block, off) = (slot as usize / s.block_size, slot as usize % s.block_size);
        for h in 0..s.num_kv_heads {
            for d in 0..s.head_dim {
                let idx = ((block * s.block_size + off) * s.num_kv_heads + h) * s.head_dim + d;
                assert_eq!(cache.k[idx], k[t * row + h * s.head_dim + d]);
                assert_eq!(cache.v[idx], v[t * row + h * s.head_dim + d]);
            }
        }
    }
    let written: Vec<usize> = slots
        .iter()
        .filter(|&&s| s != PAD_SLOT)
        .map(|&s| s as usize)
        .collect();
    for slot in (0..s.num_slots()).filter(|x| !written.contains(x)) {
        let r = slot * row..(slot + 1) * row;
        assert!(
            cache.k[r.clone()].iter().all(|&x| x == SENTINEL),
            "slot {slot} k touched"
        );
        assert!(
            cache.v[r].iter().all(|&x| x == SENTINEL),
            "slot {slot} v touched"
        );
    }
}

#[test]
fn all_padding_writes_nothing() {
    let s = shape();
    let row = s.num_kv_heads * s.head_dim;
    let mut cache = LayerKvCache::new(s);
    write_kv(
        &mut cache,
        &vec![1.0; 3 * row],
        &vec![2.0; 3 * row],
        &[PAD_SLOT; 3],
    );
    assert!(cache.k.iter().chain(&cache.v).all(|&x| x == 0.0));
}

#[test]
#[should_panic(expected = "out of range")]
fn slot_out_of_range_panics() {
    let s = shape();
    let row = s.num_kv_heads * s.head_dim;
    let mut cache = LayerKvCache::new(s);
    write_kv(&mut cache, &vec![0.0; row], &vec![0.0; row], &[20]);
}

#[test]
#[should_panic(expected = "one slot per token")]
fn row_count_mismatch_panics() {
    let s = shape();
    let row = s.num_kv_heads * s.head_dim;
    let mut cache = LayerKvCache::new(s);
    write_kv(&mut cache, &vec![0.0; 2 * row], &vec![0.0; 2 * row], &[0]);
}
