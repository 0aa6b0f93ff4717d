//! How requests spread over adapters (`--adapter-dist`). Index 0 is the most popular adapter, so "head"
//! and "tail" in the report are simply low and high indices.
//!
//! - `uniform`: every adapter equally likely.
//! - `zipf:S`: P(k) proportional to 1 / (k + 1)^S.
//! - `slora:ALPHA`: S-LoRA's power law, index = floor(u^ALPHA * n) with u uniform in [0, 1).

use rand::Rng;
use std::fmt;
use std::str::FromStr;

#[derive(Debug, thiserror::Error)]
#[error("invalid adapter distribution {0:?} (expected uniform, zipf:S or slora:ALPHA with S, ALPHA > 0)")]
pub struct PopularityParseError(String);

#[derive(Debug, Clone, Copy, PartialEq)]
pub enum AdapterDist {
    Uniform,
    Zipf(f64),
    Slora(f64),
}

impl AdapterDist {
    /// A sampler over `n` adapters (n >= 1).
    pub fn sampler(&self, n: usize) -> PopularitySampler {
        let n = n.max(1);
        let cdf = match *self {
            Self::Zipf(s) => {
                let w: Vec<f64> = (0..n).map(|k| 1.0 / ((k + 1) as f64).powf(s)).collect();
                let total: f64 = w.iter().sum();
                let mut acc = 0.0;
                w.iter()
                    .map(|x| {
                        acc += x / total;
                        acc
                    })
                    .collect()
            }
            _ => Vec::new(),
        };
        PopularitySampler {
            dist: *self,
            n,
            cdf,
        }
    }

    /// The exact probability of each index, for tests and for the printed plan.
    pub fn probabilities(&self, n: usize) -> Vec<f64> {
        let n = n.max(1);
        match *self {
            Self::Uniform => vec![1.0 / n as f64; n],
            Self::Zipf(s) => {
                let w: Vec<f64> = (0..n).map(|k| 1.0 / ((k + 1) as f64).powf(s)).collect();
                let total: f64 = w.iter().sum();
                w.into_iter().map(|x| x / total).collect()
            }
            // P(floor(u^a n) = k) = P(k/n <= u^a < (k+1)/n) = ((k+1)/n)^(1/a) - (k/n)^(1/a)
            Self::Slora(a) => (0..n)
                .map(|k| {
                    ((k + 1) as f64 / n as f64).powf(1.0 / a) - (k as f64 / n as f64).powf(1.0 / a)
                })
                .collect(),
        }
    }
}

/// Draws adapter indices; built once per schedule.
#[derive(Debug, Clone)]
pub struct PopularitySampler {
    dist: AdapterDist,
    n: usize,
    cdf: Vec<f64>,
}

impl PopularitySampler {
    pub fn sample(&self, rng: &mut impl Rng) -> usize {
        match self.dist {
            AdapterDist::Uniform => rng.random_range(0..self.n),
            AdapterDist::Zipf(_) => {
                let u: f64 = rng.random();
                self.cdf.partition_point(|&c| c <= u).min(self.n - 1)
            }
            AdapterDist::Slora(a) => {
                let u: f64 = rng.random();
                ((u.powf(a) * self.n as f64).floor() as usize).min(self.n - 1)
            }
        }
    }
}

impl FromStr for AdapterDist {
    type Err = PopularityParseError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let err = || PopularityParseError(s.to_string());
        let param = |rest: &str| -> Result<f64, PopularityParseError> {
            let v: f64 = rest.trim().parse().map_err(|_| err())?;
            (v > 0.0 && v.is_finite()).then_some(v).ok_or_else(err)
        };
        match s.trim() {
            "uniform" => Ok(Self::Uniform),
            t => {
                if let Some(rest) = t.strip_prefix("zipf:") {
                    Ok(Self::Zipf(param(rest)?))
                } else if let Some(rest) = t.strip_prefix("slora:") {
                    Ok(Self::Slora(param(rest)?))
                } else {
                    Err(err())
                }
            }
        }
    }
}

impl fmt::Display for AdapterDist {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Uniform => write!(f, "uniform"),
            Self::Zipf(s) => write!(f, "zipf:{s}"),
            Self::Slora(a) => write!(f, "slora:{a}"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::SeedableRng;
    use rand_chacha::ChaCha8Rng;

    fn empirical(d: AdapterDist, n: usize, draws: usize) -> Vec<f64> {
        let s = d.sampler(n);
        let mut rng = ChaCha8Rng::seed_from_u64(11);
        let mut counts = vec![0usize; n];
        for _ in 0..draws {
            counts[s.sample(&mut rng)] += 1;
        }
        counts
            .into_iter()
            .map(|c| c as f64 / draws as f64)
            .collect()
    }

    #[test]
    fn empirical_frequencies_match_exact_probabilities() {
        for d in [
            AdapterDist::Uniform,
            AdapterDist::Zipf(1.1),
            AdapterDist::Slora(2.0),
        ] {
            let p = d.probabilities(10);
            assert!((p.iter().sum::<f64>() - 1.0).abs() < 1e-9);
            let e = empirical(d, 10, 200_000);
            for (k, (pe, pp)) in e.iter().zip(&p).enumerate() {
                assert!((pe - pp).abs() < 0.006, "{d} index {k}: {pe} vs {pp}");
            }
        }
    }

    #[test]
    fn slora_hand_computed() {
        // alpha = 2, n = 4: P(k) = sqrt((k+1)/4) - sqrt(k/4) -> 0.5, 0.2071, 0.1589, 0.1340
        let p = AdapterDist::Slora(2.0).probabilities(4);
        let want = [0.5, 0.207_106_78, 0.158_918_93, 0.133_974_60];
        for (a, b) in p.iter().zip(want) {
            assert!((a - b).abs() < 1e-6, "{p:?}");
        }
    }

    #[test]
    fn parses_and_rejects() {
        assert_eq!(
            "zipf:1.2".parse::<AdapterDist>().unwrap(),
            AdapterDist::Zipf(1.2)
        );
        assert_eq!(
            "slora:3".parse::<AdapterDist>().unwrap().to_string(),
            "slora:3"
        );
        for bad in ["zipf", "zipf:0", "slora:-1", "pareto:2"] {
            assert!(bad.parse::<AdapterDist>().is_err(), "{bad}");
        }
    }
}
