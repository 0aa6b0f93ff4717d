//! The server config loader: layer precedence, error messages that name key, value and origin,
//! unknown-key suggestions, size/duration round trips, masked printing and the shipped example.

#[path = "config/keys_and_output.rs"]
mod keys_and_output;

use std::path::{Path, PathBuf};

use caduceus_runtime::config::{
    ByteSize, CaduceusConfig, ConfigError, ConfigOverrides, KvCacheSize, Origin,
};
use caduceus_runtime::model::DEFAULT_MODEL_PATH;

const EXAMPLE: &str = concat!(
    env!("CARGO_MANIFEST_DIR"),
    "/../deploy/config/caduceus.toml"
);

fn write(dir: &tempfile::TempDir, name: &str, text: &str) -> PathBuf {
    let path = dir.path().join(name);
    std::fs::write(&path, text).unwrap();
    path
}

fn env(vars: &[(&str, &str)]) -> Vec<(String, String)> {
    vars.iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect()
}

fn with_file(path: &Path) -> ConfigOverrides {
    ConfigOverrides {
        config: Some(path.to_path_buf()),
        ..ConfigOverrides::default()
    }
}

/// Loads `toml` from a temp file with `vars`; returns the result and the file path.
fn load(toml: &str, vars: &[(&str, &str)]) -> (Result<CaduceusConfig, ConfigError>, PathBuf) {
    let dir = tempfile::tempdir().unwrap();
    let path = write(&dir, "caduceus.toml", toml);
    let result = CaduceusConfig::load(&with_file(&path), env(vars));
    (result, path)
}

fn load_err(toml: &str, vars: &[(&str, &str)]) -> (String, ConfigError, PathBuf) {
    let (result, path) = load(toml, vars);
    let err = result.unwrap_err();
    (err.to_string(), err, path)
}

#[test]
fn no_file_no_env_no_flags_gives_the_documented_defaults() {
    let cfg = CaduceusConfig::load(&ConfigOverrides::default(), Vec::new()).unwrap();
    assert_eq!(cfg, CaduceusConfig::default());
    assert_eq!(
        (cfg.server.host.as_str(), cfg.server.port),
        ("127.0.0.1", 8000)
    );
    assert_eq!(cfg.server.body_limit, ByteSize(1 << 20));
    assert_eq!(cfg.model.path, PathBuf::from(DEFAULT_MODEL_PATH));
    assert_eq!(cfg.model.served_name(), "SmolLM2-135M-Instruct.Q4_1");
    let sched = caduceus_runtime::engine::SchedulerConfig::default();
    assert_eq!(cfg.scheduler.max_num_seqs, sched.max_num_seqs);
    // No budget by default: `serve` sizes it from the measured prefill rate and max_step_ms.
    assert_eq!(cfg.scheduler.max_num_batched_tokens, None);
    assert_eq!(cfg.scheduler.max_step_ms, 250);
    assert_eq!(cfg.scheduler.fairness, caduceus_scheduler::Fairness::Vtc);
    assert_eq!(cfg.server.rate_limit_per_key, None);
    assert_eq!(cfg.scheduler.block_size, sched.block_size);
    assert!(cfg.scheduler.enable_prefix_caching);
    assert_eq!(cfg.scheduler.max_queued_requests, 1024);
    assert_eq!(
        cfg.scheduler.kv_cache_size(),
        KvCacheSize::Bytes(ByteSize(256 << 20))
    );
    assert!(!cfg.logging.log_prompts);
    assert!(cfg.server.resolve_api_keys().unwrap().is_empty());
    assert_eq!(cfg.model.gemm, caduceus_runtime::config::GemmSetting::Tuned);
    assert_eq!(
        cfg.model.attention_kernel,
        caduceus_runtime::config::AttentionKernelSetting::TensorCores
    );
}

