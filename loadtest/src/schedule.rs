//! The whole load, built up front from the seed: for every request its send time, target model or
//! adapter, system prompt, prompt and `max_tokens`. Its xxh3 hash is printed and stored in the report, so
//! two runs (or two servers) that print the same hash saw identical load.
//!
//! Each ingredient draws from its own ChaCha stream, so changing the rate changes only the send times (a
//! sweep replays the same prompts at every rate) and a longer run extends a shorter one.

use crate::arrival::{ArrivalProcess, Horizon, Rate};
use crate::dataset::Dataset;
use crate::lengths::LengthDist;
use crate::patients;
use crate::popularity::AdapterDist;
use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;
use std::collections::HashMap;
use std::sync::Arc;
use xxhash_rust::xxh3::Xxh3;

#[derive(Debug, thiserror::Error)]
pub enum ScheduleError {
    #[error("an infinite rate needs --num-requests (a duration gives no request count)")]
    InfiniteRateNeedsCount,
    #[error("the adapter list is empty")]
    NoAdapters,
    #[error("the schedule is empty (duration too short for the rate?)")]
    Empty,
}

/// Who the requests are addressed to (the `model` field of each request).
#[derive(Debug, Clone, PartialEq)]
pub enum Targets {
    Model(String),
    /// Adapter ids, most popular first, and how requests spread over them.
    Adapters {
        ids: Vec<String>,
        dist: AdapterDist,
    },
}

/// Open loop (send at scheduled times) or closed loop (C clients, each sending when its last reply ends).
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Pacing {
    Open(ArrivalProcess),
    Closed { concurrency: usize },
}

#[derive(Debug, Clone)]
pub struct ScheduleSpec {
    pub seed: u64,
    pub horizon: Horizon,
    /// Closed loop with a time horizon has no natural count; this many requests are prepared.
    pub closed_loop_cap: usize,
    pub pacing: Pacing,
    pub targets: Targets,
    pub dataset: Dataset,
    pub output_len: LengthDist,
    /// Request options that change the load (endpoint, ignore_eos, temperature), folded into the hash.
    pub request_key: String,
}

#[derive(Debug, Clone, PartialEq)]
pub struct ScheduledRequest {
    pub index: usize,
    /// Seconds from the start of the run (0 in closed loop).
    pub send_at_s: f64,
    pub model: String,
    /// Popularity rank of the adapter (0 = most popular); `None` for the base model.
    pub adapter_rank: Option<usize>,
    pub system: Option<Arc<str>>,
    pub prompt: String,
    pub max_tokens: u32,
    /// Intended prompt tokens (random dataset only).
    pub input_len_hint: Option<u32>,
}

#[derive(Debug, Clone)]
pub struct Schedule {
    pub requests: Vec<ScheduledRequest>,
    pub hash: u64,
    pub num_adapters: usize,
}

impl Schedule {
    pub fn hash_hex(&self) -> String {
        format!("{:016x}", self.hash)
    }
}

const STREAM_ARRIVALS: u64 = 1;
const STREAM_ADAPTERS: u64 = 2;
const STREAM_PROMPTS: u64 = 3;
const STREAM_OUTPUT_LEN: u64 = 4;

fn stream(seed: u64, id: u64) -> ChaCha8Rng {
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    rng.set_stream(id);
    rng
}

pub fn build(spec: &ScheduleSpec) -> Result<Schedule, ScheduleError> {
    let send_times = match (spec.pacing, spec.horizon) {
        (Pacing::Open(p), Horizon::Seconds(_)) if p.rate == Rate::Infinite => {
            return Err(ScheduleError::InfiniteRateNeedsCount)
        }
        (Pacing::Open(p), h) => p.send_times(h, &mut stream(spec.seed, STREAM_ARRIVALS)),
        (Pacing::Closed { .. }, Horizon::Count(n)) => vec![0.0; n],
        (Pacing::Closed { .. }, Horizon::Seconds(_)) => vec![0.0; spec.closed_loop_cap],
    };
    if send_times.is_empty() {
        return Err(ScheduleError::Empty);
    }
    let (base_model, ids, sampler) = match &spec.targets {
        Targets::Model(m) => (m.as_str(), &[][..], None),
        Targets::Adapters { ids, dist } => {
            if ids.is_empty() {
                return Err(ScheduleError::NoAdapters);
            }
            ("", &ids[..], Some(dist.sampler(ids.len())))
        }
    };
    let mut adapter_rng = stream(spec.seed, STREAM_ADAPTERS);
    let mut prompt_rng = stream(spec.seed, STREAM_PROMPTS);
    let mut len_rng = stream(spec.seed, STREAM_OUTPUT_LEN);
    let mut system_cache: HashMap<String, Arc<str>> = HashMap::new();
    let patients = matches!(spec.dataset, Dataset::Patients);

    let mut requests = Vec::with_capacity(send_times.len());
    for (index, send_at_s) in send_times.into_iter().enumerate() {
        let (model, adapter_rank) = match &sampler {
            Some(s) => {
                let k = s.sample(&mut adapter_rng);
                (ids[k].clone(), Some(k))
            }
            None => (base_model.to_string(), None),
        };
        let draw = spec.dataset.draw(&mut prompt_rng);
        let sampled_len = spec.output_len.sample(&mut len_rng);
        let system = match draw.system {
            Some(s) => Some(Arc::from(s)),
            None if patients => Some(
                system_cache
                    .entry(model.clone())
                    .or_insert_with(|| match adapter_rank {
                        Some(_) => Arc::from(patients::doctor_system_prompt(&model)),
                        None => Arc::from(patients::base_system_prompt()),
                    })
                    .clone(),
            ),
            None => None,
        };
        requests.push(ScheduledRequest {
            index,
            send_at_s,
            model,
            adapter_rank,
            system,
            prompt: draw.prompt,
            max_tokens: draw.max_tokens.unwrap_or(sampled_len),
            input_len_hint: draw.input_len_hint,
        });
    }
    let hash = hash_requests(&spec.request_key, &requests);
    Ok(Schedule {
        requests,
        hash,
        num_adapters: ids.len(),
    })
}

