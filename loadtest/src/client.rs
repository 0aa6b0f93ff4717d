//! The HTTP side: one streaming request to an OpenAI-compatible server, timed chunk by chunk, and model
//! discovery through `GET /v1/models`. Plain HTTP/1.1 over hyper; load tests target local servers.

use crate::outcome::{ErrorKind, RequestOutcome};
use crate::schedule::ScheduledRequest;
use crate::sse::{Event, SseDecoder};
use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::{Method, Request, StatusCode};
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;
use serde::Deserialize;
use serde_json::json;
use std::time::{Duration, Instant};

#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    #[error("unsupported URL {0:?}: use http://HOST:PORT (plain HTTP; https is not supported)")]
    Url(String),
    #[error("GET {url}: {why}")]
    Get { url: String, why: String },
}

/// Which OpenAI API the requests use.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Endpoint {
    Chat,
    Completions,
}

impl Endpoint {
    pub fn path(self) -> &'static str {
        match self {
            Self::Chat => "/v1/chat/completions",
            Self::Completions => "/v1/completions",
        }
    }
}

/// Options applied to every request of a run.
#[derive(Debug, Clone, PartialEq)]
pub struct RequestOptions {
    pub endpoint: Endpoint,
    pub ignore_eos: bool,
    pub temperature: Option<f64>,
    pub timeout: Duration,
}

impl RequestOptions {
    /// The part of the options that shapes the load, folded into the schedule hash.
    pub fn key(&self) -> String {
        format!(
            "{:?}|ignore_eos={}|temperature={:?}",
            self.endpoint, self.ignore_eos, self.temperature
        )
    }
}

/// One entry of `GET /v1/models`.
#[derive(Debug, Clone, PartialEq, Deserialize)]
pub struct ModelEntry {
    pub id: String,
    #[serde(default)]
    pub parent: Option<String>,
}

#[derive(Deserialize)]
struct ModelList {
    data: Vec<ModelEntry>,
    /// Caduceus pages `/v1/models` (OpenAI list style); servers that do not say list all.
    #[serde(default)]
    has_more: bool,
    #[serde(default)]
    last_id: Option<String>,
}

/// A cheap-to-clone client bound to one server.
#[derive(Clone)]
pub struct ApiClient {
    http: Client<HttpConnector, Full<Bytes>>,
    base: String,
    /// With `with_replicas`: every server, `base` first; each model goes to one of them.
    replicas: Vec<String>,
    api_key: Option<String>,
    opts: RequestOptions,
}

/// `http://host:port` from a URL with or without a trailing `/` or `/v1`.
fn normalise(url: &str) -> Result<String, ClientError> {
    let base = url
        .trim_end_matches('/')
        .trim_end_matches("/v1")
        .to_string();
    let authority = base
        .strip_prefix("http://")
        .ok_or_else(|| ClientError::Url(url.into()))?;
    if authority.is_empty() || authority.contains('/') {
        return Err(ClientError::Url(url.into()));
    }
    Ok(base)
}

/// FNV-1a: a hash of a model name that every run and platform agrees on.
fn stable_hash(text: &str) -> u64 {
    text.bytes().fold(0xcbf2_9ce4_8422_2325, |h, b| {
        (h ^ u64::from(b)).wrapping_mul(0x0000_0100_0000_01b3)
    })
}

impl ApiClient {
    /// `url` is `http://host:port`, with or without a trailing `/v1`.
    pub fn new(
        url: &str,
        api_key: Option<String>,
        opts: RequestOptions,
    ) -> Result<Self, ClientError> {
        let base = normalise(url)?;
        let mut connector = HttpConnector::new();
        connector.set_nodelay(true);
        let http = Client::builder(TokioExecutor::new())
            .pool_idle_timeout(Duration::from_secs(30))
            .build(connector);
        Ok(Self {
            http,
            base,
            replicas: Vec::new(),
            api_key,
            opts,
        })
    }

