//! Every config key with the form its value must take. One table drives three things: rejecting
//! unknown keys (with a "did you mean"), turning environment strings into typed TOML values, and
//! checking each value before the merged tree is deserialized, so a bad value is reported with
//! its key and origin rather than as an anonymous serde error.

use toml::Value;

use super::units::{ByteSize, HumanDuration, DURATION_FORM, SIZE_FORM};

/// The form a value must take.
#[derive(Clone, Copy, Debug)]
pub(crate) enum Kind {
    Bool,
    /// An integer in `min..=max`.
    Int {
        min: i64,
        max: i64,
    },
    /// A finite number above zero (integer or float).
    PositiveNumber,
    /// A non-empty string.
    Str,
    /// A host name or IP address.
    Host,
    /// A file-system path (existence is checked later where it matters).
    Path,
    /// A byte size of at least `min` bytes.
    Size {
        min: u64,
    },
    /// A duration of at least `min_ms` milliseconds.
    Duration {
        min_ms: u64,
    },
    /// An array of strings.
    StrList,
    /// One of a fixed set of words.
    Choice(&'static [&'static str]),
    /// A `tracing` EnvFilter directive.
    LogFilter,
    /// A ZeroMQ TCP endpoint `tcp://HOST:PORT` (`*` for every interface).
    TcpEndpoint,
    /// Where the model runs: `auto`, `cpu`, `cuda` or `cuda:N`.
    Device,
    /// A number in (0, 1].
    Fraction,
}

/// One key of the config file.
pub(crate) struct KeySpec {
    pub section: &'static str,
    pub key: &'static str,
    pub kind: Kind,
}

const USIZE_MAX: i64 = i64::MAX;

const fn spec(section: &'static str, key: &'static str, kind: Kind) -> KeySpec {
    KeySpec { section, key, kind }
}

const fn int(min: i64, max: i64) -> Kind {
    Kind::Int { min, max }
}

