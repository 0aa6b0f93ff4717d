//! Behaviour of the token sampler against independent reference computations.

use caduceus_runtime::sampling::penalties::{
    apply_frequency_presence_penalties, apply_repetition_penalty,
};
use caduceus_runtime::sampling::{Sampler, SamplingError, SamplingParams};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha20Rng;

fn random_logits(seed: u64, vocab: usize) -> Vec<f32> {
    let mut rng = ChaCha20Rng::seed_from_u64(seed);
    (0..vocab).map(|_| rng.random_range(-8.0f32..8.0)).collect()
}

fn softmax_f64(logits: &[f64]) -> Vec<f64> {
    let max = logits.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
    let exps: Vec<f64> = logits.iter().map(|l| (l - max).exp()).collect();
    let sum: f64 = exps.iter().sum();
    exps.iter().map(|e| e / sum).collect()
}

fn log_softmax_f64(logits: &[f32]) -> Vec<f64> {
    let max = logits
        .iter()
        .map(|&l| l as f64)
        .fold(f64::NEG_INFINITY, f64::max);
    let lse = max
        + logits
            .iter()
            .map(|&l| (l as f64 - max).exp())
            .sum::<f64>()
            .ln();
    logits.iter().map(|&l| l as f64 - lse).collect()
}

/// Token frequencies over `n` draws with the same logits.
fn histogram(params: SamplingParams, logits: &[f32], n: usize) -> Vec<usize> {
    let mut sampler = Sampler::new(params);
    let mut counts = vec![0usize; logits.len()];
    for _ in 0..n {
        counts[sampler.sample(logits, &[], &[]).token_id as usize] += 1;
    }
    counts
}

/// Pearson chi-square of `counts` against `probs`; tokens with zero probability must never occur.
fn chi_square(counts: &[usize], probs: &[f64]) -> f64 {
    let n: usize = counts.iter().sum();
    let mut chi = 0.0;
    for (i, (&c, &p)) in counts.iter().zip(probs).enumerate() {
        if p == 0.0 {
            assert_eq!(c, 0, "token {i} has probability 0 but was drawn {c} times");
        } else {
            let e = p * n as f64;
            chi += (c as f64 - e).powi(2) / e;
        }
    }
    chi
}

/// Generous bound for a chi-square with `df` degrees of freedom (p-value far below 1e-4).
fn chi_bound(df: usize) -> f64 {
    5.0 * df as f64 + 20.0
}

fn seeded(seed: u64) -> SamplingParams {
    SamplingParams {
        seed: Some(seed),
        ..Default::default()
    }
}

#[test]
fn greedy_is_argmax_with_ties_to_lowest_id() {
    let mut s = Sampler::new(SamplingParams::greedy());
    assert_eq!(s.sample(&[1.0, 5.0, 5.0, 2.0], &[], &[]).token_id, 1);
    assert_eq!(s.sample(&[f32::NAN, -1.0, -1.0], &[], &[]).token_id, 1);
    for seed in 0..20 {
        let logits = random_logits(seed, 500);
        let expected = (0..logits.len())
            .max_by(|&a, &b| logits[a].total_cmp(&logits[b]).then(b.cmp(&a)))
            .unwrap();
        assert_eq!(s.sample(&logits, &[], &[]).token_id as usize, expected);
    }
}

#[test]
fn all_masked_row_falls_back_to_raw_argmax() {
    // NaN counts as -inf: with nothing left to sample, the raw argmax (here token 0) is returned.
    let mut s = Sampler::new(seeded(3));
    let row = [f32::NEG_INFINITY, f32::NAN, f32::NEG_INFINITY];
    assert_eq!(s.sample(&row, &[], &[]).token_id, 0);
}

#[test]
fn same_seed_same_sequence_different_seed_differs() {
    let logits = random_logits(11, 64)
        .iter()
        .map(|l| l / 4.0)
        .collect::<Vec<_>>();
    let run = |seed| {
        let mut s = Sampler::new(SamplingParams {
            top_p: 0.95,
            ..seeded(seed)
        });
        (0..200)
            .map(|_| s.sample(&logits, &[], &[]).token_id)
            .collect::<Vec<u32>>()
    };
    let a = run(42);
    assert_eq!(a, run(42));
    assert_ne!(a, run(43));
}

