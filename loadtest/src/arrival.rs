//! Open-loop arrival times. Gaps are Gamma-distributed with shape = burstiness and mean 1/rate, exactly as
//! vLLM's `bench serve` draws them: burstiness 1 is a Poisson process, below 1 burstier, above 1 more
//! regular (the squared coefficient of variation of the gaps is 1/burstiness).
//!
//! A ramp is a time change: the process is generated at the full rate in "steady time" s and mapped to
//! wall time t through the inverse of the cumulative intensity of a rate rising linearly from 0 to R over
//! the first T seconds (t = sqrt(2Ts) while s < T/2, then t = s + T/2), which keeps the gap shape.

use rand::Rng;
use rand_distr::{Distribution, Gamma};
use std::fmt;
use std::str::FromStr;

#[derive(Debug, thiserror::Error)]
pub enum ArrivalError {
    #[error("invalid rate {0:?} (expected a positive number of requests/s or 'inf')")]
    Rate(String),
    #[error("burstiness must be a positive finite number, got {0}")]
    Burstiness(f64),
    #[error("ramp must be a non-negative number of seconds, got {0}")]
    Ramp(f64),
}

/// Requests per second; `Infinite` sends everything at time 0.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Rate {
    Finite(f64),
    Infinite,
}

impl FromStr for Rate {
    type Err = ArrivalError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s.trim() {
            "inf" | "infinite" => Ok(Self::Infinite),
            t => match t.parse::<f64>() {
                Ok(r) if r.is_infinite() && r > 0.0 => Ok(Self::Infinite),
                Ok(r) if r > 0.0 && r.is_finite() => Ok(Self::Finite(r)),
                _ => Err(ArrivalError::Rate(s.to_string())),
            },
        }
    }
}

impl fmt::Display for Rate {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            // Enough digits for any sensible rate, without sweep bisection noise (56.568542494923804).
            Self::Finite(r) => {
                let s = format!("{r:.3}");
                write!(f, "{}", s.trim_end_matches('0').trim_end_matches('.'))
            }
            Self::Infinite => write!(f, "inf"),
        }
    }
}

/// The open-loop arrival process.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct ArrivalProcess {
    pub rate: Rate,
    pub burstiness: f64,
    pub ramp_s: f64,
}

/// When to stop generating arrivals.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Horizon {
    Count(usize),
    /// Arrivals strictly before this many seconds (the count is whatever the process yields).
    Seconds(f64),
}

impl ArrivalProcess {
    pub fn new(rate: Rate, burstiness: f64, ramp_s: f64) -> Result<Self, ArrivalError> {
        if !(burstiness > 0.0 && burstiness.is_finite()) {
            return Err(ArrivalError::Burstiness(burstiness));
        }
        if !(ramp_s >= 0.0 && ramp_s.is_finite()) {
            return Err(ArrivalError::Ramp(ramp_s));
        }
        Ok(Self {
            rate,
            burstiness,
            ramp_s,
        })
    }

    /// Send times in seconds from the start, non-decreasing. An infinite rate with a time horizon yields
    /// nothing (it has no natural count); callers reject that combination up front.
    pub fn send_times(&self, horizon: Horizon, rng: &mut impl Rng) -> Vec<f64> {
        let Rate::Finite(rate) = self.rate else {
            return match horizon {
                Horizon::Count(n) => vec![0.0; n],
                Horizon::Seconds(_) => Vec::new(),
            };
        };
        // Shape > 0 and scale > 0 were validated, so Gamma::new cannot fail; fall back to fixed gaps anyway.
        let gamma = Gamma::new(self.burstiness, 1.0 / (rate * self.burstiness)).ok();
        let mut out = Vec::new();
        let mut s = 0.0;
        loop {
            if let Horizon::Count(n) = horizon {
                if out.len() >= n {
                    break;
                }
            }
            s += match &gamma {
                Some(g) => g.sample(rng),
                None => 1.0 / rate,
            };
            let t = self.warp(s);
            if let Horizon::Seconds(d) = horizon {
                if t >= d {
                    break;
                }
            }
            out.push(t);
        }
        out
    }

