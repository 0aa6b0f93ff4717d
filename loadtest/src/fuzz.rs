//! Random and mutated HTTP requests for an OpenAI-compatible server: JSON shapes, wrong types,
//! numbers at the limits, unicode, sizes, malformed bytes, every endpoint. A server under test
//! must answer every one with a status below 500 and stay healthy. Request `index` of seed `seed`
//! is always the same request, so a failure found in a long run replays alone.

use rand::seq::IndexedRandom;
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use serde_json::{json, Map, Value};

mod corpus;

use corpus::{FIELDS, LIMIT_FLOATS, LIMIT_INTS, METHODS, PATHS, RAW_NUMBERS, TEXTS};

/// One request to send: valid HTTP framing around arbitrary content.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct FuzzRequest {
    pub method: &'static str,
    /// Path and query, percent-encoded (always a valid request target).
    pub path: String,
    /// Extra headers (visible ASCII values).
    pub headers: Vec<(&'static str, String)>,
    pub body: Vec<u8>,
}

impl FuzzRequest {
    /// A one-line description for reports (the body cut to `max` bytes).
    pub fn summary(&self, max: usize) -> String {
        let body = String::from_utf8_lossy(&self.body[..self.body.len().min(max)]).into_owned();
        let cut = if self.body.len() > max { "..." } else { "" };
        format!(
            "{} {} ({} bytes) {body}{cut}",
            self.method,
            self.path,
            self.body.len()
        )
    }
}

/// Request `index` of the run seeded `seed`; `models` are the served names (base and adapters)
/// that valid-looking requests address.
pub fn request(seed: u64, index: u64, models: &[String]) -> FuzzRequest {
    let mix = seed ^ index.wrapping_mul(0x9E37_79B9_7F4A_7C15);
    let mut g = Gen {
        rng: ChaCha8Rng::seed_from_u64(mix),
        models,
    };
    g.request()
}

struct Gen<'a> {
    rng: ChaCha8Rng,
    models: &'a [String],
}

