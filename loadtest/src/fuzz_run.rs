//! `caduceus-loadtest fuzz`: sends [`crate::fuzz`] requests over plain TCP (one connection each,
//! so a malformed request cannot poison the next), counts answers by status, and checks the
//! server is still healthy afterwards. A 5xx, a connection closed without an answer or an
//! unhealthy server fails the run.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

use crate::fuzz::{request, FuzzRequest};

/// What a fuzz run sends.
#[derive(Clone, Debug)]
pub struct FuzzPlan {
    pub addr: SocketAddr,
    pub seed: u64,
    pub num_requests: u64,
    pub concurrency: usize,
    /// Served names valid-looking requests address.
    pub models: Vec<String>,
    /// Sent as `Authorization: Bearer` on requests that set none themselves.
    pub api_key: Option<String>,
    /// Longest wait for one answer.
    pub timeout: Duration,
}

/// A request the server answered badly.
#[derive(Clone, Debug)]
pub struct Failure {
    pub index: u64,
    /// The status, or 0 when the connection closed (or timed out) without one.
    pub status: u16,
    pub request: String,
}

/// Counts by status, the failures, and the health check after the run.
#[derive(Debug, Default)]
pub struct FuzzReport {
    pub by_status: BTreeMap<u16, u64>,
    pub failures: Vec<Failure>,
    /// Status of `GET /health` after the last request (0: no answer).
    pub health_after: u16,
}

impl FuzzReport {
    /// No 5xx, every request answered, healthy afterwards.
    pub fn passed(&self) -> bool {
        self.failures.is_empty() && self.health_after == 200
    }

    /// Human-readable summary.
    pub fn summary(&self) -> String {
        let total: u64 = self.by_status.values().sum();
        let mut s = format!("{total} requests; by status:");
        for (status, n) in &self.by_status {
            s.push_str(&format!(" {status}: {n};"));
        }
        s.push_str(&format!(
            "\nfailures (5xx or no answer): {}\n/health after the run: {}\n",
            self.failures.len(),
            self.health_after
        ));
        for f in self.failures.iter().take(20) {
            s.push_str(&format!("  #{} -> {}: {}\n", f.index, f.status, f.request));
        }
        s
    }
}

/// Runs the plan.
pub async fn run(plan: &FuzzPlan) -> FuzzReport {
    let next = Arc::new(AtomicU64::new(0));
    let report = Arc::new(Mutex::new(FuzzReport::default()));
    let workers: Vec<_> = (0..plan.concurrency.max(1))
        .map(|_| {
            let (next, report, plan) = (next.clone(), report.clone(), plan.clone());
            tokio::spawn(async move {
                loop {
                    let index = next.fetch_add(1, Ordering::Relaxed);
                    if index >= plan.num_requests {
                        return;
                    }
                    let mut req = request(plan.seed, index, &plan.models);
                    if let Some(key) = &plan.api_key {
                        if !req.headers.iter().any(|(k, _)| *k == "authorization") {
                            req.headers.push(("authorization", format!("Bearer {key}")));
                        }
                    }
                    let status = send(plan.addr, &req, plan.timeout).await;
                    let mut r = report.lock().unwrap_or_else(|e| e.into_inner());
                    *r.by_status.entry(status).or_default() += 1;
                    if status == 0 || status >= 500 {
                        r.failures.push(Failure {
                            index,
                            status,
                            request: req.summary(300),
                        });
                    }
                }
            })
        })
        .collect();
    for w in workers {
        let _ = w.await;
    }
    let health = FuzzRequest {
        method: "GET",
        path: "/health".into(),
        headers: Vec::new(),
        body: Vec::new(),
    };
    let health_after = send(plan.addr, &health, plan.timeout).await;
    let mut report = std::mem::take(&mut *report.lock().unwrap_or_else(|e| e.into_inner()));
    report.health_after = health_after;
    report.failures.sort_by_key(|f| f.index);
    report
}

/// Sends one request on its own connection; the response status, or 0 without one.
pub async fn send(addr: SocketAddr, req: &FuzzRequest, timeout: Duration) -> u16 {
    let exchange = async {
        let mut s = TcpStream::connect(addr).await.ok()?;
        let mut head = format!(
            "{} {} HTTP/1.1\r\nhost: fuzz\r\nconnection: close\r\ncontent-length: {}\r\n",
            req.method,
            req.path,
            req.body.len()
        );
        for (k, v) in &req.headers {
            head.push_str(&format!("{k}: {v}\r\n"));
        }
        head.push_str("\r\n");
        s.write_all(head.as_bytes()).await.ok()?;
        // A server may answer (413) and close before the whole body is sent.
        let _ = s.write_all(&req.body).await;
        let mut raw = Vec::new();
        let _ = s.read_to_end(&mut raw).await;
        parse_status(&raw)
    };
    tokio::time::timeout(timeout, exchange)
        .await
        .ok()
        .flatten()
        .unwrap_or(0)
}

fn parse_status(raw: &[u8]) -> Option<u16> {
    let line = raw.split(|&b| b == b'\n').next()?;
    let line = std::str::from_utf8(line).ok()?;
    line.strip_prefix("HTTP/1.")?
        .split(' ')
        .nth(1)?
        .parse()
        .ok()
}

#[cfg(test)]
mod tests {
    use super::parse_status;

    #[test]
    fn status_lines_parse_and_garbage_does_not() {
        assert_eq!(
            parse_status(b"HTTP/1.1 413 Payload Too Large\r\n"),
            Some(413)
        );
        assert_eq!(parse_status(b"HTTP/1.0 200 OK\r\n\r\nx"), Some(200));
        assert_eq!(parse_status(b""), None);
        assert_eq!(parse_status(b"garbage"), None);
    }
}
