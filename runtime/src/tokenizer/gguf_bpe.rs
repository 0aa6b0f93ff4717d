//! Building a byte-level BPE tokenizer from GGUF metadata (`tokenizer.ggml.model = "gpt2"`).
//!
//! GGUF stores the vocabulary, merges and token types but not the pre-tokenizer itself, only its
//! name (`tokenizer.ggml.pre`). We map that name to the same splitting rules llama.cpp uses and
//! describe the whole thing as a `tokenizer.json` document, so the `tokenizers` crate (the Hugging
//! Face implementation) does the actual work and ids match the original model's tokenizer.

use serde_json::{json, Map, Value};

use super::TokenizerError;
use crate::model::gguf::GgufFile;

/// GGUF token types (llama.cpp's `llama_token_type`).
const TOKEN_TYPE_CONTROL: i32 = 3;
const TOKEN_TYPE_USER_DEFINED: i32 = 4;

/// GPT-2-style split used by Llama 3 (`llama-bpe`): digits in groups of up to three.
const LLAMA3_SPLIT: &str = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";
/// Qwen2's split: as Llama 3 but every digit on its own.
const QWEN2_SPLIT: &str = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";

/// Pre-tokenizer names (`tokenizer.ggml.pre`) this module understands.
pub const SUPPORTED_PRE_TOKENIZERS: &[&str] = &[
    "default",
    "gpt-2",
    "smollm",
    "starcoder",
    "refact",
    "codeshell",
    "llama-bpe",
    "llama3",
    "qwen2",
];

/// What a GGUF file says about its tokenizer, filled from the `tokenizer.ggml.*` metadata keys.
#[derive(Clone, Debug, Default)]
pub struct GgufTokenizerSpec {
    /// `tokenizer.ggml.model`, e.g. "gpt2" (byte-level BPE) or "llama" (SentencePiece).
    pub model: String,
    /// `tokenizer.ggml.pre`: the pre-tokenizer's name; `None` means GPT-2's.
    pub pre: Option<String>,
    /// Token strings; a token's id is its index.
    pub tokens: Vec<String>,
    /// llama.cpp token types (1 normal, 3 control, 4 user-defined, ...), parallel to `tokens`.
    pub token_types: Vec<i32>,
    /// Merge rules, highest priority first, each `"left right"`.
    pub merges: Vec<String>,
    pub bos_id: Option<u32>,
    pub eos_id: Option<u32>,
    pub add_bos: bool,
    pub add_eos: bool,
}

impl GgufTokenizerSpec {
    /// Reads the `tokenizer.ggml.*` keys. Missing optional keys get llama.cpp's defaults
    /// (no BOS/EOS, `add_bos_token` false); a missing model or token list is an error.
    pub fn from_gguf(file: &GgufFile) -> Result<Self, TokenizerError> {
        let missing = |key: &str| {
            TokenizerError::BadSpec(format!(
                "{}: metadata key {key} is missing or has the wrong type",
                file.path().display()
            ))
        };
        let model = file
            .get_str("tokenizer.ggml.model")
            .ok_or_else(|| missing("tokenizer.ggml.model"))?
            .to_owned();
        let tokens: Vec<String> = file
            .get_str_array("tokenizer.ggml.tokens")
            .ok_or_else(|| missing("tokenizer.ggml.tokens"))?
            .into_iter()
            .map(str::to_owned)
            .collect();
        let token_types = match file.get("tokenizer.ggml.token_type") {
            None => Vec::new(),
            Some(_) => file
                .get_i64_array("tokenizer.ggml.token_type")
                .ok_or_else(|| missing("tokenizer.ggml.token_type"))?
                .into_iter()
                .map(|t| i32::try_from(t).unwrap_or(0))
                .collect(),
        };
        let merges = match file.get("tokenizer.ggml.merges") {
            None => Vec::new(),
            Some(_) => file
                .get_str_array("tokenizer.ggml.merges")
                .ok_or_else(|| missing("tokenizer.ggml.merges"))?
                .into_iter()
                .map(str::to_owned)
                .collect(),
        };
        let id = |key: &str| file.get_u64(key).and_then(|v| u32::try_from(v).ok());
        Ok(GgufTokenizerSpec {
            model,
            pre: file.get_str("tokenizer.ggml.pre").map(str::to_owned),
            tokens,
            token_types,
            merges,
            bos_id: id("tokenizer.ggml.bos_token_id"),
            eos_id: id("tokenizer.ggml.eos_token_id"),
            add_bos: file
                .get_bool("tokenizer.ggml.add_bos_token")
                .unwrap_or(false),
            add_eos: file
                .get_bool("tokenizer.ggml.add_eos_token")
                .unwrap_or(false),
        })
    }
}

/// The `tokenizers` pipeline equivalent to `spec`.
pub(crate) fn build_hf_tokenizer(
    spec: &GgufTokenizerSpec,
) -> Result<tokenizers::Tokenizer, TokenizerError> {
    let document = tokenizer_json(spec)?;
    serde_json::from_value(document).map_err(|e| {
        TokenizerError::BadSpec(format!(
            "cannot build the BPE tokenizer from GGUF metadata: {e}"
        ))
    })
}

