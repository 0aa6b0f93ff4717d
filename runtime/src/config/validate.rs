//! Checks that involve more than one key or the file system, run after the layers are merged.
//! Single-value ranges live in the schema; these are the rules a per-key check cannot see.

use super::error::ConfigError;
use super::load::Origins;
use super::secrets::{key_problem, read_key_file, ApiKey};
use super::sections::{CaduceusConfig, ServerSection};

/// Validates a merged config; `origins` says which layer set each key.
pub(crate) fn validate(cfg: &CaduceusConfig, origins: &Origins) -> Result<(), ConfigError> {
    let invalid = |key: &str, value: String, expected: String| ConfigError::InvalidValue {
        key: key.into(),
        value,
        expected,
        origin: origins.of(key),
    };
    let sched = &cfg.scheduler;
    // Powers of two keep block boundaries aligned with the kernels' tiles, as vLLM's choices do.
    if !sched.block_size.is_power_of_two() {
        return Err(invalid(
            "scheduler.block_size",
            sched.block_size.to_string(),
            "a power of two in 1..=256 (16 is the usual choice)".into(),
        ));
    }
    if sched.kv_cache_blocks.is_some() && sched.kv_cache_bytes.is_some() {
        return Err(ConfigError::Conflict {
            key: "scheduler.kv_cache_blocks",
            origin: origins.of("scheduler.kv_cache_blocks"),
            other: "scheduler.kv_cache_bytes",
            other_origin: origins.of("scheduler.kv_cache_bytes"),
            reason: "size the KV cache pool in blocks or in bytes, not both",
        });
    }
    // Every running sequence needs one token of the step budget to decode.
    let budget = sched.max_num_batched_tokens;
    if let Some(budget) = budget.filter(|&b| b < sched.max_num_seqs) {
        return Err(invalid(
            "scheduler.max_num_batched_tokens",
            budget.to_string(),
            format!(
                "at least scheduler.max_num_seqs ({}) so every running sequence can decode each step",
                sched.max_num_seqs
            ),
        ));
    }
    for key in &cfg.server.api_keys {
        if let Some(expected) = key_problem(key.expose()) {
            return Err(invalid("server.api_keys", key.masked(), expected.into()));
        }
    }
    for key in &cfg.server.admin_api_keys {
        if let Some(expected) = key_problem(key.expose()) {
            return Err(invalid(
                "server.admin_api_keys",
                key.masked(),
                expected.into(),
            ));
        }
    }
    if let Some(key) = &cfg.server.metrics_api_key {
        if let Some(expected) = key_problem(key.expose()) {
            return Err(invalid(
                "server.metrics_api_key",
                key.masked(),
                expected.into(),
            ));
        }
    }
    let server = &cfg.server;
    if server.allow_runtime_lora_updating
        && server.admin_api_keys.is_empty()
        && !server.is_loopback()
    {
        return Err(invalid(
            "server.allow_runtime_lora_updating",
            "true".into(),
            format!(
                "false while server.host ({}) is not a loopback address: anyone who reaches the \
                 port could load adapters; set server.admin_api_keys instead",
                server.host
            ),
        ));
    }
    if let Some(path) = &cfg.server.api_key_file {
        if let Err(message) = read_key_file(path) {
            return Err(invalid(
                "server.api_key_file",
                format!("\"{}\"", path.display()),
                format!("a readable file with one API key per line ({message})"),
            ));
        }
    }
    if let (Some(burst), None) = (server.rate_limit_burst, server.rate_limit_per_key) {
        return Err(invalid(
            "server.rate_limit_burst",
            burst.to_string(),
            "no value unless server.rate_limit_per_key is set (the burst is above that rate)"
                .into(),
        ));
    }
    let adapters = &cfg.adapters;
    if adapters.max_cpu_loras < adapters.max_loras {
        return Err(invalid(
            "adapters.max_cpu_loras",
            adapters.max_cpu_loras.to_string(),
            format!(
                "at least adapters.max_loras ({}): adapters in a batch must be loaded in host memory",
                adapters.max_loras
            ),
        ));
    }
    if let Some(dir) = &adapters.dir {
        if !dir.is_dir() {
            return Err(invalid(
                "adapters.dir",
                format!("\"{}\"", dir.display()),
                "an existing directory".into(),
            ));
        }
    }
    Ok(())
}

impl ServerSection {
    /// Every accepted key: `api_keys` plus those in `api_key_file` (read now, so a rotated file
    /// is picked up on the next call). Empty means authentication is off.
    pub fn resolve_api_keys(&self) -> Result<Vec<ApiKey>, ConfigError> {
        let mut keys = self.api_keys.clone();
        if let Some(path) = &self.api_key_file {
            let from_file = read_key_file(path).map_err(|message| ConfigError::KeyFile {
                path: path.clone(),
                message,
            })?;
            keys.extend(from_file);
        }
        Ok(keys)
    }
}

impl CaduceusConfig {
    /// The effective configuration as TOML, API keys masked: what `caduceus config print` shows.
    pub fn to_toml_masked(&self) -> Result<String, ConfigError> {
        toml::to_string(self).map_err(|e| ConfigError::Schema {
            message: e.to_string(),
        })
    }
}