#[test]
fn batch_neighbours_do_not_change_a_request() {
    let row_a = random_logits(1, 300);
    let row_b = random_logits(2, 300);
    let mut alone = Sampler::new(seeded(9));
    let solo: Vec<u32> = (0..50)
        .map(|_| alone.sample(&row_a, &[], &[]).token_id)
        .collect();
    let mut a = Sampler::new(seeded(9));
    let mut b = Sampler::new(seeded(10));
    let mut interleaved = Vec::new();
    for _ in 0..50 {
        b.sample(&row_b, &[], &[]);
        interleaved.push(a.sample(&row_a, &[], &[]).token_id);
        b.sample(&row_b, &[], &[]);
    }
    assert_eq!(solo, interleaved);
}

const SMALL: [f32; 6] = [1.0, 2.0, 0.5, -1.0, 3.0, 0.0];

#[test]
fn temperature_one_matches_softmax() {
    let counts = histogram(seeded(7), &SMALL, 20_000);
    let probs = softmax_f64(&SMALL.map(|l| l as f64));
    let chi = chi_square(&counts, &probs);
    assert!(chi < chi_bound(5), "chi-square {chi}, counts {counts:?}");
}

#[test]
fn temperature_half_matches_sharpened_softmax() {
    let params = SamplingParams {
        temperature: 0.5,
        ..seeded(8)
    };
    let counts = histogram(params, &SMALL, 20_000);
    let probs = softmax_f64(&SMALL.map(|l| l as f64 / 0.5));
    let chi = chi_square(&counts, &probs);
    assert!(chi < chi_bound(5), "chi-square {chi}, counts {counts:?}");
    // And it is distinguishable from temperature 1.
    let flat = softmax_f64(&SMALL.map(|l| l as f64));
    assert!(chi_square(&counts, &flat) > 10.0 * chi_bound(5));
}

#[test]
fn top_k_two_only_yields_the_two_best() {
    let params = SamplingParams {
        top_k: Some(2),
        ..seeded(9)
    };
    let counts = histogram(params, &SMALL, 5_000);
    // Best two are ids 4 (3.0) and 1 (2.0), renormalised.
    let mut probs = vec![0.0; SMALL.len()];
    let z = (3.0f64).exp() + (2.0f64).exp();
    probs[4] = (3.0f64).exp() / z;
    probs[1] = (2.0f64).exp() / z;
    let chi = chi_square(&counts, &probs);
    assert!(chi < chi_bound(1), "chi-square {chi}, counts {counts:?}");
}

#[test]
fn top_k_on_large_vocab_stays_within_the_k_best() {
    let logits = random_logits(5, 49_152);
    let mut order: Vec<usize> = (0..logits.len()).collect();
    order.sort_by(|&a, &b| logits[b].total_cmp(&logits[a]));
    let allowed: std::collections::HashSet<usize> = order[..40].iter().copied().collect();
    let mut s = Sampler::new(SamplingParams {
        top_k: Some(40),
        top_p: 0.9,
        ..seeded(5)
    });
    for _ in 0..64 {
        assert!(allowed.contains(&(s.sample(&logits, &[], &[]).token_id as usize)));
    }
}

/// Smallest set of most likely tokens whose mass reaches `p`, as a 0/1 mask.
fn nucleus(probs: &[f64], p: f64) -> Vec<bool> {
    let mut order: Vec<usize> = (0..probs.len()).collect();
    order.sort_by(|&a, &b| probs[b].total_cmp(&probs[a]));
    let mut keep = vec![false; probs.len()];
    let mut acc = 0.0;
    for i in order {
        keep[i] = true;
        acc += probs[i];
        if acc >= p {
            break;
        }
    }
    keep
}

