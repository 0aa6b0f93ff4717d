//! The token mask: the one representation of "which tokens may come next" shared by the CPU
//! sampler and (later) the GPU sampling kernel.

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Instant;

use rayon::prelude::*;
use toktrie::SimpleVob;

use super::RequestMatcher;

/// One logits row's allowed tokens as a bitset: bit `t % 32` of word `t / 32` is set iff token
/// `t` may be sampled; ids past the last word are not allowed.
///
/// This is the layout of llguidance's `SimpleVob` and of the `int32` bitmask vLLM and xgrammar
/// hand their samplers, on purpose: the GPU engine uploads [`TokenMask::words`] of each
/// constrained row (`ceil(vocab / 32)` words) with the step's other metadata and its sampling
/// kernel tests the bit before the softmax; the CPU path is [`TokenMask::apply`]. Any other
/// consumer of masks should take this type, not a twin.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TokenMask {
    words: Vec<u32>,
}

impl TokenMask {
    /// A mask from llguidance's bit vector (same layout, copied).
    pub fn from_vob(vob: &SimpleVob) -> Self {
        TokenMask {
            words: vob.as_slice().to_vec(),
        }
    }

    /// A mask allowing exactly `ids`, over `vocab` tokens.
    pub fn from_ids(vocab: usize, ids: &[u32]) -> Self {
        let mut words = vec![0u32; vocab.div_ceil(32)];
        for &t in ids {
            if let Some(w) = words.get_mut(t as usize / 32) {
                *w |= 1 << (t % 32);
            }
        }
        TokenMask { words }
    }

    /// The bitset words (what a device upload copies).
    pub fn words(&self) -> &[u32] {
        &self.words
    }

    /// Whether token `t` may be sampled.
    pub fn allows(&self, t: u32) -> bool {
        self.words
            .get(t as usize / 32)
            .is_some_and(|w| w & (1 << (t % 32)) != 0)
    }

    /// Whether every token it allows is among `ids` (also when it allows none).
    pub fn allows_only(&self, ids: &[u32]) -> bool {
        let num_allowed = self.num_allowed();
        if num_allowed > ids.len() {
            return false;
        }
        let mut listed: Vec<u32> = ids.iter().copied().filter(|&t| self.allows(t)).collect();
        listed.sort_unstable();
        listed.dedup();
        listed.len() == num_allowed
    }

    /// Number of allowed tokens.
    pub fn num_allowed(&self) -> usize {
        self.words.iter().map(|w| w.count_ones() as usize).sum()
    }

    /// Sets every disallowed logit to -inf (a whole word of zeros at a time).
    pub fn apply(&self, logits: &mut [f32]) {
        for (i, chunk) in logits.chunks_mut(32).enumerate() {
            let w = self.words.get(i).copied().unwrap_or(0);
            if w == u32::MAX {
                continue;
            }
            for (j, l) in chunk.iter_mut().enumerate() {
                if w & (1 << j) == 0 {
                    *l = f32::NEG_INFINITY;
                }
            }
        }
    }
}

static MASKS_COMPUTED: AtomicU64 = AtomicU64::new(0);
static MASK_NANOS: AtomicU64 = AtomicU64::new(0);

/// Process-wide mask counters (for `bench-throughput`'s per-token mask time).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct MaskStats {
    /// Masks computed.
    pub num_masks: u64,
    /// Time spent computing them, summed over threads, in nanoseconds.
    pub total_nanos: u64,
}

/// The counters since the process started.
pub fn mask_stats() -> MaskStats {
    MaskStats {
        num_masks: MASKS_COMPUTED.load(Ordering::Relaxed),
        total_nanos: MASK_NANOS.load(Ordering::Relaxed),
    }
}

/// The next-token masks of a batch's constrained requests, keyed as given: in parallel on the
/// rayon pool when there are several (each mask can take a fraction of a millisecond), inline
/// for one.
pub fn compute_masks<K: Send>(items: Vec<(K, &mut RequestMatcher)>) -> Vec<(K, TokenMask)> {
    let one = |(k, m): (K, &mut RequestMatcher)| {
        let start = Instant::now();
        let mask = m.compute_mask();
        let nanos = u64::try_from(start.elapsed().as_nanos()).unwrap_or(u64::MAX);
        MASK_NANOS.fetch_add(nanos, Ordering::Relaxed);
        MASKS_COMPUTED.fetch_add(1, Ordering::Relaxed);
        (k, mask)
    };
    if items.len() > 1 {
        items.into_par_iter().map(one).collect()
    } else {
        items.into_iter().map(one).collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn apply_masks_exactly_the_unset_bits() {
        let vocab = 70;
        let allowed = [0u32, 31, 32, 33, 69];
        let mask = TokenMask::from_ids(vocab, &allowed);
        assert_eq!(mask.num_allowed(), allowed.len());
        let mut row: Vec<f32> = (0..vocab).map(|i| i as f32).collect();
        mask.apply(&mut row);
        for (t, l) in row.iter().enumerate() {
            let want = allowed.contains(&(t as u32));
            assert_eq!(l.is_finite(), want, "token {t}");
            assert_eq!(mask.allows(t as u32), want);
        }
        assert!(!mask.allows(1000));
        let vob = {
            let mut v = SimpleVob::alloc(vocab);
            for &t in &allowed {
                v.allow_token(t);
            }
            v
        };
        assert_eq!(
            TokenMask::from_vob(&vob),
            mask,
            "one layout with llguidance"
        );
    }

    #[test]
    fn allows_only_compares_sets_not_lists() {
        let mask = TokenMask::from_ids(70, &[2, 40]);
        assert!(mask.allows_only(&[40, 2]));
        assert!(mask.allows_only(&[1, 2, 40, 69, 500]));
        // Duplicates do not stand in for a missing id.
        assert!(!mask.allows_only(&[2, 2, 2]));
        assert!(!mask.allows_only(&[40]));
        assert!(TokenMask::from_ids(70, &[]).allows_only(&[]));
    }
}