/// A `tokenizer.json` document (as a JSON value) describing the GGUF tokenizer.
pub(crate) fn tokenizer_json(spec: &GgufTokenizerSpec) -> Result<Value, TokenizerError> {
    if spec.model != "gpt2" {
        return Err(TokenizerError::UnsupportedModel(spec.model.clone()));
    }
    if spec.tokens.is_empty() {
        return Err(TokenizerError::BadSpec(
            "tokenizer.ggml.tokens is empty".into(),
        ));
    }
    if !spec.token_types.is_empty() && spec.token_types.len() != spec.tokens.len() {
        return Err(TokenizerError::BadSpec(format!(
            "{} token types for {} tokens",
            spec.token_types.len(),
            spec.tokens.len()
        )));
    }
    for (what, id) in [("BOS", spec.bos_id), ("EOS", spec.eos_id)] {
        if let Some(id) = id.filter(|&id| id as usize >= spec.tokens.len()) {
            return Err(TokenizerError::BadSpec(format!(
                "{what} id {id} is outside the vocabulary of {} tokens",
                spec.tokens.len()
            )));
        }
    }
    let (pre_tokenizer, ignore_merges) = pre_tokenizer(spec.pre.as_deref())?;

    let mut vocab = Map::with_capacity(spec.tokens.len());
    for (id, token) in spec.tokens.iter().enumerate() {
        if vocab.contains_key(token) {
            tracing::warn!(
                id,
                token,
                "duplicate GGUF token string; the first id keeps it"
            );
            continue;
        }
        vocab.insert(token.clone(), json!(id));
    }
    let merges = spec
        .merges
        .iter()
        .map(|m| match m.split_once(' ') {
            Some((a, b)) => Ok(json!([a, b])),
            None => Err(TokenizerError::BadSpec(format!(
                "merge {m:?} is not two tokens separated by a space"
            ))),
        })
        .collect::<Result<Vec<_>, _>>()?;
    let added_tokens: Vec<Value> = spec
        .token_types
        .iter()
        .enumerate()
        .filter(|(_, &ty)| ty == TOKEN_TYPE_CONTROL || ty == TOKEN_TYPE_USER_DEFINED)
        .map(|(id, &ty)| {
            json!({
                "id": id,
                "content": spec.tokens[id],
                "single_word": false,
                "lstrip": false,
                "rstrip": false,
                "normalized": false,
                "special": ty == TOKEN_TYPE_CONTROL,
            })
        })
        .collect();

    Ok(json!({
        "version": "1.0",
        "truncation": null,
        "padding": null,
        "added_tokens": added_tokens,
        "normalizer": null,
        "pre_tokenizer": pre_tokenizer,
        "post_processor": null,
        "decoder": byte_level(true),
        "model": {
            "type": "BPE",
            "dropout": null,
            "unk_token": null,
            "continuing_subword_prefix": null,
            "end_of_word_suffix": null,
            "fuse_unk": false,
            "byte_fallback": false,
            "ignore_merges": ignore_merges,
            "vocab": vocab,
            "merges": merges,
        },
    }))
}

/// The pre-tokenizer for a `tokenizer.ggml.pre` name, and whether BPE should skip merging words
/// already in the vocabulary (llama.cpp does so for Llama 3, as does its HF tokenizer).
fn pre_tokenizer(name: Option<&str>) -> Result<(Value, bool), TokenizerError> {
    let name = name.unwrap_or("default");
    let split = |pattern: &str| {
        json!({
            "type": "Split",
            "pattern": { "Regex": pattern },
            "behavior": "Isolated",
            "invert": false,
        })
    };
    let sequence = |items: Vec<Value>| json!({ "type": "Sequence", "pretokenizers": items });
    Ok(match name {
        "default" | "gpt-2" => (byte_level(true), false),
        "smollm" | "starcoder" | "refact" | "codeshell" => (
            sequence(vec![
                json!({ "type": "Digits", "individual_digits": true }),
                byte_level(true),
            ]),
            false,
        ),
        "llama-bpe" | "llama3" => (sequence(vec![split(LLAMA3_SPLIT), byte_level(false)]), true),
        "qwen2" => (sequence(vec![split(QWEN2_SPLIT), byte_level(false)]), false),
        other => {
            return Err(TokenizerError::UnsupportedPreTokenizer {
                name: other.to_owned(),
                supported: SUPPORTED_PRE_TOKENIZERS.join(", "),
            })
        }
    })
}

