//! The server over a real socket: SSE parsing, clients that disconnect, overload, drain on
//! shutdown, request timeouts and an engine failure.

mod support;

#[path = "server_e2e/big_prompts.rs"]
mod big_prompts;
#[path = "server_e2e/disconnects.rs"]
mod disconnects;

use std::net::SocketAddr;
use std::time::Duration;

use caduceus_runtime::server::{run_server, AppState, ServeOutcome};
use serde_json::{json, Value};
use support::server_app::{sse_data, TestServer};
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

/// [`http`]'s status, or 0 when the connection is refused or reset: a server that is stopping
/// may close its listener between two requests.
async fn status_or_gone(addr: SocketAddr, path: &str) -> u16 {
    let Ok(mut s) = TcpStream::connect(addr).await else {
        return 0;
    };
    let req = format!("GET {path} HTTP/1.1\r\nhost: test\r\nconnection: close\r\n\r\n");
    let mut raw = Vec::new();
    if s.write_all(req.as_bytes()).await.is_err() || s.read_to_end(&mut raw).await.is_err() {
        return 0;
    }
    parse_response(&String::from_utf8_lossy(&raw)).0
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
        drop(conns); // every client leaves: streaming, decoding, prefilling and waiting ones
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
    let mut srv = start(TestServer::default(), Duration::from_secs(30)).await;
    let addr = srv.addr;
    let body = json!({"prompt": "Tell me.", "max_tokens": 120, "ignore_eos": true, "stream": true});
    let inflight =
        tokio::spawn(async move { http(addr, "POST", "/v1/completions", Some(&body)).await });
    tokio::time::sleep(Duration::from_millis(50)).await;
    srv.stop.take().unwrap().send(()).unwrap();
    tokio::time::sleep(Duration::from_millis(20)).await;
    // Connections still accepted during the drain get 503.
    if let Ok(Ok(s)) = tokio::time::timeout(Duration::from_secs(2), TcpStream::connect(addr)).await
    {
        drop(s);
        let (status, _) = http(
            addr,
            "POST",
            "/v1/completions",
            Some(&json!({"prompt": "x"})),
        )
        .await;
        assert!(
            status == 503 || status == 0,
            "new request during drain got {status}"
        );
    }
    let (status, text) = inflight.await.unwrap();
    assert_eq!(status, 200);
    assert_eq!(sse_data(&text).last().map(String::as_str), Some("[DONE]"));
    assert_eq!(srv.done.await.unwrap(), ServeOutcome::Drained);
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
    let srv = start(TestServer::default(), Duration::from_secs(5)).await;
    srv.state.engine.shutdown(); // the engine thread ends, as it would on a fatal error
                                 // The thread takes the command asynchronously: health turns 503 within moments.
    let mut status = 200;
    for _ in 0..500 {
        status = status_or_gone(srv.addr, "/health").await;
        if status != 200 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert!(status == 503 || status == 0, "{status}");
    let outcome = tokio::time::timeout(Duration::from_secs(10), srv.done)
        .await
        .unwrap()
        .unwrap();
    assert_eq!(outcome, ServeOutcome::EngineFailed);
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
