//! An in-process mock OpenAI server with known, injected behaviour: a fixed time to first token, a fixed
//! gap between tokens, a fixed (or requested) number of output tokens, and a share of requests answered
//! with an error status or cut off mid-stream. The tests hold the harness's metrics against these
//! numbers; `caduceus-loadtest mock-server` exposes it for manual trials. Binds 127.0.0.1 only.

use bytes::Bytes;
use http_body_util::combinators::BoxBody;
use http_body_util::{BodyExt, Channel, Full, Limited};
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper::{Method, Request, Response, StatusCode};
use hyper_util::rt::TokioIo;
use serde_json::{json, Value};
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;
use tokio::net::TcpListener;
use tokio::sync::{oneshot, OwnedSemaphorePermit, Semaphore};
use tokio::time::Instant;
use xxhash_rust::xxh3::xxh3_64_with_seed;

#[derive(Debug, thiserror::Error)]
pub enum MockError {
    #[error("mock server cannot bind {addr}: {source}")]
    Bind {
        addr: SocketAddr,
        source: std::io::Error,
    },
}

/// The error a stream is aborted with to simulate a dropped connection.
#[derive(Debug, thiserror::Error)]
#[error("mock: injected disconnect")]
pub struct InjectedDisconnect;

#[derive(Debug, Clone, PartialEq)]
pub struct MockConfig {
    pub ttft: Duration,
    pub itl: Duration,
    /// Tokens per answer; `None` uses each request's `max_tokens` (as a server honouring `ignore_eos`).
    pub output_tokens: Option<u32>,
    /// Share of requests answered with `error_status` at once.
    pub error_rate: f64,
    pub error_status: u16,
    /// Share of requests whose stream is cut after half of their tokens.
    pub disconnect_rate: f64,
    pub base_model: String,
    pub adapters: Vec<String>,
    /// Seeds the per-request error draws (a hash of the request's arrival number).
    pub seed: u64,
    /// Answers at most this many requests at once; the rest queue (so TTFT grows with load, which
    /// gives `sweep --search` a capacity to find).
    pub max_concurrency: Option<usize>,
}

impl Default for MockConfig {
    fn default() -> Self {
        Self {
            ttft: Duration::from_millis(200),
            itl: Duration::from_millis(20),
            output_tokens: None,
            error_rate: 0.0,
            error_status: 503,
            disconnect_rate: 0.0,
            base_model: "mock-base".into(),
            adapters: Vec::new(),
            seed: 0,
            max_concurrency: None,
        }
    }
}

/// Counters of what the mock did, for tests to compare with the harness's report.
#[derive(Debug, Default)]
pub struct MockStats {
    pub requests: AtomicU64,
    pub errors: AtomicU64,
    pub disconnects: AtomicU64,
    pub tokens: AtomicU64,
    /// Order-independent digest of the accepted request bodies (wrapping sum of their xxh3): two
    /// servers sent the same schedule end with the same digest.
    pub body_digest: AtomicU64,
}

struct State {
    cfg: MockConfig,
    stats: Arc<MockStats>,
    slots: Option<Arc<Semaphore>>,
}

/// A running mock; dropping it (or `shutdown`) stops accepting connections.
pub struct MockServer {
    addr: SocketAddr,
    stats: Arc<MockStats>,
    stop: Option<oneshot::Sender<()>>,
}

impl MockServer {
    /// Starts on 127.0.0.1 with an OS-chosen port.
    pub async fn start(cfg: MockConfig) -> Result<Self, MockError> {
        Self::bind(cfg, 0).await
    }

