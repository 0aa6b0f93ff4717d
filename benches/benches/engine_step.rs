//! Host cost of one engine step around the device: `EngineCore::step` with 256 requests decoding
//! (1,024-token prompts, as the engine load) on a backend whose forward and sampling cost
//! nothing, so what is timed is what the GPU engine's device waits for between steps:
//! scheduling, batch preparation (positions, slot mapping, block tables), per-row sampling
//! settings, output processing and streaming. A decode step of the 8B model at batch 256 takes
//! ~17 ms on an H200; this must stay a small fraction of it. `decode_256x1k` streams token ids
//! (what the GPU bench's engine does); `decode_256x1k_text` also detokenizes every new token
//! incrementally, as the server's requests do, with the default model's tokenizer (skipped, with a
//! message, when `models/` lacks it: `scripts/fetch-default-model`).
//!
//! `cargo bench -p caduceus-benches --bench engine_step`

use caduceus_kernels::lora::Segment;
use caduceus_runtime::adapters::LoadedAdapter;
use caduceus_runtime::engine::{
    Backend, BackendError, EngineCore, EngineRequest, RequestId, RequestOutput, RowOutcome,
    SchedulerConfig, SlotSpec,
};
use caduceus_runtime::model::config::{LlamaConfig, WeightSource};
use caduceus_runtime::model::gguf::GgufFile;
use caduceus_runtime::model::ForwardBatch;
use caduceus_runtime::model::DEFAULT_MODEL_PATH;
use caduceus_runtime::sampling::{RowSample, SampledToken};
use caduceus_runtime::tokenizer::{GgufTokenizerSpec, Tokenizer};
use criterion::{criterion_group, criterion_main, Criterion, Throughput};
use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

const STREAMS: usize = 256;
const PROMPT: usize = 1024;
const BLOCK: usize = 16;
/// Decode steps an engine runs before the bench builds a fresh one (untimed): its KV pool holds
/// `PROMPT + GROWTH` tokens a request, so no request is ever preempted, and the contexts stay
/// within 1k to 3k tokens.
const GROWTH: usize = 2048;

/// A device that computes nothing: every row samples a token that never stops a request.
struct NullBackend {
    config: LlamaConfig,
    num_blocks: usize,
    step: u32,
}

impl Backend for NullBackend {
    fn config(&self) -> &LlamaConfig {
        &self.config
    }
    fn num_kv_blocks(&self) -> usize {
        self.num_blocks
    }
    fn block_size(&self) -> usize {
        BLOCK
    }
    fn describe(&self) -> String {
        "null".into()
    }
    fn init_adapter_slots(&mut self, _spec: SlotSpec) -> Result<usize, BackendError> {
        Ok(0)
    }
    fn load_adapter(&mut self, _slot: u32, _a: &LoadedAdapter) -> Result<(), BackendError> {
        Ok(())
    }
    fn forward(
        &mut self,
        _batch: &ForwardBatch<'_>,
        _lora: &[Segment],
    ) -> Result<(), BackendError> {
        Ok(())
    }
    fn sample(&mut self, rows: &[RowSample]) -> Result<Vec<RowOutcome>, BackendError> {
        self.step = self.step.wrapping_add(1);
        Ok((0..rows.len())
            .map(|i| {
                Ok(SampledToken {
                    token_id: 1000 + (self.step * 7 + i as u32 * 13) % 20_000,
                    logprob: None,
                    top_logprobs: Vec::new(),
                })
            })
            .collect())
    }
}

fn config() -> LlamaConfig {
    LlamaConfig {
        architecture: "llama".into(),
        vocab_size: 128_256,
        hidden_size: 4096,
        intermediate_size: 14_336,
        num_layers: 32,
        num_heads: 32,
        num_kv_heads: 8,
        head_dim: 128,
        rms_norm_eps: 1e-5,
        rope_theta: 500_000.0,
        rope_scaling: None,
        max_position_embeddings: 8192,
        tie_word_embeddings: false,
        attention_bias: false,
        rope_neox: true,
        source: WeightSource::HuggingFace,
    }
}

