//! API keys, `config print`, the shipped example, unit round trips and the `config` subcommands.

use std::path::PathBuf;
use std::process::Command;

use caduceus_runtime::config::{ApiKey, ByteSize, CaduceusConfig, HumanDuration};
use proptest::prelude::*;

use super::{load, load_err, with_file, write, EXAMPLE};

#[test]
fn api_keys_from_list_env_and_file_are_validated_and_never_echoed() {
    let dir = tempfile::tempdir().unwrap();
    let keys = write(
        &dir,
        "keys",
        "# rotated 2025-01\nsk-file-key-000000000001\n\n  sk-file-key-000000000002  \n",
    );
    let toml = format!(
        "[server]\napi_keys = [\"sk-inline-key-0000000001\"]\napi_key_file = \"{}\"\n",
        keys.display()
    );
    let (cfg, _) = load(&toml, &[]);
    let resolved: Vec<String> = cfg
        .unwrap()
        .server
        .resolve_api_keys()
        .unwrap()
        .iter()
        .map(|k| k.expose().to_owned())
        .collect();
    assert_eq!(
        resolved,
        [
            "sk-inline-key-0000000001",
            "sk-file-key-000000000001",
            "sk-file-key-000000000002"
        ]
    );

    let (cfg, _) = load(
        "",
        &[(
            "CADUCEUS_SERVER__API_KEYS",
            "sk-a-000000000000, sk-b-000000000000",
        )],
    );
    assert_eq!(
        cfg.unwrap().server.api_keys,
        [
            ApiKey::new("sk-a-000000000000"),
            ApiKey::new("sk-b-000000000000")
        ]
    );

    let (msg, err, _) = load_err("[server]\napi_keys = [\"sk-has space-0000000\"]\n", &[]);
    assert_eq!(err.key(), Some("server.api_keys"));
    assert!(
        !msg.contains("space-0000000") && msg.contains("without whitespace"),
        "{msg}"
    );
    let (msg, _, _) = load_err("[server]\napi_keys = [\"\"]\n", &[]);
    assert!(msg.contains("non-empty"), "{msg}");

    let empty = write(&dir, "empty", "# nothing yet\n");
    let (msg, err, _) = load_err(
        &format!("[server]\napi_key_file = \"{}\"\n", empty.display()),
        &[],
    );
    assert_eq!(err.key(), Some("server.api_key_file"));
    assert!(
        msg.contains("holds no keys") && msg.contains(&empty.display().to_string()),
        "{msg}"
    );
    let (msg, _, _) = load_err("[server]\napi_key_file = \"/no/such/keys\"\n", &[]);
    assert!(
        msg.contains("/no/such/keys") && msg.contains("readable file"),
        "{msg}"
    );
}

#[test]
fn print_masks_keys_and_reloads_to_the_same_config() {
    let toml = "[server]\napi_keys = [\"sk-secret-1234567890abcd\", \"tiny\"]\nport = 9001\n[scheduler]\nkv_cache_bytes = \"2GiB\"\n[model]\nserved_model_name = \"avatar\"\n";
    let (cfg, _) = load(toml, &[]);
    let cfg = cfg.unwrap();
    let printed = cfg.to_toml_masked().unwrap();
    assert!(
        !printed.contains("secret") && !printed.contains("tiny"),
        "{printed}"
    );
    assert!(
        printed.contains("\"sk-...abcd\"") && printed.contains("\"***\""),
        "{printed}"
    );
    assert!(printed.contains("kv_cache_bytes = \"2GiB\""), "{printed}");
    assert!(!format!("{cfg:?}").contains("secret"));
    let (reloaded, _) = load(&printed, &[]);
    let mut reloaded = reloaded.unwrap();
    reloaded.server.api_keys = cfg.server.api_keys.clone();
    assert_eq!(reloaded, cfg);
}

