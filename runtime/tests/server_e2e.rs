//! The server over a real socket: SSE parsing, clients that disconnect, overload, drain on
//! shutdown, request timeouts and an engine failure.

mod support;

#[path = "server_e2e/big_prompts.rs"]
mod big_prompts;
#[path = "server_e2e/disconnects.rs"]
mod disconnects;

use std::net::SocketAddr;
use std::time::Duration;

use caduceus_runtime::engine::FaultPlan;
use caduceus_runtime::server::{app, run_server, AppState, Phase, ServeOutcome};
use serde_json::{json, Value};
use support::log_capture::{capture_global, text as log_text};
use support::server_app::{call, sse_data, TestServer};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::oneshot;

/// Held by the tests whose clients leave early, so each can count its own 499s exactly.
static SOCKET_ABORTS: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

struct Running {
    addr: SocketAddr,
    state: AppState,
    stop: Option<oneshot::Sender<()>>,
    done: tokio::task::JoinHandle<ServeOutcome>,
}

async fn start(cfg: TestServer, grace: Duration) -> Running {
    let state = cfg.state();
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let (stop, rx) = oneshot::channel::<()>();
    let s = state.clone();
    let done = tokio::spawn(async move {
        run_server(listener, s, grace, async {
            let _ = rx.await;
        })
        .await
        .unwrap()
    });
    Running {
        addr,
        state,
        stop: Some(stop),
        done,
    }
}

async fn send(addr: SocketAddr, method: &str, path: &str, body: Option<&Value>) -> TcpStream {
    let mut s = TcpStream::connect(addr).await.unwrap();
    let body = body.map(|b| b.to_string()).unwrap_or_default();
    let req = format!(
        "{method} {path} HTTP/1.1\r\nhost: test\r\ncontent-type: application/json\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{body}",
        body.len()
    );
    s.write_all(req.as_bytes()).await.unwrap();
    s
}

/// Status and de-chunked body of a whole response.
async fn http(addr: SocketAddr, method: &str, path: &str, body: Option<&Value>) -> (u16, String) {
    let mut s = send(addr, method, path, body).await;
    let mut raw = Vec::new();
    s.read_to_end(&mut raw).await.unwrap();
    parse_response(&String::from_utf8_lossy(&raw))
}

fn parse_response(raw: &str) -> (u16, String) {
    let (head, body) = raw.split_once("\r\n\r\n").unwrap_or((raw, ""));
    let status = head
        .split(' ')
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or(0);
    if !head
        .to_ascii_lowercase()
        .contains("transfer-encoding: chunked")
    {
        return (status, body.to_string());
    }
    let mut out = String::new();
    let mut rest = body;
    while let Some((size, after)) = rest.split_once("\r\n") {
        let n = usize::from_str_radix(size.trim(), 16).unwrap_or(0);
        if n == 0 || after.len() < n {
            break;
        }
        out.push_str(&after[..n]);
        rest = after[n..].trim_start_matches("\r\n");
    }
    (status, out)
}

