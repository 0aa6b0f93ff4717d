//! The publisher thread: a ZeroMQ PUB socket sending each step's events as one message
//! (`topic`, 8-byte big-endian sequence number, msgpack payload), and an optional ROUTER socket
//! replaying the recent messages from a sequence number, for subscribers that saw a gap or
//! joined late. Its own single-threaded tokio runtime keeps the sockets off the engine thread;
//! the engine only pushes plain data into a channel.

use std::collections::{HashMap, VecDeque};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;

use bytes::Bytes;
use caduceus_scheduler::KvCacheEvent;
use tokio::sync::mpsc;
use zeromq::{PubSocket, RouterSocket, Socket, SocketRecv, SocketSend, ZmqMessage};

use super::wire::{encode_batch, WireEvent, REPLAY_END_SEQ};

/// Messages kept for replay (vLLM keeps 10,000 steps' worth too).
pub const DEFAULT_REPLAY_BUFFER: usize = 10_000;

/// Where and how to publish.
#[derive(Clone, Debug)]
pub struct KvEventSettings {
    /// PUB endpoint, `tcp://HOST:PORT` (`*` = every interface; port 0 = any free port).
    pub endpoint: String,
    /// ROUTER endpoint for replays; `None` = no replay socket.
    pub replay_endpoint: Option<String>,
    /// First frame of every message (`kv@<pod>@<model>` for llm-d).
    pub topic: String,
    /// Where the blocks live: `GPU` or `CPU`.
    pub medium: &'static str,
    /// Messages kept for replay.
    pub replay_buffer: usize,
}

/// Why the publisher could not start.
#[derive(Debug, thiserror::Error)]
pub enum KvEventsError {
    /// A socket could not be bound.
    #[error("binding the KV-event socket {endpoint} (kv_events.{key}): {message}")]
    Bind {
        key: &'static str,
        endpoint: String,
        message: String,
    },
    /// The thread or its runtime could not start.
    #[error("starting the KV-event publisher thread: {0}")]
    Thread(#[from] std::io::Error),
}

/// One step's events, stamped when the engine handed them over.
struct Batch {
    ts: f64,
    events: Vec<WireEvent>,
}

/// The engine's end: resolves adapter names and queues each step's events for the publisher.
#[derive(Clone, Debug)]
pub struct KvEventSink {
    tx: mpsc::UnboundedSender<Batch>,
    names: HashMap<u32, Arc<str>>,
}

impl KvEventSink {
    /// Remembers the name of adapter `id` for the `lora_name` of its events.
    pub fn note_adapter(&mut self, id: u32, name: &Arc<str>) {
        self.names.entry(id).or_insert_with(|| name.clone());
    }

    /// Queues one step's events (dropped silently once the publisher has stopped).
    pub fn publish(&self, events: Vec<KvCacheEvent>) {
        if events.is_empty() {
            return;
        }
        let ts = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0.0, |d| d.as_secs_f64());
        let events = events
            .into_iter()
            .map(|event| {
                let lora_name = match &event {
                    KvCacheEvent::BlockStored {
                        adapter: Some(a), ..
                    } => self.names.get(&a.id).cloned(),
                    _ => None,
                };
                WireEvent { event, lora_name }
            })
            .collect();
        let _ = self.tx.send(Batch { ts, events });
    }
}

/// A running publisher. The thread stops once this and every [`KvEventSink`] are dropped.
pub struct KvEventPublisher {
    sink: KvEventSink,
    endpoint: String,
    replay_endpoint: Option<String>,
    _thread: JoinHandle<()>,
}

impl KvEventPublisher {
    /// Binds the sockets (errors name the config key) and starts the thread.
    pub fn start(settings: KvEventSettings) -> Result<KvEventPublisher, KvEventsError> {
        let (tx, rx) = mpsc::unbounded_channel();
        let (ready_tx, ready_rx) = std::sync::mpsc::channel();
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()?;
        let thread = std::thread::Builder::new()
            .name("caduceus-kv-events".into())
            .spawn(move || runtime.block_on(run(settings, rx, ready_tx)))?;
        let bound = ready_rx.recv().map_err(|_| {
            KvEventsError::Thread(std::io::Error::other("the publisher thread stopped"))
        })??;
        Ok(KvEventPublisher {
            sink: KvEventSink {
                tx,
                names: HashMap::new(),
            },
            endpoint: bound.0,
            replay_endpoint: bound.1,
            _thread: thread,
        })
    }

    /// A sink for the engine.
    pub fn sink(&self) -> KvEventSink {
        self.sink.clone()
    }

