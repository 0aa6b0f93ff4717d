//! A thousand clients that leave mid-generation: every request is aborted (499 in
//! `caduceus_requests_total`), the engine generates only a sliver of what finishing them would
//! take, and KV blocks and adapter slots return to idle.
//!
//! The tiny model would finish a request in a second or two, so the engine's steps are held (a
//! fault-injection latch) from before each round's requests are sent: every request reaches its
//! handler with nothing generated, however late the server gets to a connection (on a loaded
//! machine the kernel has been seen to hand one over seconds after the client's connect
//! returned). The test then lets the engine through one step at a time until every streaming
//! request has its first token, so no request can come near its `max_tokens` before the
//! clients leave, whatever the machine's load.

use std::time::Duration;

use caduceus_runtime::engine::{FaultPlan, StepLatch};

use serde_json::json;
use tokio::io::AsyncReadExt;
use tokio::net::TcpStream;

use super::{http, send, start, wait_idle, SOCKET_ABORTS};
use crate::support::server_app::{copy_adapter, TestServer};

/// The adapter every request of this test names: its per-adapter counters are this test's own.
const ADAPTER: &str = "dr-leaves-early";
const ROUNDS: usize = 20;
const PER_ROUND: usize = 50;
const MAX_TOKENS: usize = 180;
/// The seed every request of this test carries: the latch holds the steps that run them.
const SEED: u64 = 1818;

/// The sum of the samples of `name` whose labels contain every one of `labels`.
fn metric(page: &str, name: &str, labels: &[&str]) -> f64 {
    page.lines()
        .filter(|l| l.starts_with(name) && l[name.len()..].starts_with('{'))
        .filter(|l| labels.iter().all(|want| l.contains(want)))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}

/// Reads until the first SSE `data:` arrives: the request has generated a token.
async fn first_data(s: &mut TcpStream) {
    let mut seen = Vec::new();
    let mut buf = [0u8; 512];
    let read = async {
        while !seen.windows(5).any(|w| w == b"data:") {
            let n = s.read(&mut buf).await.unwrap();
            assert!(n > 0, "the stream ended before its first token");
            seen.extend_from_slice(&buf[..n]);
        }
    };
    tokio::time::timeout(Duration::from_secs(20), read)
        .await
        .expect("no token within 20 s");
}