#[test]
fn flags_beat_env_which_beats_the_file() {
    let toml = "[server]\nport = 8100\nhost = \"0.0.0.0\"\n[scheduler]\nmax_num_seqs = 32\n";
    let vars = [
        ("CADUCEUS_SERVER__PORT", "8200"),
        ("CADUCEUS_SCHEDULER__BLOCK_SIZE", "32"),
        ("CADUCEUS_LOGGING__JSON", "true"),
        ("UNRELATED_VAR", "ignored"),
    ];
    let dir = tempfile::tempdir().unwrap();
    let path = write(&dir, "c.toml", toml);

    let file_only = CaduceusConfig::load(&with_file(&path), Vec::new()).unwrap();
    assert_eq!(file_only.server.port, 8100);

    let file_env = CaduceusConfig::load(&with_file(&path), env(&vars)).unwrap();
    assert_eq!(file_env.server.port, 8200);
    assert_eq!(file_env.server.host, "0.0.0.0", "file value not overridden");
    assert_eq!(file_env.scheduler.max_num_seqs, 32);
    assert_eq!(file_env.scheduler.block_size, 32, "env-only value");
    assert!(file_env.logging.json);

    let flags = ConfigOverrides {
        port: Some(8300),
        model: Some("other/model.gguf".into()),
        max_model_len: Some(4096),
        ..with_file(&path)
    };
    let all = CaduceusConfig::load(&flags, env(&vars)).unwrap();
    assert_eq!(all.server.port, 8300);
    assert_eq!(all.model.path, PathBuf::from("other/model.gguf"));
    assert_eq!(all.model.served_name(), "model");
    assert_eq!(all.model.max_model_len, Some(4096));
    assert_eq!(all.scheduler.block_size, 32);
}

#[test]
fn bad_values_name_key_value_expectation_and_origin() {
    let (msg, err, path) = load_err("[server]\nport = \"eighty\"\n", &[]);
    assert_eq!(err.key(), Some("server.port"));
    assert!(
        matches!(&err, ConfigError::InvalidValue { origin: Origin::File(p), .. } if *p == path)
    );
    for part in ["server.port", "\"eighty\"", "an integer in 1..=65535"] {
        assert!(msg.contains(part), "{msg}");
    }
    assert!(msg.contains(&path.display().to_string()), "{msg}");

    let (msg, err, _) = load_err("", &[("CADUCEUS_SCHEDULER__MAX_NUM_SEQS", "lots")]);
    assert_eq!(err.key(), Some("scheduler.max_num_seqs"));
    for part in [
        "\"lots\"",
        "environment variable CADUCEUS_SCHEDULER__MAX_NUM_SEQS",
    ] {
        assert!(msg.contains(part), "{msg}");
    }

    let flags = ConfigOverrides {
        port: Some(0),
        ..ConfigOverrides::default()
    };
    let msg = CaduceusConfig::load(&flags, Vec::new())
        .unwrap_err()
        .to_string();
    assert!(
        msg.contains("server.port") && msg.contains("got 0") && msg.contains("flag --port"),
        "{msg}"
    );

    let cases: [(&str, &str, &str, &str); 17] = [
        (
            "[scheduler]\nblock_size = 24",
            "scheduler.block_size",
            "24",
            "power of two",
        ),
        (
            "[scheduler]\nblock_size = 512",
            "scheduler.block_size",
            "512",
            "1..=256",
        ),
        (
            "[scheduler]\nmax_num_batched_tokens = 8\nmax_num_seqs = 16",
            "scheduler.max_num_batched_tokens",
            "8",
            "at least scheduler.max_num_seqs (16)",
        ),
        (
            "[scheduler]\nkv_cache_bytes = \"lots\"",
            "scheduler.kv_cache_bytes",
            "\"lots\"",
            "\"512MiB\"",
        ),
        (
            "[server]\nrequest_timeout = 30",
            "server.request_timeout",
            "30",
            "\"30s\"",
        ),
        (
            "[logging]\nlevel = \"caduceus=loud\"",
            "logging.level",
            "\"caduceus=loud\"",
            "tracing filter",
        ),
        (
            "[adapters]\nmax_lora_rank = 1024",
            "adapters.max_lora_rank",
            "1024",
            "1..=512",
        ),
        (
            "[adapters]\nloader_step_share_percent = 0",
            "adapters.loader_step_share_percent",
            "0",
            "1..=100",
        ),
        (
            "[adapters]\nloader_threads = 0",
            "adapters.loader_threads",
            "0",
            "1..=64",
        ),
        (
            "[scheduler]\nbacklog_prefill_percent = 101",
            "scheduler.backlog_prefill_percent",
            "101",
            "1..=100",
        ),
        (
            "[adapters]\nmax_loras = 16\nmax_cpu_loras = 4",
            "adapters.max_cpu_loras",
            "4",
            "at least adapters.max_loras (16)",
        ),
        (
            "[adapters]\ndir = \"/definitely/not/here\"",
            "adapters.dir",
            "/definitely/not/here",
            "existing directory",
        ),
        (
            "[model]\ndtype = \"f8\"",
            "model.dtype",
            "\"f8\"",
            "\"bf16\"",
        ),
        (
            "[model]\ngemm = \"fastest\"",
            "model.gemm",
            "\"fastest\"",
            "\"library\"",
        ),
        (
            "[structured_outputs]\ncompile_timeout = \"0ms\"",
            "structured_outputs.compile_timeout",
            "\"0ms\"",
            "above zero",
        ),
        (
            "[structured_outputs]\ngrammar_cache_entries = 0",
            "structured_outputs.grammar_cache_entries",
            "0",
            "1..=1048576",
        ),
        (
            "[model]\nattention_kernel = \"tensor\"",
            "model.attention_kernel",
            "\"tensor\"",
            "\"tensor_cores\"",
        ),
    ];
    for (toml, key, value, expected) in cases {
        let (msg, err, path) = load_err(toml, &[]);
        assert_eq!(err.key(), Some(key), "{msg}");
        assert!(
            msg.contains(value) && msg.contains(expected),
            "{toml}: {msg}"
        );
        assert!(msg.contains(&path.display().to_string()), "{msg}");
    }
}