    pub async fn bind(cfg: MockConfig, port: u16) -> Result<Self, MockError> {
        let addr = SocketAddr::from(([127, 0, 0, 1], port));
        let listener = TcpListener::bind(addr)
            .await
            .map_err(|source| MockError::Bind { addr, source })?;
        let addr = listener
            .local_addr()
            .map_err(|source| MockError::Bind { addr, source })?;
        let stats = Arc::new(MockStats::default());
        let slots = cfg
            .max_concurrency
            .map(|n| Arc::new(Semaphore::new(n.max(1))));
        let state = Arc::new(State {
            cfg,
            stats: stats.clone(),
            slots,
        });
        let (stop, mut stopped) = oneshot::channel();
        tokio::spawn(async move {
            loop {
                tokio::select! {
                    _ = &mut stopped => break,
                    accepted = listener.accept() => {
                        // A failed accept (e.g. out of file descriptors) drops that connection only.
                        let Ok((tcp, _)) = accepted else { continue };
                        let _ = tcp.set_nodelay(true);
                        let state = state.clone();
                        tokio::spawn(async move {
                            let svc = service_fn(move |req| handle(req, state.clone()));
                            let _ = hyper::server::conn::http1::Builder::new()
                                .serve_connection(TokioIo::new(tcp), svc)
                                .await;
                        });
                    }
                }
            }
        });
        Ok(Self {
            addr,
            stats,
            stop: Some(stop),
        })
    }

    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    pub fn stats(&self) -> &MockStats {
        &self.stats
    }

    pub fn shutdown(mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
    }
}

type Body = BoxBody<Bytes, InjectedDisconnect>;

fn full(status: StatusCode, value: Value) -> Response<Body> {
    let body = Full::new(Bytes::from(value.to_string()))
        .map_err(|never| match never {})
        .boxed();
    let mut resp = Response::new(body);
    *resp.status_mut() = status;
    resp.headers_mut().insert(
        "content-type",
        hyper::header::HeaderValue::from_static("application/json"),
    );
    resp
}

fn error(status: StatusCode, message: &str) -> Response<Body> {
    full(
        status,
        json!({"error": {"message": message, "type": "mock_error", "code": status.as_u16()}}),
    )
}

async fn handle(
    req: Request<Incoming>,
    state: Arc<State>,
) -> Result<Response<Body>, std::convert::Infallible> {
    let chat = match (req.method(), req.uri().path()) {
        (&Method::GET, "/v1/models") => return Ok(models(&state.cfg)),
        (&Method::GET, "/health") => return Ok(full(StatusCode::OK, json!({"status": "ok"}))),
        (&Method::POST, "/v1/chat/completions") => true,
        (&Method::POST, "/v1/completions") => false,
        _ => return Ok(error(StatusCode::NOT_FOUND, "no such route")),
    };
    let Ok(collected) = Limited::new(req.into_body(), 4 << 20).collect().await else {
        return Ok(error(StatusCode::BAD_REQUEST, "unreadable body"));
    };
    let raw = collected.to_bytes();
    let Ok(body) = serde_json::from_slice::<Value>(&raw) else {
        return Ok(error(StatusCode::BAD_REQUEST, "body is not JSON"));
    };
    let cfg = &state.cfg;
    let model = body["model"].as_str().unwrap_or_default().to_string();
    if model != cfg.base_model && !cfg.adapters.contains(&model) {
        return Ok(error(StatusCode::NOT_FOUND, "unknown model"));
    }
    let n = state.stats.requests.fetch_add(1, Ordering::Relaxed);
    state
        .stats
        .body_digest
        .fetch_add(xxh3_64_with_seed(&raw, 0), Ordering::Relaxed);
    let u = xxh3_64_with_seed(&n.to_le_bytes(), cfg.seed) as f64 / u64::MAX as f64;
    if u < cfg.error_rate {
        state.stats.errors.fetch_add(1, Ordering::Relaxed);
        let status =
            StatusCode::from_u16(cfg.error_status).unwrap_or(StatusCode::SERVICE_UNAVAILABLE);
        return Ok(error(status, "injected error"));
    }
    let disconnect = u < cfg.error_rate + cfg.disconnect_rate;
    let requested = body["max_tokens"].as_u64().unwrap_or(16).clamp(1, 1 << 20) as u32;
    let tokens = cfg.output_tokens.unwrap_or(requested).max(1);
    // Closed semaphores never happen (it lives as long as the state); treat one as "no limit".
    let permit = match &state.slots {
        Some(slots) => slots.clone().acquire_owned().await.ok(),
        None => None,
    };
    let start = Instant::now();
    if body["stream"].as_bool() != Some(true) {
        tokio::time::sleep_until(start + cfg.ttft + cfg.itl * (tokens - 1)).await;
        drop(permit);
        state
            .stats
            .tokens
            .fetch_add(tokens as u64, Ordering::Relaxed);
        let text = " ok".repeat(tokens as usize);
        let choice = if chat {
            json!({"index": 0, "message": {"role": "assistant", "content": text}, "finish_reason": "length"})
        } else {
            json!({"index": 0, "text": text, "finish_reason": "length"})
        };
        let usage =
            json!({"prompt_tokens": 1, "completion_tokens": tokens, "total_tokens": tokens + 1});
        return Ok(full(
            StatusCode::OK,
            json!({"model": model, "choices": [choice], "usage": usage}),
        ));
    }
    let (tx, body) = Channel::<Bytes, InjectedDisconnect>::new(8);
    let stream = Stream {
        state: state.clone(),
        chat,
        model,
        tokens,
        disconnect,
        start,
        _permit: permit,
    };
    tokio::spawn(stream.run(tx));
    let mut resp = Response::new(body.boxed());
    resp.headers_mut().insert(
        "content-type",
        hyper::header::HeaderValue::from_static("text/event-stream"),
    );
    Ok(resp)
}

