//! Descriptive statistics with the same conventions as numpy (which vLLM's `bench serve` uses), so figures
//! from this harness and from vLLM's can sit in one table: linear-interpolation percentiles, population
//! standard deviation. Plus a seeded percentile bootstrap for confidence intervals.

use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use serde::Serialize;
use std::collections::BTreeMap;

/// Arithmetic mean; 0 for an empty slice (vLLM reports 0 rather than NaN when nothing completed).
pub fn mean(xs: &[f64]) -> f64 {
    if xs.is_empty() {
        return 0.0;
    }
    xs.iter().sum::<f64>() / xs.len() as f64
}

/// Population standard deviation (numpy's `std` default, ddof = 0).
pub fn std_dev(xs: &[f64]) -> f64 {
    if xs.is_empty() {
        return 0.0;
    }
    let m = mean(xs);
    (xs.iter().map(|x| (x - m) * (x - m)).sum::<f64>() / xs.len() as f64).sqrt()
}

/// Percentile `p` (0..=100) of already sorted data, interpolating linearly between closest ranks
/// (numpy's default `method="linear"`): rank = p/100 * (n - 1).
pub fn percentile_sorted(sorted: &[f64], p: f64) -> f64 {
    match sorted.len() {
        0 => 0.0,
        1 => sorted[0],
        n => {
            let rank = (p / 100.0).clamp(0.0, 1.0) * (n - 1) as f64;
            let lo = rank.floor() as usize;
            let hi = (lo + 1).min(n - 1);
            let frac = rank - lo as f64;
            sorted[lo] + (sorted[hi] - sorted[lo]) * frac
        }
    }
}

/// Percentile of unsorted data (sorts a copy; NaNs sort last).
pub fn percentile(xs: &[f64], p: f64) -> f64 {
    let mut v = xs.to_vec();
    v.sort_by(f64::total_cmp);
    percentile_sorted(&v, p)
}

/// The summary every latency metric gets in the report and the table.
#[derive(Debug, Clone, Copy, Default, PartialEq, Serialize)]
pub struct Summary {
    pub mean: f64,
    pub median: f64,
    pub std: f64,
    pub p90: f64,
    pub p99: f64,
    pub min: f64,
    pub max: f64,
}

impl Summary {
    pub fn of(xs: &[f64]) -> Self {
        let mut v = xs.to_vec();
        v.sort_by(f64::total_cmp);
        Self {
            mean: mean(&v),
            median: percentile_sorted(&v, 50.0),
            std: std_dev(&v),
            p90: percentile_sorted(&v, 90.0),
            p99: percentile_sorted(&v, 99.0),
            min: v.first().copied().unwrap_or(0.0),
            max: v.last().copied().unwrap_or(0.0),
        }
    }

    /// The same summary with every figure multiplied (seconds to milliseconds).
    pub fn scaled(self, k: f64) -> Self {
        Self {
            mean: self.mean * k,
            median: self.median * k,
            std: self.std * k,
            p90: self.p90 * k,
            p99: self.p99 * k,
            min: self.min * k,
            max: self.max * k,
        }
    }
}

/// A two-sided confidence interval.
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
pub struct Interval {
    pub lo: f64,
    pub hi: f64,
}

/// Draws `items.len()` items with replacement.
pub fn resample<'a, T>(items: &'a [T], rng: &mut impl Rng) -> Vec<&'a T> {
    (0..items.len())
        .map(|_| &items[rng.random_range(0..items.len())])
        .collect()
}

/// Percentile bootstrap core: runs `resamples` seeded replicates (each draws its own resample from the
/// RNG and returns named statistics) and gives each name the central `level` interval of its values.
/// Non-finite values are dropped. Seeded, so a report can be reproduced exactly.
pub fn bootstrap_intervals(
    resamples: usize,
    level: f64,
    seed: u64,
    mut replicate: impl FnMut(&mut ChaCha8Rng) -> Vec<(String, f64)>,
) -> BTreeMap<String, Interval> {
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    let mut draws: BTreeMap<String, Vec<f64>> = BTreeMap::new();
    for _ in 0..resamples {
        for (name, v) in replicate(&mut rng) {
            let values = draws.entry(name).or_default();
            if v.is_finite() {
                values.push(v);
            }
        }
    }
    let tail = (1.0 - level) / 2.0 * 100.0;
    draws
        .into_iter()
        .filter(|(_, v)| !v.is_empty())
        .map(|(k, mut v)| {
            v.sort_by(f64::total_cmp);
            let ci = Interval {
                lo: percentile_sorted(&v, tail),
                hi: percentile_sorted(&v, 100.0 - tail),
            };
            (k, ci)
        })
        .collect()
}