/// Waits until the engine holds no request and no free block is missing, and no HTTP request is
/// in flight (a handler may still be tokenizing when the engine is already idle).
async fn wait_idle(state: &AppState) {
    for _ in 0..2000 {
        let s = state.engine.stats();
        if s.num_running + s.num_waiting == 0
            && s.num_free_blocks == s.num_usable_blocks
            && state.lifecycle.in_flight() == 0
        {
            return;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    panic!(
        "the server did not return to idle: {:?}, {} requests in flight",
        state.engine.stats(),
        state.lifecycle.in_flight()
    );
}

fn long_request(stream: bool) -> Value {
    json!({"prompt": "Tell me everything.", "max_tokens": 200, "ignore_eos": true, "stream": stream})
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn streaming_over_a_socket_parses_as_openai_sse() {
    let srv = start(TestServer::default(), Duration::from_secs(5)).await;
    let body = json!({"messages": [{"role": "user", "content": "Hi"}], "max_tokens": 8, "ignore_eos": true,
                      "stream": true, "stream_options": {"include_usage": true}, "temperature": 0});
    let (status, text) = http(srv.addr, "POST", "/v1/chat/completions", Some(&body)).await;
    assert_eq!(status, 200);
    let data = sse_data(&text);
    assert_eq!(data.last().map(String::as_str), Some("[DONE]"));
    let chunks: Vec<Value> = data[..data.len() - 1]
        .iter()
        .map(|d| serde_json::from_str(d).unwrap())
        .collect();
    assert_eq!(chunks[0]["choices"][0]["delta"]["role"], "assistant");
    assert_eq!(chunks.last().unwrap()["usage"]["completion_tokens"], 8);
    let (status, text) = http(srv.addr, "GET", "/health", None).await;
    assert_eq!((status, text.as_str()), (200, r#"{"status":"ok"}"#));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn clients_that_disconnect_abort_their_requests() {
    let _alone = SOCKET_ABORTS.lock().await;
    let srv = start(
        TestServer {
            max_num_seqs: 2,
            ..TestServer::default()
        },
        Duration::from_secs(5),
    )
    .await;
    for round in 0..3 {
        let mut conns = Vec::new();
        for i in 0..6 {
            let mut s = send(
                srv.addr,
                "POST",
                "/v1/completions",
                Some(&long_request(i % 2 == 0)),
            )
            .await;
            if i % 2 == 0 {
                // Streaming: read the first bytes, so the request is decoding when we leave.
                let mut buf = [0u8; 256];
                let _ = s.read(&mut buf).await.unwrap();
            }
            conns.push(s);
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
        // Every client leaves: streaming, decoding, prefilling and waiting ones. Every handler
        // sees its client leave (a request still being tokenized has not reached the engine
        // yet, so an idle engine alone proves nothing), then the engine is idle.
        drop(conns);
        wait_until(|| srv.state.lifecycle.in_flight() == 0).await;
        wait_idle(&srv.state).await;
        assert_eq!(srv.state.lifecycle.in_flight(), 0, "round {round}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn past_the_queue_limit_requests_get_429_at_once() {
    let srv = start(
        TestServer {
            max_num_seqs: 1,
            max_queued: 2,
            ..TestServer::default()
        },
        Duration::from_secs(5),
    )
    .await;
    let body = json!({"prompt": "Hello", "max_tokens": 40, "ignore_eos": true});
    let tasks: Vec<_> = (0..10)
        .map(|_| {
            let b = body.clone();
            let addr = srv.addr;
            tokio::spawn(async move { http(addr, "POST", "/v1/completions", Some(&b)).await })
        })
        .collect();
    let mut codes = Vec::new();
    for t in tasks {
        let (status, text) = t.await.unwrap();
        if status == 429 {
            let v: Value = serde_json::from_str(&text).unwrap();
            assert_eq!(v["error"]["code"], "rate_limit_exceeded", "{v}");
        }
        codes.push(status);
    }
    let ok = codes.iter().filter(|&&c| c == 200).count();
    let limited = codes.iter().filter(|&&c| c == 429).count();
    assert_eq!(ok + limited, 10, "{codes:?}");
    assert!(limited >= 1 && ok >= 1, "{codes:?}");
    wait_idle(&srv.state).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shutdown_drains_in_flight_requests_and_refuses_new_ones() {
    // The in-flight request's steps are held until the drain has been observed, so it is
    // still running however fast the machine is.
    let (faults, latch) = FaultPlan::hold_steps_of(21);
    let cfg = TestServer {
        faults,
        ..TestServer::default()
    };
    let mut srv = start(cfg, Duration::from_secs(30)).await;
    let addr = srv.addr;
    let body = json!({"prompt": "Tell me.", "max_tokens": 12, "ignore_eos": true, "stream": true,
                      "seed": 21});
    let inflight =
        tokio::spawn(async move { http(addr, "POST", "/v1/completions", Some(&body)).await });
    wait_until(|| latch.num_held() > 0).await;
    srv.stop.take().unwrap().send(()).unwrap();
    wait_until(|| srv.state.lifecycle.phase() == Phase::Draining).await;
    // The listener stays open while draining: new requests connect and get 503.
    let (status, text) = http(
        addr,
        "POST",
        "/v1/completions",
        Some(&json!({"prompt": "x"})),
    )
    .await;
    assert_eq!(status, 503, "new request during drain: {text}");
    let (status, text) = http(addr, "GET", "/health", None).await;
    assert_eq!(status, 503, "{text}");
    assert!(text.contains("draining"), "{text}");
    latch.release();
    let (status, text) = inflight.await.unwrap();
    assert_eq!(status, 200);
    assert_eq!(sse_data(&text).last().map(String::as_str), Some("[DONE]"));
    assert_eq!(srv.done.await.unwrap(), ServeOutcome::Drained);
}

/// Polls `done` every few milliseconds for up to 10 s; panics if it never holds.
async fn wait_until(done: impl Fn() -> bool) {
    for _ in 0..1000 {
        if done() {
            return;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    panic!("condition not reached within 10 s");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_request_past_its_timeout_gets_504_and_is_aborted() {
    let srv = start(
        TestServer {
            request_timeout: Duration::from_millis(1),
            ..TestServer::default()
        },
        Duration::from_secs(5),
    )
    .await;
    let (status, text) = http(
        srv.addr,
        "POST",
        "/v1/completions",
        Some(&long_request(false)),
    )
    .await;
    assert_eq!(status, 504, "{text}");
    let v: Value = serde_json::from_str(&text).unwrap();
    assert_eq!(v["error"]["code"], "timeout");
    wait_idle(&srv.state).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn when_the_engine_dies_health_is_503_and_the_server_stops_with_a_failure() {
    let log = capture_global();
    // A real fault: the engine thread panics inside the step that schedules this request.
    let cfg = TestServer {
        faults: FaultPlan {
            panic_in_step: Some(FaultPlan::seed(13)),
            ..FaultPlan::default()
        },
        ..TestServer::default()
    };
    let srv = start(cfg, Duration::from_secs(5)).await;
    let body = json!({"prompt": "Hello", "max_tokens": 4, "seed": 13});
    let (status, text) = http(srv.addr, "POST", "/v1/completions", Some(&body)).await;
    assert_eq!(status, 503, "{text}");
    let outcome = tokio::time::timeout(Duration::from_secs(10), srv.done)
        .await
        .unwrap()
        .unwrap();
    assert_eq!(outcome, ServeOutcome::EngineFailed);
    // Health says so (asked in-process: the listener is closed once the server stopped)...
    let (status, _, text) = call(&app(srv.state.clone()), "GET", "/health", None, None).await;
    assert_eq!(status.as_u16(), 503, "{text}");
    assert!(text.contains("engine_failed"), "{text}");
    // ...and the cause was logged before the server gave up.
    let log = log_text(&log);
    let died = log
        .find("the engine thread panicked")
        .unwrap_or_else(|| panic!("engine death not logged:\n{log}"));
    assert!(log[died..].contains("injected fault"), "{log}");
    let stopped = log
        .find("the engine thread stopped; refusing requests")
        .unwrap_or_else(|| panic!("server stop not logged:\n{log}"));
    assert!(died < stopped, "{log}");
}

#[tokio::test]
async fn a_client_sending_a_too_large_body_reads_its_413() {
    let running = start(
        TestServer {
            body_limit_bytes: 1024,
            ..TestServer::default()
        },
        Duration::from_secs(5),
    )
    .await;
    // A 14 MiB body (more than loopback socket buffers hold) sent whole before the response
    // is read, as simple clients do.
    let body = format!("{{\"prompt\": \"{}\"}}", "x".repeat(14 << 20));
    let mut s = TcpStream::connect(running.addr).await.unwrap();
    let head = format!(
        "POST /v1/completions HTTP/1.1\r\nhost: test\r\ncontent-type: application/json\r\ncontent-length: {}\r\nconnection: close\r\n\r\n",
        body.len()
    );
    s.write_all(head.as_bytes()).await.unwrap();
    s.write_all(body.as_bytes()).await.unwrap();
    let mut raw = Vec::new();
    s.read_to_end(&mut raw).await.unwrap();
    let (status, text) = parse_response(&String::from_utf8_lossy(&raw));
    assert_eq!(status, 413, "{text}");
    assert!(text.contains("1024"), "{text}");
}
