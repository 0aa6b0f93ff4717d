//! Text <-> token ids for the engine: one [`Tokenizer`] type whether the vocabulary comes from a
//! GGUF file's metadata (see [`gguf_bpe`]) or from a Hugging Face model directory.
//!
//! The heavy lifting (BPE merges, pre-tokenizer regexes, special-token splitting) is done by the
//! `tokenizers` crate so that ids match Hugging Face exactly; this module adds what a serving
//! runtime needs on top: BOS policy, the set of end-of-generation ids, and the chat template text.

pub mod chat_prompt;
pub mod detokenizer;
pub mod gguf_bpe;

use std::path::{Path, PathBuf};

pub use gguf_bpe::GgufTokenizerSpec;

/// Why a tokenizer could not be built or used.
#[derive(Debug, thiserror::Error)]
pub enum TokenizerError {
    #[error("cannot read tokenizer file {path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("invalid tokenizer file {path}: {message}")]
    BadFile { path: PathBuf, message: String },
    #[error("unsupported GGUF tokenizer model {0:?} (tokenizer.ggml.model); supported: \"gpt2\" (byte-level BPE)")]
    UnsupportedModel(String),
    #[error(
        "unsupported GGUF pre-tokenizer {name:?} (tokenizer.ggml.pre); supported: {supported}"
    )]
    UnsupportedPreTokenizer { name: String, supported: String },
    #[error("invalid GGUF tokenizer metadata: {0}")]
    BadSpec(String),
    #[error("token id {id} is out of range (vocabulary size {vocab_size})")]
    BadTokenId { id: u32, vocab_size: usize },
    #[error("tokenizer failed: {0}")]
    Backend(String),
}

impl TokenizerError {
    fn backend(e: impl std::fmt::Display) -> Self {
        TokenizerError::Backend(e.to_string())
    }
}

/// Names of special tokens that end a generation turn in common chat models, in addition to the
/// declared EOS (the same list llama.cpp uses to detect end-of-generation tokens).
const END_OF_GENERATION_NAMES: &[&str] = &[
    "<|eot_id|>",
    "<|eom_id|>",
    "<|im_end|>",
    "<|end|>",
    "<end_of_turn>",
    "<|endoftext|>",
    "<|end_of_text|>",
    "<EOT>",
    "_<EOT>",
    "<｜end▁of▁sentence｜>",
];

/// Whether the model's BOS/EOS are added around a text (vLLM's `add_special_tokens`): as the
/// model asks (its `add_bos_token`, or its post-processor), or none beyond what the text spells.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum AddedTokens {
    #[default]
    Model,
    None,
}

impl AddedTokens {
    /// From a request's `add_special_tokens` (absent: as the model asks).
    pub fn from_request(add_special_tokens: Option<bool>) -> Self {
        match add_special_tokens {
            Some(false) => AddedTokens::None,
            _ => AddedTokens::Model,
        }
    }
}

/// A loaded tokenizer plus the serving policy around it (BOS, stop ids, chat template).
#[derive(Clone)]
pub struct Tokenizer {
    inner: tokenizers::Tokenizer,
    /// The same pipeline with special-token parsing off: user text such as `<|im_start|>` stays
    /// those characters instead of becoming the control token.
    literal: tokenizers::Tokenizer,
    /// The text of every special token, to tell whether a user text spells one.
    special_texts: Vec<String>,
    /// The backend's post-processor prepends BOS (HF directories), so segment-wise encoding,
    /// which skips the post-processor, must add it.
    post_adds_bos: bool,
    /// One past the largest id (cached: `tokenizers` rebuilds its whole vocabulary to count it).
    vocab_size: usize,
    bos_id: Option<u32>,
    eos_id: Option<u32>,
    /// EOS first, then other special end-of-turn tokens present in the vocabulary.
    eos_ids: Vec<u32>,
    /// Prepend `bos_id` in [`Tokenizer::encode`] (when the backend's post-processor does not).
    add_bos: bool,
    add_eos: bool,
    chat_template: Option<String>,
}

impl std::fmt::Debug for Tokenizer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Tokenizer")
            .field("vocab_size", &self.vocab_size())
            .field("bos_id", &self.bos_id)
            .field("eos_ids", &self.eos_ids)
            .field("add_bos", &self.add_bos)
            .field("add_eos", &self.add_eos)
            .finish_non_exhaustive()
    }
}

