//! API keys: a newtype that never prints in full, and the key file reader.
//!
//! Configs get logged, printed by `caduceus config print` and pasted into tickets, so a key
//! shows as `sk-...abcd` in `Debug` and when serialized; only [`ApiKey::expose`] gives it out.

use std::fmt;
use std::path::Path;

use serde::{Deserialize, Serialize, Serializer};

/// One accepted bearer token.
#[derive(Clone, PartialEq, Eq, Deserialize)]
#[serde(transparent)]
pub struct ApiKey(String);

impl ApiKey {
    /// Wraps a key.
    pub fn new(key: impl Into<String>) -> ApiKey {
        ApiKey(key.into())
    }

    /// The full key, for comparing against a request's `Authorization` header.
    pub fn expose(&self) -> &str {
        &self.0
    }

    /// `sk-...abcd` for keys of 12+ characters (enough left hidden), `***` for shorter ones.
    pub fn masked(&self) -> String {
        let chars: Vec<char> = self.0.chars().collect();
        if chars.len() < 12 {
            return "***".into();
        }
        let head: String = chars[..3].iter().collect();
        let tail: String = chars[chars.len() - 4..].iter().collect();
        format!("{head}...{tail}")
    }
}

impl fmt::Debug for ApiKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "ApiKey({})", self.masked())
    }
}

impl Serialize for ApiKey {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.serialize_str(&self.masked())
    }
}

/// Why a key is unusable, or `None` if it is fine. Whitespace inside a key is almost always a
/// copy-paste accident, and an empty key would match an empty bearer token.
pub(crate) fn key_problem(key: &str) -> Option<&'static str> {
    if key.is_empty() {
        Some("a non-empty key")
    } else if key.chars().any(char::is_whitespace) {
        Some("a key without whitespace")
    } else {
        None
    }
}

/// Reads one key per line; blank lines and lines starting with `#` are skipped.
pub(crate) fn read_key_file(path: &Path) -> Result<Vec<ApiKey>, String> {
    let text = std::fs::read_to_string(path).map_err(|e| e.to_string())?;
    let mut keys = Vec::new();
    for (i, line) in text.lines().enumerate() {
        let line = line.trim();
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        if let Some(expected) = key_problem(line) {
            return Err(format!("line {}: expected {expected}", i + 1));
        }
        keys.push(ApiKey::new(line));
    }
    if keys.is_empty() {
        return Err("the file holds no keys".into());
    }
    Ok(keys)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_never_print_in_full() {
        let key = ApiKey::new("sk-0123456789abcd");
        assert_eq!(key.masked(), "sk-...abcd");
        assert_eq!(format!("{key:?}"), "ApiKey(sk-...abcd)");
        assert_eq!(serde_json::to_string(&key).unwrap(), "\"sk-...abcd\"");
        assert_eq!(ApiKey::new("short").masked(), "***");
        assert_eq!(key.expose(), "sk-0123456789abcd");
    }

    #[test]
    fn key_problems() {
        assert_eq!(key_problem("sk-1"), None);
        assert!(key_problem("").is_some());
        assert!(key_problem("sk 1").is_some());
    }
}
