//! Layering: defaults < TOML file < `CADUCEUS_<SECTION>__<KEY>` environment variables < flags.
//!
//! Each layer's values are checked against the schema as they are merged, recording where every
//! key came from; the merged tree is then deserialized and cross-checked, so any error names the
//! layer that must change.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use toml::{Table, Value};

use super::error::{ConfigError, Origin};
use super::schema::{self, KeySpec, SECTIONS};
use super::sections::CaduceusConfig;
use super::validate;

/// Prefix of configuration environment variables.
pub const ENV_PREFIX: &str = "CADUCEUS_";

/// The command-line layer: the flags `caduceus serve` and `caduceus config print` share.
#[derive(Clone, Debug, Default, clap::Args)]
pub struct ConfigOverrides {
    /// TOML config file (see deploy/config/caduceus.toml); without it, defaults and env apply.
    #[arg(long, value_name = "FILE")]
    pub config: Option<PathBuf>,
    /// GGUF file or Hugging Face model directory (`model.path`).
    #[arg(long, value_name = "PATH")]
    pub model: Option<PathBuf>,
    /// Name clients use in `model` (`model.served_model_name`).
    #[arg(long, value_name = "NAME")]
    pub served_model_name: Option<String>,
    /// Listen address (`server.host`).
    #[arg(long)]
    pub host: Option<String>,
    /// Listen port (`server.port`).
    #[arg(long)]
    pub port: Option<u16>,
    /// Prompt + output token limit (`model.max_model_len`).
    #[arg(long, value_name = "TOKENS")]
    pub max_model_len: Option<usize>,
    /// Adapter directory (`adapters.dir`): one sub-folder per PEFT adapter.
    #[arg(long, value_name = "DIR")]
    pub adapter_dir: Option<PathBuf>,
    /// Distinct adapters per batch, i.e. adapter slots (`adapters.max_loras`).
    #[arg(long, value_name = "N")]
    pub max_loras: Option<usize>,
    /// `logging.level`, when the caller has its own flag for it (the CLI's global `--log-level`).
    #[arg(skip)]
    pub log_level: Option<String>,
}

/// Where each dotted key's value came from; keys absent here are defaults.
#[derive(Clone, Debug, Default)]
pub(crate) struct Origins(BTreeMap<String, Origin>);

impl Origins {
    pub(crate) fn of(&self, key: &str) -> Origin {
        self.0.get(key).cloned().unwrap_or(Origin::Default)
    }
}

impl CaduceusConfig {
    /// Merges defaults, the `overrides.config` file, the `CADUCEUS_*` variables of `env` and the
    /// flags in `overrides`, then validates. `env` is explicit so tests need not touch the
    /// process environment; variables without the prefix are ignored.
    pub fn load<I>(overrides: &ConfigOverrides, env: I) -> Result<CaduceusConfig, ConfigError>
    where
        I: IntoIterator<Item = (String, String)>,
    {
        let mut layers = Layers::default();
        if let Some(path) = &overrides.config {
            layers.apply_file(path)?;
        }
        layers.apply_env(env)?;
        layers.apply_flags(overrides)?;
        let config: CaduceusConfig =
            Value::Table(layers.table)
                .try_into()
                .map_err(|e: toml::de::Error| ConfigError::Schema {
                    message: e.to_string(),
                })?;
        validate::validate(&config, &layers.origins)?;
        Ok(config)
    }

    /// [`CaduceusConfig::load`] with this process's environment.
    pub fn load_from_process_env(
        overrides: &ConfigOverrides,
    ) -> Result<CaduceusConfig, ConfigError> {
        let env = std::env::vars_os()
            .filter(|(k, _)| k.to_string_lossy().starts_with(ENV_PREFIX))
            .map(|(k, v)| {
                (
                    k.to_string_lossy().into_owned(),
                    v.to_string_lossy().into_owned(),
                )
            });
        CaduceusConfig::load(overrides, env)
    }
}

/// The environment variable that sets `section.key`.
pub fn env_var_name(section: &str, key: &str) -> String {
    format!(
        "{ENV_PREFIX}{}__{}",
        section.to_ascii_uppercase(),
        key.to_ascii_uppercase()
    )
}

#[derive(Default)]
struct Layers {
    table: Table,
    origins: Origins,
}