impl Gen<'_> {
    fn request(&mut self) -> FuzzRequest {
        let mut req = match self.rng.random_range(0..100) {
            0..40 => self.generation("/v1/chat/completions", true),
            40..70 => self.generation("/v1/completions", false),
            70..76 => {
                let body = self.load_body();
                self.json_post("/v1/load_lora_adapter", body)
            }
            76..80 => {
                let body = json!({"lora_name": self.name()});
                self.json_post("/v1/unload_lora_adapter", body)
            }
            80..86 => FuzzRequest {
                method: "GET",
                path: format!("/v1/models{}", self.query()),
                headers: Vec::new(),
                body: Vec::new(),
            },
            86..90 => FuzzRequest {
                method: "GET",
                path: (*self.pick(&["/health", "/version", "/metrics", "/openapi.json"]))
                    .to_owned(),
                headers: Vec::new(),
                body: Vec::new(),
            },
            90..95 => {
                let body = self.value(2).to_string().into_bytes();
                let method = *self.pick(METHODS);
                FuzzRequest {
                    method,
                    path: format!("{}{}", self.pick(PATHS), self.query()),
                    headers: vec![("content-type", "application/json".into())],
                    body,
                }
            }
            _ => {
                let n = self.size(4096);
                let body = (0..n).map(|_| self.rng.random()).collect();
                FuzzRequest {
                    method: "POST",
                    path: self
                        .pick(&["/v1/chat/completions", "/v1/completions"])
                        .to_string(),
                    headers: vec![("content-type", self.content_type())],
                    body,
                }
            }
        };
        self.maybe_auth(&mut req);
        self.maybe_request_id(&mut req);
        req
    }

    fn generation(&mut self, path: &str, chat: bool) -> FuzzRequest {
        let mut body = Map::new();
        body.insert("model".into(), json!(self.model()));
        if chat {
            body.insert("messages".into(), self.messages());
        } else {
            body.insert("prompt".into(), self.prompt());
        }
        // Valid requests stay short: a fuzz run is about answers, not generation.
        body.insert("max_tokens".into(), json!(self.rng.random_range(1..5)));
        if self.rng.random_bool(0.3) {
            body.insert("stream".into(), json!(true));
        }
        for _ in 0..self.rng.random_range(0..5) {
            self.mutate(&mut body);
        }
        self.json_post(path, Value::Object(body))
    }

    /// One change: a field set to a random value (max_tokens only to numbers and wrong types,
    /// never left unbounded), or removed.
    fn mutate(&mut self, body: &mut Map<String, Value>) {
        let field = *self.pick(FIELDS);
        if field == "max_tokens" || field == "max_completion_tokens" {
            let v = match self.rng.random_range(0..4) {
                0 => json!(*self.pick(LIMIT_INTS) as f64),
                1 => json!(self.rng.random_range(1..64)),
                2 => json!(self.text()),
                _ => json!([1, 2]),
            };
            body.insert(field.into(), v);
            return;
        }
        match self.rng.random_range(0..10) {
            0 => {
                body.remove(field);
            }
            1 => {
                let v = self.messages();
                body.insert(field.into(), v);
            }
            2 => {
                let v = self.prompt();
                body.insert(field.into(), v);
            }
            _ => {
                let v = self.value(3);
                body.insert(field.into(), v);
            }
        }
    }

    fn messages(&mut self) -> Value {
        let n = match self.rng.random_range(0..10) {
            0 => 0,
            1 => self.rng.random_range(10..60),
            _ => self.rng.random_range(1..4),
        };
        let roles = [
            "system",
            "user",
            "assistant",
            "tool",
            "developer",
            "wizard",
            "",
        ];
        let msgs: Vec<Value> = (0..n)
            .map(|_| {
                let mut m = Map::new();
                if self.rng.random_bool(0.95) {
                    m.insert("role".into(), json!(self.pick(&roles)));
                }
                let content = match self.rng.random_range(0..10) {
                    0 => self.value(2),
                    1 => json!([{"type": "text", "text": self.text()}]),
                    2 => json!([{"type": "image_url", "image_url": {"url": self.text()}}]),
                    3 => Value::Null,
                    _ => json!(self.text()),
                };
                if self.rng.random_bool(0.95) {
                    m.insert("content".into(), content);
                }
                if self.rng.random_bool(0.05) {
                    let k = self.pick(&["name", "tool_calls", "tool_call_id", "extra"]);
                    m.insert((*k).into(), self.value(2));
                }
                Value::Object(m)
            })
            .collect();
        Value::Array(msgs)
    }

    fn prompt(&mut self) -> Value {
        match self.rng.random_range(0..8) {
            0 => json!((0..self.rng.random_range(0..4))
                .map(|_| self.text())
                .collect::<Vec<_>>()),
            1 => json!((0..self.rng.random_range(0..20))
                .map(|_| *self.pick(LIMIT_INTS) as i64)
                .collect::<Vec<_>>()),
            2 => json!([(0..self.rng.random_range(0..20))
                .map(|_| self.rng.random_range(0..300))
                .collect::<Vec<u32>>()]),
            3 => self.value(3),
            _ => json!(self.text()),
        }
    }

    fn load_body(&mut self) -> Value {
        let mut m = Map::new();
        m.insert("lora_name".into(), self.name());
        let path = match self.rng.random_range(0..8) {
            0 => json!("../../etc"),
            1 => json!("/etc/passwd"),
            2 => json!(format!("{}/../x", self.model())),
            3 => self.value(1),
            _ => json!(self.model()),
        };
        m.insert("lora_path".into(), path);
        if self.rng.random_bool(0.3) {
            m.insert("load_inplace".into(), self.value(1));
        }
        if self.rng.random_bool(0.2) {
            self.mutate(&mut m);
        }
        Value::Object(m)
    }

    fn name(&mut self) -> Value {
        match self.rng.random_range(0..6) {
            0 => self.value(1),
            1 => json!("x".repeat(self.size(1000))),
            2 => json!(self.text()),
            3 => json!(format!("fuzz-{}", self.rng.random_range(0..8))),
            _ => json!(self.model()),
        }
    }

    fn model(&mut self) -> String {
        if self.models.is_empty() || self.rng.random_bool(0.1) {
            return self.text();
        }
        self.pick(self.models).clone()
    }

    /// A random JSON value nested at most `depth` deep.
    fn value(&mut self, depth: u32) -> Value {
        let top = if depth == 0 { 6 } else { 9 };
        match self.rng.random_range(0..top) {
            0 => Value::Null,
            1 => json!(self.rng.random_bool(0.5)),
            2 => json!(*self.pick(LIMIT_INTS) as f64),
            3 => {
                let i = *self.pick(LIMIT_INTS);
                i64::try_from(i).map_or_else(|_| json!(u64::MAX), |i| json!(i))
            }
            4 => json!(*self.pick(LIMIT_FLOATS)),
            5 => json!(self.text()),
            6 | 7 => {
                let n = self.size(40);
                Value::Array((0..n).map(|_| self.value(depth - 1)).collect())
            }
            _ => {
                let n = self.size(8);
                let mut m = Map::new();
                for _ in 0..n {
                    let k = if self.rng.random_bool(0.5) {
                        (*self.pick(FIELDS)).to_owned()
                    } else {
                        self.text()
                    };
                    m.insert(k, self.value(depth - 1));
                }
                Value::Object(m)
            }
        }
    }

    fn text(&mut self) -> String {
        match self.rng.random_range(0..12) {
            0 => self.pick(TEXTS).repeat(self.size(20_000)),
            1 => (0..self.size(64))
                .filter_map(|_| char::from_u32(self.rng.random_range(0..0x11_0000)))
                .collect(),
            _ => (*self.pick(TEXTS)).to_owned(),
        }
    }

    /// A length, mostly small, sometimes up to `max`.
    fn size(&mut self, max: usize) -> usize {
        match self.rng.random_range(0..10) {
            0 => max,
            1..=3 => self.rng.random_range(0..=max),
            _ => self.rng.random_range(0..=max.min(4)),
        }
    }

    fn query(&mut self) -> String {
        if self.rng.random_bool(0.4) {
            return String::new();
        }
        let keys = ["limit", "after", "before", "order", "x", ""];
        let n = self.rng.random_range(1..4);
        let parts: Vec<String> = (0..n)
            .map(|_| {
                let k = self.pick(&keys).to_string();
                let v = match self.rng.random_range(0..5) {
                    0 => (*self.pick(LIMIT_INTS)).to_string(),
                    1 => self.model(),
                    2 => self.text(),
                    3 => (*self.pick(RAW_NUMBERS)).to_string(),
                    _ => self.rng.random_range(0..50).to_string(),
                };
                format!("{k}={}", percent_encode(&v))
            })
            .collect();
        format!("?{}", parts.join("&"))
    }

    fn content_type(&mut self) -> String {
        (*self.pick(&[
            "application/json",
            "application/json; charset=utf-8",
            "text/plain",
            "multipart/form-data; boundary=x",
            "application/x-www-form-urlencoded",
            "",
        ]))
        .to_owned()
    }

    fn maybe_auth(&mut self, req: &mut FuzzRequest) {
        if self.rng.random_bool(0.9) {
            return;
        }
        let v = match self.rng.random_range(0..5) {
            0 => "Bearer".to_owned(),
            1 => "bearer sk-fuzz".to_owned(),
            2 => "Basic dXNlcjpwYXNz".to_owned(),
            3 => format!("Bearer {}", "k".repeat(self.size(6000))),
            _ => String::new(),
        };
        req.headers.push(("authorization", v));
    }

    /// Now and then a gateway's `X-Request-Id`, valid or not.
    fn maybe_request_id(&mut self, req: &mut FuzzRequest) {
        if self.rng.random_bool(0.9) {
            return;
        }
        let v = match self.rng.random_range(0..4) {
            0 => "0f8fad5b-d9cb-469f-a165-70867728950e".to_owned(),
            1 => "a=b status=500".to_owned(),
            2 => "r".repeat(self.size(300)),
            _ => String::new(),
        };
        req.headers.push(("x-request-id", v));
    }

    fn json_post(&mut self, path: &str, body: Value) -> FuzzRequest {
        let mut bytes = serde_json::to_vec(&body).unwrap_or_default();
        match self.rng.random_range(0..20) {
            0 => self.corrupt(&mut bytes),
            1 => {
                let raw = *self.pick(RAW_NUMBERS);
                splice_raw_number(&mut bytes, raw);
            }
            2 => splice_lone_surrogate(&mut bytes),
            _ => {}
        }
        let mut headers = Vec::new();
        if self.rng.random_bool(0.95) {
            headers.push(("content-type", "application/json".to_owned()));
        } else {
            headers.push(("content-type", self.content_type()));
        }
        FuzzRequest {
            method: "POST",
            path: path.to_owned(),
            headers,
            body: bytes,
        }
    }

    /// Byte-level damage: truncation, flipped bytes, inserted brackets, duplication.
    fn corrupt(&mut self, bytes: &mut Vec<u8>) {
        if bytes.is_empty() {
            return;
        }
        let at = self.rng.random_range(0..bytes.len());
        match self.rng.random_range(0..4) {
            0 => bytes.truncate(at),
            1 => bytes[at] ^= 1 << self.rng.random_range(0..8),
            2 => {
                let fill = *self.pick(&[b'[', b'{', b'"', b'\\', b',', 0xff]);
                let n = self.size(3000);
                bytes.splice(at..at, std::iter::repeat_n(fill, n));
            }
            _ => {
                let copy = bytes.clone();
                bytes.extend_from_slice(&copy);
            }
        }
    }

    fn pick<'t, T>(&mut self, items: &'t [T]) -> &'t T {
        items.choose(&mut self.rng).unwrap_or(&items[0])
    }
}

