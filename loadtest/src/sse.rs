//! Incremental decoding of an OpenAI streaming response: SSE `data:` lines carrying chat chunks
//! (`choices[0].delta.content`), completions chunks (`choices[0].text`) or the usage chunk, and the final
//! `data: [DONE]`. Bytes arrive in arbitrary pieces; only complete lines are interpreted.

use serde::Deserialize;

/// What one `data:` line said.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct Chunk {
    /// The chunk carried non-empty generated text (a token chunk in vLLM's sense).
    pub has_content: bool,
    pub finished: bool,
    pub usage: Option<Usage>,
    /// The server reported an error inside the stream.
    pub error: Option<String>,
}

#[derive(Debug, Clone, Copy, PartialEq, Default)]
pub struct Usage {
    pub prompt_tokens: Option<u64>,
    pub completion_tokens: Option<u64>,
}

#[derive(Debug, Clone, PartialEq)]
pub enum Event {
    Chunk(Chunk),
    Done,
}

#[derive(Debug, thiserror::Error, PartialEq)]
#[error("malformed stream chunk: {0}")]
pub struct SseError(pub String);

#[derive(Deserialize)]
struct ChunkJson {
    #[serde(default)]
    choices: Vec<ChoiceJson>,
    #[serde(default)]
    usage: Option<UsageJson>,
    #[serde(default)]
    error: Option<serde_json::Value>,
}

#[derive(Deserialize)]
struct ChoiceJson {
    #[serde(default)]
    delta: Option<DeltaJson>,
    #[serde(default)]
    text: Option<String>,
    #[serde(default)]
    finish_reason: Option<String>,
}

#[derive(Deserialize)]
struct DeltaJson {
    #[serde(default)]
    content: Option<String>,
}

#[derive(Deserialize)]
struct UsageJson {
    #[serde(default)]
    prompt_tokens: Option<u64>,
    #[serde(default)]
    completion_tokens: Option<u64>,
}

/// Splits a byte stream into events.
#[derive(Debug, Default)]
pub struct SseDecoder {
    buf: Vec<u8>,
}

impl SseDecoder {
    /// Feeds bytes; returns the events completed by them, in order.
    pub fn push(&mut self, bytes: &[u8]) -> Result<Vec<Event>, SseError> {
        self.buf.extend_from_slice(bytes);
        let mut events = Vec::new();
        let mut start = 0;
        while let Some(pos) = self.buf[start..].iter().position(|&b| b == b'\n') {
            let line = &self.buf[start..start + pos];
            start += pos + 1;
            if let Some(ev) = parse_line(line)? {
                events.push(ev);
            }
        }
        self.buf.drain(..start);
        Ok(events)
    }

    /// Interprets a last line that had no newline (servers that close right after the final event).
    pub fn finish(&mut self) -> Result<Option<Event>, SseError> {
        let line = std::mem::take(&mut self.buf);
        parse_line(&line)
    }
}

fn parse_line(line: &[u8]) -> Result<Option<Event>, SseError> {
    let line = line.strip_suffix(b"\r").unwrap_or(line);
    let Some(payload) = line.strip_prefix(b"data:") else {
        // Blank separators, comments (":"), `event:`/`id:` fields carry nothing we measure.
        return Ok(None);
    };
    let payload = payload.trim_ascii();
    if payload == b"[DONE]" {
        return Ok(Some(Event::Done));
    }
    if payload.is_empty() {
        return Ok(None);
    }
    let json: ChunkJson = serde_json::from_slice(payload).map_err(|e| SseError(e.to_string()))?;
    let mut chunk = Chunk {
        usage: json.usage.map(|u| Usage {
            prompt_tokens: u.prompt_tokens,
            completion_tokens: u.completion_tokens,
        }),
        error: json.error.map(|e| e.to_string()),
        ..Chunk::default()
    };
    if let Some(choice) = json.choices.first() {
        let text = choice
            .delta
            .as_ref()
            .and_then(|d| d.content.as_deref())
            .or(choice.text.as_deref())
            .unwrap_or("");
        chunk.has_content = !text.is_empty();
        chunk.finished = choice.finish_reason.is_some();
    }
    Ok(Some(Event::Chunk(chunk)))
}

#[cfg(test)]
mod tests {
    use super::*;

    const CHAT: &str = concat!(
        "data: {\"choices\":[{\"index\":0,\"delta\":{\"role\":\"assistant\",\"content\":\"\"}}]}\n\n",
        "data: {\"choices\":[{\"index\":0,\"delta\":{\"content\":\"Hi\"},\"finish_reason\":null}]}\n\n",
        ": keep-alive comment\n",
        "data: {\"choices\":[{\"index\":0,\"delta\":{},\"finish_reason\":\"stop\"}]}\r\n\r\n",
        "data: {\"choices\":[],\"usage\":{\"prompt_tokens\":12,\"completion_tokens\":1,\"total_tokens\":13}}\n\n",
        "data: [DONE]\n\n"
    );

    fn events_in_pieces(text: &str, piece: usize) -> Vec<Event> {
        let mut d = SseDecoder::default();
        let mut out = Vec::new();
        for c in text.as_bytes().chunks(piece) {
            out.extend(d.push(c).unwrap());
        }
        out.extend(d.finish().unwrap());
        out
    }

    #[test]
    fn chat_stream_in_any_split_gives_the_same_events() {
        let whole = events_in_pieces(CHAT, CHAT.len());
        assert_eq!(whole.len(), 5);
        let Event::Chunk(role) = &whole[0] else {
            panic!()
        };
        assert!(!role.has_content, "the role chunk is not a token");
        let Event::Chunk(tok) = &whole[1] else {
            panic!()
        };
        assert!(tok.has_content && !tok.finished);
        let Event::Chunk(stop) = &whole[2] else {
            panic!()
        };
        assert!(stop.finished && !stop.has_content);
        let Event::Chunk(usage) = &whole[3] else {
            panic!()
        };
        assert_eq!(usage.usage.unwrap().completion_tokens, Some(1));
        assert_eq!(usage.usage.unwrap().prompt_tokens, Some(12));
        assert_eq!(whole[4], Event::Done);
        for piece in [1, 2, 7, 33] {
            assert_eq!(events_in_pieces(CHAT, piece), whole, "piece {piece}");
        }
    }

    #[test]
    fn completions_text_and_errors() {
        let ev = events_in_pieces("data: {\"choices\":[{\"text\":\" the\"}]}\ndata:[DONE]", 5);
        assert_eq!(ev.len(), 2);
        assert!(matches!(&ev[0], Event::Chunk(c) if c.has_content));
        assert_eq!(ev[1], Event::Done);
        let ev = events_in_pieces("data: {\"error\":{\"message\":\"boom\"}}\n", 100);
        assert!(matches!(&ev[0], Event::Chunk(c) if c.error.as_deref().unwrap().contains("boom")));
        assert!(SseDecoder::default().push(b"data: {not json\n").is_err());
    }
}
