//! Doctor avatars through the HTTP API (issue 5): `/v1/models` lists adapters, unknown models are
//! 404, many adapters over few slots under concurrency, prefix-cache isolation between adapters
//! and generations, the load/unload endpoints with their path checks, broken adapters failing
//! alone, and the LoRA metrics.

#[path = "adapters_server/gateway_metrics.rs"]
mod gateway_metrics;
mod support;

use std::path::Path;
use std::time::Duration;

use axum::http::StatusCode;
use axum::Router;
use caduceus_runtime::adapters::make::write_synthetic_adapters;
use caduceus_runtime::adapters::{Projection, SlotFormat};
use caduceus_runtime::model::loader::LoadedModel;
use caduceus_runtime::server::app;
use serde_json::{json, Value};
use support::server_app::{call, TestServer, MODEL};

async fn get(router: &Router, uri: &str) -> (StatusCode, String) {
    let (s, _, b) = call(router, "GET", uri, None, None).await;
    (s, b)
}

async fn post(router: &Router, uri: &str, body: Value) -> (StatusCode, Value) {
    let (s, _, b) = call(router, "POST", uri, Some(body), None).await;
    (s, serde_json::from_str(&b).unwrap_or(Value::String(b)))
}

/// A greedy completion of `prompt` on `model`; returns (status, body).
async fn complete(
    router: &Router,
    model: &str,
    prompt: &str,
    max_tokens: usize,
) -> (StatusCode, Value) {
    let body = json!({"model": model, "prompt": prompt, "max_tokens": max_tokens,
                      "temperature": 0, "ignore_eos": true});
    post(router, "/v1/completions", body).await
}

fn text(body: &Value) -> String {
    body["choices"][0]["text"]
        .as_str()
        .unwrap_or_default()
        .to_owned()
}

fn cached(body: &Value) -> u64 {
    body["usage"]["prompt_tokens_details"]["cached_tokens"]
        .as_u64()
        .unwrap_or(0)
}

/// `count` synthetic rank-8 adapters (doctor-0000, ...) for the tiny model under `dir`.
fn synthetic(dir: &Path, count: usize, seed: u64) {
    let model = LoadedModel::load(&support::shared("reference/tiny-llama/model")).unwrap();
    write_synthetic_adapters(
        model.model.config(),
        dir,
        count,
        8,
        &Projection::ALL,
        seed,
        16.0,
    )
    .unwrap();
}

fn server(root: &Path, max_loras: usize, max_cpu_loras: usize) -> Router {
    let state = TestServer {
        adapter_dir: Some(root.to_path_buf()),
        max_loras,
        max_cpu_loras,
        ..TestServer::default()
    }
    .state();
    app(state)
}