#[test]
fn kv_pool_in_blocks_and_bytes_conflict_naming_both_origins() {
    let (msg, err, path) = load_err(
        "[scheduler]\nkv_cache_blocks = 512\n",
        &[("CADUCEUS_SCHEDULER__KV_CACHE_BYTES", "64MiB")],
    );
    assert!(matches!(err, ConfigError::Conflict { .. }));
    for part in [
        "scheduler.kv_cache_blocks",
        "scheduler.kv_cache_bytes",
        "CADUCEUS_SCHEDULER__KV_CACHE_BYTES",
    ] {
        assert!(msg.contains(part), "{msg}");
    }
    assert!(msg.contains(&path.display().to_string()), "{msg}");
    let (ok, _) = load("[scheduler]\nkv_cache_blocks = 512\n", &[]);
    assert_eq!(
        ok.unwrap().scheduler.kv_cache_size(),
        KvCacheSize::Blocks(512)
    );
}

#[test]
fn unknown_keys_report_the_dotted_key_and_the_closest_valid_one() {
    let (msg, err, path) = load_err("[server]\nprot = 9000\n", &[]);
    assert_eq!(err.key(), Some("server.prot"));
    assert_eq!(
        msg,
        format!(
            "unknown config key `server.prot` in config file {}; did you mean `server.port`?",
            path.display()
        )
    );
    let (msg, _, _) = load_err("[server]\nmax_num_seqs = 4\n", &[]);
    assert!(
        msg.ends_with("did you mean `scheduler.max_num_seqs`?"),
        "{msg}"
    );
    let (msg, _, _) = load_err("[sever]\nport = 1\n", &[]);
    assert!(
        msg.contains("`sever`") && msg.ends_with("did you mean `server`?"),
        "{msg}"
    );
    let (msg, _, _) = load_err("[server]\nflux_capacitor = true\n", &[]);
    assert!(
        msg.contains("server.flux_capacitor") && !msg.contains("did you mean"),
        "{msg}"
    );
    let (msg, _, _) = load_err("server = 5\n", &[]);
    assert!(
        msg.contains("`server`") && msg.contains("[server]"),
        "{msg}"
    );

    let (msg, _, _) = load_err("", &[("CADUCEUS_PORT", "9000")]);
    assert!(msg.contains("environment variable CADUCEUS_PORT"), "{msg}");
    assert!(
        msg.ends_with("did you mean `CADUCEUS_SERVER__PORT`?"),
        "{msg}"
    );
    let (msg, _, _) = load_err("", &[("CADUCEUS_SCHEDULER__MAX_NUM_SEQ", "9")]);
    assert!(
        msg.contains("scheduler.max_num_seq`")
            && msg.ends_with("`CADUCEUS_SCHEDULER__MAX_NUM_SEQS`?"),
        "{msg}"
    );
}

