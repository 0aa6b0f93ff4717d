//! What happened to one request: the raw timings every metric is computed from.

use serde::{Serialize, Serializer};
use std::fmt;

/// Why a request failed, grouped the way the report counts them.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum ErrorKind {
    /// The server answered with a non-200 status.
    Status(u16),
    /// No complete answer within `--timeout`.
    Timeout,
    /// The TCP connection could not be opened.
    Connect,
    /// The connection broke, or the stream ended before `[DONE]` or a finish reason.
    Disconnect,
    /// The stream was not valid SSE/JSON, or carried an error object.
    Protocol,
}

impl fmt::Display for ErrorKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Status(s) => write!(f, "http_{s}"),
            Self::Timeout => write!(f, "timeout"),
            Self::Connect => write!(f, "connect"),
            Self::Disconnect => write!(f, "disconnect"),
            Self::Protocol => write!(f, "protocol"),
        }
    }
}

impl Serialize for ErrorKind {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

/// One request's record. Times are seconds; `start_s` is from the start of the run.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct RequestOutcome {
    pub index: usize,
    pub model: String,
    pub adapter_rank: Option<usize>,
    /// When the schedule said to send it.
    pub scheduled_s: f64,
    /// When it was actually sent (later than scheduled if the harness or the in-flight cap held it).
    pub start_s: f64,
    /// Time to the first chunk with non-empty text.
    pub ttft_s: Option<f64>,
    /// Gaps between successive non-empty text chunks.
    pub itl_s: Vec<f64>,
    /// Send to end of stream (or to the failure).
    pub e2el_s: f64,
    pub prompt_tokens: Option<u64>,
    /// From the usage chunk when present, else the number of non-empty text chunks.
    pub output_tokens: u64,
    pub error: Option<ErrorKind>,
}

impl RequestOutcome {
    pub fn ok(&self) -> bool {
        self.error.is_none()
    }

    pub fn end_s(&self) -> f64 {
        self.start_s + self.e2el_s
    }

    /// vLLM's TPOT: (E2E - TTFT) / (output tokens - 1), defined only with more than one output token.
    pub fn tpot_s(&self) -> Option<f64> {
        match (self.ttft_s, self.output_tokens) {
            (Some(ttft), n) if n > 1 && self.ok() => Some((self.e2el_s - ttft) / (n - 1) as f64),
            _ => None,
        }
    }

    /// Arrival times (from the start of the run) of the non-empty text chunks.
    pub fn chunk_times_s(&self) -> Vec<f64> {
        let Some(ttft) = self.ttft_s else {
            return Vec::new();
        };
        let mut t = self.start_s + ttft;
        let mut out = Vec::with_capacity(self.itl_s.len() + 1);
        out.push(t);
        for gap in &self.itl_s {
            t += gap;
            out.push(t);
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tpot_and_chunk_times() {
        let o = RequestOutcome {
            index: 0,
            model: "m".into(),
            adapter_rank: None,
            scheduled_s: 1.0,
            start_s: 1.0,
            ttft_s: Some(0.2),
            itl_s: vec![0.02, 0.03],
            e2el_s: 0.25,
            prompt_tokens: Some(10),
            output_tokens: 3,
            error: None,
        };
        assert!((o.tpot_s().unwrap() - 0.025).abs() < 1e-12);
        let t = o.chunk_times_s();
        assert_eq!(t.len(), 3);
        assert!((t[2] - 1.25).abs() < 1e-12);
        let one = RequestOutcome {
            output_tokens: 1,
            ..o.clone()
        };
        assert_eq!(one.tpot_s(), None);
        let failed = RequestOutcome {
            error: Some(ErrorKind::Timeout),
            ..o
        };
        assert_eq!(failed.tpot_s(), None);
        assert_eq!(ErrorKind::Status(503).to_string(), "http_503");
        assert_eq!(
            serde_json::to_string(&ErrorKind::Disconnect).unwrap(),
            "\"disconnect\""
        );
    }
}