#[tokio::test]
async fn models_lists_every_adapter_and_unknown_models_are_404() {
    let tmp = tempfile::tempdir().unwrap();
    synthetic(tmp.path(), 3, 1);
    std::fs::create_dir(tmp.path().join("not-an-adapter")).unwrap();
    let router = server(tmp.path(), 2, 4);
    let (status, body) = get(&router, "/v1/models").await;
    assert_eq!(status, StatusCode::OK);
    let body: Value = serde_json::from_str(&body).unwrap();
    let ids: Vec<&str> = body["data"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| m["id"].as_str().unwrap())
        .collect();
    assert_eq!(ids, [MODEL, "doctor-0000", "doctor-0001", "doctor-0002"]);
    for m in &body["data"].as_array().unwrap()[1..] {
        assert_eq!(m["parent"], MODEL);
    }
    let (status, body) = complete(&router, "doctor-9999", "hello", 4).await;
    assert_eq!(status, StatusCode::NOT_FOUND, "{body}");
    assert_eq!(body["error"]["code"], "model_not_found");
    let (status, _) = complete(&router, "../doctor-0000", "hello", 4).await;
    assert_eq!(status, StatusCode::NOT_FOUND);
    // Adapters change the output; the base model is still served.
    let (s1, base) = complete(&router, MODEL, "Doctor, my head hurts.", 12).await;
    let (s2, avatar) = complete(&router, "doctor-0001", "Doctor, my head hurts.", 12).await;
    assert_eq!((s1, s2), (StatusCode::OK, StatusCode::OK));
    assert_ne!(text(&base), text(&avatar));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_slots_eight_adapters_sixty_four_concurrent_requests_equal_their_solo_runs() {
    let tmp = tempfile::tempdir().unwrap();
    synthetic(tmp.path(), 8, 2);
    let router = server(tmp.path(), 2, 8);
    let jobs: Vec<(String, String)> = (0..64)
        .map(|i| {
            let model = if i % 9 == 8 {
                MODEL.to_owned()
            } else {
                format!("doctor-{:04}", i % 8)
            };
            (
                model,
                format!(
                    "Patient {i} asks: my knee hurts after {} days, what now?",
                    i % 5
                ),
            )
        })
        .collect();
    let mut solo = Vec::new();
    for (model, prompt) in &jobs {
        let (status, body) = complete(&router, model, prompt, 10).await;
        assert_eq!(status, StatusCode::OK, "{body}");
        solo.push(text(&body));
    }
    let handles: Vec<_> = jobs
        .iter()
        .cloned()
        .map(|(model, prompt)| {
            let router = router.clone();
            tokio::spawn(async move { complete(&router, &model, &prompt, 10).await })
        })
        .collect();
    let all = tokio::time::timeout(
        Duration::from_secs(300),
        futures_util::future::join_all(handles),
    )
    .await
    .expect("some request waited forever");
    for (i, r) in all.into_iter().enumerate() {
        let (status, body) = r.unwrap();
        assert_eq!(status, StatusCode::OK, "request {i}: {body}");
        assert_eq!(text(&body), solo[i], "request {i} on {}", jobs[i].0);
    }
}

#[tokio::test]
async fn prefix_cache_is_never_shared_across_adapters_or_generations() {
    let tmp = tempfile::tempdir().unwrap();
    synthetic(tmp.path(), 2, 3);
    let router = server(tmp.path(), 2, 4);
    // The tiny model's tokenizer is byte-level: ~110 tokens, 6 full KV blocks of 16.
    let system = "You are a careful physician answering patient questions. ";
    let prompt = format!("{system}Question: is a fever of 38.5 C dangerous for an adult?");
    let ok = |(status, body): (StatusCode, Value)| {
        assert_eq!(status, StatusCode::OK, "{body}");
        body
    };
    let a1 = ok(complete(&router, "doctor-0000", &prompt, 4).await);
    assert_eq!(cached(&a1), 0);
    let b1 = ok(complete(&router, "doctor-0001", &prompt, 4).await);
    assert_eq!(cached(&b1), 0, "doctor-0001 reused doctor-0000's KV");
    let base = ok(complete(&router, MODEL, &prompt, 4).await);
    assert_eq!(cached(&base), 0, "the base model reused an adapter's KV");
    let a2 = ok(complete(&router, "doctor-0000", &prompt, 4).await);
    assert!(
        cached(&a2) >= 64,
        "same adapter, same prompt: {}",
        a2["usage"]
    );
    assert_eq!(text(&a1), text(&a2));
    let b2 = ok(complete(&router, "doctor-0001", &prompt, 4).await);
    assert!(cached(&b2) >= 64, "{}", b2["usage"]);
    assert_eq!(text(&b1), text(&b2));
    // Reloading with other weights is a new generation: no reuse of the old KV.
    synthetic_one(tmp.path(), "doctor-0000", 99);
    let (status, body) = post(
        &router,
        "/v1/load_lora_adapter",
        json!({"lora_name": "doctor-0000", "lora_path": "doctor-0000", "load_inplace": true}),
    )
    .await;
    assert_eq!(status, StatusCode::OK, "{body}");
    let a3 = ok(complete(&router, "doctor-0000", &prompt, 4).await);
    assert_eq!(
        cached(&a3),
        0,
        "a reloaded adapter reused KV of its old weights"
    );
}

/// Prompt logprobs (`echo` with `logprobs`) are each model's own: every doctor scores the same
/// prompt differently from the base model and from each other, and gets the same numbers in one
/// mixed batch as alone, with the prompt cached by a previous request on the same adapter.
#[tokio::test]
async fn each_doctor_scores_a_prompt_with_its_own_adapter_alone_or_mixed() {
    let tmp = tempfile::tempdir().unwrap();
    synthetic(tmp.path(), 2, 6);
    let router = server(tmp.path(), 2, 4);
    let prompt = "Question: should I see a doctor about a cough that lasts three weeks?";
    let models = [MODEL, "doctor-0000", "doctor-0001"];
    let echo = |model: &str| {
        let body = json!({"model": model, "prompt": prompt, "max_tokens": 2, "temperature": 0,
            "ignore_eos": true, "logprobs": 1, "echo": true});
        let router = router.clone();
        async move {
            let (s, b) = post(&router, "/v1/completions", body).await;
            assert_eq!(s, StatusCode::OK, "{b}");
            let lps: Vec<Option<f64>> = b["choices"][0]["logprobs"]["token_logprobs"]
                .as_array()
                .unwrap()
                .iter()
                .map(Value::as_f64)
                .collect();
            lps
        }
    };
    let mut alone = Vec::new();
    for m in models {
        // The first request caches the prompt for the adapter; the echo must still score it all.
        assert_eq!(complete(&router, m, prompt, 1).await.0, StatusCode::OK);
        alone.push(echo(m).await);
    }
    let mixed = futures_util::future::join_all(models.map(echo)).await;
    for (i, (a, b)) in alone.iter().zip(&mixed).enumerate() {
        assert_eq!(a[0], None);
        assert!(a[1..].iter().all(Option::is_some), "{}: {a:?}", models[i]);
        for (x, y) in a.iter().zip(b).skip(1) {
            let (x, y) = (x.unwrap(), y.unwrap());
            assert!((x - y).abs() < 1e-4, "{}: {x} alone, {y} mixed", models[i]);
        }
    }
    for i in 0..models.len() {
        for j in i + 1..models.len() {
            let differ = alone[i]
                .iter()
                .zip(&alone[j])
                .filter(|(x, y)| x.zip(**y).is_some_and(|(x, y)| (x - y).abs() > 1e-3))
                .count();
            assert!(differ > 10, "{} and {} score alike", models[i], models[j]);
        }
    }
}

/// Rewrites adapter `name` under `root` with weights from `seed`.
fn synthetic_one(root: &Path, name: &str, seed: u64) {
    let tmp = tempfile::tempdir().unwrap();
    synthetic(tmp.path(), 1, seed);
    for file in ["adapter_config.json", "adapter_model.safetensors"] {
        std::fs::copy(
            tmp.path().join("doctor-0000").join(file),
            root.join(name).join(file),
        )
        .unwrap();
    }
}

#[tokio::test]
async fn load_and_unload_endpoints_check_paths_and_keep_serving() {
    let tmp = tempfile::tempdir().unwrap();
    let root = tmp.path().join("adapters");
    std::fs::create_dir(&root).unwrap();
    synthetic(&root, 1, 4);
    let router = server(&root, 2, 4);
    let outside = tempfile::tempdir().unwrap();
    synthetic(outside.path(), 1, 5);
    std::os::unix::fs::symlink(outside.path().join("doctor-0000"), root.join("escape")).unwrap();
    let load = |name: &str, path: &str| json!({"lora_name": name, "lora_path": path});
    let bad = [
        (load("x", "../adapters/doctor-0000"), "'..'"),
        (
            load(
                "x",
                &outside.path().join("doctor-0000").display().to_string(),
            ),
            "outside",
        ),
        (load("x", "escape"), "outside"),
        (load("x", "missing"), "missing"),
        (load("bad/name", "doctor-0000"), "invalid adapter name"),
        (load("doctor-0000", "doctor-0000"), "already loaded"),
        (load(MODEL, "doctor-0000"), "base model"),
    ];
    for (body, needle) in bad {
        let (status, resp) = post(&router, "/v1/load_lora_adapter", body.clone()).await;
        assert_eq!(status, StatusCode::BAD_REQUEST, "{body} -> {resp}");
        let message = resp["error"]["message"].as_str().unwrap_or_default();
        assert!(message.contains(needle), "{body}: {message}");
    }
    // An invalid adapter (rank above max_lora_rank = 16) is refused with the reason.
    let big = tmp.path().join("big");
    let model = LoadedModel::load(&support::shared("reference/tiny-llama/model")).unwrap();
    write_synthetic_adapters(model.model.config(), &big, 1, 32, &Projection::ALL, 6, 16.0).unwrap();
    std::fs::rename(big.join("doctor-0000"), root.join("rank32")).unwrap();
    let (status, resp) = post(&router, "/v1/load_lora_adapter", load("big", "rank32")).await;
    assert_eq!(status, StatusCode::BAD_REQUEST);
    assert!(
        resp["error"]["message"].as_str().unwrap().contains("32"),
        "{resp}"
    );
    let (status, _) = complete(&router, MODEL, "still serving?", 4).await;
    assert_eq!(status, StatusCode::OK);

    // A valid load under a new name serves at once; unload makes it 404 again.
    let (status, resp) = post(
        &router,
        "/v1/load_lora_adapter",
        load("dr-new", "doctor-0000"),
    )
    .await;
    assert_eq!(status, StatusCode::OK, "{resp}");
    let (status, body) = complete(&router, "dr-new", "hello doctor", 6).await;
    assert_eq!(status, StatusCode::OK, "{body}");
    let (s, list) = get(&router, "/v1/models").await;
    assert_eq!(s, StatusCode::OK);
    assert!(list.contains("\"dr-new\""));
    let unload = json!({"lora_name": "dr-new"});
    let (status, _) = post(&router, "/v1/unload_lora_adapter", unload.clone()).await;
    assert_eq!(status, StatusCode::OK);
    let (status, _) = complete(&router, "dr-new", "hello doctor", 6).await;
    assert_eq!(status, StatusCode::NOT_FOUND);
    let (status, _) = post(&router, "/v1/unload_lora_adapter", unload).await;
    assert_eq!(status, StatusCode::NOT_FOUND);
    // A folder adapter that was unloaded is not rediscovered behind the API's back.
    let (status, _) = post(
        &router,
        "/v1/unload_lora_adapter",
        json!({"lora_name": "doctor-0000"}),
    )
    .await;
    assert_eq!(status, StatusCode::OK);
    let (status, _) = complete(&router, "doctor-0000", "hello", 4).await;
    assert_eq!(status, StatusCode::NOT_FOUND);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_broken_adapter_fails_its_requests_only() {
    let tmp = tempfile::tempdir().unwrap();
    synthetic(tmp.path(), 2, 8);
    let weights = tmp.path().join("doctor-0001/adapter_model.safetensors");
    let bytes = std::fs::read(&weights).unwrap();
    std::fs::write(&weights, &bytes[..bytes.len() / 2]).unwrap();
    let router = server(tmp.path(), 2, 4);
    let (r1, r2, r3) = tokio::join!(
        complete(&router, "doctor-0001", "hello", 4),
        complete(&router, "doctor-0000", "hello", 4),
        complete(&router, MODEL, "hello", 4),
    );
    assert_eq!(r1.0, StatusCode::INTERNAL_SERVER_ERROR, "{}", r1.1);
    assert_eq!(r1.1["error"]["code"], "adapter_load_failed");
    assert!(
        r1.1["error"]["message"]
            .as_str()
            .unwrap()
            .contains("doctor-0001"),
        "{}",
        r1.1
    );
    assert_eq!((r2.0, r3.0), (StatusCode::OK, StatusCode::OK));
    // Streaming gets the error as an SSE error event.
    let body = json!({"model": "doctor-0001", "prompt": "hello", "max_tokens": 4, "stream": true});
    let (status, _, sse) = call(&router, "POST", "/v1/completions", Some(body), None).await;
    assert_eq!(status, StatusCode::OK);
    assert!(sse.contains("adapter_load_failed"), "{sse}");

    let (_, metrics) = get(&router, "/metrics").await;
    for needle in [
        "caduceus_lora_requests_total{adapter=\"doctor-0000\"}",
        "caduceus_lora_loads_total{source=\"disk\"}",
        "caduceus_lora_load_failures_total{adapter=\"doctor-0001\"}",
        "caduceus_lora_load_seconds_bucket",
        "caduceus_lora_resident_adapters{tier=\"host\"}",
        "caduceus_lora_requests_info{max_lora=\"2\"",
    ] {
        assert!(metrics.contains(needle), "missing {needle} in\n{metrics}");
    }
}

#[tokio::test]
async fn adapters_found_by_name_stay_inside_the_root_and_clients_see_no_server_path() {
    let tmp = tempfile::tempdir().unwrap();
    let root = tmp.path().join("adapters");
    std::fs::create_dir(&root).unwrap();
    synthetic(&root, 1, 4);
    let outside = tempfile::tempdir().unwrap();
    synthetic(outside.path(), 1, 5);
    let foreign = outside.path().join("doctor-0000");
    let symlink = |from: &Path, to: &Path| std::os::unix::fs::symlink(from, to).unwrap();
    // A symlinked folder seen at start, and a folder whose weights file is a symlink out.
    symlink(&foreign, &root.join("escape"));
    let half = root.join("half-escape");
    std::fs::create_dir(&half).unwrap();
    std::fs::copy(
        foreign.join("adapter_config.json"),
        half.join("adapter_config.json"),
    )
    .unwrap();
    symlink(
        &foreign.join("adapter_model.safetensors"),
        &half.join("adapter_model.safetensors"),
    );
    // A broken adapter inside the root: its error must not name the server's folders.
    let broken = root.join("broken");
    std::fs::create_dir(&broken).unwrap();
    std::fs::write(broken.join("adapter_config.json"), "{").unwrap();
    std::fs::write(broken.join("adapter_model.safetensors"), "").unwrap();
    let router = server(&root, 2, 4);
    // A symlinked folder that appears after start, found on first request.
    symlink(&foreign, &root.join("late-escape"));
    let (status, body) = get(&router, "/v1/models").await;
    assert_eq!(status, StatusCode::OK);
    let models: Value = serde_json::from_str(&body).unwrap();
    let ids: Vec<&str> = models["data"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| m["id"].as_str().unwrap())
        .collect();
    assert_eq!(ids, [MODEL, "broken", "doctor-0000"]);
    let tmp_path = tmp.path().display().to_string();
    assert!(!body.contains(&tmp_path), "{body}");
    assert_eq!(models["data"][2]["root"], "doctor-0000");
    for name in ["escape", "half-escape", "late-escape"] {
        let (status, resp) = complete(&router, name, "hello", 2).await;
        assert_eq!(status, StatusCode::NOT_FOUND, "{name}: {resp}");
    }
    let (status, resp) = complete(&router, "broken", "hello", 2).await;
    assert_eq!(status, StatusCode::INTERNAL_SERVER_ERROR, "{resp}");
    let message = resp["error"]["message"].as_str().unwrap();
    assert!(message.contains("adapter_config.json"), "{message}");
    assert!(!message.contains(&tmp_path), "{message}");
    let (status, resp) = post(
        &router,
        "/v1/load_lora_adapter",
        json!({"lora_name": "b2", "lora_path": "broken"}),
    )
    .await;
    assert_eq!(status, StatusCode::BAD_REQUEST);
    let message = resp["error"]["message"].as_str().unwrap();
    assert!(message.contains("broken"), "{message}");
    assert!(!message.contains(&tmp_path), "{message}");
    let (status, resp) = complete(&router, "doctor-0000", "hello", 2).await;
    assert_eq!(status, StatusCode::OK, "{resp}");
}

#[test]
fn requests_parked_on_a_cold_adapter_count_as_waiting() {
    use caduceus_runtime::adapters::peft::AdapterLimits;
    use caduceus_runtime::adapters::{AdapterRegistry, AdapterService, AdapterSettings};
    use caduceus_runtime::engine::{EngineCore, EngineRequest, RequestId, SchedulerConfig};
    use caduceus_runtime::model::LoraDtype;
    use std::sync::Arc;
    let tmp = tempfile::tempdir().unwrap();
    synthetic(tmp.path(), 1, 7);
    let loaded = LoadedModel::load(&support::shared("reference/tiny-llama/model")).unwrap();
    let base = loaded.model.config().clone();
    let registry = AdapterRegistry::scan(Some(tmp.path()), vec![MODEL.into()]).unwrap();
    let settings = AdapterSettings {
        max_loras: 2,
        max_cpu_loras: 2,
        max_cpu_lora_bytes: 1 << 30,
        limits: AdapterLimits {
            max_rank: 16,
            max_file_bytes: 1 << 30,
        },
        format: SlotFormat::Host(LoraDtype::F32),
        loader_share_percent: 100,
        loader_threads: None,
    };
    let service = Arc::new(AdapterService::new(registry, base, settings));
    let config = SchedulerConfig {
        num_blocks: 64,
        max_model_len: 256,
        ..SchedulerConfig::default()
    };
    let mut core = EngineCore::new(Arc::new(loaded.model), None, Vec::new(), config)
        .unwrap()
        .with_adapters(service)
        .unwrap();
    let mut req = EngineRequest::new(vec![5, 6, 7], 2);
    req.adapter = Some(Arc::from("doctor-0000"));
    req.detokenize = false;
    let (tx, _rx) = tokio::sync::mpsc::unbounded_channel();
    core.add_request(RequestId(0), req, tx).unwrap();
    assert_eq!(core.num_parked(), 1);
    assert_eq!(core.stats().num_waiting, 1);
}
