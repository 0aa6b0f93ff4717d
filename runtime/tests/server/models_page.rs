//! Registration reads no weights (a folder whose weights are garbage, or a FIFO that would block
//! any reader, registers at once), and `GET /v1/models` comes in bounded pages.

use std::path::Path;
use std::time::Duration;

use axum::http::StatusCode;
use caduceus_runtime::adapters::AdapterRegistry;
use caduceus_runtime::server::{app, MAX_MODELS_LIMIT};
use serde_json::Value;

use crate::support::server_app::{call, TestServer, MODEL};

/// An adapter folder with a real config and `weights` as its weights file's content.
fn fake_adapter(root: &Path, name: &str, weights: &[u8]) {
    let config =
        crate::support::shared("reference/tiny-llama/adapters/doctor-b/adapter_config.json");
    let dir = root.join(name);
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::copy(config, dir.join("adapter_config.json")).unwrap();
    std::fs::write(dir.join("adapter_model.safetensors"), weights).unwrap();
}

#[test]
fn registration_never_opens_the_weights() {
    let root = tempfile::tempdir().unwrap();
    fake_adapter(root.path(), "dr-garbage", b"not a safetensors file at all");
    // Opening a FIFO for reading blocks until a writer comes: none ever does.
    let fifo_dir = root.path().join("dr-fifo");
    fake_adapter(root.path(), "dr-fifo", b"");
    let weights = fifo_dir.join("adapter_model.safetensors");
    std::fs::remove_file(&weights).unwrap();
    let made = std::process::Command::new("mkfifo")
        .arg(&weights)
        .status()
        .unwrap();
    assert!(made.success(), "mkfifo failed");
    let dir = root.path().to_path_buf();
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let _ = tx.send(AdapterRegistry::scan(Some(&dir), vec![MODEL.into()]).map(|r| r.list()));
    });
    let listed = rx
        .recv_timeout(Duration::from_secs(20))
        .expect("registration blocked: it opened the FIFO weights file")
        .unwrap();
    let names: Vec<&str> = listed.iter().map(|e| &*e.name).collect();
    assert_eq!(names, ["dr-fifo", "dr-garbage"]);
}

async fn get(r: &axum::Router, uri: &str) -> (StatusCode, Value) {
    let (s, _, b) = call(r, "GET", uri, None, None).await;
    (s, serde_json::from_str(&b).unwrap())
}

#[tokio::test]
async fn models_come_in_pages_that_add_up_to_the_whole_list() {
    let root = tempfile::tempdir().unwrap();
    let names: Vec<String> = (0..23).map(|i| format!("dr-{i:03}")).collect();
    for n in &names {
        fake_adapter(root.path(), n, b"garbage");
    }
    let r = app(TestServer {
        adapter_dir: Some(root.path().to_path_buf()),
        ..TestServer::default()
    }
    .state());
    let (s, all) = get(&r, "/v1/models").await;
    assert_eq!(s, StatusCode::OK, "{all}");
    let ids = |v: &Value| -> Vec<String> {
        v["data"]
            .as_array()
            .unwrap()
            .iter()
            .map(|c| c["id"].as_str().unwrap().to_owned())
            .collect()
    };
    let mut expected = vec![MODEL.to_owned()];
    expected.extend(names.iter().cloned());
    assert_eq!(ids(&all), expected);
    assert_eq!(all["has_more"], false);
    assert_eq!(all["object"], "list");
    assert_eq!(all["last_id"], "dr-022");
    // Pages of 5, each continuing after the previous last id.
    let mut paged = Vec::new();
    let mut uri = "/v1/models?limit=5".to_owned();
    loop {
        let (s, page) = get(&r, &uri).await;
        assert_eq!(s, StatusCode::OK, "{page}");
        let got = ids(&page);
        assert!(got.len() <= 5 && !got.is_empty(), "{page}");
        assert_eq!(page["first_id"], got[0].as_str());
        paged.extend(got);
        if page["has_more"] == false {
            break;
        }
        uri = format!(
            "/v1/models?limit=5&after={}",
            page["last_id"].as_str().unwrap()
        );
    }
    assert_eq!(paged, expected);
    // A cursor at the base model continues with the adapters.
    let (_, page) = get(&r, &format!("/v1/models?limit=2&after={MODEL}")).await;
    assert_eq!(ids(&page), ["dr-000", "dr-001"]);
    for bad in ["0", "abc", "-1", &(MAX_MODELS_LIMIT + 1).to_string()] {
        let (s, v) = get(&r, &format!("/v1/models?limit={bad}")).await;
        assert_eq!(s, StatusCode::BAD_REQUEST, "limit={bad}: {v}");
        assert_eq!(v["error"]["param"], "limit", "{v}");
    }
}
