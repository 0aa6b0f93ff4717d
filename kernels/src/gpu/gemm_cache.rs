//! The cache of chosen GEMM algorithms: cuBLASLt's heuristic query is host work that must not
//! run on every projection (nor while a CUDA graph is being captured), so [`super::gemm::gemm`]
//! asks it once per [`GemmKey`] and reuses the answer.
//!
//! The key buckets `m` (the token count, which changes every step) to its next power of two and
//! the heuristic is asked for the bucket's upper end, so the choice does not depend on which `m`
//! of a bucket came first; `n`, `k`, the dtype, `beta` (accumulate or not) and the bias epilogue
//! are exact, as any of them changes the kernel cuBLASLt picks. Should cuBLASLt refuse a bucket's
//! algorithm for some `m` of the bucket (it checks on the host before launching), that call asks
//! for its exact shape instead, uncached (`gpu::cublaslt`).

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;

use super::device::DType;
use super::gemm::GemmShape;

/// What an algorithm is chosen for.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct GemmKey {
    /// [`m_bucket`] of the row count.
    pub m_bucket: usize,
    pub n: usize,
    pub k: usize,
    pub dtype: DType,
    /// `beta = 1` (`y +=`) rather than `beta = 0`.
    pub accumulate: bool,
    /// With cuBLASLt's bias epilogue.
    pub bias: bool,
}

impl GemmKey {
    pub fn new(dtype: DType, s: &GemmShape, bias: bool) -> GemmKey {
        GemmKey {
            m_bucket: m_bucket(s.m),
            n: s.n,
            k: s.k,
            dtype,
            accumulate: s.accumulate,
            bias,
        }
    }
}

/// The bucket of a row count: the next power of two (1, 2, 4, 8, ...), so the CUDA-graph batch
/// ladder and every prefill length map onto a few dozen keys per weight shape.
pub fn m_bucket(m: usize) -> usize {
    m.max(1).next_power_of_two()
}

/// How often the cache answered (hits) or the heuristic had to be asked (misses).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct GemmCacheStats {
    pub hits: u64,
    pub misses: u64,
    /// Distinct keys cached.
    pub entries: usize,
}

/// Algorithms (`A`: cuBLASLt's `cublasLtMatmulAlgo_t`, or `()` in emulation) by [`GemmKey`].
#[cfg_attr(not(any(feature = "cuda", feature = "cuda-emu")), allow(dead_code))]
pub(crate) struct AlgoCache<A> {
    algos: Mutex<HashMap<GemmKey, A>>,
    hits: AtomicU64,
    misses: AtomicU64,
}

#[cfg_attr(not(any(feature = "cuda", feature = "cuda-emu")), allow(dead_code))]
impl<A: Copy> AlgoCache<A> {
    pub fn new() -> Self {
        AlgoCache {
            algos: Mutex::new(HashMap::new()),
            hits: AtomicU64::new(0),
            misses: AtomicU64::new(0),
        }
    }

    /// The cached algorithm for `key`, or `choose()`'s (cached when it succeeds).
    pub fn get_or_choose<E>(
        &self,
        key: GemmKey,
        choose: impl FnOnce() -> Result<A, E>,
    ) -> Result<A, E> {
        // A panic while holding the lock cannot leave the map half-updated: recover it.
        let mut algos = self.algos.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(a) = algos.get(&key) {
            self.hits.fetch_add(1, Ordering::Relaxed);
            return Ok(*a);
        }
        self.misses.fetch_add(1, Ordering::Relaxed);
        let a = choose()?;
        algos.insert(key, a);
        Ok(a)
    }

    /// Forgets every choice (the counts stay).
    pub fn clear(&self) {
        self.algos.lock().unwrap_or_else(|e| e.into_inner()).clear();
    }

    pub fn stats(&self) -> GemmCacheStats {
        GemmCacheStats {
            hits: self.hits.load(Ordering::Relaxed),
            misses: self.misses.load(Ordering::Relaxed),
            entries: self.algos.lock().unwrap_or_else(|e| e.into_inner()).len(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn shape(m: usize, n: usize, k: usize, accumulate: bool) -> GemmShape {
        GemmShape {
            m,
            n,
            k,
            accumulate,
        }
    }

    #[test]
    fn buckets_are_powers_of_two_covering_every_m() {
        let got: Vec<usize> = [0, 1, 2, 3, 4, 5, 8, 9, 24, 256, 257, 8191]
            .into_iter()
            .map(m_bucket)
            .collect();
        assert_eq!(got, [1, 1, 2, 4, 4, 8, 8, 16, 32, 256, 512, 8192]);
        for m in 1..5000 {
            let b = m_bucket(m);
            assert!(b >= m && b < 2 * m, "m {m} -> {b}");
        }
    }

    #[test]
    fn a_key_hits_only_for_the_same_bucket_shape_dtype_beta_and_bias() {
        let cache = AlgoCache::<u32>::new();
        let mut next = 0u32;
        let mut pick = |dtype, s: GemmShape, bias| {
            cache
                .get_or_choose(GemmKey::new(dtype, &s, bias), || {
                    next += 1;
                    Ok::<_, ()>(next)
                })
                .unwrap()
        };
        let base = pick(DType::Bf16, shape(5, 64, 32, false), false);
        // Same bucket (5..=8): the first choice is reused.
        assert_eq!(pick(DType::Bf16, shape(8, 64, 32, false), false), base);
        assert_eq!(pick(DType::Bf16, shape(6, 64, 32, false), false), base);
        // Anything else that changes cuBLASLt's choice is a new entry.
        let others = [
            pick(DType::Bf16, shape(9, 64, 32, false), false),
            pick(DType::Bf16, shape(5, 65, 32, false), false),
            pick(DType::Bf16, shape(5, 64, 33, false), false),
            pick(DType::F16, shape(5, 64, 32, false), false),
            pick(DType::Bf16, shape(5, 64, 32, true), false),
            pick(DType::Bf16, shape(5, 64, 32, false), true),
        ];
        assert_eq!(others, [2, 3, 4, 5, 6, 7]);
        let stats = cache.stats();
        assert_eq!((stats.hits, stats.misses, stats.entries), (2, 7, 7));
    }

    #[test]
    fn a_failed_choice_is_not_cached() {
        let cache = AlgoCache::<u32>::new();
        let key = GemmKey::new(DType::F16, &shape(1, 8, 8, false), false);
        assert_eq!(
            cache.get_or_choose(key, || Err("no algorithm")),
            Err("no algorithm")
        );
        assert_eq!(cache.get_or_choose(key, || Ok::<_, &str>(3)), Ok(3));
        assert_eq!(cache.get_or_choose(key, || Ok::<_, &str>(4)), Ok(3));
        assert_eq!(cache.stats().entries, 1);
    }
}