/// Bootstrap interval of one statistic of one sample.
pub fn bootstrap_ci<T: Clone>(
    items: &[T],
    stat: impl Fn(&[T]) -> f64,
    resamples: usize,
    level: f64,
    seed: u64,
) -> Option<Interval> {
    if items.is_empty() {
        return None;
    }
    let mut ci = bootstrap_intervals(resamples, level, seed, |rng| {
        let pick: Vec<T> = resample(items, rng).into_iter().cloned().collect();
        vec![(String::new(), stat(&pick))]
    });
    ci.remove("")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn percentiles_match_numpy_linear() {
        // numpy.percentile([1, 2, 3, 4], [50, 90, 99]) == [2.5, 3.7, 3.97]
        let xs = [4.0, 1.0, 3.0, 2.0];
        assert!((percentile(&xs, 50.0) - 2.5).abs() < 1e-12);
        assert!((percentile(&xs, 90.0) - 3.7).abs() < 1e-12);
        assert!((percentile(&xs, 99.0) - 3.97).abs() < 1e-12);
        assert_eq!(percentile(&xs, 0.0), 1.0);
        assert_eq!(percentile(&xs, 100.0), 4.0);
        // numpy.percentile([10, 20, 40], 25) == 15.0 ; 75 -> 30.0
        assert!((percentile(&[10.0, 20.0, 40.0], 25.0) - 15.0).abs() < 1e-12);
        assert!((percentile(&[10.0, 20.0, 40.0], 75.0) - 30.0).abs() < 1e-12);
        assert_eq!(percentile(&[], 50.0), 0.0);
        assert_eq!(percentile(&[7.0], 99.0), 7.0);
    }

    #[test]
    fn summary_mean_and_population_std() {
        // numpy.std([2, 4, 4, 4, 5, 5, 7, 9]) == 2.0, mean 5.0, median 4.5
        let s = Summary::of(&[2.0, 4.0, 4.0, 4.0, 5.0, 5.0, 7.0, 9.0]);
        assert_eq!(s.mean, 5.0);
        assert_eq!(s.std, 2.0);
        assert_eq!(s.median, 4.5);
        assert_eq!((s.min, s.max), (2.0, 9.0));
        assert_eq!(s.scaled(1000.0).mean, 5000.0);
    }

    #[test]
    fn bootstrap_of_a_constant_is_degenerate() {
        let ci = bootstrap_ci(&[3.0; 20], mean, 200, 0.95, 1).unwrap();
        assert_eq!((ci.lo, ci.hi), (3.0, 3.0));
    }

    #[test]
    fn bootstrap_of_a_coin_matches_binomial_quantiles() {
        // Mean of a resample of 50 zeros + 50 ones is Binomial(100, 0.5) / 100, whose 2.5% and 97.5%
        // quantiles are 40 and 60 (scipy.stats.binom.ppf([0.025, 0.975], 100, 0.5) == [40, 60]).
        let xs: Vec<f64> = (0..100).map(|i| (i % 2) as f64).collect();
        let ci = bootstrap_ci(&xs, mean, 4000, 0.95, 7).unwrap();
        assert!((ci.lo - 0.40).abs() <= 0.011, "{ci:?}");
        assert!((ci.hi - 0.60).abs() <= 0.011, "{ci:?}");
        // Seeded: the same call gives the same interval, another seed a (slightly) different one.
        assert_eq!(ci, bootstrap_ci(&xs, mean, 4000, 0.95, 7).unwrap());
    }

    #[test]
    fn bootstrap_empty_is_none() {
        assert!(bootstrap_ci::<f64>(&[], mean, 10, 0.95, 1).is_none());
    }
}
