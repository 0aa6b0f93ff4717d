//! KV-cache events over ZeroMQ from a real engine serving two adapters: a subscriber decodes
//! every message with its own msgpack reading of vLLM's format, rebuilds the cache and must
//! find the block pool's own view; sequence numbers have no gaps, and the replay socket returns
//! what the subscriber missed before it joined.

use std::collections::HashMap;
use std::time::Duration;

use caduceus_runtime::engine::{CpuBackend, EngineCore, EngineRequest, RequestId, SchedulerConfig};
use caduceus_runtime::kv_events::{KvEventPublisher, KvEventSettings};
use caduceus_runtime::model::loader::LoadedModel;
use caduceus_runtime::model::{LlamaModel, LoraDtype};
use rmpv::Value;
use zeromq::{DealerSocket, Socket, SocketRecv, SocketSend, SubSocket, ZmqMessage};

use super::support;

const TOPIC: &str = "kv@10.0.0.7:8000@tiny";
const BLOCK_SIZE: usize = 4;

/// Cache content as a subscriber sees it: hash -> (tokens, lora id, lora name).
type Mirror = HashMap<u64, (Vec<u32>, Option<u64>, Option<String>)>;

fn u64_of(v: &Value) -> u64 {
    match v {
        Value::Integer(i) => i.as_u64().expect("unsigned hash"),
        Value::Binary(b) => {
            let tail: [u8; 8] = b[b.len() - 8..].try_into().unwrap();
            u64::from_be_bytes(tail)
        }
        other => panic!("not a hash: {other}"),
    }
}

/// Applies one msgpack payload `[ts, [events], dp_rank]`; returns the number of removals.
fn apply(mirror: &mut Mirror, payload: &[u8], names: &mut HashMap<u64, String>) -> usize {
    let value = rmpv::decode::read_value(&mut &payload[..]).unwrap();
    let top = value.as_array().unwrap();
    assert!(top[0].as_f64().unwrap() > 1.6e9, "unix timestamp");
    assert_eq!(top[2].as_u64(), Some(0), "dp_rank");
    let mut removed = 0;
    for event in top[1].as_array().unwrap() {
        let e = event.as_array().unwrap();
        match e[0].as_str().unwrap() {
            "BlockStored" => {
                let hashes: Vec<u64> = e[1].as_array().unwrap().iter().map(u64_of).collect();
                let tokens: Vec<u32> = e[3]
                    .as_array()
                    .unwrap()
                    .iter()
                    .map(|t| t.as_u64().unwrap() as u32)
                    .collect();
                let block_size = e[4].as_u64().unwrap() as usize;
                assert_eq!(block_size, BLOCK_SIZE);
                assert_eq!(tokens.len(), hashes.len() * block_size, "llm-d's check");
                let lora_id = e[5].as_u64();
                assert_eq!(e[6].as_str(), Some("CPU"));
                let lora_name = e[7].as_str().map(str::to_owned);
                assert_eq!(lora_id.is_some(), lora_name.is_some());
                if let (Some(id), Some(name)) = (lora_id, &lora_name) {
                    let known = names.entry(id).or_insert_with(|| name.clone());
                    assert_eq!(known, name, "one name per lora id");
                }
                for (h, t) in hashes.iter().zip(tokens.chunks(block_size)) {
                    let old = mirror.insert(*h, (t.to_vec(), lora_id, lora_name.clone()));
                    assert!(old.is_none(), "block {h:x} announced twice");
                }
            }
            "BlockRemoved" => {
                for h in e[1].as_array().unwrap().iter().map(u64_of) {
                    assert!(mirror.remove(&h).is_some(), "unknown block {h:x} removed");
                    removed += 1;
                }
            }
            "AllBlocksCleared" => mirror.clear(),
            other => panic!("unknown event {other}"),
        }
    }
    removed
}

