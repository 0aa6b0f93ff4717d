//! Token-length distributions for `--input-len` / `--output-len`: `N` (fixed), `uniform:A-B`
//! (inclusive) or `normal:MEAN,SD` (rounded, clamped to at least 1).

use rand::Rng;
use rand_distr::{Distribution, Normal};
use std::fmt;
use std::str::FromStr;

#[derive(Debug, thiserror::Error)]
#[error("invalid length distribution {spec:?}: {why} (expected N, uniform:A-B or normal:MEAN,SD)")]
pub struct LengthParseError {
    spec: String,
    why: &'static str,
}

/// A distribution of token counts; every sample is at least 1.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum LengthDist {
    Fixed(u32),
    Uniform { lo: u32, hi: u32 },
    Normal { mean: f64, sd: f64 },
}

impl LengthDist {
    pub fn sample(&self, rng: &mut impl Rng) -> u32 {
        match *self {
            Self::Fixed(n) => n.max(1),
            Self::Uniform { lo, hi } => rng.random_range(lo..=hi).max(1),
            Self::Normal { mean, sd } => match Normal::new(mean, sd) {
                Ok(d) => d.sample(rng).round().max(1.0) as u32,
                Err(_) => mean.round().max(1.0) as u32,
            },
        }
    }

    /// Expected value, for sizing and for the printed plan.
    pub fn mean(&self) -> f64 {
        match *self {
            Self::Fixed(n) => n as f64,
            Self::Uniform { lo, hi } => (lo as f64 + hi as f64) / 2.0,
            Self::Normal { mean, .. } => mean,
        }
    }
}

impl FromStr for LengthDist {
    type Err = LengthParseError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let err = |why| LengthParseError {
            spec: s.to_string(),
            why,
        };
        let s = s.trim();
        if let Some(rest) = s.strip_prefix("uniform:") {
            let (a, b) = rest.split_once('-').ok_or_else(|| err("missing '-'"))?;
            let lo: u32 = a.trim().parse().map_err(|_| err("bad lower bound"))?;
            let hi: u32 = b.trim().parse().map_err(|_| err("bad upper bound"))?;
            if lo == 0 || lo > hi {
                return Err(err("need 1 <= A <= B"));
            }
            Ok(Self::Uniform { lo, hi })
        } else if let Some(rest) = s.strip_prefix("normal:") {
            let (m, sd) = rest.split_once(',').ok_or_else(|| err("missing ','"))?;
            let mean: f64 = m.trim().parse().map_err(|_| err("bad mean"))?;
            let sd: f64 = sd
                .trim()
                .parse()
                .map_err(|_| err("bad standard deviation"))?;
            if !(mean >= 1.0 && sd >= 0.0 && sd.is_finite()) {
                return Err(err("need MEAN >= 1 and SD >= 0"));
            }
            Ok(Self::Normal { mean, sd })
        } else {
            let n: u32 = s.parse().map_err(|_| err("not a number"))?;
            if n == 0 {
                return Err(err("must be at least 1"));
            }
            Ok(Self::Fixed(n))
        }
    }
}

impl fmt::Display for LengthDist {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Fixed(n) => write!(f, "{n}"),
            Self::Uniform { lo, hi } => write!(f, "uniform:{lo}-{hi}"),
            Self::Normal { mean, sd } => write!(f, "normal:{mean},{sd}"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::SeedableRng;
    use rand_chacha::ChaCha8Rng;

    #[test]
    fn parses_and_round_trips() {
        for spec in ["128", "uniform:10-20", "normal:100,15"] {
            let d: LengthDist = spec.parse().unwrap();
            assert_eq!(d.to_string(), spec);
        }
        for bad in [
            "0",
            "x",
            "uniform:20-10",
            "uniform:5",
            "normal:100",
            "normal:0,1",
        ] {
            assert!(bad.parse::<LengthDist>().is_err(), "{bad}");
        }
    }

    #[test]
    fn samples_stay_in_range_with_the_right_mean() {
        let mut rng = ChaCha8Rng::seed_from_u64(3);
        let u: LengthDist = "uniform:10-20".parse().unwrap();
        let xs: Vec<u32> = (0..20_000).map(|_| u.sample(&mut rng)).collect();
        assert!(xs.iter().all(|&x| (10..=20).contains(&x)));
        assert!(xs.contains(&10) && xs.contains(&20));
        let m = xs.iter().map(|&x| x as f64).sum::<f64>() / xs.len() as f64;
        assert!((m - 15.0).abs() < 0.1, "{m}");

        let n: LengthDist = "normal:200,20".parse().unwrap();
        let m = (0..20_000).map(|_| n.sample(&mut rng) as f64).sum::<f64>() / 20_000.0;
        assert!((m - 200.0).abs() < 1.0, "{m}");
        assert_eq!(LengthDist::Fixed(7).sample(&mut rng), 7);
    }
}