impl Tokenizer {
    /// Builds the tokenizer a GGUF file describes (only `tokenizer.ggml.model = "gpt2"`).
    pub fn from_gguf_spec(spec: &GgufTokenizerSpec) -> Result<Tokenizer, TokenizerError> {
        let inner = gguf_bpe::build_hf_tokenizer(spec)?;
        Ok(Self::assemble(
            inner,
            spec.bos_id,
            spec.eos_id,
            &[],
            spec.add_bos,
            spec.add_eos,
            None,
        ))
    }

    /// Loads a Hugging Face model directory: `tokenizer.json`, plus `tokenizer_config.json` (BOS/EOS,
    /// `add_bos_token`, chat template), `chat_template.jinja` (the chat template, first) and
    /// `generation_config.json` (extra EOS ids) when present.
    pub fn from_hf_dir(dir: &Path) -> Result<Tokenizer, TokenizerError> {
        let tok_path = dir.join("tokenizer.json");
        let text = std::fs::read_to_string(&tok_path).map_err(|source| TokenizerError::Io {
            path: tok_path.clone(),
            source,
        })?;
        let inner: tokenizers::Tokenizer = text.parse().map_err(|e| TokenizerError::BadFile {
            path: tok_path.clone(),
            message: format!("{e}"),
        })?;

        let config = read_optional_json(&dir.join("tokenizer_config.json"))?;
        let generation = read_optional_json(&dir.join("generation_config.json"))?;
        let cfg = |key: &str| config.as_ref().and_then(|c| c.get(key));

        let bos_token = cfg("bos_token").and_then(token_content);
        let eos_token = cfg("eos_token").and_then(token_content);
        let bos_id = bos_token.as_deref().and_then(|t| inner.token_to_id(t));
        let eos_id = eos_token.as_deref().and_then(|t| inner.token_to_id(t));
        let extra_eos = generation
            .as_ref()
            .and_then(|g| g.get("eos_token_id"))
            .map(json_ids)
            .unwrap_or_default();

        // HF adds BOS through the post-processor; honour `add_bos_token` only if it does not.
        let wants_bos = cfg("add_bos_token")
            .and_then(|v| v.as_bool())
            .unwrap_or(false);
        let add_eos = cfg("add_eos_token")
            .and_then(|v| v.as_bool())
            .unwrap_or(false);
        let post_adds_bos = match (bos_id, inner.encode_fast("", true)) {
            (Some(bos), Ok(enc)) => enc.get_ids().first() == Some(&bos),
            _ => false,
        };
        // Transformers saves the template as its own file (and lets that file win over the
        // config's entry, as here); older directories keep it in tokenizer_config.json.
        let chat_template = match read_optional_text(&dir.join(CHAT_TEMPLATE_FILE))? {
            Some(text) => Some(text),
            None => cfg("chat_template").and_then(chat_template_text),
        };
        Ok(Self::assemble(
            inner,
            bos_id,
            eos_id,
            &extra_eos,
            wants_bos && !post_adds_bos,
            add_eos,
            chat_template,
        ))
    }

    fn assemble(
        inner: tokenizers::Tokenizer,
        bos_id: Option<u32>,
        eos_id: Option<u32>,
        extra_eos: &[u32],
        add_bos: bool,
        add_eos: bool,
        chat_template: Option<String>,
    ) -> Tokenizer {
        let mut eos_ids: Vec<u32> = eos_id.into_iter().collect();
        let mut push = |id: u32| {
            if !eos_ids.contains(&id) {
                eos_ids.push(id);
            }
        };
        extra_eos.iter().copied().for_each(&mut push);
        let mut marked: Vec<u32> = inner
            .get_added_tokens_decoder()
            .into_iter()
            .filter(|(_, t)| t.special && END_OF_GENERATION_NAMES.contains(&t.content.as_str()))
            .map(|(id, _)| id)
            .collect();
        marked.sort_unstable();
        marked.into_iter().for_each(push);
        let mut special_texts: Vec<String> = inner
            .get_added_tokens_decoder()
            .into_values()
            .filter(|t| t.special)
            .map(|t| t.content)
            .collect();
        special_texts.sort_unstable();
        let post_adds_bos = match (bos_id, inner.encode_fast("", true)) {
            (Some(bos), Ok(enc)) => enc.get_ids().first() == Some(&bos),
            _ => false,
        };
        let mut literal = inner.clone();
        literal.set_encode_special_tokens(true);
        let vocab_size = inner
            .get_vocab(true)
            .values()
            .max()
            .map_or(0, |&max| max as usize + 1);
        Tokenizer {
            inner,
            literal,
            special_texts,
            post_adds_bos,
            vocab_size,
            bos_id,
            eos_id,
            eos_ids,
            add_bos: add_bos && bos_id.is_some(),
            add_eos: add_eos && eos_id.is_some(),
            chat_template,
        }
    }

