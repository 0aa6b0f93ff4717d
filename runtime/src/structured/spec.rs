//! What a request constrains its output to, independent of the API field that asked for it.

use llguidance::api::TopLevelGrammar;
use serde_json::Value;

use super::StructuredError;

/// A constraint on a request's output text.
#[derive(Clone, Debug, PartialEq)]
pub enum ConstraintSpec {
    /// Any JSON object (`response_format: {"type": "json_object"}`).
    JsonObject,
    /// A value valid under this JSON schema.
    JsonSchema(Value),
    /// A full match of this regular expression.
    Regex(String),
    /// Exactly one of these strings.
    Choice(Vec<String>),
    /// A Lark grammar (llguidance's dialect, which accepts vLLM's / Outlines' Lark).
    Lark(String),
}

/// How JSON is laid out: compact, no free whitespace. A small model given free whitespace can
/// emit newlines until `max_tokens` and leave the JSON unfinished.
const JSON_LAYOUT: &str =
    r#"{"whitespace_flexible": false, "item_separator": ", ", "key_separator": ": "}"#;

impl ConstraintSpec {
    /// What the constraint is, for error messages.
    pub fn what(&self) -> &'static str {
        match self {
            ConstraintSpec::JsonObject | ConstraintSpec::JsonSchema(_) => "the JSON schema",
            ConstraintSpec::Regex(_) => "the regex",
            ConstraintSpec::Choice(_) => "the choice list",
            ConstraintSpec::Lark(_) => "the Lark grammar",
        }
    }

    /// The text compiled grammars are cached by: a kind tag, `\0`, and the grammar text
    /// (see [`text_len`]).
    pub fn cache_key(&self) -> String {
        match self {
            ConstraintSpec::JsonObject => "json_object".to_owned(),
            ConstraintSpec::JsonSchema(v) => format!("json_schema\0{v}"),
            ConstraintSpec::Regex(r) => format!("regex\0{r}"),
            ConstraintSpec::Choice(c) => format!("choice\0{}", Value::from(c.clone())),
            ConstraintSpec::Lark(g) => format!("lark\0{g}"),
        }
    }

    /// The llguidance grammar for this constraint.
    pub(super) fn to_grammar(&self) -> Result<TopLevelGrammar, StructuredError> {
        let invalid = |message: String| StructuredError::Invalid {
            what: self.what(),
            message,
        };
        Ok(match self {
            ConstraintSpec::JsonObject => json_grammar(serde_json::json!({"type": "object"}))?,
            ConstraintSpec::JsonSchema(schema) => match schema {
                Value::Object(_) | Value::Bool(true) => json_grammar(schema.clone())?,
                _ => return Err(invalid("a schema must be a JSON object".into())),
            },
            ConstraintSpec::Regex(rx) => TopLevelGrammar::from_regex(rx),
            ConstraintSpec::Choice(choices) => {
                if choices.is_empty() {
                    return Err(invalid("it must name at least one choice".into()));
                }
                let alternatives: Vec<String> = choices.iter().map(|c| regex::escape(c)).collect();
                TopLevelGrammar::from_regex(&format!("(?:{})", alternatives.join("|")))
            }
            ConstraintSpec::Lark(g) => TopLevelGrammar::from_lark(g.clone()),
        })
    }
}

/// A JSON-schema grammar with our layout.
fn json_grammar(schema: Value) -> Result<TopLevelGrammar, StructuredError> {
    let schema = match schema {
        Value::Bool(true) => serde_json::json!({}),
        other => other,
    };
    Ok(TopLevelGrammar::from_json_schema(with_json_layout(schema)))
}

/// `schema` with our JSON layout (compact, no free whitespace) as its `x-guidance` options,
/// replacing its own; also for schemas embedded in Lark grammars with `%json`.
pub fn with_json_layout(mut schema: Value) -> Value {
    if let (Some(obj), Ok(layout)) = (
        schema.as_object_mut(),
        serde_json::from_str::<Value>(JSON_LAYOUT),
    ) {
        obj.insert("x-guidance".to_owned(), layout);
    }
    schema
}

/// Bytes of the grammar text in a [`ConstraintSpec::cache_key`]: what the request sent, without
/// the kind tag.
pub(super) fn text_len(key: &str) -> usize {
    key.split_once('\0')
        .map_or(key.len(), |(_, text)| text.len())
}