/// The default model's tokenizer, if its file is here.
fn default_tokenizer() -> Option<Arc<Tokenizer>> {
    let path = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("..")
        .join(DEFAULT_MODEL_PATH);
    let file = GgufFile::open(&path).ok()?;
    let spec = GgufTokenizerSpec::from_gguf(&file).ok()?;
    Tokenizer::from_gguf_spec(&spec).ok().map(Arc::new)
}

/// Each request's output stream, which the bench empties between steps (untimed), as the
/// server's connections do on other threads.
type Streams = Vec<tokio::sync::mpsc::UnboundedReceiver<RequestOutput>>;

/// An engine with `STREAMS` requests past their prefill, all decoding, and their streams; with a
/// tokenizer every request detokenizes its output.
fn decoding_engine(tokenizer: Option<Arc<Tokenizer>>) -> (EngineCore<NullBackend>, Streams) {
    // Never reached: the bench replaces the engine after GROWTH steps, and the requests first
    // decode while the last prompts prefill (32 steps of 8,192 tokens).
    let max_tokens = GROWTH + PROMPT;
    let blocks_per_seq = (PROMPT + max_tokens).div_ceil(BLOCK);
    let backend = NullBackend {
        config: config(),
        num_blocks: STREAMS * blocks_per_seq + 1,
        step: 0,
    };
    let sched = SchedulerConfig {
        max_num_seqs: STREAMS,
        max_num_batched_tokens: 8192,
        max_model_len: PROMPT + max_tokens,
        ..SchedulerConfig::default()
    };
    let detokenize = tokenizer.is_some();
    let mut engine = EngineCore::with_backend(backend, tokenizer, vec![2], sched).unwrap();
    let mut streams = Vec::with_capacity(STREAMS);
    for i in 0..STREAMS {
        // Ids inside the smallest vocabulary the bench may detokenize with (SmolLM2's 49,152).
        let prompt = (0..PROMPT as u32)
            .map(|t| 3 + (i as u32 * 7919 + t) % 40_000)
            .collect();
        let mut req = EngineRequest::new(prompt, max_tokens);
        req.detokenize = detokenize;
        let (out, rx) = tokio::sync::mpsc::unbounded_channel();
        engine.add_request(RequestId(i as u64), req, out).unwrap();
        streams.push(rx);
    }
    // Prefill (free here) until every request decodes.
    while engine.step().unwrap().num_scheduled_tokens > STREAMS {}
    (engine, streams)
}

fn bench(c: &mut Criterion) {
    let mut g = c.benchmark_group("engine_step");
    g.throughput(Throughput::Elements(STREAMS as u64));
    g.measurement_time(Duration::from_secs(5));
    let tokenizer = default_tokenizer();
    if tokenizer.is_none() {
        eprintln!("engine_step: no {DEFAULT_MODEL_PATH}: decode_256x1k_text skipped");
    }
    let runs = [("decode_256x1k", None)]
        .into_iter()
        .chain(tokenizer.map(|t| ("decode_256x1k_text", Some(t))));
    for (name, tokenizer) in runs {
        g.bench_function(name, |b| {
            let (mut engine, mut streams) = decoding_engine(tokenizer.clone());
            let mut steps = 0;
            b.iter_custom(|iters| {
                let mut took = Duration::ZERO;
                for _ in 0..iters {
                    if steps == GROWTH {
                        (engine, streams) = decoding_engine(tokenizer.clone());
                        steps = 0;
                    }
                    let start = Instant::now();
                    let s = engine.step().unwrap();
                    took += start.elapsed();
                    steps += 1;
                    assert_eq!(s.num_scheduled_reqs, STREAMS);
                    for rx in &mut streams {
                        while rx.try_recv().is_ok() {}
                    }
                }
                took
            })
        });
    }
    g.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);
