//! Request fields of the OpenAI (and vLLM) API that Caduceus does not implement. A client that
//! sends one expects it to act (a JSON schema enforced, a tool called, a bias applied); ignoring
//! it would answer 200 with something else, so such a request gets a 400 naming the field.

use std::collections::BTreeMap;

use serde::de::{Deserializer, IgnoredAny, MapAccess, SeqAccess, Visitor};
use serde::Deserialize;

use super::error::ApiError;

/// The one list of fields refused until implemented: remove a name when its feature lands.
pub const UNSUPPORTED_FIELDS: &[&str] = &[
    "functions",
    "function_call",
    // vLLM's older JSON whitespace option (its `guided_*` constraints are implemented).
    "guided_whitespace_pattern",
    "best_of",
    "suffix",
    "prediction",
    "audio",
    "modalities",
    "web_search_options",
    // vLLM's extensions that change the answer.
    "use_beam_search",
];

/// Fields whose default is `true`, refused only when sent as something else (`false`): the
/// server always spaces special tokens as the tokenizer does.
pub const UNSUPPORTED_UNLESS_TRUE: &[&str] = &["spaces_between_special_tokens"];

/// Whether a field's value asks for anything: `null`, `false`, `""`, `[]` and `{}` do not (SDKs
/// send some of these as explicit defaults). `true` and `false` are told apart for the fields
/// whose default is `true`.
#[derive(Clone, Copy, PartialEq)]
enum Presence {
    Off,
    On,
    True,
    False,
}

impl<'de> Deserialize<'de> for Presence {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        d.deserialize_any(PresenceVisitor)
    }
}

struct PresenceVisitor;

impl<'de> Visitor<'de> for PresenceVisitor {
    type Value = Presence;

    fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
        f.write_str("any JSON value")
    }
    fn visit_unit<E>(self) -> Result<Presence, E> {
        Ok(Presence::Off)
    }
    fn visit_none<E>(self) -> Result<Presence, E> {
        Ok(Presence::Off)
    }
    fn visit_bool<E>(self, v: bool) -> Result<Presence, E> {
        Ok(if v { Presence::True } else { Presence::False })
    }
    fn visit_i64<E>(self, _: i64) -> Result<Presence, E> {
        Ok(Presence::On)
    }
    fn visit_u64<E>(self, _: u64) -> Result<Presence, E> {
        Ok(Presence::On)
    }
    fn visit_f64<E>(self, _: f64) -> Result<Presence, E> {
        Ok(Presence::On)
    }
    fn visit_str<E>(self, v: &str) -> Result<Presence, E> {
        Ok(if v.is_empty() {
            Presence::Off
        } else {
            Presence::On
        })
    }
    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Presence, A::Error> {
        let mut any = false;
        while seq.next_element::<IgnoredAny>()?.is_some() {
            any = true;
        }
        Ok(if any { Presence::On } else { Presence::Off })
    }
    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Presence, A::Error> {
        let mut any = false;
        while map.next_entry::<IgnoredAny, IgnoredAny>()?.is_some() {
            any = true;
        }
        Ok(if any { Presence::On } else { Presence::Off })
    }
}

/// The field a JSON object body asks for that the server does not implement, if any (the
/// first in [`UNSUPPORTED_FIELDS`] order). Bodies that are not JSON objects pass: the typed
/// parse reports them.
pub fn unsupported_field(body: &[u8]) -> Option<&'static str> {
    // Only the top-level keys are kept; every value is skipped without being stored.
    let fields: BTreeMap<String, Presence> = serde_json::from_slice(body).ok()?;
    let asks = |name: &str| matches!(fields.get(name), Some(Presence::On | Presence::True));
    let refused_unless_true = |name: &str| {
        fields
            .get(name)
            .is_some_and(|p| !matches!(p, Presence::Off | Presence::True))
    };
    UNSUPPORTED_FIELDS
        .iter()
        .find(|name| asks(name))
        .or_else(|| {
            UNSUPPORTED_UNLESS_TRUE
                .iter()
                .find(|name| refused_unless_true(name))
        })
        .copied()
}

/// The 400 for [`unsupported_field`].
pub fn unsupported_error(field: &str) -> ApiError {
    ApiError::invalid_request(
        format!("`{field}` is not supported by this server; remove it from the request"),
        Some(field),
    )
}

#[cfg(test)]
mod tests {
    use super::unsupported_field;

    #[test]
    fn only_fields_that_ask_for_something_are_refused() {
        let cases = [
            (r#"{"functions": [{"name": "f"}]}"#, Some("functions")),
            (r#"{"best_of": 3}"#, Some("best_of")),
            // Implemented: structured outputs, tools, logit_bias.
            (
                r#"{"response_format": {"type": "json_object"}, "tools": [{}]}"#,
                None,
            ),
            (r#"{"logit_bias": {"50256": -100}}"#, None),
            // Explicit empty values ask for nothing.
            (
                r#"{"functions": [], "best_of": null, "echo": false, "suffix": null}"#,
                None,
            ),
            (r#"{"model": "m", "prompt": "hi"}"#, None),
            (r#"{"use_beam_search": true}"#, Some("use_beam_search")),
            // Implemented vLLM options.
            (
                r#"{"allowed_token_ids": [1, 2], "include_stop_str_in_output": true}"#,
                None,
            ),
            (r#"{"skip_special_tokens": false}"#, None),
            // Default-true fields pass as true (and absent, or null) and are refused otherwise.
            (r#"{"spaces_between_special_tokens": null}"#, None),
            (r#"{"spaces_between_special_tokens": true}"#, None),
            (
                r#"{"spaces_between_special_tokens": 0}"#,
                Some("spaces_between_special_tokens"),
            ),
            ("[1, 2]", None),
            ("not json", None),
        ];
        for (body, refused) in cases {
            assert_eq!(unsupported_field(body.as_bytes()), refused, "{body}");
        }
    }
}