/// GPT-2 byte-to-unicode mapping, optionally with GPT-2's own word-splitting regex.
fn byte_level(use_regex: bool) -> Value {
    json!({
        "type": "ByteLevel",
        "add_prefix_space": false,
        "trim_offsets": true,
        "use_regex": use_regex,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::tokenizer::Tokenizer;

    /// A byte-level vocabulary: the 256 byte symbols, a few merges and two control tokens.
    fn tiny_spec(pre: &str) -> GgufTokenizerSpec {
        let bytes: Vec<String> = (0u8..=255).map(|b| byte_symbol(b).to_string()).collect();
        let mut tokens = vec!["<|start|>".to_string(), "<|end|>".to_string()];
        tokens.extend(bytes);
        tokens.extend(["Ġ1", "12", "he", "hel", "hell", "hello"].map(String::from));
        let mut token_types = vec![TOKEN_TYPE_CONTROL; 2];
        token_types.resize(tokens.len(), 1);
        GgufTokenizerSpec {
            model: "gpt2".into(),
            pre: Some(pre.into()),
            tokens,
            token_types,
            merges: ["Ġ 1", "1 2", "h e", "he l", "hel l", "hell o"]
                .map(String::from)
                .to_vec(),
            bos_id: Some(0),
            eos_id: Some(1),
            add_bos: false,
            add_eos: false,
        }
    }

    /// GPT-2's printable stand-in for a byte (the table byte-level BPE vocabularies are written in).
    fn byte_symbol(b: u8) -> char {
        let printable = (b'!'..=b'~').contains(&b) || (0xA1..=0xAC).contains(&b) || b >= 0xAE;
        if printable {
            return char::from(b);
        }
        let rank = (0u8..b)
            .filter(|&x| !((b'!'..=b'~').contains(&x) || (0xA1..=0xAC).contains(&x) || x >= 0xAE))
            .count() as u32;
        char::from_u32(256 + rank).unwrap()
    }

    #[test]
    fn digits_split_individually_for_smollm_but_not_gpt2() {
        let smol = Tokenizer::from_gguf_spec(&tiny_spec("smollm")).unwrap();
        let gpt2 = Tokenizer::from_gguf_spec(&tiny_spec("gpt-2")).unwrap();
        let id = |t: &Tokenizer, s: &str| t.token_to_id(s).unwrap();
        // smollm: " 12" -> " ", "1", "2" (digits isolated before BPE).
        assert_eq!(
            smol.encode(" 12").unwrap(),
            vec![id(&smol, "Ġ"), id(&smol, "1"), id(&smol, "2")]
        );
        // GPT-2 regex keeps " 12" together; merges give "Ġ1" then "2".
        assert_eq!(
            gpt2.encode(" 12").unwrap(),
            vec![id(&gpt2, "Ġ1"), id(&gpt2, "2")]
        );
    }

    #[test]
    fn control_tokens_are_special_and_merges_apply() {
        let tok = Tokenizer::from_gguf_spec(&tiny_spec("smollm")).unwrap();
        let hello = tok.token_to_id("hello").unwrap();
        assert_eq!(
            tok.encode("<|start|>hello<|end|>").unwrap(),
            vec![0, hello, 1]
        );
        assert_eq!(tok.decode(&[0, hello, 1], true).unwrap(), "hello");
        assert_eq!(
            tok.decode(&[0, hello, 1], false).unwrap(),
            "<|start|>hello<|end|>"
        );
        assert_eq!(tok.eos_ids(), &[1]);
    }

    #[test]
    fn add_bos_prepends_once() {
        let mut spec = tiny_spec("gpt-2");
        spec.add_bos = true;
        let tok = Tokenizer::from_gguf_spec(&spec).unwrap();
        let hello = tok.token_to_id("hello").unwrap();
        assert_eq!(tok.encode("hello").unwrap(), vec![0, hello]);
        assert_eq!(tok.encode("<|start|>hello").unwrap(), vec![0, hello]);
    }

    #[test]
    fn unsupported_names_are_reported() {
        let mut spec = tiny_spec("smollm");
        spec.model = "llama".into();
        let err = Tokenizer::from_gguf_spec(&spec).unwrap_err().to_string();
        assert!(err.contains("\"llama\"") && err.contains("gpt2"), "{err}");
        let err = Tokenizer::from_gguf_spec(&tiny_spec("falcon3"))
            .unwrap_err()
            .to_string();
        assert!(err.contains("falcon3") && err.contains("smollm"), "{err}");
    }

    #[test]
    fn llama3_and_qwen2_regexes_compile_and_group_digits() {
        let llama = Tokenizer::from_gguf_spec(&tiny_spec("llama3")).unwrap();
        let qwen = Tokenizer::from_gguf_spec(&tiny_spec("qwen2")).unwrap();
        let id = |s: &str| llama.token_to_id(s).unwrap();
        // "12" is one pre-token for llama3 (\p{N}{1,3}) so the merge applies; qwen2 splits digits.
        assert_eq!(llama.encode("12").unwrap(), vec![id("12")]);
        assert_eq!(qwen.encode("12").unwrap(), vec![id("1"), id("2")]);
    }

    #[test]
    fn bad_token_id_is_an_error() {
        let tok = Tokenizer::from_gguf_spec(&tiny_spec("smollm")).unwrap();
        let err = tok.decode(&[100_000], false).unwrap_err();
        assert!(matches!(
            err,
            TokenizerError::BadTokenId { id: 100_000, .. }
        ));
    }
}
