//! Structured outputs and tools on the wire: OpenAI's `response_format`, `tools`,
//! `tool_choice`, `parallel_tool_calls` and vLLM's `structured_outputs`; the tools are checked
//! into a [`ToolPlan`] here, the output constraints in `constraint`.

use serde::{Deserialize, Serialize};
use serde_json::Value;
use utoipa::ToSchema;

use super::validate::{invalid, ValidationError};

/// `response_format`.
#[derive(Clone, Debug, PartialEq, Deserialize, ToSchema)]
#[serde(
    tag = "type",
    rename_all = "snake_case",
    expecting = "`response_format.type` must be \"text\", \"json_object\" or \"json_schema\""
)]
pub enum ResponseFormat {
    /// Free text (the default).
    Text,
    /// Any JSON object.
    JsonObject,
    /// JSON valid under `json_schema.schema`.
    JsonSchema { json_schema: JsonSchemaFormat },
}

/// `response_format.json_schema`.
#[derive(Clone, Debug, PartialEq, Deserialize, ToSchema)]
pub struct JsonSchemaFormat {
    pub name: String,
    #[serde(default)]
    pub description: Option<String>,
    #[serde(default)]
    #[schema(value_type = Option<Object>)]
    pub schema: Option<Value>,
    /// Accepted; the schema is always enforced exactly.
    #[serde(default)]
    pub strict: Option<bool>,
}

/// vLLM's `structured_outputs`: exactly one of its constraints. A key the server does not know
/// is a 400 (a misspelt constraint would otherwise leave the answer unconstrained).
#[derive(Clone, Debug, Default, PartialEq, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct StructuredOutputs {
    /// A JSON schema (an object, or its text).
    #[serde(default)]
    #[schema(value_type = Option<Object>)]
    pub json: Option<Value>,
    #[serde(default)]
    pub regex: Option<String>,
    #[serde(default)]
    pub choice: Option<Vec<String>>,
    /// A Lark grammar.
    #[serde(default)]
    pub grammar: Option<String>,
    #[serde(default)]
    pub json_object: Option<bool>,
    /// Accepted: the grammar engine has no fallback to disable.
    #[serde(default)]
    pub disable_fallback: Option<bool>,
    /// Accepted: JSON is always laid out without free whitespace.
    #[serde(default)]
    pub disable_any_whitespace: Option<bool>,
    /// `true` is a 400 (set `"additionalProperties": false` in the schema instead).
    #[serde(default)]
    pub disable_additional_properties: Option<bool>,
    /// A 400 when set: JSON's whitespace is fixed.
    #[serde(default)]
    pub whitespace_pattern: Option<String>,
    /// A 400 when set: structural tags are not implemented.
    #[serde(default)]
    #[schema(value_type = Option<Object>)]
    pub structural_tag: Option<Value>,
}

/// One entry of `tools`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct ToolParam {
    /// Only `"function"`.
    #[serde(rename = "type")]
    pub kind: String,
    pub function: FunctionDef,
}

/// A callable function: its name and JSON-schema parameters.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct FunctionDef {
    pub name: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub description: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schema(value_type = Option<Object>)]
    pub parameters: Option<Value>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub strict: Option<bool>,
}

/// `tool_choice`: `"none"`, `"auto"`, `"required"` or `{"type": "function", "function":
/// {"name": ...}}`.
#[derive(Clone, Debug, PartialEq, Deserialize, ToSchema)]
#[serde(
    untagged,
    expecting = "`tool_choice` must be \"none\", \"auto\", \"required\" or {\"type\": \"function\", \"function\": {\"name\": ...}}"
)]
pub enum ToolChoiceParam {
    Mode(String),
    Named(NamedToolChoice),
}

/// A named `tool_choice`.
#[derive(Clone, Debug, PartialEq, Deserialize, ToSchema)]
pub struct NamedToolChoice {
    #[serde(rename = "type")]
    pub kind: String,
    pub function: NamedFunction,
}

/// The function a named `tool_choice` forces.
#[derive(Clone, Debug, PartialEq, Deserialize, ToSchema)]
pub struct NamedFunction {
    pub name: String,
}

/// One tool call in an answer (or in an assistant message sent back).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct ToolCall {
    /// `call_...`.
    pub id: String,
    /// Always `"function"`.
    #[serde(rename = "type")]
    pub kind: String,
    pub function: FunctionCall,
}

/// The function called and its arguments (a JSON object, as a string).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct FunctionCall {
    pub name: String,
    pub arguments: String,
}