/// Every key; a unit test keeps it in step with the structs in `sections.rs`.
pub(crate) const SCHEMA: &[KeySpec] = &[
    spec("server", "host", Kind::Host),
    spec("server", "port", int(1, 65535)),
    spec("server", "api_keys", Kind::StrList),
    spec("server", "api_key_file", Kind::Path),
    spec("server", "body_limit", Kind::Size { min: 1024 }),
    spec("server", "request_timeout", Kind::Duration { min_ms: 1 }),
    spec(
        "server",
        "shutdown_grace_period",
        Kind::Duration { min_ms: 0 },
    ),
    spec(
        "server",
        "engine_stall_timeout",
        Kind::Duration { min_ms: 0 },
    ),
    spec(
        "server",
        "prefix_cache_isolation",
        Kind::Choice(&["per_key", "shared"]),
    ),
    spec("server", "allow_special_tokens_in_prompt", Kind::Bool),
    spec("server", "trust_request_chat_template", Kind::Bool),
    spec("server", "allow_request_priority", Kind::Bool),
    spec("server", "admin_api_keys", Kind::StrList),
    spec("server", "allow_runtime_lora_updating", Kind::Bool),
    spec("server", "metrics_api_key", Kind::Str),
    spec("server", "worker_threads", int(1, 1024)),
    spec("server", "rate_limit_per_key", Kind::PositiveNumber),
    spec("server", "rate_limit_burst", int(1, u32::MAX as i64)),
    spec("server", "max_concurrent_adapter_loads", int(1, 1024)),
    spec("model", "path", Kind::Path),
    spec("model", "served_model_name", Kind::Str),
    spec("model", "max_model_len", int(2, u32::MAX as i64)),
    spec("model", "device", Kind::Device),
    spec("model", "gpu_memory_utilization", Kind::Fraction),
    spec("model", "num_gpu_blocks_override", int(2, u32::MAX as i64)),
    spec("model", "cuda_graphs", Kind::Bool),
    spec("model", "cuda_graph_max_batch", int(1, 65536)),
    spec("model", "programmatic_launch", Kind::Bool),
    spec(
        "model",
        "generation_config",
        Kind::Choice(&["auto", "ignore"]),
    ),
    spec("model", "gemm", Kind::Choice(&["tuned", "library", "gemv"])),
    spec(
        "model",
        "attention_kernel",
        Kind::Choice(&["cuda_cores", "tensor_cores"]),
    ),
    spec(
        "model",
        "dtype",
        Kind::Choice(&["auto", "f32", "f16", "bf16"]),
    ),
    spec("scheduler", "max_num_seqs", int(1, 65536)),
    spec("scheduler", "max_num_batched_tokens", int(1, USIZE_MAX)),
    spec("scheduler", "max_step_ms", int(10, 60_000)),
    spec("scheduler", "block_size", int(1, 256)),
    spec("scheduler", "kv_cache_blocks", int(2, u32::MAX as i64)),
    spec("scheduler", "kv_cache_bytes", Kind::Size { min: 1 }),
    spec("scheduler", "enable_prefix_caching", Kind::Bool),
    spec("scheduler", "max_queued_requests", int(1, USIZE_MAX)),
    spec("scheduler", "fairness", Kind::Choice(&["vtc", "fcfs"])),
    spec("scheduler", "backlog_prefill_percent", int(1, 100)),
    spec("logging", "level", Kind::LogFilter),
    spec("logging", "json", Kind::Bool),
    spec("logging", "log_prompts", Kind::Bool),
    spec("adapters", "dir", Kind::Path),
    spec("adapters", "max_loras", int(1, 1024)),
    spec("adapters", "max_cpu_loras", int(1, USIZE_MAX)),
    spec("adapters", "max_cpu_lora_bytes", Kind::Size { min: 1 }),
    spec("adapters", "max_lora_rank", int(1, 512)),
    spec("adapters", "loader_step_share_percent", int(1, 100)),
    spec("adapters", "loader_threads", int(1, 64)),
    spec(
        "adapters",
        "dtype",
        Kind::Choice(&["auto", "f16", "f32", "q8"]),
    ),
    spec(
        "structured_outputs",
        "max_grammar_bytes",
        Kind::Size { min: 1 },
    ),
    spec(
        "structured_outputs",
        "compile_timeout",
        Kind::Duration { min_ms: 1 },
    ),
    spec(
        "structured_outputs",
        "max_grammar_symbols",
        int(1, USIZE_MAX),
    ),
    spec(
        "structured_outputs",
        "grammar_cache_entries",
        int(1, 1 << 20),
    ),
    spec("kv_events", "enabled", Kind::Bool),
    spec("kv_events", "endpoint", Kind::TcpEndpoint),
    spec("kv_events", "replay_endpoint", Kind::TcpEndpoint),
    spec("kv_events", "topic", Kind::Str),
];

/// The sections, in file order.
pub(crate) const SECTIONS: [&str; 7] = [
    "server",
    "model",
    "scheduler",
    "logging",
    "adapters",
    "structured_outputs",
    "kv_events",
];

/// The spec of `section.key`, if there is one.
pub(crate) fn find(section: &str, key: &str) -> Option<&'static KeySpec> {
    SCHEMA.iter().find(|s| s.section == section && s.key == key)
}

impl Kind {
    /// The accepted form, for error messages.
    pub(crate) fn expected(self) -> String {
        match self {
            Kind::Bool => "true or false".into(),
            Kind::Int { min, max } if max == USIZE_MAX => format!("an integer >= {min}"),
            Kind::Int { min, max } => format!("an integer in {min}..={max}"),
            Kind::PositiveNumber => "a number above zero (e.g. 5 or 0.5)".into(),
            Kind::Str => "a non-empty string".into(),
            Kind::Host => "an IP address or host name (e.g. \"127.0.0.1\", \"0.0.0.0\")".into(),
            Kind::Path => "a file path string".into(),
            Kind::Size { min } => format!("{SIZE_FORM}, at least {}", ByteSize(min)),
            Kind::Duration { min_ms: 0 } => DURATION_FORM.into(),
            Kind::Duration { .. } => format!("{DURATION_FORM}, above zero"),
            Kind::StrList => "an array of strings".into(),
            Kind::Choice(words) => format!("one of {}", quoted_list(words)),
            Kind::LogFilter => {
                "a tracing filter such as \"info\" or \"caduceus_runtime=debug,info\"".into()
            }
            Kind::TcpEndpoint => {
                "a ZeroMQ endpoint \"tcp://HOST:PORT\" (e.g. \"tcp://*:5557\")".into()
            }
            Kind::Device => "one of \"auto\", \"cpu\", \"cuda\", \"cuda:N\" (N a GPU index)".into(),
            Kind::Fraction => "a number greater than 0 and at most 1 (e.g. 0.9)".into(),
        }
    }