    /// The PUB socket's bound address (with the real port when 0 was asked).
    pub fn endpoint(&self) -> &str {
        &self.endpoint
    }

    /// The ROUTER socket's bound address, if replay is on.
    pub fn replay_endpoint(&self) -> Option<&str> {
        self.replay_endpoint.as_deref()
    }
}

/// `tcp://*:P` means every interface; the socket library wants an address.
fn bind_address(endpoint: &str) -> String {
    endpoint.replacen("tcp://*:", "tcp://0.0.0.0:", 1)
}

type Bound = (String, Option<String>);
type Replay = Arc<Mutex<VecDeque<(u64, Bytes)>>>;

async fn bind<S: Socket>(
    socket: &mut S,
    key: &'static str,
    endpoint: &str,
) -> Result<String, KvEventsError> {
    socket
        .bind(&bind_address(endpoint))
        .await
        .map(|e| e.to_string())
        .map_err(|e| KvEventsError::Bind {
            key,
            endpoint: endpoint.to_owned(),
            message: e.to_string(),
        })
}

async fn run(
    settings: KvEventSettings,
    mut rx: mpsc::UnboundedReceiver<Batch>,
    ready: std::sync::mpsc::Sender<Result<Bound, KvEventsError>>,
) {
    let mut publisher = PubSocket::new();
    let endpoint = match bind(&mut publisher, "endpoint", &settings.endpoint).await {
        Ok(e) => e,
        Err(e) => {
            let _ = ready.send(Err(e));
            return;
        }
    };
    let replay: Replay = Arc::default();
    let mut replay_endpoint = None;
    if let Some(r) = &settings.replay_endpoint {
        let mut router = RouterSocket::new();
        match bind(&mut router, "replay_endpoint", r).await {
            Ok(e) => replay_endpoint = Some(e),
            Err(e) => {
                let _ = ready.send(Err(e));
                return;
            }
        }
        tokio::spawn(serve_replay(router, replay.clone()));
    }
    tracing::info!(%endpoint, replay = ?replay_endpoint, topic = %settings.topic, "publishing KV-cache events");
    if ready.send(Ok((endpoint, replay_endpoint))).is_err() {
        return;
    }
    let topic = Bytes::from(settings.topic.clone().into_bytes());
    let mut seq: u64 = 0;
    while let Some(batch) = rx.recv().await {
        let payload = Bytes::from(encode_batch(batch.ts, &batch.events, settings.medium, 0));
        {
            let mut buffer = replay.lock().unwrap_or_else(|e| e.into_inner());
            if buffer.len() >= settings.replay_buffer.max(1) {
                buffer.pop_front();
            }
            buffer.push_back((seq, payload.clone()));
        }
        let frames = vec![topic.clone(), seq_frame(seq), payload];
        if let Ok(message) = ZmqMessage::try_from(frames) {
            if let Err(e) = publisher.send(message).await {
                tracing::debug!(error = %e, seq, "KV-event message not sent");
            }
        }
        seq += 1;
    }
}

fn seq_frame(seq: u64) -> Bytes {
    Bytes::copy_from_slice(&seq.to_be_bytes())
}

/// Answers `[identity, "", start_seq]` with `["", seq, payload]` for each kept message from
/// `start_seq` on, then `["", -1, ""]`.
async fn serve_replay(mut router: RouterSocket, replay: Replay) {
    loop {
        let frames = match router.recv().await {
            Ok(m) => m.into_vec(),
            Err(e) => {
                tracing::debug!(error = %e, "KV-event replay request not read");
                continue;
            }
        };
        let (Some(identity), Some(start)) = (frames.first(), frames.last()) else {
            continue;
        };
        let Ok(start) = <[u8; 8]>::try_from(&start[..]) else {
            tracing::debug!("KV-event replay request without an 8-byte sequence number");
            continue;
        };
        let start = u64::from_be_bytes(start);
        let kept: Vec<(u64, Bytes)> = replay
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .iter()
            .filter(|(seq, _)| *seq >= start)
            .cloned()
            .collect();
        let end = (REPLAY_END_SEQ, Bytes::new());
        for (seq, payload) in kept.into_iter().chain([end]) {
            let frames = vec![identity.clone(), Bytes::new(), seq_frame(seq), payload];
            let Ok(message) = ZmqMessage::try_from(frames) else {
                continue;
            };
            if let Err(e) = router.send(message).await {
                tracing::debug!(error = %e, "KV-event replay answer not sent");
                break;
            }
        }
    }
}