    /// Raw text to ids. Special-token strings in the text (e.g. `<|im_start|>`) become their
    /// special ids, as Hugging Face does; BOS/EOS are added only when the model asks for them,
    /// and BOS not before a text that starts with its own (Hugging Face would give two).
    pub fn encode(&self, text: &str) -> Result<Vec<u32>, TokenizerError> {
        let enc = self
            .inner
            .encode_fast(text, true)
            .map_err(TokenizerError::backend)?;
        let mut body = enc.get_ids();
        if let (true, Some(bos)) = (self.post_adds_bos, self.bos_id) {
            // The post-processor's BOS before the text's own: keep the text's.
            if body.get(1) == Some(&bos) {
                body = &body[1..];
            }
        }
        let mut ids = Vec::with_capacity(body.len() + 2);
        if let (true, Some(bos)) = (self.add_bos, self.bos_id) {
            if body.first() != Some(&bos) {
                ids.push(bos);
            }
        }
        ids.extend_from_slice(body);
        if let (true, Some(eos)) = (self.add_eos, self.eos_id) {
            if ids.last() != Some(&eos) {
                ids.push(eos);
            }
        }
        Ok(ids)
    }

    /// Text that may spell special tokens only where `parse_special` is set: each segment is
    /// encoded on its own (no BOS/EOS), then `added` says whether the model's BOS/EOS go around
    /// them (BOS not before a text that starts with one). Chat prompts use it so that only the
    /// template's markup becomes control tokens.
    pub fn encode_segments(
        &self,
        segments: &[(&str, bool)],
        added: AddedTokens,
    ) -> Result<Vec<u32>, TokenizerError> {
        let mut ids = Vec::new();
        let bos = match (added, self.bos_id) {
            (AddedTokens::Model, Some(bos)) if self.add_bos || self.post_adds_bos => Some(bos),
            _ => None,
        };
        for &(text, parse_special) in segments {
            let backend = if parse_special {
                &self.inner
            } else {
                &self.literal
            };
            let enc = backend
                .encode_fast(text, false)
                .map_err(TokenizerError::backend)?;
            ids.extend_from_slice(enc.get_ids());
        }
        if let Some(bos) = bos.filter(|&b| ids.first() != Some(&b)) {
            ids.insert(0, bos);
        }
        if let (AddedTokens::Model, true, Some(eos)) = (added, self.add_eos, self.eos_id) {
            if ids.last() != Some(&eos) {
                ids.push(eos);
            }
        }
        Ok(ids)
    }

    /// Raw text with special-token parsing off: a user's `<|im_start|>` is characters.
    pub fn encode_literal(&self, text: &str) -> Result<Vec<u32>, TokenizerError> {
        self.encode_segments(&[(text, false)], AddedTokens::Model)
    }

    /// The ids of `text` alone, as they appear inside a longer text: no BOS/EOS, special-token
    /// parsing off.
    pub fn encode_fragment(&self, text: &str) -> Result<Vec<u32>, TokenizerError> {
        self.encode_segments(&[(text, false)], AddedTokens::None)
    }

    /// The token sequences that spell `word` (its leading spaces dropped) in an answer: at the
    /// start of a text, and after a space where that tokenizes differently (vLLM's
    /// `bad_words`). vLLM keeps the second only when it has as many tokens as the first; in a
    /// byte-level vocabulary ` fever` is one token where `fever` is two, so that rule would
    /// leave the word allowed inside a sentence, and here it is kept whenever it differs.
    pub fn word_sequences(&self, word: &str) -> Result<Vec<Vec<u32>>, TokenizerError> {
        let word = word.trim_start();
        let plain = self.encode_fragment(word)?;
        let spaced = self.encode_fragment(&format!(" {word}"))?;
        Ok(if spaced == plain {
            vec![plain]
        } else {
            vec![plain, spaced]
        })
    }

    /// Whether `text` contains the text of a special token (which [`Tokenizer::encode`] would
    /// turn into the token itself).
    pub fn spells_special_token(&self, text: &str) -> bool {
        self.special_texts
            .iter()
            .any(|s| !s.is_empty() && text.contains(s.as_str()))
    }