impl Layers {
    fn apply_file(&mut self, path: &Path) -> Result<(), ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|e| ConfigError::Read {
            path: path.to_path_buf(),
            message: e.to_string(),
        })?;
        let table: Table = text
            .parse()
            .map_err(|e: toml::de::Error| ConfigError::Syntax {
                path: path.to_path_buf(),
                message: e.to_string(),
            })?;
        let origin = Origin::File(path.to_path_buf());
        for (section, body) in table {
            if !SECTIONS.contains(&section.as_str()) {
                return Err(ConfigError::UnknownKey {
                    suggestion: schema::suggest(&section, None),
                    key: section,
                    origin,
                });
            }
            let Value::Table(body) = body else {
                return Err(ConfigError::InvalidValue {
                    value: body.to_string(),
                    expected: format!("a table (a `[{section}]` header)"),
                    key: section,
                    origin,
                });
            };
            for (key, value) in body {
                let spec = self.spec(&section, &key, &origin, |k| k.to_owned())?;
                self.set(spec, value, origin.clone())?;
            }
        }
        Ok(())
    }

    fn apply_env<I>(&mut self, env: I) -> Result<(), ConfigError>
    where
        I: IntoIterator<Item = (String, String)>,
    {
        // Sorted so that, with several bad variables, the same one is reported every time.
        let vars: BTreeMap<String, String> = env
            .into_iter()
            .filter(|(name, _)| name.starts_with(ENV_PREFIX))
            .collect();
        for (name, text) in vars {
            let origin = Origin::Env(name.clone());
            let rest = name[ENV_PREFIX.len()..].to_ascii_lowercase();
            let (section, key) = rest.split_once("__").unwrap_or(("", rest.as_str()));
            let spec = self.spec(section, key, &origin, |dotted| {
                match dotted.split_once('.') {
                    Some((s, k)) => env_var_name(s, k),
                    None => format!("{ENV_PREFIX}{}__<KEY>", dotted.to_ascii_uppercase()),
                }
            })?;
            let value = spec.kind.parse_env(&text);
            self.set(spec, value, origin)?;
        }
        Ok(())
    }

    fn apply_flags(&mut self, o: &ConfigOverrides) -> Result<(), ConfigError> {
        let path_str = |p: &PathBuf| Value::String(p.to_string_lossy().into_owned());
        let flags: [(&str, &str, &str, Option<Value>); 8] = [
            ("model", "path", "--model", o.model.as_ref().map(path_str)),
            (
                "model",
                "served_model_name",
                "--served-model-name",
                o.served_model_name.clone().map(Value::String),
            ),
            (
                "server",
                "host",
                "--host",
                o.host.clone().map(Value::String),
            ),
            (
                "server",
                "port",
                "--port",
                o.port.map(|p| Value::Integer(p.into())),
            ),
            (
                "model",
                "max_model_len",
                "--max-model-len",
                o.max_model_len.map(int_value),
            ),
            (
                "adapters",
                "dir",
                "--adapter-dir",
                o.adapter_dir.as_ref().map(path_str),
            ),
            (
                "adapters",
                "max_loras",
                "--max-loras",
                o.max_loras.map(int_value),
            ),
            (
                "logging",
                "level",
                "--log-level",
                o.log_level.clone().map(Value::String),
            ),
        ];
        for (section, key, flag, value) in flags {
            let Some(value) = value else { continue };
            let origin = Origin::Flag(flag.into());
            let spec = self.spec(section, key, &origin, |k| k.to_owned())?;
            self.set(spec, value, origin)?;
        }
        Ok(())
    }

    /// The spec of `section.key`, or an unknown-key error whose suggestion `name` renders in the
    /// layer's own spelling (a dotted key, or an environment variable name).
    fn spec(
        &self,
        section: &str,
        key: &str,
        origin: &Origin,
        name: impl Fn(&str) -> String,
    ) -> Result<&'static KeySpec, ConfigError> {
        schema::find(section, key).ok_or_else(|| {
            let unknown_section = !section.is_empty() && !SECTIONS.contains(&section);
            let suggestion = schema::suggest(section, Some(key))
                .or_else(|| {
                    unknown_section
                        .then(|| schema::suggest(section, None))
                        .flatten()
                })
                .map(|s| name(&s));
            ConfigError::UnknownKey {
                key: if section.is_empty() {
                    key.to_owned()
                } else {
                    format!("{section}.{key}")
                },
                origin: origin.clone(),
                suggestion,
            }
        })
    }

    fn set(&mut self, spec: &KeySpec, value: Value, origin: Origin) -> Result<(), ConfigError> {
        let dotted = format!("{}.{}", spec.section, spec.key);
        if !spec.kind.accepts(&value) {
            return Err(ConfigError::InvalidValue {
                value: render(spec, &value),
                expected: spec.kind.expected(),
                key: dotted,
                origin,
            });
        }
        let section = self
            .table
            .entry(spec.section)
            .or_insert_with(|| Value::Table(Table::new()));
        if let Value::Table(section) = section {
            section.insert(spec.key.to_owned(), value);
        }
        self.origins.0.insert(dotted, origin);
        Ok(())
    }
}

fn int_value(n: usize) -> Value {
    Value::Integer(i64::try_from(n).unwrap_or(i64::MAX))
}

/// The value as written, except that API keys are never echoed.
fn render(spec: &KeySpec, value: &Value) -> String {
    if matches!(spec.key, "api_keys" | "admin_api_keys" | "metrics_api_key") {
        return format!("(redacted {} value)", spec.key);
    }
    value.to_string()
}