/// A streamed piece of a tool call: the first one of each call carries `id`, `type` and the
/// name, the next ones argument fragments.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct ToolCallDelta {
    pub index: u32,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub id: Option<String>,
    #[serde(rename = "type", default, skip_serializing_if = "Option::is_none")]
    pub kind: Option<String>,
    pub function: FunctionCallDelta,
}

/// The name (first piece) or an arguments fragment.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct FunctionCallDelta {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub arguments: Option<String>,
}

/// How the model must use its tools.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ToolMode {
    /// Text or tool calls, the model's choice.
    Auto,
    /// At least one tool call.
    Required,
    /// A call of this function.
    Named(String),
}

/// Checked `tools` + `tool_choice` + `parallel_tool_calls` (absent when no tool may be called).
#[derive(Clone, Debug, PartialEq)]
pub struct ToolPlan {
    pub tools: Vec<FunctionDef>,
    pub mode: ToolMode,
    /// More than one call per answer.
    pub parallel: bool,
}

/// Most tools in one request.
pub const MAX_TOOLS: usize = 64;

/// Checks `tools`, `tool_choice` and `parallel_tool_calls`.
pub fn tool_plan(
    tools: Option<Vec<ToolParam>>,
    choice: Option<ToolChoiceParam>,
    parallel: Option<bool>,
) -> Result<Option<ToolPlan>, ValidationError> {
    let tools = tools.unwrap_or_default();
    if tools.len() > MAX_TOOLS {
        return Err(invalid("tools", format!("takes at most {MAX_TOOLS} tools")));
    }
    let mut defs: Vec<FunctionDef> = Vec::with_capacity(tools.len());
    for (i, t) in tools.into_iter().enumerate() {
        if t.kind != "function" {
            return Err(invalid(&format!("tools[{i}].type"), "must be \"function\""));
        }
        let name = &t.function.name;
        let ok_name = !name.is_empty()
            && name.len() <= 64
            && name
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '-');
        if !ok_name {
            return Err(invalid(
                &format!("tools[{i}].function.name"),
                "must be 1 to 64 letters, digits, underscores or dashes",
            ));
        }
        if defs.iter().any(|d| &d.name == name) {
            return Err(invalid(
                &format!("tools[{i}].function.name"),
                format!("repeats the name `{name}`"),
            ));
        }
        if let Some(p) = &t.function.parameters {
            if !p.is_object() {
                return Err(invalid(
                    &format!("tools[{i}].function.parameters"),
                    "must be a JSON schema object",
                ));
            }
        }
        defs.push(t.function);
    }
    let mode = match choice {
        None => (!defs.is_empty()).then_some(ToolMode::Auto),
        Some(ToolChoiceParam::Mode(m)) => match m.as_str() {
            "none" => None,
            "auto" => Some(ToolMode::Auto),
            "required" => Some(ToolMode::Required),
            _ => {
                return Err(invalid(
                    "tool_choice",
                    "must be \"none\", \"auto\", \"required\" or a named function",
                ))
            }
        },
        Some(ToolChoiceParam::Named(n)) => {
            if n.kind != "function" {
                return Err(invalid("tool_choice.type", "must be \"function\""));
            }
            if !defs.iter().any(|d| d.name == n.function.name) {
                return Err(invalid(
                    "tool_choice.function.name",
                    format!("names `{}`, which is not in `tools`", n.function.name),
                ));
            }
            Some(ToolMode::Named(n.function.name))
        }
    };
    let Some(mode) = mode else {
        return Ok(None);
    };
    if defs.is_empty() {
        return Err(invalid("tool_choice", "requires `tools`"));
    }
    Ok(Some(ToolPlan {
        tools: defs,
        mode,
        parallel: parallel.unwrap_or(true),
    }))
}

/// Opens the tool calls of an answer: `<tool_call>[{"name": ..., "arguments": {...}}, ...]`
/// then [`TOOL_CALL_CLOSE`] (see docs/structured-outputs.md for why this format).
pub const TOOL_CALL_OPEN: &str = "<tool_call>";
/// Closes the tool calls of an answer.
pub const TOOL_CALL_CLOSE: &str = "</tool_call>";

/// Calls as the model writes them, for an assistant message sent back in a conversation.
pub fn tool_calls_text(calls: &[ToolCall]) -> String {
    let items: Vec<Value> = calls
        .iter()
        .map(|c| {
            let args = serde_json::from_str::<Value>(&c.function.arguments)
                .unwrap_or_else(|_| Value::String(c.function.arguments.clone()));
            serde_json::json!({"name": c.function.name, "arguments": args})
        })
        .collect();
    let body = serde_json::to_string(&items).unwrap_or_default();
    format!("{TOOL_CALL_OPEN}{body}{TOOL_CALL_CLOSE}")
}