#[test]
fn top_p_yields_exactly_the_smallest_nucleus() {
    // Probabilities 0.35, 0.05, 0.3, 0.2, 0.1: the 0.6 nucleus is {0, 2} (0.35 + 0.3 = 0.65).
    let probs_in = [0.35f64, 0.05, 0.3, 0.2, 0.1];
    let logits: Vec<f32> = probs_in.iter().map(|p| p.ln() as f32).collect();
    let probs = softmax_f64(&logits.iter().map(|&l| l as f64).collect::<Vec<_>>());
    let keep = nucleus(&probs, 0.6);
    assert_eq!(keep, vec![true, false, true, false, false]);
    let params = SamplingParams {
        top_p: 0.6,
        ..seeded(10)
    };
    let counts = histogram(params, &logits, 5_000);
    let kept_mass: f64 = (0..5).filter(|&i| keep[i]).map(|i| probs[i]).sum();
    let expected: Vec<f64> = (0..5)
        .map(|i| if keep[i] { probs[i] / kept_mass } else { 0.0 })
        .collect();
    let chi = chi_square(&counts, &expected);
    assert!(chi < chi_bound(1), "chi-square {chi}, counts {counts:?}");
    assert!(counts[0] > 0 && counts[2] > 0);
}

#[test]
fn min_p_keeps_exactly_tokens_above_the_relative_threshold() {
    let logits = [0.5f32, 2.0, -0.3, 1.2, 0.9, -2.0, 1.9];
    let probs = softmax_f64(&logits.map(|l| l as f64));
    let p_max = probs.iter().cloned().fold(0.0, f64::max);
    let min_p = 0.4;
    let keep: Vec<bool> = probs.iter().map(|&p| p >= min_p * p_max).collect();
    assert!(keep.iter().filter(|&&k| k).count() >= 3 && keep.iter().any(|&k| !k));
    let params = SamplingParams {
        min_p: min_p as f32,
        ..seeded(12)
    };
    let counts = histogram(params, &logits, 10_000);
    let kept_mass: f64 = (0..logits.len())
        .filter(|&i| keep[i])
        .map(|i| probs[i])
        .sum();
    let expected: Vec<f64> = (0..logits.len())
        .map(|i| if keep[i] { probs[i] / kept_mass } else { 0.0 })
        .collect();
    let df = keep.iter().filter(|&&k| k).count() - 1;
    let chi = chi_square(&counts, &expected);
    assert!(chi < chi_bound(df), "chi-square {chi}, counts {counts:?}");
}

#[test]
fn repetition_penalty_matches_hand_computed_example() {
    let mut logits = vec![2.0f32, -1.0, 0.5, 3.0, -0.5];
    let mut scratch = Vec::new();
    // Token 0 in the prompt, 1 and 0 generated, 4 twice in the prompt; 2 and 3 untouched.
    apply_repetition_penalty(&mut logits, &[0, 4, 4], &[1, 0], 1.25, &mut scratch);
    assert_eq!(logits, vec![1.6, -1.25, 0.5, 3.0, -0.625]);

    // Through the sampler: the penalty turns the argmax from 0 to 1, for a positive logit ...
    let mut s = Sampler::new(SamplingParams {
        repetition_penalty: 2.0,
        ..SamplingParams::greedy()
    });
    assert_eq!(s.sample(&[3.0, 2.0, -1.0], &[0], &[]).token_id, 1);
    // ... and pushes a negative logit further down (-0.5 * 2 < -0.8).
    assert_eq!(s.sample(&[-0.5, -0.8], &[], &[0]).token_id, 1);
}

#[test]
fn presence_and_frequency_follow_the_openai_formula() {
    let vocab = 50;
    let mut rng = ChaCha20Rng::seed_from_u64(77);
    let output: Vec<u32> = (0..40).map(|_| rng.random_range(0..vocab as u32)).collect();
    let (freq, presence) = (0.7f32, -0.4f32);
    let raw = random_logits(78, vocab);
    let mut got = raw.clone();
    apply_frequency_presence_penalties(&mut got, &output, freq, presence, &mut Vec::new());
    for (id, (&l, &g)) in raw.iter().zip(&got).enumerate() {
        let count = output.iter().filter(|&&t| t as usize == id).count() as f32;
        let expected = l - count * freq - if count > 0.0 { presence } else { 0.0 };
        assert!((g - expected).abs() < 1e-5, "token {id}: {g} vs {expected}");
    }
}

