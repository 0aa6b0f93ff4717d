//! Service-level objectives (`--slo ttft=1000ms,tpot=50ms,e2el=5s`) and the check vLLM's goodput uses:
//! a request is good when it succeeded and meets every objective given.

use crate::outcome::RequestOutcome;
use serde::Serialize;
use std::fmt;
use std::str::FromStr;

#[derive(Debug, thiserror::Error)]
#[error("invalid SLO {0:?} (expected e.g. ttft=1000ms,tpot=50ms,e2el=5s; keys ttft, tpot, e2el)")]
pub struct SloParseError(String);

/// Upper bounds in milliseconds; `None` means no objective on that metric.
#[derive(Debug, Clone, Copy, Default, PartialEq, Serialize)]
pub struct Slo {
    pub ttft_ms: Option<f64>,
    pub tpot_ms: Option<f64>,
    pub e2el_ms: Option<f64>,
}

impl Slo {
    pub fn is_empty(&self) -> bool {
        self.ttft_ms.is_none() && self.tpot_ms.is_none() && self.e2el_ms.is_none()
    }

    /// Whether one request meets every objective. Failed requests never do. A request with a single
    /// output token has no TPOT and passes that objective (vLLM counts its TPOT as 0).
    pub fn met_by(&self, o: &RequestOutcome) -> bool {
        if !o.ok() {
            return false;
        }
        let ms = |s: f64| s * 1000.0;
        let ttft = ms(o.ttft_s.unwrap_or(o.e2el_s));
        let tpot = ms(o.tpot_s().unwrap_or(0.0));
        let e2el = ms(o.e2el_s);
        self.ttft_ms.is_none_or(|b| ttft <= b)
            && self.tpot_ms.is_none_or(|b| tpot <= b)
            && self.e2el_ms.is_none_or(|b| e2el <= b)
    }
}

fn parse_ms(v: &str) -> Option<f64> {
    let v = v.trim();
    let (num, scale) = if let Some(n) = v.strip_suffix("ms") {
        (n, 1.0)
    } else if let Some(n) = v.strip_suffix('s') {
        (n, 1000.0)
    } else {
        (v, 1.0)
    };
    let x: f64 = num.trim().parse().ok()?;
    (x > 0.0 && x.is_finite()).then_some(x * scale)
}

impl FromStr for Slo {
    type Err = SloParseError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let err = || SloParseError(s.to_string());
        let mut slo = Slo::default();
        for part in s.split(',').map(str::trim).filter(|p| !p.is_empty()) {
            let (k, v) = part.split_once(['=', ':']).ok_or_else(err)?;
            let ms = Some(parse_ms(v).ok_or_else(err)?);
            match k.trim() {
                "ttft" => slo.ttft_ms = ms,
                "tpot" => slo.tpot_ms = ms,
                "e2el" | "e2e" => slo.e2el_ms = ms,
                _ => return Err(err()),
            }
        }
        if slo.is_empty() {
            return Err(err());
        }
        Ok(slo)
    }
}

impl fmt::Display for Slo {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let parts: Vec<String> = [
            ("ttft", self.ttft_ms),
            ("tpot", self.tpot_ms),
            ("e2el", self.e2el_ms),
        ]
        .into_iter()
        .filter_map(|(k, v)| v.map(|v| format!("{k}={v}ms")))
        .collect();
        write!(f, "{}", parts.join(","))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::outcome::ErrorKind;

    fn outcome(ttft: f64, e2el: f64, tokens: u64) -> RequestOutcome {
        RequestOutcome {
            index: 0,
            model: "m".into(),
            adapter_rank: None,
            scheduled_s: 0.0,
            start_s: 0.0,
            ttft_s: Some(ttft),
            itl_s: vec![],
            e2el_s: e2el,
            prompt_tokens: None,
            output_tokens: tokens,
            error: None,
        }
    }

    #[test]
    fn parses_units_and_round_trips() {
        let s: Slo = "ttft=1s, tpot=50ms,e2el=2500".parse().unwrap();
        assert_eq!(
            (s.ttft_ms, s.tpot_ms, s.e2el_ms),
            (Some(1000.0), Some(50.0), Some(2500.0))
        );
        assert_eq!(s.to_string(), "ttft=1000ms,tpot=50ms,e2el=2500ms");
        assert_eq!(s.to_string().parse::<Slo>().unwrap(), s);
        for bad in ["", "ttft", "ttft=-1ms", "latency=5ms", "ttft=abc"] {
            assert!(bad.parse::<Slo>().is_err(), "{bad}");
        }
    }

    #[test]
    fn every_objective_must_hold() {
        let slo: Slo = "ttft=300ms,tpot=50ms".parse().unwrap();
        // TPOT = (1.2 - 0.2) / (21 - 1) = 50 ms exactly: met (bounds are inclusive).
        assert!(slo.met_by(&outcome(0.2, 1.2, 21)));
        assert!(!slo.met_by(&outcome(0.2, 1.3, 21)));
        assert!(!slo.met_by(&outcome(0.31, 0.31, 1)));
        assert!(slo.met_by(&outcome(0.3, 9.0, 1)), "one token: no TPOT");
        let failed = RequestOutcome {
            error: Some(ErrorKind::Timeout),
            ..outcome(0.1, 0.2, 5)
        };
        assert!(!slo.met_by(&failed));
    }
}
