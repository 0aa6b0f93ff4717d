//! The optional per-key request-rate limit (`server.rate_limit_per_key`): a token bucket per API
//! key, so one client's burst is refused with 429 and `Retry-After` before it reaches the engine's
//! queue, which every client shares. With no API keys configured every client is one key.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use axum::extract::{Request, State};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};

use super::protocol::ApiError;
use super::state::AppState;
use super::tenant::Tenant;

/// Refuses a generation request whose key is over its rate with 429 and `Retry-After` (whole
/// seconds, rounded up). Runs inside authentication, which tags the request with its key.
pub async fn limit_rate(State(state): State<AppState>, req: Request, next: Next) -> Response {
    let Some(limiter) = &state.settings.rate_limiter else {
        return next.run(req).await;
    };
    let tenant = req.extensions().get::<Tenant>().copied();
    match limiter.try_acquire(tenant, Instant::now()) {
        Ok(()) => next.run(req).await,
        Err(wait) => {
            let secs = wait.as_secs_f64().ceil().max(1.0) as u64;
            let mut err = ApiError::rate_limited(secs);
            err.body.error.message = format!(
                "this API key is over its request rate ({}/s, burst {}); retry after {secs} s",
                limiter.limit.per_second, limiter.limit.burst
            );
            err.into_response()
        }
    }
}

/// A sustained rate and the burst allowed above it.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct RateLimit {
    /// Requests per second a key may send on average (> 0).
    pub per_second: f64,
    /// Requests a key may send at once after being idle (>= 1).
    pub burst: u32,
}

/// One bucket per key; the map holds at most one entry per configured key (plus one for
/// unauthenticated use), as only authenticated requests reach it.
#[derive(Debug)]
pub struct RateLimiter {
    limit: RateLimit,
    buckets: Mutex<HashMap<Option<Tenant>, Bucket>>,
}

#[derive(Clone, Copy, Debug)]
struct Bucket {
    tokens: f64,
    updated: Instant,
}

impl RateLimiter {
    pub fn new(limit: RateLimit) -> RateLimiter {
        RateLimiter {
            limit,
            buckets: Mutex::new(HashMap::new()),
        }
    }

    /// Takes one request from `tenant`'s bucket at `now`, or says how long until one is there.
    pub fn try_acquire(&self, tenant: Option<Tenant>, now: Instant) -> Result<(), Duration> {
        let RateLimit { per_second, burst } = self.limit;
        let capacity = f64::from(burst.max(1));
        // A poisoned lock only means another request panicked mid-update; the counts are
        // still numbers, so keep limiting.
        let mut buckets = self.buckets.lock().unwrap_or_else(|p| p.into_inner());
        let bucket = buckets.entry(tenant).or_insert(Bucket {
            tokens: capacity,
            updated: now,
        });
        let elapsed = now.saturating_duration_since(bucket.updated).as_secs_f64();
        bucket.tokens = (bucket.tokens + elapsed * per_second).min(capacity);
        bucket.updated = now;
        if bucket.tokens >= 1.0 {
            bucket.tokens -= 1.0;
            Ok(())
        } else {
            Err(Duration::from_secs_f64((1.0 - bucket.tokens) / per_second))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn limiter(per_second: f64, burst: u32) -> RateLimiter {
        RateLimiter::new(RateLimit { per_second, burst })
    }

    #[test]
    fn a_burst_passes_then_the_sustained_rate() {
        let l = limiter(2.0, 3);
        let a = Some(Tenant::from_api_key("sk-a"));
        let t0 = Instant::now();
        for _ in 0..3 {
            assert_eq!(l.try_acquire(a, t0), Ok(()));
        }
        // Empty: the next token is 1 / 2 s away.
        assert_eq!(l.try_acquire(a, t0), Err(Duration::from_millis(500)));
        let t1 = t0 + Duration::from_millis(250);
        assert_eq!(l.try_acquire(a, t1), Err(Duration::from_millis(250)));
        let t2 = t0 + Duration::from_millis(500);
        assert_eq!(l.try_acquire(a, t2), Ok(()));
        assert!(l.try_acquire(a, t2).is_err());
        // A long idle refills to the burst, not beyond.
        let t3 = t2 + Duration::from_secs(60);
        for _ in 0..3 {
            assert_eq!(l.try_acquire(a, t3), Ok(()));
        }
        assert!(l.try_acquire(a, t3).is_err());
    }

    #[test]
    fn keys_have_separate_buckets() {
        let l = limiter(0.5, 1);
        let (a, b) = (
            Some(Tenant::from_api_key("sk-a")),
            Some(Tenant::from_api_key("sk-b")),
        );
        let t0 = Instant::now();
        assert_eq!(l.try_acquire(a, t0), Ok(()));
        assert_eq!(l.try_acquire(a, t0), Err(Duration::from_secs(2)));
        assert_eq!(l.try_acquire(b, t0), Ok(()));
        assert_eq!(l.try_acquire(None, t0), Ok(()));
    }
}
