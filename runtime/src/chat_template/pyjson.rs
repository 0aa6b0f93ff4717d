//! HF's `tojson` filter: Python's `json.dumps` output, which differs from minijinja's built-in
//! (that one escapes `<>&'` for HTML and omits the spaces after `,` and `:`). Tool schemas are
//! rendered into prompts with it, so byte-exact Python output keeps prompts identical to HF's.

use minijinja::value::{Kwargs, Value};
use minijinja::{Error, ErrorKind};

/// HF's `tojson`: Python's `json.dumps(value, ensure_ascii=False, indent=indent, sort_keys=...)`.
pub(super) fn tojson(value: Value, kwargs: Kwargs) -> Result<Value, Error> {
    let indent: Option<usize> = kwargs.get("indent")?;
    let ensure_ascii: Option<bool> = kwargs.get("ensure_ascii")?;
    let sort_keys: Option<bool> = kwargs.get("sort_keys")?;
    kwargs.assert_all_used()?;
    let json_err = |e: serde_json::Error| Error::new(ErrorKind::BadSerialization, e.to_string());
    let text = if sort_keys.unwrap_or(false) {
        let sorted = sort_json_keys(serde_json::to_value(&value).map_err(json_err)?);
        python_json(&sorted, indent).map_err(json_err)?
    } else {
        python_json(&value, indent).map_err(json_err)?
    };
    let text = if ensure_ascii.unwrap_or(false) {
        escape_non_ascii(&text)
    } else {
        text
    };
    Ok(Value::from_safe_string(text))
}

/// `json.dumps` layout: `", "` and `": "` separators, or `indent` spaces per level.
fn python_json<T: serde::Serialize + ?Sized>(
    value: &T,
    indent: Option<usize>,
) -> Result<String, serde_json::Error> {
    let mut out = Vec::new();
    match indent {
        Some(n) => {
            let pad = vec![b' '; n];
            let fmt = serde_json::ser::PrettyFormatter::with_indent(&pad);
            value.serialize(&mut serde_json::Serializer::with_formatter(&mut out, fmt))?;
        }
        None => {
            value.serialize(&mut serde_json::Serializer::with_formatter(
                &mut out,
                PythonCompact,
            ))?;
        }
    }
    // serde_json only writes valid UTF-8.
    Ok(String::from_utf8_lossy(&out).into_owned())
}

/// serde_json formatter with Python's default separators.
struct PythonCompact;

impl serde_json::ser::Formatter for PythonCompact {
    fn begin_array_value<W: ?Sized + std::io::Write>(
        &mut self,
        writer: &mut W,
        first: bool,
    ) -> std::io::Result<()> {
        if first {
            Ok(())
        } else {
            writer.write_all(b", ")
        }
    }

    fn begin_object_key<W: ?Sized + std::io::Write>(
        &mut self,
        writer: &mut W,
        first: bool,
    ) -> std::io::Result<()> {
        if first {
            Ok(())
        } else {
            writer.write_all(b", ")
        }
    }

    fn begin_object_value<W: ?Sized + std::io::Write>(
        &mut self,
        writer: &mut W,
    ) -> std::io::Result<()> {
        writer.write_all(b": ")
    }
}

fn sort_json_keys(v: serde_json::Value) -> serde_json::Value {
    match v {
        serde_json::Value::Object(map) => {
            let mut entries: Vec<_> = map.into_iter().collect();
            entries.sort_by(|a, b| a.0.cmp(&b.0));
            serde_json::Value::Object(
                entries
                    .into_iter()
                    .map(|(k, v)| (k, sort_json_keys(v)))
                    .collect(),
            )
        }
        serde_json::Value::Array(items) => {
            serde_json::Value::Array(items.into_iter().map(sort_json_keys).collect())
        }
        other => other,
    }
}

/// `\uXXXX` escapes (UTF-16, as Python writes them) for every non-ASCII character.
fn escape_non_ascii(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    for c in text.chars() {
        if c.is_ascii() {
            out.push(c);
        } else {
            let mut units = [0u16; 2];
            for unit in c.encode_utf16(&mut units) {
                out.push_str(&format!("\\u{unit:04x}"));
            }
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tojson_matches_python_json_dumps() {
        let v = Value::from_serialize(serde_json::json!({"b": [1, 2.5, "x<y>'&é"], "a": null}));
        let compact = tojson(
            v.clone(),
            Kwargs::from_iter(std::iter::empty::<(&str, Value)>()),
        );
        // Python: json.dumps({...}, ensure_ascii=False) with keys in insertion order.
        let keys_first_b = r#"{"b": [1, 2.5, "x<y>'&é"], "a": null}"#;
        let keys_first_a = r#"{"a": null, "b": [1, 2.5, "x<y>'&é"]}"#;
        let compact = compact.unwrap().to_string();
        assert!(
            compact == keys_first_b || compact == keys_first_a,
            "{compact}"
        );
        let sorted = tojson(
            v.clone(),
            Kwargs::from_iter([("sort_keys", Value::from(true))]),
        );
        assert_eq!(sorted.unwrap().to_string(), keys_first_a);
        let indented = tojson(v.clone(), Kwargs::from_iter([("indent", Value::from(2))]));
        assert!(indented
            .unwrap()
            .to_string()
            .contains("\n  \"b\": [\n    1,\n"));
        let ascii = tojson(
            Value::from("é😀"),
            Kwargs::from_iter([("ensure_ascii", Value::from(true))]),
        );
        assert_eq!(ascii.unwrap().to_string(), r#""\u00e9\ud83d\ude00""#);
    }
}