    /// Whether `value` has this form.
    pub(crate) fn accepts(self, value: &Value) -> bool {
        match (self, value) {
            (Kind::Bool, Value::Boolean(_)) => true,
            (Kind::Int { min, max }, Value::Integer(n)) => (min..=max).contains(n),
            (Kind::PositiveNumber, Value::Integer(n)) => *n > 0,
            (Kind::PositiveNumber, Value::Float(x)) => x.is_finite() && *x > 0.0,
            (Kind::Str, Value::String(s)) => !s.trim().is_empty(),
            (Kind::Host, Value::String(s)) => is_host(s),
            (Kind::Path, Value::String(s)) => !s.is_empty(),
            (Kind::Size { min }, Value::Integer(n)) => u64::try_from(*n).is_ok_and(|n| n >= min),
            (Kind::Size { min }, Value::String(s)) => {
                ByteSize::parse(s).is_some_and(|b| b.0 >= min)
            }
            (Kind::Duration { min_ms }, Value::String(s)) => {
                HumanDuration::parse(s).is_some_and(|d| d.get().as_millis() >= u128::from(min_ms))
            }
            (Kind::StrList, Value::Array(items)) => items.iter().all(Value::is_str),
            (Kind::Choice(words), Value::String(s)) => words.contains(&s.as_str()),
            (Kind::LogFilter, Value::String(s)) => {
                tracing_subscriber::EnvFilter::try_new(s).is_ok()
            }
            (Kind::TcpEndpoint, Value::String(s)) => is_tcp_endpoint(s),
            (Kind::Device, Value::String(s)) => s.parse::<super::sections::Device>().is_ok(),
            (Kind::Fraction, Value::Float(x)) => *x > 0.0 && *x <= 1.0,
            (Kind::Fraction, Value::Integer(1)) => true,
            _ => false,
        }
    }

    /// Reads an environment variable's text as this kind's TOML value. Text that does not fit
    /// stays a string, so [`Kind::accepts`] reports it with the value the SRE wrote.
    pub(crate) fn parse_env(self, text: &str) -> Value {
        let trimmed = text.trim();
        match self {
            Kind::Bool => match trimmed {
                "true" | "1" => Value::Boolean(true),
                "false" | "0" => Value::Boolean(false),
                _ => Value::String(text.into()),
            },
            Kind::Int { .. } | Kind::Size { .. } => trimmed
                .parse::<i64>()
                .map_or_else(|_| Value::String(text.into()), Value::Integer),
            Kind::Fraction => trimmed
                .parse::<f64>()
                .map_or_else(|_| Value::String(text.into()), Value::Float),
            Kind::PositiveNumber => match (trimmed.parse::<i64>(), trimmed.parse::<f64>()) {
                (Ok(n), _) => Value::Integer(n),
                (_, Ok(x)) => Value::Float(x),
                _ => Value::String(text.into()),
            },
            Kind::StrList => Value::Array(
                text.split(',')
                    .map(str::trim)
                    .filter(|s| !s.is_empty())
                    .map(|s| Value::String(s.into()))
                    .collect(),
            ),
            _ => Value::String(text.into()),
        }
    }
}

fn quoted_list(words: &[&str]) -> String {
    let quoted: Vec<String> = words.iter().map(|w| format!("\"{w}\"")).collect();
    quoted.join(", ")
}

fn is_tcp_endpoint(s: &str) -> bool {
    let Some((host, port)) = s.strip_prefix("tcp://").and_then(|a| a.rsplit_once(':')) else {
        return false;
    };
    let host = host.trim_start_matches('[').trim_end_matches(']');
    (host == "*" || is_host(host)) && port.parse::<u16>().is_ok()
}