/// Replaces the first JSON number after a `:` with `raw`.
fn splice_raw_number(bytes: &mut Vec<u8>, raw: &str) {
    let Some(start) = bytes
        .windows(2)
        .position(|w| w[0] == b':' && (w[1].is_ascii_digit() || w[1] == b'-'))
        .map(|p| p + 1)
    else {
        return;
    };
    let end = bytes[start..]
        .iter()
        .position(|b| !(b.is_ascii_digit() || matches!(b, b'-' | b'+' | b'.' | b'e' | b'E')))
        .map_or(bytes.len(), |n| start + n);
    bytes.splice(start..end, raw.bytes());
}

/// Puts an unpaired UTF-16 surrogate escape (valid JSON syntax, no valid string) in the first
/// string value.
fn splice_lone_surrogate(bytes: &mut Vec<u8>) {
    if let Some(p) = bytes.windows(2).position(|w| w == b":\"") {
        bytes.splice(p + 2..p + 2, b"\\ud800".iter().copied());
    }
}

/// Percent-encodes everything but unreserved characters, so any text fits in a request target.
pub fn percent_encode(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for b in s.bytes() {
        if b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.' | b'~') {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn requests_are_reproducible_by_index_and_cover_every_kind() {
        let models = vec!["base".to_owned(), "dr-a".to_owned()];
        let a: Vec<_> = (0..300).map(|i| request(7, i, &models)).collect();
        let b: Vec<_> = (0..300).map(|i| request(7, i, &models)).collect();
        assert_eq!(a, b);
        assert_ne!(
            a,
            (0..300).map(|i| request(8, i, &models)).collect::<Vec<_>>()
        );
        for path in [
            "/v1/chat/completions",
            "/v1/completions",
            "/v1/load_lora_adapter",
            "/v1/unload_lora_adapter",
            "/health",
        ] {
            assert!(a.iter().any(|r| r.path == path), "{path} never generated");
        }
        assert!(a.iter().any(|r| r.path.starts_with("/v1/models?")));
        assert!(a.iter().any(|r| r.method != "GET" && r.method != "POST"));
        // Some bodies are not JSON at all, some are.
        let parses = |r: &FuzzRequest| serde_json::from_slice::<Value>(&r.body).is_ok();
        assert!(a.iter().any(parses));
        assert!(a.iter().any(|r| !r.body.is_empty() && !parses(r)));
        // Every target is printable ASCII, every header value visible ASCII.
        for r in &a {
            assert!(r.path.bytes().all(|b| b.is_ascii_graphic()), "{}", r.path);
            for (_, v) in &r.headers {
                assert!(v.bytes().all(|b| b == b' ' || b.is_ascii_graphic()));
            }
        }
    }

    #[test]
    fn splices_break_numbers_and_strings_as_intended() {
        let mut b = br#"{"max_tokens":12,"x":"y"}"#.to_vec();
        splice_raw_number(&mut b, "1e999");
        assert_eq!(b, br#"{"max_tokens":1e999,"x":"y"}"#.to_vec());
        let mut b = br#"{"x":"y"}"#.to_vec();
        splice_lone_surrogate(&mut b);
        assert_eq!(b, br#"{"x":"\ud800y"}"#.to_vec());
        assert!(serde_json::from_slice::<Value>(&b).is_err());
        assert_eq!(percent_encode("a b/é"), "a%20b%2F%C3%A9");
    }
}