#[test]
fn sampler_applies_repetition_then_frequency_presence() {
    let params = SamplingParams {
        repetition_penalty: 1.5,
        frequency_penalty: 0.6,
        presence_penalty: 0.3,
        ..SamplingParams::greedy()
    };
    let mut s = Sampler::new(params.clone());
    let vocab = 30;
    for seed in 0..40 {
        let raw: Vec<f32> = random_logits(seed, vocab).iter().map(|l| l / 3.0).collect();
        let mut rng = ChaCha20Rng::seed_from_u64(1000 + seed);
        let prompt: Vec<u32> = (0..10).map(|_| rng.random_range(0..vocab as u32)).collect();
        let output: Vec<u32> = (0..10).map(|_| rng.random_range(0..vocab as u32)).collect();
        let penalised: Vec<f64> = (0..vocab)
            .map(|id| {
                let mut l = raw[id] as f64;
                let seen = prompt.contains(&(id as u32)) || output.contains(&(id as u32));
                if seen {
                    let r = params.repetition_penalty as f64;
                    l = if l > 0.0 { l / r } else { l * r };
                }
                let count = output.iter().filter(|&&t| t as usize == id).count() as f64;
                l - count * params.frequency_penalty as f64
                    - if count > 0.0 {
                        params.presence_penalty as f64
                    } else {
                        0.0
                    }
            })
            .collect();
        let expected = (0..vocab)
            .max_by(|&a, &b| penalised[a].total_cmp(&penalised[b]).then(b.cmp(&a)))
            .unwrap();
        assert_eq!(s.sample(&raw, &prompt, &output).token_id as usize, expected);
    }
}

#[test]
fn logprobs_are_raw_log_softmax_even_when_sampling_is_modified() {
    let logits = random_logits(21, 1000);
    let reference = log_softmax_f64(&logits);
    let mut order: Vec<usize> = (0..logits.len()).collect();
    order.sort_by(|&a, &b| reference[b].total_cmp(&reference[a]).then(a.cmp(&b)));
    for params in [
        SamplingParams {
            logprobs: Some(5),
            ..seeded(1)
        },
        SamplingParams {
            logprobs: Some(20),
            temperature: 0.3,
            top_k: Some(3),
            repetition_penalty: 1.8,
            frequency_penalty: 1.0,
            presence_penalty: 1.0,
            ..seeded(2)
        },
        SamplingParams {
            logprobs: Some(0),
            ..SamplingParams::greedy()
        },
    ] {
        let n = params.logprobs.unwrap();
        let mut s = Sampler::new(params);
        for _ in 0..10 {
            let t = s.sample(&logits, &[order[0] as u32], &[order[1] as u32]);
            let lp = t.logprob.expect("logprob requested");
            assert!((lp as f64 - reference[t.token_id as usize]).abs() < 1e-5);
            assert_eq!(t.top_logprobs.len(), n);
            for (rank, &(id, lp)) in t.top_logprobs.iter().enumerate() {
                assert_eq!(id as usize, order[rank]);
                assert!((lp as f64 - reference[id as usize]).abs() < 1e-5);
            }
            assert!(t.top_logprobs.windows(2).all(|w| w[0].1 >= w[1].1));
        }
    }
    let mut plain = Sampler::new(seeded(3));
    let t = plain.sample(&logits, &[], &[]);
    assert_eq!((t.logprob, t.top_logprobs.len()), (None, 0));
}