/// The engine's own view, keyed and labelled as on the wire.
fn pool_view(core: &EngineCore<CpuBackend<&LlamaModel>>, names: &HashMap<u64, String>) -> Mirror {
    let pool = core.scheduler().kv_cache_manager().block_pool();
    (0..pool.num_blocks() as u32)
        .filter_map(|b| pool.cached_key(caduceus_scheduler::BlockId(b)))
        .map(|k| {
            let id = k.extra.adapter.map(|a| u64::from(a.id));
            let name = id.and_then(|i| names.get(&i).cloned());
            (k.hash.0 as u64, (k.tokens.to_vec(), id, name))
        })
        .collect()
}

fn run_to_idle(core: &mut EngineCore<CpuBackend<&LlamaModel>>) {
    for _ in 0..2000 {
        if !core.has_unfinished() {
            return;
        }
        if core.step().unwrap().num_scheduled_reqs == 0 {
            core.wait_for_adapter_load(Duration::from_millis(200));
        }
    }
    panic!("engine not idle");
}

/// Queues a request; the returned stream must stay alive (dropping it aborts the request).
fn submit(
    core: &mut EngineCore<CpuBackend<&LlamaModel>>,
    id: u64,
    adapter: Option<&str>,
) -> Stream {
    let prompt: Vec<u32> = (0..18 + id as u32 % 7).map(|i| (i * 5 + 3) % 250).collect();
    let mut req = EngineRequest::new(prompt, 6);
    req.ignore_eos = true;
    req.detokenize = false;
    req.adapter = adapter.map(Into::into);
    let (out, rx) = tokio::sync::mpsc::unbounded_channel();
    core.add_request(RequestId(id), req, out).unwrap();
    rx
}

type Stream = tokio::sync::mpsc::UnboundedReceiver<caduceus_runtime::engine::RequestOutput>;

/// Messages `(seq, payload)` of a replay from `start`, until the end marker.
async fn replay(endpoint: &str, start: u64) -> Vec<(u64, Vec<u8>)> {
    let mut dealer = DealerSocket::new();
    dealer.connect(endpoint).await.unwrap();
    let request = vec![bytes::Bytes::new(), start.to_be_bytes().to_vec().into()];
    dealer
        .send(ZmqMessage::try_from(request).unwrap())
        .await
        .unwrap();
    let mut got = Vec::new();
    loop {
        let frames = tokio::time::timeout(Duration::from_secs(10), dealer.recv())
            .await
            .expect("replay answer")
            .unwrap()
            .into_vec();
        assert_eq!(frames.len(), 3, "empty delimiter, seq, payload");
        assert!(frames[0].is_empty());
        let seq = u64::from_be_bytes(frames[1][..].try_into().unwrap());
        if seq == u64::MAX {
            assert!(frames[2].is_empty(), "the end marker has no payload");
            return got;
        }
        got.push((seq, frames[2].to_vec()));
    }
}