    /// Ids to text; invalid UTF-8 from partial byte tokens becomes U+FFFD.
    pub fn decode(&self, ids: &[u32], skip_special_tokens: bool) -> Result<String, TokenizerError> {
        let vocab_size = self.vocab_size();
        if let Some(&id) = ids.iter().find(|&&id| id as usize >= vocab_size) {
            return Err(TokenizerError::BadTokenId { id, vocab_size });
        }
        self.inner
            .decode(ids, skip_special_tokens)
            .map_err(TokenizerError::backend)
    }

    /// The backend pipeline as `tokenizer.json` text: structured outputs read each token's exact
    /// bytes from it (byte-level or byte-fallback vocabularies, special tokens marked).
    pub fn to_json(&self) -> Result<String, TokenizerError> {
        self.inner.to_string(false).map_err(TokenizerError::backend)
    }

    /// Number of ids (one past the largest), added tokens included.
    pub fn vocab_size(&self) -> usize {
        self.vocab_size
    }

    pub fn bos_id(&self) -> Option<u32> {
        self.bos_id
    }

    /// Ids that end a generation: EOS plus end-of-turn specials such as `<|eot_id|>`/`<|im_end|>`.
    pub fn eos_ids(&self) -> &[u32] {
        &self.eos_ids
    }

    pub fn token_to_id(&self, s: &str) -> Option<u32> {
        self.inner.token_to_id(s)
    }

    pub fn id_to_token(&self, id: u32) -> Option<String> {
        self.inner.id_to_token(id)
    }

    /// The chat template from `tokenizer_config.json` (HF directories only; GGUF files carry
    /// theirs in `tokenizer.chat_template`, which the loader reads directly).
    pub fn chat_template(&self) -> Option<&str> {
        self.chat_template.as_deref()
    }

    pub fn bos_token(&self) -> Option<String> {
        self.bos_id.and_then(|id| self.inner.id_to_token(id))
    }

    pub fn eos_token(&self) -> Option<String> {
        self.eos_id.and_then(|id| self.inner.id_to_token(id))
    }
}

/// The chat template file of a Hugging Face directory (what transformers' `save_pretrained`
/// writes now, leaving the template out of tokenizer_config.json).
const CHAT_TEMPLATE_FILE: &str = "chat_template.jinja";

/// A file's text, or `None` when it does not exist.
fn read_optional_text(path: &Path) -> Result<Option<String>, TokenizerError> {
    match std::fs::read_to_string(path) {
        Ok(t) => Ok(Some(t)),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(source) => Err(TokenizerError::Io {
            path: path.to_path_buf(),
            source,
        }),
    }
}

/// A JSON file's document, or `None` when it does not exist (a model directory's optional
/// `tokenizer_config.json` and `generation_config.json`).
pub(crate) fn read_optional_json(path: &Path) -> Result<Option<serde_json::Value>, TokenizerError> {
    let Some(text) = read_optional_text(path)? else {
        return Ok(None);
    };
    serde_json::from_str(&text)
        .map(Some)
        .map_err(|e| TokenizerError::BadFile {
            path: path.to_path_buf(),
            message: e.to_string(),
        })
}

/// `"<s>"` or `{"content": "<s>", ...}` (both spellings occur in tokenizer_config.json).
fn token_content(v: &serde_json::Value) -> Option<String> {
    match v {
        serde_json::Value::String(s) => Some(s.clone()),
        serde_json::Value::Object(o) => o.get("content")?.as_str().map(str::to_owned),
        _ => None,
    }
}

/// `2` or `[128001, 128009]`.
fn json_ids(v: &serde_json::Value) -> Vec<u32> {
    match v {
        serde_json::Value::Array(a) => a.iter().filter_map(json_id).collect(),
        other => json_id(other).into_iter().collect(),
    }
}

fn json_id(v: &serde_json::Value) -> Option<u32> {
    v.as_u64().and_then(|n| u32::try_from(n).ok())
}

/// A template string, or the `[{"name": "default", "template": ...}, ...]` list form.
fn chat_template_text(v: &serde_json::Value) -> Option<String> {
    match v {
        serde_json::Value::String(s) => Some(s.clone()),
        serde_json::Value::Array(list) => {
            let named = |name: &str| {
                list.iter()
                    .find(|t| t.get("name").and_then(|n| n.as_str()) == Some(name))
            };
            named("default")
                .or_else(|| list.first())
                .and_then(|t| t.get("template"))
                .and_then(|t| t.as_str())
                .map(str::to_owned)
        }
        _ => None,
    }
}