#[test]
fn logit_bias_shifts_the_draw_the_argmax_and_the_logprobs_alike() {
    let logits = random_logits(33, 40);
    let argmax = |row: &[f32]| {
        (0..row.len())
            .max_by(|&a, &b| row[a].total_cmp(&row[b]))
            .unwrap()
    };
    let top = argmax(&logits) as u32;
    // The favourite banned, a mid token lifted, one nudged down.
    let bias = vec![(top, -100.0), (7, 2.5), (11, -1.0)];
    let mut biased = logits.clone();
    for &(t, b) in &bias {
        biased[t as usize] += b;
    }
    let with_bias = |p: SamplingParams| SamplingParams {
        logit_bias: bias.clone(),
        ..p
    };
    let probs = softmax_f64(&biased.iter().map(|&l| l as f64).collect::<Vec<_>>());
    let n = 20_000;
    let counts = histogram(with_bias(seeded(5)), &logits, n);
    assert_eq!(counts[top as usize], 0, "a -100 bias was drawn");
    let chi = chi_square(&counts, &probs);
    assert!(chi < chi_bound(logits.len() - 1), "chi-square {chi}");
    let mut greedy = Sampler::new(with_bias(SamplingParams {
        logprobs: Some(3),
        ..SamplingParams::greedy()
    }));
    let t = greedy.sample(&logits, &[], &[]);
    assert_eq!(t.token_id as usize, argmax(&biased));
    let reference = log_softmax_f64(&biased);
    let lp = t.logprob.unwrap() as f64;
    assert!((lp - reference[t.token_id as usize]).abs() < 1e-5, "{lp}");
    // Without the bias the same sampler settings pick the raw favourite.
    let mut plain = Sampler::new(SamplingParams::greedy());
    assert_eq!(plain.sample(&logits, &[], &[]).token_id, top);
}

#[test]
fn validate_names_each_out_of_range_field() {
    let base = SamplingParams::default();
    let cases: Vec<(&str, SamplingParams)> = vec![
        (
            "temperature",
            SamplingParams {
                temperature: -0.1,
                ..base.clone()
            },
        ),
        (
            "temperature",
            SamplingParams {
                temperature: 2.5,
                ..base.clone()
            },
        ),
        (
            "temperature",
            SamplingParams {
                temperature: f32::INFINITY,
                ..base.clone()
            },
        ),
        (
            "top_p",
            SamplingParams {
                top_p: 0.0,
                ..base.clone()
            },
        ),
        (
            "top_p",
            SamplingParams {
                top_p: 1.01,
                ..base.clone()
            },
        ),
        (
            "min_p",
            SamplingParams {
                min_p: -0.01,
                ..base.clone()
            },
        ),
        (
            "min_p",
            SamplingParams {
                min_p: 1.5,
                ..base.clone()
            },
        ),
        (
            "presence_penalty",
            SamplingParams {
                presence_penalty: 2.01,
                ..base.clone()
            },
        ),
        (
            "presence_penalty",
            SamplingParams {
                presence_penalty: -3.0,
                ..base.clone()
            },
        ),
        (
            "frequency_penalty",
            SamplingParams {
                frequency_penalty: -2.5,
                ..base.clone()
            },
        ),
        (
            "frequency_penalty",
            SamplingParams {
                frequency_penalty: f32::NAN,
                ..base.clone()
            },
        ),
        (
            "repetition_penalty",
            SamplingParams {
                repetition_penalty: 0.0,
                ..base.clone()
            },
        ),
        (
            "repetition_penalty",
            SamplingParams {
                repetition_penalty: 2.1,
                ..base.clone()
            },
        ),
        (
            "logprobs",
            SamplingParams {
                logprobs: Some(21),
                ..base.clone()
            },
        ),
    ];
    for (field, params) in cases {
        match params.validate() {
            Err(err @ SamplingError::OutOfRange { field: f, .. }) => {
                assert_eq!(f, field);
                let msg = err.to_string();
                assert!(msg.contains(field), "{msg}");
            }
            Ok(()) => panic!("{field} accepted in {params:?}"),
        }
    }
    // Boundaries that are allowed.
    let ok = SamplingParams {
        temperature: 2.0,
        top_k: Some(0),
        top_p: 1.0,
        min_p: 1.0,
        presence_penalty: -2.0,
        frequency_penalty: 2.0,
        repetition_penalty: 2.0,
        seed: Some(0),
        logprobs: Some(20),
        logit_bias: vec![(0, -100.0), (1, 100.0)],
        allowed_token_ids: vec![0, 1],
        bad_words: vec![vec![3], vec![4, 5]],
    };
    assert_eq!(ok.validate(), Ok(()));
    let err = SamplingParams { top_p: 1.5, ..base }
        .validate()
        .unwrap_err();
    assert_eq!(
        err,
        SamplingError::OutOfRange {
            field: "top_p",
            value: "1.5".into(),
            allowed: "(0, 1]"
        }
    );
}