#[test]
fn kv_events_over_zeromq_rebuild_the_cache_of_a_mixed_adapter_workload() {
    let dir = support::shared("reference/tiny-llama");
    let loaded = LoadedModel::load(&dir.join("model")).unwrap();
    let model = &loaded.model;
    let service = super::service(model, &dir.join("adapters"), 2, LoraDtype::F32);
    let publisher = KvEventPublisher::start(KvEventSettings {
        endpoint: "tcp://127.0.0.1:0".into(),
        replay_endpoint: Some("tcp://127.0.0.1:0".into()),
        topic: TOPIC.into(),
        medium: "CPU",
        replay_buffer: 10_000,
    })
    .unwrap();
    let config = SchedulerConfig {
        max_num_seqs: 8,
        max_num_batched_tokens: 64,
        block_size: BLOCK_SIZE,
        num_blocks: 40, // small: later requests evict earlier cached blocks
        max_model_len: 64,
        ..SchedulerConfig::default()
    };
    let mut core = EngineCore::new(model, None, vec![], config)
        .unwrap()
        .with_adapters(service)
        .unwrap()
        .with_kv_events(publisher.sink());
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();

    // Part one before anyone listens: only the replay can return it.
    let adapters = [None, Some("doctor-a"), Some("doctor-b")];
    let mut streams = Vec::new();
    for id in 0..3 {
        streams.push(submit(&mut core, id, adapters[id as usize % 3]));
    }
    run_to_idle(&mut core);
    let mut sub = SubSocket::new();
    rt.block_on(async {
        sub.connect(publisher.endpoint()).await.unwrap();
        sub.subscribe("kv@").await.unwrap();
        // Let the subscription reach the publisher (a late subscription only moves where the
        // live stream starts; the replay below covers the rest).
        tokio::time::sleep(Duration::from_millis(300)).await;
    });
    for id in 3..14 {
        streams.push(submit(&mut core, id, adapters[id as usize % 3]));
        if id % 4 == 0 {
            run_to_idle(&mut core);
        }
    }
    run_to_idle(&mut core);
    for mut s in streams {
        let mut last = None;
        while let Ok(o) = s.try_recv() {
            last = o.finished;
        }
        assert_eq!(
            last.map(|f| f.num_output_tokens),
            Some(6),
            "every request ran"
        );
    }
    let replay_endpoint = publisher.replay_endpoint().unwrap().to_owned();
    let all = rt.block_on(replay(&replay_endpoint, 0));
    let seqs: Vec<u64> = all.iter().map(|(s, _)| *s).collect();
    assert_eq!(
        seqs,
        (0..all.len() as u64).collect::<Vec<_>>(),
        "no gaps from 0"
    );
    let last = *seqs.last().unwrap();
    // The live stream: consecutive from where the subscriber joined, the same bytes as kept.
    let live = rt.block_on(async {
        let mut live = Vec::new();
        loop {
            let Ok(frames) = tokio::time::timeout(Duration::from_secs(10), sub.recv()).await else {
                panic!(
                    "live stream stopped after {:?} (last {last})",
                    live.iter().map(|(s, _)| *s).collect::<Vec<_>>()
                );
            };
            let frames = frames.unwrap().into_vec();
            assert_eq!(frames.len(), 3, "topic, seq, payload");
            assert_eq!(&frames[0][..], TOPIC.as_bytes());
            let seq = u64::from_be_bytes(frames[1][..].try_into().unwrap());
            live.push((seq, frames[2].to_vec()));
            if seq == last {
                return live;
            }
        }
    });
    let first_live = live[0].0;
    assert!(
        first_live > 0,
        "part one was published before the subscriber joined"
    );
    for (i, (seq, payload)) in live.iter().enumerate() {
        assert_eq!(*seq, first_live + i as u64, "gap in the live stream");
        assert_eq!(payload, &all[*seq as usize].1);
    }
    // What the subscriber missed, asked for as llm-d does after a gap.
    let missed = rt.block_on(replay(&replay_endpoint, 0));
    assert_eq!(&missed[..first_live as usize], &all[..first_live as usize]);
    let tail = rt.block_on(replay(&replay_endpoint, first_live));
    assert_eq!(tail, live);

    let mut mirror = Mirror::new();
    let mut names = HashMap::new();
    let first = rmpv::decode::read_value(&mut &all[0].1[..]).unwrap();
    assert_eq!(
        first[1][0][0].as_str(),
        Some("AllBlocksCleared"),
        "a (re)started replica starts from an empty cache"
    );
    let mut removed = 0;
    for (_, payload) in &all {
        removed += apply(&mut mirror, payload, &mut names);
    }
    assert!(removed > 0, "the workload must evict");
    let mut labels: Vec<&String> = names.values().collect();
    labels.sort();
    assert_eq!(labels, ["doctor-a", "doctor-b"]);
    assert_eq!(mirror, pool_view(&core, &names));
    // Same tokens under the base model and both adapters: three distinct cached blocks.
    let first_block: Vec<u32> = (0..BLOCK_SIZE as u32).map(|i| (i * 5 + 3) % 250).collect();
    let owners = mirror
        .values()
        .filter(|(t, _, _)| *t == first_block)
        .count();
    assert_eq!(
        owners, 3,
        "base, doctor-a and doctor-b each hold the first block"
    );
}
