//! What the inference gateway's endpoint picker reads from /metrics (the model-server metric
//! protocol): one current LoRA info series stamped with its update time, the cache geometry,
//! and the histogram bounds the SLO queries of deploy/ select.

use std::time::{SystemTime, UNIX_EPOCH};

use super::{complete, get, server, synthetic};

fn unix_now() -> f64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_secs_f64()
}

#[tokio::test]
async fn gateway_metrics_follow_the_model_server_protocol() {
    // Installed before the engine starts, as `caduceus serve` does, so its first gauges stay.
    caduceus_runtime::metrics::install();
    let tmp = tempfile::tempdir().unwrap();
    synthetic(tmp.path(), 3, 5);
    let router = server(tmp.path(), 2, 4);
    let before = unix_now();
    let (r0, r1, r2) = tokio::join!(
        complete(&router, "doctor-0000", "hello there", 3),
        complete(&router, "doctor-0001", "hello there", 3),
        complete(&router, "doctor-0002", "hello", 3),
    );
    assert!(r0.0.is_success() && r1.0.is_success() && r2.0.is_success());
    let (_, page) = get(&router, "/metrics").await;
    let info: Vec<&str> = page
        .lines()
        .filter(|l| l.starts_with("caduceus_lora_requests_info{"))
        .collect();
    // Every change of running/waiting adapters happened, yet only the current series is left.
    assert_eq!(info.len(), 1, "{page}");
    let (labels, value) = info[0].rsplit_once(' ').unwrap();
    assert!(labels.contains("max_lora=\"2\""), "{labels}");
    assert!(labels.contains("running_lora_adapters=\""), "{labels}");
    assert!(labels.contains("waiting_lora_adapters=\""), "{labels}");
    let stamp: f64 = value.parse().unwrap();
    assert!(
        stamp >= before - 1.0 && stamp <= unix_now() + 1.0,
        "{stamp}"
    );
    assert!(page.contains("# TYPE caduceus_lora_requests_info gauge"));
    // The test server's pool: block size 16, 2048 blocks of which 2047 usable.
    assert!(
        page.contains(r#"caduceus_cache_config_info{block_size="16",num_gpu_blocks="2047"} 1"#),
        "{page}"
    );
    for bound in [
        r#"caduceus_time_to_first_token_seconds_bucket{le="2"}"#,
        r#"caduceus_inter_token_latency_seconds_bucket{le="0.25"}"#,
    ] {
        assert!(page.contains(bound), "SLO bound {bound} missing:\n{page}");
    }
}