    pub fn base_url(&self) -> &str {
        &self.base
    }

    /// Also sends to `urls`: each model (adapter) always goes to the same server, chosen by a
    /// stable hash of its name, as a gateway with adapter affinity would route. The harness side
    /// of a local scale-out run; the servers themselves route nothing.
    pub fn with_replicas(mut self, urls: &[String]) -> Result<Self, ClientError> {
        if urls.is_empty() {
            return Ok(self);
        }
        let mut bases = vec![self.base.clone()];
        for url in urls {
            bases.push(normalise(url)?);
        }
        self.replicas = bases;
        Ok(self)
    }

    /// The server a request for `model` is sent to.
    pub fn base_for(&self, model: &str) -> &str {
        match self.replicas.len() {
            0 => &self.base,
            n => &self.replicas[(stable_hash(model) % n as u64) as usize],
        }
    }

    pub fn options(&self) -> &RequestOptions {
        &self.opts
    }

    /// The JSON body for a scheduled request addressed to `model`.
    pub fn body(&self, r: &ScheduledRequest, model: &str) -> serde_json::Value {
        let mut body = match self.opts.endpoint {
            Endpoint::Chat => {
                let mut messages = Vec::with_capacity(2);
                if let Some(sys) = &r.system {
                    messages.push(json!({"role": "system", "content": &**sys}));
                }
                messages.push(json!({"role": "user", "content": r.prompt}));
                json!({"model": model, "messages": messages})
            }
            Endpoint::Completions => {
                let prompt = match &r.system {
                    Some(sys) => format!("{sys}\n\nPatient: {}\nDoctor:", r.prompt),
                    None => r.prompt.clone(),
                };
                json!({"model": model, "prompt": prompt})
            }
        };
        body["max_tokens"] = json!(r.max_tokens);
        body["stream"] = json!(true);
        body["stream_options"] = json!({"include_usage": true});
        if self.opts.ignore_eos {
            body["ignore_eos"] = json!(true);
        }
        if let Some(t) = self.opts.temperature {
            body["temperature"] = json!(t);
        }
        body
    }

    /// Sends one request and times it; never fails, a failure is recorded in the outcome. `t0` is the
    /// start of the run.
    pub async fn send(&self, r: &ScheduledRequest, model: &str, t0: Instant) -> RequestOutcome {
        let started = Instant::now();
        let mut rec = Recorder::default();
        let result =
            tokio::time::timeout(self.opts.timeout, self.stream(r, model, started, &mut rec)).await;
        let error = match result {
            Err(_) => Some(ErrorKind::Timeout),
            Ok(Err(kind)) => Some(kind),
            Ok(Ok(())) => None,
        };
        RequestOutcome {
            index: r.index,
            model: model.to_string(),
            adapter_rank: r.adapter_rank,
            scheduled_s: r.send_at_s,
            start_s: started.duration_since(t0).as_secs_f64(),
            ttft_s: rec.ttft_s,
            itl_s: rec.itl_s,
            e2el_s: started.elapsed().as_secs_f64(),
            prompt_tokens: rec.prompt_tokens.or(r.input_len_hint.map(u64::from)),
            output_tokens: rec.completion_tokens.unwrap_or(rec.content_chunks),
            error,
        }
    }

