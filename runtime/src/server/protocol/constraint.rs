//! The one output constraint a request asks for, from whichever field asked: OpenAI's
//! `response_format`, vLLM's `structured_outputs`, or vLLM's older top-level `guided_json`,
//! `guided_regex`, `guided_choice` and `guided_grammar` (dropped by vLLM in 0.12, where they are
//! ignored without an error; clients written for earlier versions still send them, and here
//! they constrain as they did there).

use serde_json::Value;

use super::structured::{ResponseFormat, StructuredOutputs};
use super::validate::{invalid, ValidationError};
use crate::structured::ConstraintSpec;

/// The constraint fields of a chat or completion request, as sent (both declare the same ones).
pub(super) struct ConstraintFields {
    pub response_format: Option<ResponseFormat>,
    pub structured_outputs: Option<StructuredOutputs>,
    pub guided_json: Option<Value>,
    pub guided_regex: Option<String>,
    pub guided_choice: Option<Vec<String>>,
    pub guided_grammar: Option<String>,
}

/// The [`ConstraintFields`] of a chat or completion request.
macro_rules! constraint_fields {
    ($req:ident) => {
        ConstraintFields {
            response_format: $req.response_format,
            structured_outputs: $req.structured_outputs,
            guided_json: $req.guided_json,
            guided_regex: $req.guided_regex,
            guided_choice: $req.guided_choice,
            guided_grammar: $req.guided_grammar,
        }
    };
}
pub(super) use constraint_fields;

/// The output constraint the request asks for, with the field that asked (for a 400 about
/// it); more than one is a 400 naming the later field.
pub(super) fn output_constraint(
    f: ConstraintFields,
) -> Result<Option<(ConstraintSpec, &'static str)>, ValidationError> {
    let mut asked: Vec<(ConstraintSpec, &'static str)> = Vec::new();
    match f.response_format {
        None | Some(ResponseFormat::Text) => {}
        Some(ResponseFormat::JsonObject) => {
            asked.push((ConstraintSpec::JsonObject, "response_format"))
        }
        Some(ResponseFormat::JsonSchema { json_schema }) => {
            let schema = json_schema.schema.unwrap_or(Value::Bool(true));
            asked.push((ConstraintSpec::JsonSchema(schema), "response_format"));
        }
    }
    if let Some(spec) = f
        .structured_outputs
        .map(structured_spec)
        .transpose()?
        .flatten()
    {
        asked.push((spec, "structured_outputs"));
    }
    if let Some(json) = f.guided_json {
        asked.push((schema_spec(json, "guided_json")?, "guided_json"));
    }
    if let Some(rx) = f.guided_regex {
        asked.push((ConstraintSpec::Regex(rx), "guided_regex"));
    }
    if let Some(choice) = f.guided_choice {
        asked.push((ConstraintSpec::Choice(choice), "guided_choice"));
    }
    if let Some(g) = f.guided_grammar {
        asked.push((ConstraintSpec::Lark(g), "guided_grammar"));
    }
    if let [(_, first), (_, second), ..] = asked[..] {
        return Err(invalid(
            second,
            format!("cannot be combined with `{first}`; send one output constraint"),
        ));
    }
    Ok(asked.pop())
}

/// A JSON schema sent as an object or as its text.
fn schema_spec(json: Value, field: &str) -> Result<ConstraintSpec, ValidationError> {
    Ok(ConstraintSpec::JsonSchema(match json {
        Value::String(text) => {
            serde_json::from_str(&text).map_err(|e| invalid(field, format!("is not JSON: {e}")))?
        }
        other => other,
    }))
}

fn structured_spec(s: StructuredOutputs) -> Result<Option<ConstraintSpec>, ValidationError> {
    if s.disable_additional_properties == Some(true) {
        return Err(invalid(
            "structured_outputs.disable_additional_properties",
            "is not supported; set `\"additionalProperties\": false` in the schema's objects",
        ));
    }
    if s.whitespace_pattern.is_some() {
        return Err(invalid(
            "structured_outputs.whitespace_pattern",
            "is not supported: JSON is always written without free whitespace",
        ));
    }
    if s.structural_tag.is_some() {
        return Err(invalid(
            "structured_outputs.structural_tag",
            "is not supported; use `grammar`",
        ));
    }
    let mut specs = Vec::new();
    if let Some(json) = s.json {
        specs.push(schema_spec(json, "structured_outputs.json")?);
    }
    if let Some(rx) = s.regex {
        specs.push(ConstraintSpec::Regex(rx));
    }
    if let Some(choice) = s.choice {
        specs.push(ConstraintSpec::Choice(choice));
    }
    if let Some(g) = s.grammar {
        specs.push(ConstraintSpec::Lark(g));
    }
    if s.json_object == Some(true) {
        specs.push(ConstraintSpec::JsonObject);
    }
    if specs.len() > 1 {
        return Err(invalid(
            "structured_outputs",
            "must set exactly one of `json`, `regex`, `choice`, `grammar`, `json_object`",
        ));
    }
    Ok(specs.pop())
}