/// Lets the held engine through one step at a time, each once the step before it is done and
/// its tokens have had 50 ms to reach the clients, until every one of `streams` has its first
/// token; returns how many steps that took. The other requests were scheduled with them (the
/// batch holds all of them) and are decoding too.
async fn step_until_first_tokens<'a>(
    latch: &StepLatch,
    streams: impl Iterator<Item = &'a mut TcpStream>,
) -> usize {
    let firsts = futures_util::future::join_all(streams.map(first_data));
    tokio::pin!(firsts);
    let mut steps = 0;
    loop {
        tokio::select! {
            _ = &mut firsts => return steps,
            _ = tokio::time::sleep(Duration::from_millis(50)) => {}
        }
        if latch.is_waiting() {
            latch.pass_one();
            steps += 1;
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_thousand_clients_leaving_mid_generation_are_all_aborted() {
    // The only other test that leaves early waits, so the 499 count below is exact.
    let _alone = SOCKET_ABORTS.lock().await;
    let root = tempfile::tempdir().unwrap();
    copy_adapter(root.path(), ADAPTER);
    let (faults, latch) = FaultPlan::hold_steps_of(SEED);
    let srv = start(
        TestServer {
            adapter_dir: Some(root.path().to_path_buf()),
            max_num_seqs: 64,
            faults,
            ..TestServer::default()
        },
        Duration::from_secs(5),
    )
    .await;
    let page = || async { http(srv.addr, "GET", "/metrics", None).await.1 };
    let before = page().await;
    let mut steps_in_all = 0;
    for _ in 0..ROUNDS {
        // The previous round is cleaned up (KV blocks, handlers) before the next one starts.
        wait_idle(&srv.state).await;
        latch.arm();
        let mut conns = Vec::with_capacity(PER_ROUND);
        for i in 0..PER_ROUND {
            // Half completions, half chat; half of each streaming.
            let (path, mut body) = if i % 4 < 2 {
                ("/v1/completions", json!({"prompt": "Tell me everything."}))
            } else {
                let messages = json!([{"role": "user", "content": "Tell me everything."}]);
                ("/v1/chat/completions", json!({ "messages": messages }))
            };
            body["model"] = json!(ADAPTER);
            body["max_tokens"] = json!(MAX_TOKENS);
            body["ignore_eos"] = json!(true);
            body["seed"] = json!(SEED);
            body["stream"] = json!(i % 2 == 0);
            conns.push((i % 2 == 0, send(srv.addr, "POST", path, Some(&body)).await));
        }
        // No step runs, so no request can finish: every one reaches its handler however long
        // that takes.
        for _ in 0..3000 {
            if srv.state.lifecycle.in_flight() == PER_ROUND {
                break;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        assert_eq!(
            srv.state.lifecycle.in_flight(),
            PER_ROUND,
            "requests still not in a handler after 30 s"
        );
        let streams = conns.iter_mut().filter(|(streaming, _)| *streaming);
        let steps = step_until_first_tokens(&latch, streams.map(|(_, s)| s)).await;
        assert!(
            steps < MAX_TOKENS / 4,
            "{steps} steps before every stream had its first token"
        );
        steps_in_all += steps;
        drop(conns);
        // A streaming handler learns that its client left when its next token fails to send.
        latch.release();
    }
    wait_idle(&srv.state).await;
    assert_eq!(srv.state.lifecycle.in_flight(), 0);
    let total = (ROUNDS * PER_ROUND) as f64;
    // A handler dropped before its request log existed is recorded just after it leaves the
    // in-flight count: give the last records a moment.
    let mut after = page().await;
    for _ in 0..100 {
        let n = metric(&after, "caduceus_requests_total", &["status=\"499\""])
            - metric(&before, "caduceus_requests_total", &["status=\"499\""]);
        if n >= total {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
        after = page().await;
    }
    let delta =
        |name: &str, labels: &[&str]| metric(&after, name, labels) - metric(&before, name, labels);
    let adapter = format!("adapter=\"{ADAPTER}\"");
    // Every client left while its request was running: each one is a 499.
    let lines: Vec<&str> = after
        .lines()
        .filter(|l| l.starts_with("caduceus_requests_total{"))
        .collect();
    let aborted = delta("caduceus_requests_total", &["status=\"499\""]);
    assert_eq!(aborted, total, "{aborted} of {total} aborted: {lines:?}");
    // Every request the engine received finished there (a client may leave before its request
    // was submitted; it is counted as a 499 all the same).
    let finished = delta("caduceus_lora_requests_total", &[&adapter]);
    assert!(finished > 0.0 && finished <= total, "{finished}");
    // Finishing them would have taken MAX_TOKENS each; leaving cut them to a few (about 5% of
    // that on a quiet machine; a quarter leaves room for a loaded CI runner).
    let generated = delta("caduceus_lora_generation_tokens_total", &[&adapter]);
    assert!(
        generated < total * MAX_TOKENS as f64 / 4.0,
        "{generated} tokens generated for {total} requests that left early"
    );
    let info = after
        .lines()
        .find(|l| l.starts_with("caduceus_lora_requests_info{"))
        .expect("the adapter info gauge");
    assert!(
        info.contains("running_lora_adapters=\"\"") && info.contains("waiting_lora_adapters=\"\""),
        "{info}"
    );
    let stats = srv.state.engine.stats();
    assert_eq!(stats.kv_usage, 0.0, "{stats:?}");
    eprintln!(
        "{total} requests left early after {generated} generated tokens in all; \
         {steps_in_all} steps let through before their clients left"
    );
}
