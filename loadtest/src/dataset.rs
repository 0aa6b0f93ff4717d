//! Where prompts come from (`--dataset`): the built-in patient questions, a JSONL file of prompts, or
//! random text of a chosen token length (vLLM's "random" dataset, for capacity runs where content does not
//! matter).

use crate::lengths::LengthDist;
use crate::patients;
use rand::Rng;
use serde::Deserialize;
use std::path::{Path, PathBuf};

#[derive(Debug, thiserror::Error)]
pub enum DatasetError {
    #[error("cannot read dataset {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{path}:{line}: {why}")]
    Line {
        path: PathBuf,
        line: usize,
        why: String,
    },
    #[error("{0}: no prompts in file")]
    Empty(PathBuf),
}

/// One prompt from a JSONL file: a JSON string, or an object with `prompt` (or `text`) and optional
/// `system` and `max_tokens` (or `output_len`).
#[derive(Debug, Clone, PartialEq)]
pub struct FilePrompt {
    pub system: Option<String>,
    pub prompt: String,
    pub max_tokens: Option<u32>,
}

#[derive(Debug, Clone, PartialEq)]
pub enum Dataset {
    Patients,
    File(Vec<FilePrompt>),
    Random { input_len: LengthDist },
}

/// What the schedule needs from one draw.
#[derive(Debug, Clone, PartialEq)]
pub struct Draw {
    /// `None` means "use the target's default system prompt" (patients) or none at all.
    pub system: Option<String>,
    pub prompt: String,
    pub input_len_hint: Option<u32>,
    pub max_tokens: Option<u32>,
}

#[derive(Deserialize)]
#[serde(untagged)]
enum Line {
    Text(String),
    Object {
        #[serde(alias = "text")]
        prompt: String,
        #[serde(default)]
        system: Option<String>,
        #[serde(default, alias = "output_len")]
        max_tokens: Option<u32>,
    },
}

impl Dataset {
    /// `patients`, `random`, or a path to a JSONL file.
    pub fn from_spec(spec: &str, input_len: LengthDist) -> Result<Self, DatasetError> {
        match spec {
            "patients" | "builtin" => Ok(Self::Patients),
            "random" => Ok(Self::Random { input_len }),
            path => Self::load_jsonl(Path::new(path)),
        }
    }

    pub fn load_jsonl(path: &Path) -> Result<Self, DatasetError> {
        let text = std::fs::read_to_string(path).map_err(|source| DatasetError::Read {
            path: path.to_path_buf(),
            source,
        })?;
        let mut prompts = Vec::new();
        for (i, raw) in text.lines().enumerate() {
            if raw.trim().is_empty() {
                continue;
            }
            let line: Line = serde_json::from_str(raw).map_err(|e| DatasetError::Line {
                path: path.to_path_buf(),
                line: i + 1,
                why: e.to_string(),
            })?;
            prompts.push(match line {
                Line::Text(prompt) => FilePrompt {
                    system: None,
                    prompt,
                    max_tokens: None,
                },
                Line::Object {
                    prompt,
                    system,
                    max_tokens,
                } => FilePrompt {
                    system,
                    prompt,
                    max_tokens,
                },
            });
        }
        if prompts.is_empty() {
            return Err(DatasetError::Empty(path.to_path_buf()));
        }
        Ok(Self::File(prompts))
    }

    /// A short name for the report.
    pub fn name(&self) -> String {
        match self {
            Self::Patients => "patients".into(),
            Self::File(p) => format!("jsonl ({} prompts)", p.len()),
            Self::Random { input_len } => format!("random (input {input_len})"),
        }
    }

    pub fn draw(&self, rng: &mut impl Rng) -> Draw {
        match self {
            Self::Patients => Draw {
                system: None,
                prompt: patients::patient_question(rng),
                input_len_hint: None,
                max_tokens: None,
            },
            Self::File(prompts) => {
                let p = &prompts[rng.random_range(0..prompts.len())];
                Draw {
                    system: p.system.clone(),
                    prompt: p.prompt.clone(),
                    input_len_hint: None,
                    max_tokens: p.max_tokens,
                }
            }
            Self::Random { input_len } => {
                let n = input_len.sample(rng);
                Draw {
                    system: None,
                    prompt: random_words(n as usize, rng),
                    input_len_hint: Some(n),
                    max_tokens: None,
                }
            }
        }
    }
}

/// Common English words that are one token each (with their leading space) in the BPE vocabularies of
/// Llama, Mistral, Qwen and SmolLM, so N words is close to N prompt tokens without a tokenizer.
const WORDS: &[&str] = &[
    "the", "of", "and", "to", "in", "is", "was", "for", "on", "with", "as", "by", "at", "from",
    "his", "her", "they", "but", "not", "are", "this", "have", "had", "were", "one", "all",
    "which", "their", "there", "time", "would", "about", "more", "could", "after", "first",
    "other", "some", "what", "when", "into", "only", "new", "over", "also", "back", "then", "two",
    "year", "work", "day", "home", "water", "people", "good", "long", "great", "little", "old",
    "same", "right", "still", "place", "hand", "part", "night", "head", "life", "left", "house",
    "world", "light", "small", "large", "high", "city", "open", "school", "music", "family",
    "book", "table", "green", "river", "paper", "power", "heart", "doctor", "blood", "pain",
    "body", "sleep", "food", "walk", "money",
];

fn random_words(n: usize, rng: &mut impl Rng) -> String {
    let mut s = String::with_capacity(n * 6);
    for i in 0..n {
        if i > 0 {
            s.push(' ');
        }
        s.push_str(WORDS[rng.random_range(0..WORDS.len())]);
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::SeedableRng;
    use rand_chacha::ChaCha8Rng;

    #[test]
    fn jsonl_accepts_strings_and_objects() {
        let dir = std::env::temp_dir().join(format!("caduceus-loadtest-ds-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("p.jsonl");
        std::fs::write(
            &path,
            "\"plain prompt\"\n\n{\"prompt\": \"p2\", \"system\": \"sys\", \"max_tokens\": 9}\n{\"text\": \"p3\", \"output_len\": 4}\n",
        )
        .unwrap();
        let Dataset::File(p) = Dataset::load_jsonl(&path).unwrap() else {
            panic!("not a file dataset")
        };
        assert_eq!(p.len(), 3);
        assert_eq!(p[0].prompt, "plain prompt");
        assert_eq!(
            (p[1].system.as_deref(), p[1].max_tokens),
            (Some("sys"), Some(9))
        );
        assert_eq!((p[2].prompt.as_str(), p[2].max_tokens), ("p3", Some(4)));

        std::fs::write(&path, "{\"prompt\": \"ok\"}\n{oops\n").unwrap();
        let err = Dataset::load_jsonl(&path).unwrap_err().to_string();
        assert!(err.contains(":2:"), "{err}");
        std::fs::write(&path, "\n").unwrap();
        assert!(matches!(
            Dataset::load_jsonl(&path),
            Err(DatasetError::Empty(_))
        ));
        assert!(Dataset::load_jsonl(&dir.join("missing.jsonl")).is_err());
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn random_prompts_have_the_drawn_word_count() {
        let d = Dataset::from_spec("random", "uniform:5-50".parse().unwrap()).unwrap();
        let mut rng = ChaCha8Rng::seed_from_u64(4);
        for _ in 0..100 {
            let draw = d.draw(&mut rng);
            let n = draw.input_len_hint.unwrap() as usize;
            assert!((5..=50).contains(&n));
            assert_eq!(draw.prompt.split(' ').count(), n);
        }
    }
}