    async fn stream(
        &self,
        r: &ScheduledRequest,
        model: &str,
        started: Instant,
        rec: &mut Recorder,
    ) -> Result<(), ErrorKind> {
        let body = Bytes::from(self.body(r, model).to_string());
        let mut req = Request::builder()
            .method(Method::POST)
            .uri(format!(
                "{}{}",
                self.base_for(model),
                self.opts.endpoint.path()
            ))
            .header("content-type", "application/json")
            .header("accept", "text/event-stream");
        if let Some(key) = &self.api_key {
            req = req.header("authorization", format!("Bearer {key}"));
        }
        let req = req.body(Full::new(body)).map_err(|_| ErrorKind::Protocol)?;
        let resp = self.http.request(req).await.map_err(|e| {
            if e.is_connect() {
                ErrorKind::Connect
            } else {
                ErrorKind::Disconnect
            }
        })?;
        let status = resp.status();
        let mut body = resp.into_body();
        if status != StatusCode::OK {
            // Drain so the connection can be reused; the content does not matter.
            let _ = body.collect().await;
            return Err(ErrorKind::Status(status.as_u16()));
        }
        let mut decoder = SseDecoder::default();
        while let Some(frame) = body.frame().await {
            let frame = frame.map_err(|_| ErrorKind::Disconnect)?;
            let Ok(data) = frame.into_data() else {
                continue;
            };
            let now = started.elapsed().as_secs_f64();
            for ev in decoder.push(&data).map_err(|_| ErrorKind::Protocol)? {
                if rec.apply(ev, now)? {
                    return Ok(());
                }
            }
        }
        let now = started.elapsed().as_secs_f64();
        if let Some(ev) = decoder.finish().map_err(|_| ErrorKind::Protocol)? {
            if rec.apply(ev, now)? {
                return Ok(());
            }
        }
        // No [DONE]: acceptable only if a finish reason was seen (some servers just close).
        if rec.finished {
            Ok(())
        } else {
            Err(ErrorKind::Disconnect)
        }
    }

    /// `GET /v1/models`, following `has_more` / `after` pages to the end.
    pub async fn list_models(&self) -> Result<Vec<ModelEntry>, ClientError> {
        let mut all = Vec::new();
        let mut after: Option<String> = None;
        loop {
            let page = self.models_page(after.as_deref()).await?;
            all.extend(page.data);
            match page.last_id {
                Some(last) if page.has_more && after.as_deref() != Some(&last) => {
                    after = Some(last)
                }
                _ => return Ok(all),
            }
        }
    }

    async fn models_page(&self, after: Option<&str>) -> Result<ModelList, ClientError> {
        let url = match after {
            Some(a) => format!(
                "{}/v1/models?after={}",
                self.base,
                crate::fuzz::percent_encode(a)
            ),
            None => format!("{}/v1/models", self.base),
        };
        let err = |why: String| ClientError::Get {
            url: url.clone(),
            why,
        };
        let mut req = Request::builder().method(Method::GET).uri(&url);
        if let Some(key) = &self.api_key {
            req = req.header("authorization", format!("Bearer {key}"));
        }
        let req = req
            .body(Full::new(Bytes::new()))
            .map_err(|e| err(e.to_string()))?;
        let fut = self.http.request(req);
        let resp = tokio::time::timeout(Duration::from_secs(30), fut)
            .await
            .map_err(|_| err("timed out".into()))?
            .map_err(|e| err(e.to_string()))?;
        let status = resp.status();
        let bytes = resp
            .into_body()
            .collect()
            .await
            .map_err(|e| err(e.to_string()))?
            .to_bytes();
        if status != StatusCode::OK {
            return Err(err(format!("HTTP {status}")));
        }
        serde_json::from_slice(&bytes).map_err(|e| err(e.to_string()))
    }
}

/// Adapters among the listed models: entries with a `parent`, or failing that every id but `base`.
pub fn adapters_from_models(models: &[ModelEntry], base: Option<&str>) -> Vec<String> {
    let with_parent: Vec<String> = models
        .iter()
        .filter(|m| m.parent.is_some())
        .map(|m| m.id.clone())
        .collect();
    let mut ids = if with_parent.is_empty() {
        models
            .iter()
            .filter(|m| Some(m.id.as_str()) != base)
            .map(|m| m.id.clone())
            .collect()
    } else {
        with_parent
    };
    // Server order is not guaranteed; sorting keeps the schedule identical across servers.
    ids.sort();
    ids.dedup();
    ids
}