fn is_host(s: &str) -> bool {
    if s.parse::<std::net::IpAddr>().is_ok() {
        return true;
    }
    !s.is_empty()
        && s.len() <= 253
        && s.split('.').all(|label| {
            !label.is_empty()
                && label.len() <= 63
                && !label.starts_with('-')
                && label.chars().all(|c| c.is_ascii_alphanumeric() || c == '-')
        })
}

/// The valid key closest to `section.key`: the same key in another section, or a dotted key at
/// small edit distance (typos like `prot` for `port`).
pub(crate) fn suggest(section: &str, key: Option<&str>) -> Option<String> {
    let Some(key) = key else {
        return closest(section, SECTIONS.iter().copied()).map(str::to_owned);
    };
    if let Some(s) = SCHEMA.iter().find(|s| s.key == key) {
        return Some(format!("{}.{}", s.section, s.key));
    }
    let wanted = format!("{section}.{key}");
    let all: Vec<String> = SCHEMA
        .iter()
        .map(|s| format!("{}.{}", s.section, s.key))
        .collect();
    closest(&wanted, all.iter().map(String::as_str)).map(str::to_owned)
}

fn closest<'a>(wanted: &str, candidates: impl Iterator<Item = &'a str>) -> Option<&'a str> {
    let limit = (wanted.len() / 3).max(2);
    candidates
        .map(|c| (edit_distance(wanted, c), c))
        .filter(|(d, _)| *d <= limit)
        .min_by_key(|(d, _)| *d)
        .map(|(_, c)| c)
}

