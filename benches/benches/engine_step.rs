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
    Backend, BackendError, EngineCore, EngineRequest, RequestId, RowOutcome, SchedulerConfig,
    SlotSpec,
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

/// An engine with `STREAMS` requests past their prefill, all decoding; with a tokenizer every
/// request detokenizes its output.
fn decoding_engine(tokenizer: Option<Arc<Tokenizer>>) -> EngineCore<NullBackend> {
    let max_tokens = 1 << 20;
    let blocks_per_seq = (PROMPT + 4096).div_ceil(BLOCK);
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
    for i in 0..STREAMS {
        // Ids inside the smallest vocabulary the bench may detokenize with (SmolLM2's 49,152).
        let prompt = (0..PROMPT as u32)
            .map(|t| 3 + (i as u32 * 7919 + t) % 40_000)
            .collect();
        let mut req = EngineRequest::new(prompt, max_tokens);
        req.detokenize = detokenize;
        let (out, rx) = tokio::sync::mpsc::unbounded_channel();
        std::mem::forget(rx); // the stream stays open, unread (outputs queue)
        engine.add_request(RequestId(i as u64), req, out).unwrap();
    }
    // Prefill (free here) until every request decodes.
    while engine.step().unwrap().num_scheduled_tokens > STREAMS {}
    engine
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
            let mut engine = decoding_engine(tokenizer.clone());
            b.iter_custom(|iters| {
                let start = Instant::now();
                for _ in 0..iters {
                    let s = engine.step().unwrap();
                    assert_eq!(s.num_scheduled_reqs, STREAMS);
                }
                start.elapsed()
            })
        });
    }
    g.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);
