//! `caduceus serve` on the GPU engine, end to end, in the kernels' host emulation: the binary
//! started with `model.device = "cuda:0"` (the test-only `CAD_TEST_EMULATED_GPU=1` makes that
//! device the emulation), the shared tiny Llama in f16 and both PEFT doctors from
//! `adapters.dir`, against the same binary serving on the CPU. Nine greedy completions over the
//! base model and the two adapters go in at once, so batches mix adapters on the device; each
//! must come back with the CPU server's text, tokens and (within f16 rounding) logprobs. The
//! GPU server's start (memory plan, graphs, adapter slots), its `/metrics` and its drain on
//! SIGTERM are checked too.
//!
//! This is the wiring of `serve` on a GPU (config to backend, adapter tiers to device slots over
//! the copy stream, HTTP); on a real GPU `scripts/gpu-check` runs the kernels and the parity.

mod support;

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::{json, Value};

/// A `caduceus serve` child process on a free local port.
struct Server {
    child: Child,
    addr: SocketAddr,
    log: std::path::PathBuf,
}

impl Server {
    fn start(dir: &std::path::Path, name: &str, device: &str, dtype: &str) -> Server {
        let tiny = support::shared("reference/tiny-llama");
        let addr = TcpListener::bind("127.0.0.1:0")
            .and_then(|l| l.local_addr())
            .unwrap();
        let config = dir.join(format!("{name}.toml"));
        std::fs::write(
            &config,
            format!(
                r#"
[model]
path = "{model}"
device = "{device}"
dtype = "{dtype}"
max_model_len = 256
# The emulated device reports 1 GiB: 5% of it is a pool of thousands of tiny blocks.
gpu_memory_utilization = 0.05
cuda_graph_max_batch = 4

[adapters]
dir = "{adapters}"
dtype = "{adapter_dtype}"
max_loras = 2

[server]
host = "127.0.0.1"
port = {port}
"#,
                model = tiny.join("model").display(),
                adapters = tiny.join("adapters").display(),
                dtype = if device == "cpu" { "auto" } else { dtype },
                // On the CPU the reference: f32 slots (`auto` there may mean q8).
                adapter_dtype = if device == "cpu" { "f32" } else { dtype },
                port = addr.port(),
            ),
        )
        .unwrap();
        let log = dir.join(format!("{name}.log"));
        let child = Command::new(env!("CARGO_BIN_EXE_caduceus"))
            .args(["--threads", "1", "--log-level", "info", "serve", "--config"])
            .arg(&config)
            .env("CAD_TEST_EMULATED_GPU", "1")
            .env("NO_COLOR", "1")
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(&log).unwrap())
            .spawn()
            .unwrap();
        let mut server = Server { child, addr, log };
        server.wait_healthy();
        server
    }

    fn wait_healthy(&mut self) {
        let deadline = Instant::now() + Duration::from_secs(120);
        while Instant::now() < deadline {
            if let Ok(Some(status)) = self.child.try_wait() {
                panic!("the server exited ({status}):\n{}", self.log_text());
            }
            if http(self.addr, "GET", "/health", None).is_some_and(|(s, _)| s == 200) {
                return;
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        panic!("the server did not become healthy:\n{}", self.log_text());
    }

    fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// SIGTERM, then the exit status (the server drains and exits 0).
    fn stop(mut self) -> std::process::ExitStatus {
        let killed = Command::new("kill")
            .args(["-TERM", &self.child.id().to_string()])
            .status()
            .unwrap();
        assert!(killed.success());
        self.child.wait().unwrap()
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// One HTTP/1.1 request with `connection: close`: the status and the body (`None` when the
/// server cannot be reached).
fn http(addr: SocketAddr, method: &str, path: &str, body: Option<&Value>) -> Option<(u16, String)> {
    let mut s = TcpStream::connect_timeout(&addr, Duration::from_secs(1)).ok()?;
    s.set_read_timeout(Some(Duration::from_secs(300))).ok()?;
    let body = body.map(Value::to_string).unwrap_or_default();
    let req = format!(
        "{method} {path} HTTP/1.1\r\nhost: test\r\ncontent-type: application/json\r\n\
         content-length: {}\r\nconnection: close\r\n\r\n{body}",
        body.len()
    );
    s.write_all(req.as_bytes()).ok()?;
    let mut raw = Vec::new();
    s.read_to_end(&mut raw).ok()?;
    let raw = String::from_utf8_lossy(&raw).into_owned();
    let (head, body) = raw.split_once("\r\n\r\n")?;
    let status = head.split(' ').nth(1)?.parse().ok()?;
    assert!(
        !head.to_ascii_lowercase().contains("chunked"),
        "expected a whole body: {head}"
    );
    Some((status, body.to_string()))
}

/// The nine completions (base and both doctors, three prompts each), sent at once; in order.
fn complete_all(addr: SocketAddr, prompts: &[Vec<u32>]) -> Vec<Value> {
    let jobs: Vec<(String, Vec<u32>)> = ["model", "doctor-a", "doctor-b"]
        .iter()
        .flat_map(|m| prompts.iter().map(move |p| (m.to_string(), p.clone())))
        .collect();
    let handles: Vec<_> = jobs
        .into_iter()
        .map(|(model, prompt)| {
            std::thread::spawn(move || {
                let body = json!({
                    "model": model,
                    "prompt": prompt,
                    "max_tokens": 16,
                    "temperature": 0,
                    "ignore_eos": true,
                    "logprobs": 2,
                });
                let (status, text) =
                    http(addr, "POST", "/v1/completions", Some(&body)).expect("the server answers");
                assert_eq!(status, 200, "{model}: {text}");
                serde_json::from_str::<Value>(&text).unwrap()
            })
        })
        .collect();
    handles.into_iter().map(|h| h.join().unwrap()).collect()
}

#[test]
fn serve_on_the_gpu_engine_answers_as_the_cpu_server_with_mixed_adapters() {
    let expected: Value = serde_json::from_str(
        &std::fs::read_to_string(support::shared("reference/tiny-llama/expected.json")).unwrap(),
    )
    .unwrap();
    let prompts: Vec<Vec<u32>> = expected["prompts"]
        .as_array()
        .unwrap()
        .iter()
        .take(3)
        .map(|p| serde_json::from_value(p["token_ids"].clone()).unwrap())
        .collect();
    let dir = tempfile::tempdir().unwrap();

    let cpu = Server::start(dir.path(), "cpu", "cpu", "auto");
    let want = complete_all(cpu.addr, &prompts);
    assert!(cpu.stop().success());

    let gpu = Server::start(dir.path(), "gpu", "cuda:0", "f16");
    let got = complete_all(gpu.addr, &prompts);
    let start_log = gpu.log_text();
    for line in [
        "the GPU engine runs in host emulation",
        "weights converted and resident on the GPU",
        "decode graphs captured",
        "KV cache pool (GPU memory plan)",
        "adapter slots allocated",
    ] {
        assert!(start_log.contains(line), "no `{line}` in:\n{start_log}");
    }
    let (status, metrics) = http(gpu.addr, "GET", "/metrics", None).unwrap();
    assert_eq!(status, 200);
    let blocks = start_log
        .lines()
        .find(|l| l.contains("KV cache pool (GPU memory plan)"))
        .and_then(|l| l.split("num_gpu_blocks=").nth(1))
        .and_then(|s| s.split_whitespace().next())
        .expect("the plan logs its block count");
    assert!(
        metrics
            .lines()
            .any(|l| l.starts_with("caduceus_cache_config_info")
                && l.contains(&format!("num_gpu_blocks=\"{blocks}\""))),
        "cache_config_info does not carry num_gpu_blocks={blocks}:\n{metrics}"
    );
    for adapter in ["doctor-a", "doctor-b"] {
        assert!(
            metrics
                .lines()
                .any(|l| l.starts_with("caduceus_lora_generation_tokens_total")
                    && l.contains(adapter)
                    && l.ends_with(" 48")),
            "{adapter} did not generate its 3 x 16 tokens on the device:\n{metrics}"
        );
    }

    for (i, (g, w)) in got.iter().zip(&want).enumerate() {
        let (gc, wc) = (&g["choices"][0], &w["choices"][0]);
        assert_eq!(gc["text"], wc["text"], "completion {i}: text");
        assert_eq!(
            gc["logprobs"]["tokens"], wc["logprobs"]["tokens"],
            "completion {i}: tokens"
        );
        let lp = |c: &Value| -> Vec<f64> {
            c["logprobs"]["token_logprobs"]
                .as_array()
                .unwrap()
                .iter()
                .map(|v| v.as_f64().unwrap())
                .collect()
        };
        let (gl, wl) = (lp(gc), lp(wc));
        assert_eq!(gl.len(), 16, "completion {i}");
        for (t, (a, b)) in gl.iter().zip(&wl).enumerate() {
            // f16 weights and activations against the CPU's f32.
            assert!((a - b).abs() < 0.05, "completion {i} token {t}: {a} vs {b}");
        }
        assert_eq!(g["usage"]["completion_tokens"], 16);
    }
    assert!(gpu.stop().success(), "the GPU server did not drain cleanly");
}
