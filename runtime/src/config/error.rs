//! Why a configuration was refused, always naming the key, the value, the expected form and the
//! layer (file, environment variable or flag) the value came from, so an SRE can fix it without
//! reading code.

use std::fmt;
use std::path::PathBuf;

/// Where a configuration value came from.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Origin {
    /// The built-in default.
    Default,
    /// A TOML file.
    File(PathBuf),
    /// An environment variable, by name.
    Env(String),
    /// A command-line flag, e.g. `--port`.
    Flag(String),
}

impl fmt::Display for Origin {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Origin::Default => f.write_str("the built-in default"),
            Origin::File(path) => write!(f, "config file {}", path.display()),
            Origin::Env(name) => write!(f, "environment variable {name}"),
            Origin::Flag(flag) => write!(f, "command-line flag {flag}"),
        }
    }
}

/// A configuration that cannot be used; the server refuses to start with it.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// The config file could not be read.
    #[error("cannot read config file {}: {message}", path.display())]
    Read { path: PathBuf, message: String },
    /// The config file is not TOML.
    #[error("config file {} is not valid TOML: {message}", path.display())]
    Syntax { path: PathBuf, message: String },
    /// A key (or section) that no setting has.
    #[error("unknown config key `{key}` in {origin}{}", did_you_mean(suggestion))]
    UnknownKey {
        key: String,
        origin: Origin,
        suggestion: Option<String>,
    },
    /// A value of the wrong type or outside the accepted range.
    #[error("invalid value for `{key}` in {origin}: got {value}, expected {expected}")]
    InvalidValue {
        key: String,
        value: String,
        expected: String,
        origin: Origin,
    },
    /// The API key file could not be read or holds no usable key.
    #[error("cannot use server.api_key_file {}: {message}", path.display())]
    KeyFile { path: PathBuf, message: String },
    /// The merged tree did not deserialize although every value passed its check (a bug).
    #[error("configuration does not fit its schema: {message}")]
    Schema { message: String },
    /// Two settings that exclude each other were both given.
    #[error("`{key}` ({origin}) and `{other}` ({other_origin}) cannot both be set: {reason}")]
    Conflict {
        key: &'static str,
        origin: Origin,
        other: &'static str,
        other_origin: Origin,
        reason: &'static str,
    },
}

fn did_you_mean(suggestion: &Option<String>) -> String {
    match suggestion {
        Some(s) => format!("; did you mean `{s}`?"),
        None => String::new(),
    }
}

impl ConfigError {
    /// The dotted key the error is about, if it is about one.
    pub fn key(&self) -> Option<&str> {
        match self {
            ConfigError::UnknownKey { key, .. } | ConfigError::InvalidValue { key, .. } => {
                Some(key)
            }
            ConfigError::Conflict { key, .. } => Some(key),
            ConfigError::KeyFile { .. } => Some("server.api_key_file"),
            ConfigError::Read { .. } | ConfigError::Syntax { .. } | ConfigError::Schema { .. } => {
                None
            }
        }
    }
}