    fn warp(&self, s: f64) -> f64 {
        let t_ramp = self.ramp_s;
        if t_ramp <= 0.0 {
            s
        } else if s < t_ramp / 2.0 {
            (2.0 * t_ramp * s).sqrt()
        } else {
            s + t_ramp / 2.0
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::stats::{mean, std_dev};
    use rand::SeedableRng;
    use rand_chacha::ChaCha8Rng;

    fn gaps(p: ArrivalProcess, n: usize) -> Vec<f64> {
        let t = p.send_times(Horizon::Count(n), &mut ChaCha8Rng::seed_from_u64(5));
        std::iter::once(t[0])
            .chain(t.windows(2).map(|w| w[1] - w[0]))
            .collect()
    }

    #[test]
    fn gaps_have_the_requested_rate_and_variability() {
        for burstiness in [0.5, 1.0, 4.0] {
            let g = gaps(
                ArrivalProcess::new(Rate::Finite(50.0), burstiness, 0.0).unwrap(),
                40_000,
            );
            let (m, sd) = (mean(&g), std_dev(&g));
            assert!((m * 50.0 - 1.0).abs() < 0.02, "rate off: mean gap {m}");
            let cv2 = (sd / m).powi(2);
            assert!(
                (cv2 * burstiness - 1.0).abs() < 0.05,
                "burstiness {burstiness}: cv2 {cv2}"
            );
        }
    }

    #[test]
    fn duration_horizon_yields_rate_times_duration() {
        let p = ArrivalProcess::new(Rate::Finite(200.0), 1.0, 0.0).unwrap();
        let t = p.send_times(Horizon::Seconds(100.0), &mut ChaCha8Rng::seed_from_u64(1));
        // Poisson(20000): sd ~ 141
        assert!((t.len() as f64 - 20_000.0).abs() < 600.0, "{}", t.len());
        assert!(t.windows(2).all(|w| w[0] <= w[1]) && *t.last().unwrap() < 100.0);
    }

    #[test]
    fn ramp_rises_linearly_then_holds() {
        // Rate 100/s, ramp 20 s: expected arrivals in [0, 10) = 100 * 10^2 / 40 = 250,
        // in [10, 20) = 750, and in [20, 30) = 1000.
        let p = ArrivalProcess::new(Rate::Finite(100.0), 1.0, 20.0).unwrap();
        let t = p.send_times(Horizon::Seconds(30.0), &mut ChaCha8Rng::seed_from_u64(2));
        let count = |a: f64, b: f64| t.iter().filter(|&&x| x >= a && x < b).count() as f64;
        assert!(
            (count(0.0, 10.0) - 250.0).abs() < 60.0,
            "{}",
            count(0.0, 10.0)
        );
        assert!(
            (count(10.0, 20.0) - 750.0).abs() < 100.0,
            "{}",
            count(10.0, 20.0)
        );
        assert!(
            (count(20.0, 30.0) - 1000.0).abs() < 120.0,
            "{}",
            count(20.0, 30.0)
        );
    }

    #[test]
    fn infinite_rate_sends_everything_at_once() {
        let p = ArrivalProcess::new(Rate::Infinite, 1.0, 0.0).unwrap();
        assert_eq!(
            p.send_times(Horizon::Count(3), &mut ChaCha8Rng::seed_from_u64(0)),
            vec![0.0; 3]
        );
        assert_eq!("inf".parse::<Rate>().unwrap(), Rate::Infinite);
        assert_eq!(Rate::Finite(56.568542494923804).to_string(), "56.569");
        assert_eq!(Rate::Finite(40.0).to_string(), "40");
        assert!("0".parse::<Rate>().is_err() && "-2".parse::<Rate>().is_err());
        assert!(ArrivalProcess::new(Rate::Infinite, 0.0, 0.0).is_err());
    }
}