#[test]
fn shipped_example_validates_documents_every_key_and_states_the_defaults() {
    let path = PathBuf::from(EXAMPLE);
    let cfg = CaduceusConfig::load(&with_file(&path), Vec::new()).unwrap();
    assert_eq!(
        cfg,
        CaduceusConfig::default(),
        "the example's values must be the defaults"
    );
    let text = std::fs::read_to_string(&path).unwrap();
    let mut every_key = CaduceusConfig::default();
    every_key.server.api_key_file = Some("k".into());
    every_key.server.metrics_api_key = Some(ApiKey::new("k"));
    every_key.model.served_model_name = Some("m".into());
    every_key.model.max_model_len = Some(2);
    every_key.scheduler.kv_cache_blocks = Some(2);
    every_key.scheduler.kv_cache_bytes = Some(ByteSize(1));
    every_key.scheduler.max_num_batched_tokens = Some(1);
    every_key.server.rate_limit_per_key = Some(1.0);
    every_key.server.rate_limit_burst = Some(1);
    every_key.adapters.dir = Some("d".into());
    let table = toml::Table::try_from(&every_key).unwrap();
    for (section, keys) in &table {
        assert!(
            text.contains(&format!("\n[{section}]\n")),
            "missing [{section}]"
        );
        for key in keys.as_table().unwrap().keys() {
            let documented = text
                .lines()
                .any(|l| l.trim_start_matches("# ").starts_with(&format!("{key} = ")));
            assert!(documented, "example does not document {section}.{key}");
        }
    }
}

proptest! {
    #[test]
    fn sizes_round_trip_through_text_and_toml(bytes in 1024u64..(1 << 50), unit in 0u32..4) {
        let size = ByteSize(bytes << (10 * unit));
        prop_assert_eq!(ByteSize::parse(&size.to_string()), Some(size));
        let (cfg, _) = load(&format!("[server]\nbody_limit = \"{size}\"\n"), &[]);
        prop_assert_eq!(cfg.unwrap().server.body_limit, size);
        let (cfg, _) = load("", &[("CADUCEUS_SERVER__BODY_LIMIT", &size.bytes().to_string())]);
        prop_assert_eq!(cfg.unwrap().server.body_limit, size);
    }

    #[test]
    fn durations_round_trip_through_text_and_toml(ms in 1u64..(1 << 40)) {
        let d = HumanDuration(std::time::Duration::from_millis(ms));
        prop_assert_eq!(HumanDuration::parse(&d.to_string()), Some(d));
        let (cfg, _) = load("", &[("CADUCEUS_SERVER__REQUEST_TIMEOUT", &d.to_string())]);
        prop_assert_eq!(cfg.unwrap().server.request_timeout, d);
    }
}

#[test]
fn config_subcommands_exit_codes_and_output() {
    let run = |args: &[&str]| {
        Command::new(env!("CARGO_BIN_EXE_caduceus"))
            .args(args)
            .env_clear()
            .output()
            .unwrap()
    };
    let ok = run(&["config", "check", EXAMPLE]);
    assert!(ok.status.success());
    assert!(String::from_utf8_lossy(&ok.stdout).starts_with("ok: "));
    let dir = tempfile::tempdir().unwrap();
    let bad = write(&dir, "bad.toml", "[server]\nport = 70000\n");
    let out = run(&["config", "check", bad.to_str().unwrap()]);
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("server.port") && stderr.contains("70000"),
        "{stderr}"
    );
    let printed = run(&["config", "print", "--config", EXAMPLE, "--port", "9999"]);
    assert!(printed.status.success());
    let table: toml::Table = String::from_utf8_lossy(&printed.stdout).parse().unwrap();
    assert_eq!(table["server"]["port"].as_integer(), Some(9999));
}

#[test]
fn keyless_adapter_loading_is_refused_off_loopback_and_admin_keys_are_masked() {
    let (msg, err, _) = load_err(
        "[server]\nhost = \"0.0.0.0\"\nallow_runtime_lora_updating = true\n",
        &[],
    );
    assert_eq!(
        err.key(),
        Some("server.allow_runtime_lora_updating"),
        "{msg}"
    );
    assert!(msg.contains("admin_api_keys"), "{msg}");
    let (cfg, _) = load("[server]\nallow_runtime_lora_updating = true\n", &[]);
    assert!(cfg.unwrap().server.allow_runtime_lora_updating);
    let toml = "[server]\nhost = \"0.0.0.0\"\nallow_runtime_lora_updating = true\n\
                admin_api_keys = [\"sk-admin-secret-000000001\"]\n\
                metrics_api_key = \"sk-metrics-secret-00000001\"\n";
    let (cfg, _) = load(toml, &[]);
    let printed = cfg.unwrap().to_toml_masked().unwrap();
    assert!(!printed.contains("secret"), "{printed}");
    let (msg, err, _) = load_err("[server]\nadmin_api_keys = [\"has space\"]\n", &[]);
    assert_eq!(err.key(), Some("server.admin_api_keys"), "{msg}");
}