#[derive(Default)]
struct Recorder {
    ttft_s: Option<f64>,
    last_token_s: f64,
    itl_s: Vec<f64>,
    content_chunks: u64,
    prompt_tokens: Option<u64>,
    completion_tokens: Option<u64>,
    finished: bool,
}

impl Recorder {
    /// Applies one event received `now` seconds after sending; true at `[DONE]`.
    fn apply(&mut self, ev: Event, now: f64) -> Result<bool, ErrorKind> {
        let chunk = match ev {
            Event::Done => return Ok(true),
            Event::Chunk(c) => c,
        };
        if chunk.error.is_some() {
            return Err(ErrorKind::Protocol);
        }
        if chunk.has_content {
            match self.ttft_s {
                None => self.ttft_s = Some(now),
                Some(_) => self.itl_s.push(now - self.last_token_s),
            }
            self.last_token_s = now;
            self.content_chunks += 1;
        }
        self.finished |= chunk.finished;
        if let Some(u) = chunk.usage {
            self.prompt_tokens = u.prompt_tokens.or(self.prompt_tokens);
            self.completion_tokens = u.completion_tokens.or(self.completion_tokens);
        }
        Ok(false)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn adapter_discovery_prefers_parent_then_non_base() {
        let m = |id: &str, parent: Option<&str>| ModelEntry {
            id: id.into(),
            parent: parent.map(Into::into),
        };
        let listed = vec![
            m("base", None),
            m("doc-b", Some("base")),
            m("doc-a", Some("base")),
        ];
        assert_eq!(adapters_from_models(&listed, None), vec!["doc-a", "doc-b"]);
        let flat = vec![m("base", None), m("z", None), m("y", None)];
        assert_eq!(adapters_from_models(&flat, Some("base")), vec!["y", "z"]);
    }

    #[test]
    fn urls_are_normalised_or_rejected() {
        let opts = RequestOptions {
            endpoint: Endpoint::Chat,
            ignore_eos: false,
            temperature: None,
            timeout: Duration::from_secs(1),
        };
        let rt = tokio::runtime::Builder::new_current_thread()
            .build()
            .unwrap();
        let _guard = rt.enter();
        let c = ApiClient::new("http://127.0.0.1:8000/v1/", None, opts.clone()).unwrap();
        assert_eq!(c.base_url(), "http://127.0.0.1:8000");
        assert!(ApiClient::new("https://example.com", None, opts.clone()).is_err());
        assert!(ApiClient::new("127.0.0.1:8000", None, opts.clone()).is_err());
    }

    #[test]
    fn replicas_get_each_model_always_and_all_get_some() {
        let rt = tokio::runtime::Builder::new_current_thread()
            .build()
            .unwrap();
        let _guard = rt.enter();
        let opts = RequestOptions {
            endpoint: Endpoint::Chat,
            ignore_eos: false,
            temperature: None,
            timeout: Duration::from_secs(1),
        };
        let one = ApiClient::new("http://a:1", None, opts.clone()).unwrap();
        assert_eq!(one.base_for("doctor-7"), "http://a:1");
        let replicas = ["http://b:2/v1".to_string(), "http://c:3".to_string()];
        let c = one.with_replicas(&replicas).unwrap();
        let mut per_base = std::collections::HashMap::new();
        for i in 0..60 {
            let model = format!("doctor-{i:04}");
            let base = c.base_for(&model).to_string();
            assert_eq!(c.base_for(&model), base, "one server per adapter");
            *per_base.entry(base).or_insert(0) += 1;
        }
        let mut bases: Vec<_> = per_base.keys().cloned().collect();
        bases.sort();
        assert_eq!(bases, ["http://a:1", "http://b:2", "http://c:3"]);
        assert!(per_base.values().all(|&n| n >= 10), "{per_base:?}");
        let bad = ["b:2".to_string()];
        let c = ApiClient::new("http://a:1", None, opts).unwrap();
        assert!(c.with_replicas(&bad).is_err());
    }
}