#[test]
fn unreadable_and_malformed_files_name_the_path() {
    let missing = PathBuf::from("/definitely/not/here.toml");
    let err = CaduceusConfig::load(&with_file(&missing), Vec::new()).unwrap_err();
    assert!(matches!(err, ConfigError::Read { .. }));
    assert!(err.to_string().contains("/definitely/not/here.toml"));
    let (msg, err, path) = load_err("[server\nport = 1", &[]);
    assert!(matches!(err, ConfigError::Syntax { .. }));
    assert!(
        msg.contains(&path.display().to_string()) && msg.contains("not valid TOML"),
        "{msg}"
    );
}

#[test]
fn adapter_settings_come_from_file_env_and_flags() {
    use caduceus_runtime::config::AdapterDtype;
    use caduceus_runtime::model::LoraDtype;
    let dir = tempfile::tempdir().unwrap();
    let adapters = dir.path().join("avatars");
    std::fs::create_dir(&adapters).unwrap();
    let toml = "[adapters]\nmax_loras = 4\nmax_cpu_loras = 32\ndtype = \"f32\"\n";
    let path = write(&dir, "c.toml", toml);
    let file = CaduceusConfig::load(&with_file(&path), Vec::new()).unwrap();
    assert_eq!(file.adapters.loader_step_share_percent, 5);
    assert_eq!(file.adapters.loader_threads, None);
    assert_eq!(file.adapters.dtype, AdapterDtype::F32);
    assert_eq!(file.adapters.dtype.resolve(), LoraDtype::F32);
    assert_eq!(file.adapters.max_loras, 4);
    let vars = [
        ("CADUCEUS_ADAPTERS__DTYPE", "q8"),
        ("CADUCEUS_ADAPTERS__LOADER_STEP_SHARE_PERCENT", "20"),
        ("CADUCEUS_ADAPTERS__LOADER_THREADS", "3"),
    ];
    let flags = ConfigOverrides {
        adapter_dir: Some(adapters.clone()),
        max_loras: Some(16),
        ..with_file(&path)
    };
    let all = CaduceusConfig::load(&flags, env(&vars)).unwrap();
    assert_eq!(all.adapters.dtype.resolve(), LoraDtype::Q8);
    assert_eq!(all.adapters.dir.as_deref(), Some(adapters.as_path()));
    assert_eq!(all.adapters.max_loras, 16);
    assert_eq!(all.adapters.loader_step_share_percent, 20);
    assert_eq!(all.adapters.loader_threads, Some(3));
    // The default picks q8 exactly where the VNNI kernels exist.
    assert_eq!(AdapterDtype::Auto.resolve(), LoraDtype::fastest());
    let (msg, _, _) = load_err("[adapters]\ndtype = \"int4\"\n", &[]);
    assert!(
        msg.contains("adapters.dtype") && msg.contains("q8"),
        "{msg}"
    );
}

#[test]
fn structured_output_limits_come_from_file_and_env() {
    use caduceus_runtime::structured::CompileLimits;
    use std::time::Duration;
    // The defaults are the compiler's own.
    let d = CaduceusConfig::default().structured_outputs.limits();
    let c = CompileLimits::default();
    assert_eq!(
        (
            d.max_text_bytes,
            d.timeout,
            d.max_grammar_size,
            d.cache_entries
        ),
        (
            c.max_text_bytes,
            c.timeout,
            c.max_grammar_size,
            c.cache_entries
        )
    );
    let toml = "[structured_outputs]\nmax_grammar_bytes = \"16KiB\"\ncompile_timeout = \"750ms\"\n";
    let vars = [
        ("CADUCEUS_STRUCTURED_OUTPUTS__MAX_GRAMMAR_SYMBOLS", "5000"),
        ("CADUCEUS_STRUCTURED_OUTPUTS__GRAMMAR_CACHE_ENTRIES", "32"),
    ];
    let (cfg, _) = load(toml, &vars);
    let limits = cfg.unwrap().structured_outputs.limits();
    assert_eq!(limits.max_text_bytes, 16 * 1024);
    assert_eq!(limits.timeout, Duration::from_millis(750));
    assert_eq!(limits.max_grammar_size, 5000);
    assert_eq!(limits.cache_entries, 32);
}