fn models(cfg: &MockConfig) -> Response<Body> {
    let mut data =
        vec![json!({"id": cfg.base_model, "object": "model", "owned_by": "mock", "parent": null})];
    data.extend(cfg.adapters.iter().map(
        |a| json!({"id": a, "object": "model", "owned_by": "mock", "parent": cfg.base_model}),
    ));
    full(StatusCode::OK, json!({"object": "list", "data": data}))
}

/// Waits until hyper has taken every frame sent so far, and then a little longer. Hyper writes a
/// frame to the socket only when the body has nothing more for it, so a frame it finds together
/// with the abort (its task ran late, on a busy machine) is dropped unsent.
async fn drained(tx: &mut http_body_util::channel::Sender<Bytes, InjectedDisconnect>) {
    while tx.capacity() < tx.max_capacity() {
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
    tokio::time::sleep(Duration::from_millis(10)).await;
}

/// One streamed answer, paced against absolute deadlines so timer slack does not accumulate.
struct Stream {
    state: Arc<State>,
    chat: bool,
    model: String,
    tokens: u32,
    disconnect: bool,
    start: Instant,
    /// Held until the answer ends.
    _permit: Option<OwnedSemaphorePermit>,
}

impl Stream {
    async fn run(self, mut tx: http_body_util::channel::Sender<Bytes, InjectedDisconnect>) {
        let cfg = &self.state.cfg;
        if self.chat
            && tx
                .send_data(self.chunk(json!({"role": "assistant", "content": ""}), None))
                .await
                .is_err()
        {
            return;
        }
        for i in 0..self.tokens {
            tokio::time::sleep_until(self.start + cfg.ttft + cfg.itl * i).await;
            // Cut where this token would have gone, once the earlier ones have left the socket.
            if self.disconnect && i == self.tokens / 2 {
                self.state.stats.disconnects.fetch_add(1, Ordering::Relaxed);
                drained(&mut tx).await;
                tx.abort(InjectedDisconnect);
                return;
            }
            let piece = if self.chat {
                json!({"content": " tok"})
            } else {
                json!(" tok")
            };
            if tx.send_data(self.chunk(piece, None)).await.is_err() {
                return;
            }
            self.state.stats.tokens.fetch_add(1, Ordering::Relaxed);
        }
        let stop = if self.chat { json!({}) } else { json!("") };
        let usage = json!({"prompt_tokens": 1, "completion_tokens": self.tokens, "total_tokens": self.tokens + 1});
        let tail = format!(
            "{}data: {}\n\ndata: [DONE]\n\n",
            String::from_utf8_lossy(&self.chunk(stop, Some("length"))),
            json!({"model": self.model, "choices": [], "usage": usage})
        );
        let _ = tx.send_data(Bytes::from(tail)).await;
    }

    fn chunk(&self, piece: Value, finish: Option<&str>) -> Bytes {
        let choice = if self.chat {
            json!({"index": 0, "delta": piece, "finish_reason": finish})
        } else {
            json!({"index": 0, "text": piece, "finish_reason": finish})
        };
        let object = if self.chat {
            "chat.completion.chunk"
        } else {
            "text_completion"
        };
        Bytes::from(format!(
            "data: {}\n\n",
            json!({"object": object, "model": self.model, "choices": [choice]})
        ))
    }
}