/// The schedule's fingerprint: every field that reaches the wire or the clock, send times at microsecond
/// resolution.
pub fn hash_requests(request_key: &str, requests: &[ScheduledRequest]) -> u64 {
    let mut h = Xxh3::new();
    h.update(request_key.as_bytes());
    h.update(&[0]);
    for r in requests {
        h.update(&(r.index as u64).to_le_bytes());
        h.update(&((r.send_at_s * 1e6).round() as i64).to_le_bytes());
        h.update(r.model.as_bytes());
        h.update(&[0]);
        h.update(r.system.as_deref().unwrap_or("").as_bytes());
        h.update(&[0]);
        h.update(r.prompt.as_bytes());
        h.update(&[0]);
        h.update(&r.max_tokens.to_le_bytes());
    }
    h.digest()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec(seed: u64, rate: f64) -> ScheduleSpec {
        ScheduleSpec {
            seed,
            horizon: Horizon::Count(300),
            closed_loop_cap: 0,
            pacing: Pacing::Open(ArrivalProcess::new(Rate::Finite(rate), 1.0, 0.0).unwrap()),
            targets: Targets::Adapters {
                ids: (0..20).map(|i| format!("doctor-{i:03}")).collect(),
                dist: AdapterDist::Slora(2.0),
            },
            dataset: Dataset::Patients,
            output_len: LengthDist::Uniform { lo: 16, hi: 64 },
            request_key: "chat".into(),
        }
    }

    #[test]
    fn same_seed_same_schedule_and_hash() {
        let (a, b) = (
            build(&spec(42, 10.0)).unwrap(),
            build(&spec(42, 10.0)).unwrap(),
        );
        assert_eq!(a.requests, b.requests);
        assert_eq!(a.hash, b.hash);
        assert_eq!(a.hash, hash_requests("chat", &a.requests));
        assert_ne!(a.hash, build(&spec(43, 10.0)).unwrap().hash);
        let mut other_key = spec(42, 10.0);
        other_key.request_key = "completions".into();
        assert_ne!(a.hash, build(&other_key).unwrap().hash);
    }

    #[test]
    fn the_rate_changes_only_send_times() {
        let (a, b) = (
            build(&spec(7, 10.0)).unwrap(),
            build(&spec(7, 20.0)).unwrap(),
        );
        assert_ne!(a.hash, b.hash);
        for (x, y) in a.requests.iter().zip(&b.requests) {
            assert_eq!(
                (&x.model, &x.prompt, x.max_tokens),
                (&y.model, &y.prompt, y.max_tokens)
            );
            // Same Gamma draws, half the mean gap.
            assert!((x.send_at_s - 2.0 * y.send_at_s).abs() < 1e-9);
        }
    }

    #[test]
    fn doctors_get_their_own_shared_system_prompt() {
        let s = build(&spec(1, 10.0)).unwrap();
        assert_eq!(s.num_adapters, 20);
        for r in &s.requests {
            let rank = r.adapter_rank.unwrap();
            assert_eq!(r.model, format!("doctor-{rank:03}"));
            assert_eq!(
                r.system.as_deref().unwrap(),
                patients::doctor_system_prompt(&r.model)
            );
            assert!((16..=64).contains(&r.max_tokens));
        }
        // The power law favours low ranks.
        let head = s
            .requests
            .iter()
            .filter(|r| r.adapter_rank < Some(4))
            .count();
        assert!(head > s.requests.len() / 3, "{head}");
    }

    #[test]
    fn closed_loop_and_invalid_combinations() {
        let mut sp = spec(1, 10.0);
        sp.pacing = Pacing::Closed { concurrency: 4 };
        sp.horizon = Horizon::Seconds(10.0);
        sp.closed_loop_cap = 50;
        let s = build(&sp).unwrap();
        assert_eq!(s.requests.len(), 50);
        assert!(s.requests.iter().all(|r| r.send_at_s == 0.0));

        sp.pacing = Pacing::Open(ArrivalProcess::new(Rate::Infinite, 1.0, 0.0).unwrap());
        assert!(matches!(
            build(&sp),
            Err(ScheduleError::InfiniteRateNeedsCount)
        ));
        sp.targets = Targets::Adapters {
            ids: vec![],
            dist: AdapterDist::Uniform,
        };
        sp.horizon = Horizon::Count(3);
        assert!(matches!(build(&sp), Err(ScheduleError::NoAdapters)));
    }

    /// Pins the generators (ChaCha streams, Gamma sampler, templates): if this changes, schedules from
    /// older builds are no longer comparable, which release notes must say.
    #[test]
    fn golden_hash() {
        assert_eq!(
            build(&spec(42, 10.0)).unwrap().hash_hex(),
            "52e575e9f8a4f523"
        );
    }

    #[test]
    fn base_model_requests() {
        let mut sp = spec(1, 10.0);
        sp.targets = Targets::Model("smollm2".into());
        let s = build(&sp).unwrap();
        assert!(s
            .requests
            .iter()
            .all(|r| r.model == "smollm2" && r.adapter_rank.is_none()));
        assert_eq!(s.num_adapters, 0);
    }
}