/// Levenshtein distance over chars.
fn edit_distance(a: &str, b: &str) -> usize {
    let b: Vec<char> = b.chars().collect();
    let mut prev: Vec<usize> = (0..=b.len()).collect();
    for (i, ca) in a.chars().enumerate() {
        let mut cur = vec![i + 1; b.len() + 1];
        for (j, cb) in b.iter().enumerate() {
            let substitute = prev[j] + usize::from(ca != *cb);
            cur[j + 1] = substitute.min(prev[j + 1] + 1).min(cur[j] + 1);
        }
        prev = cur;
    }
    prev[b.len()]
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeSet;

    use super::*;
    use crate::config::secrets::ApiKey;
    use crate::config::units::ByteSize;
    use crate::config::CaduceusConfig;

    /// A config with every optional key set serializes to exactly the keys the schema lists.
    #[test]
    fn schema_matches_the_structs() {
        let mut cfg = CaduceusConfig::default();
        cfg.server.api_keys = vec![ApiKey::new("k")];
        cfg.server.api_key_file = Some("keys.txt".into());
        cfg.server.metrics_api_key = Some(ApiKey::new("m"));
        cfg.server.rate_limit_per_key = Some(2.5);
        cfg.server.rate_limit_burst = Some(5);
        cfg.model.served_model_name = Some("m".into());
        cfg.model.max_model_len = Some(4096);
        cfg.model.num_gpu_blocks_override = Some(64);
        cfg.model.cuda_graph_max_batch = Some(32);
        cfg.scheduler.kv_cache_blocks = Some(64);
        cfg.scheduler.max_num_batched_tokens = Some(512);
        cfg.scheduler.kv_cache_bytes = Some(ByteSize(1));
        cfg.adapters.dir = Some("adapters".into());
        cfg.adapters.loader_threads = Some(2);
        cfg.kv_events.replay_endpoint = Some("tcp://*:5558".into());
        cfg.kv_events.topic = Some("kv@pod@model".into());
        let table = toml::Table::try_from(&cfg).unwrap();
        let mut from_structs = BTreeSet::new();
        for (section, keys) in &table {
            for key in keys.as_table().unwrap().keys() {
                from_structs.insert(format!("{section}.{key}"));
            }
        }
        let from_schema: BTreeSet<String> = SCHEMA
            .iter()
            .map(|s| format!("{}.{}", s.section, s.key))
            .collect();
        assert_eq!(from_structs, from_schema);
        let sections: BTreeSet<&str> = table.keys().map(String::as_str).collect();
        assert_eq!(sections, SECTIONS.into_iter().collect());
    }

    #[test]
    fn devices_and_fractions() {
        use super::super::sections::Device;
        for (text, want) in [
            ("auto", Some(Device::Auto)),
            ("cpu", Some(Device::Cpu)),
            ("cuda", Some(Device::Cuda(0))),
            ("cuda:3", Some(Device::Cuda(3))),
            ("cuda:", None),
            ("cuda:-1", None),
            ("gpu", None),
        ] {
            assert_eq!(text.parse::<Device>().ok(), want, "{text}");
            let v = Value::String(text.into());
            assert_eq!(Kind::Device.accepts(&v), want.is_some(), "{text}");
            if let Some(d) = want {
                assert_eq!(
                    String::from(d).parse::<Device>(),
                    Ok(d),
                    "round trip {text}"
                );
            }
        }
        for (v, ok) in [
            (Value::Float(0.9), true),
            (Value::Float(1.0), true),
            (Value::Integer(1), true),
            (Value::Float(0.0), false),
            (Value::Float(1.01), false),
            (Value::Float(f64::NAN), false),
            (Value::String("0.9".into()), false),
        ] {
            assert_eq!(Kind::Fraction.accepts(&v), ok, "{v:?}");
        }
        assert_eq!(Kind::Fraction.parse_env(" 0.5 "), Value::Float(0.5));
    }

    #[test]
    fn edit_distance_matches_hand_counts() {
        assert_eq!(edit_distance("kitten", "sitting"), 3);
        assert_eq!(edit_distance("", "abc"), 3);
        assert_eq!(edit_distance("port", "port"), 0);
        assert_eq!(edit_distance("prot", "port"), 2);
    }

    #[test]
    fn suggestions() {
        assert_eq!(
            suggest("server", Some("prot")).as_deref(),
            Some("server.port")
        );
        assert_eq!(
            suggest("server", Some("max_num_seqs")).as_deref(),
            Some("scheduler.max_num_seqs")
        );
        assert_eq!(suggest("sever", None).as_deref(), Some("server"));
        assert_eq!(suggest("server", Some("completely_unrelated")), None);
    }

    #[test]
    fn env_text_becomes_typed_values() {
        assert_eq!(int(1, 9).parse_env("7"), Value::Integer(7));
        assert_eq!(Kind::Bool.parse_env("false"), Value::Boolean(false));
        assert_eq!(
            Kind::Size { min: 1 }.parse_env("4096"),
            Value::Integer(4096)
        );
        assert_eq!(
            Kind::StrList.parse_env("a, b,"),
            Value::Array(vec![Value::String("a".into()), Value::String("b".into())])
        );
        assert!(!int(1, 9).accepts(&int(1, 9).parse_env("seven")));
        let rate = Kind::PositiveNumber;
        assert_eq!(rate.parse_env("5"), Value::Integer(5));
        assert_eq!(rate.parse_env("0.5"), Value::Float(0.5));
        assert!(rate.accepts(&rate.parse_env("0.5")));
        for bad in ["0", "-1", "0.0", "inf", "NaN", "fast"] {
            assert!(!rate.accepts(&rate.parse_env(bad)), "{bad}");
        }
    }

    #[test]
    fn hosts() {
        for ok in ["127.0.0.1", "0.0.0.0", "::", "localhost", "api.example.com"] {
            assert!(is_host(ok), "{ok}");
        }
        for bad in ["", "has space", "-bad.com", "a..b"] {
            assert!(!is_host(bad), "{bad}");
        }
        for ok in [
            "tcp://*:5557",
            "tcp://0.0.0.0:0",
            "tcp://[::1]:5557",
            "tcp://pod:1",
        ] {
            assert!(is_tcp_endpoint(ok), "{ok}");
        }
        for bad in [
            "*:5557",
            "tcp://*",
            "tcp://*:port",
            "ipc:///tmp/x",
            "tcp://*:70000",
        ] {
            assert!(!is_tcp_endpoint(bad), "{bad}");
        }
    }
}
