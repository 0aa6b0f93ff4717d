//! The sampling kernel (`cuda/sampling.cu`) against its CPU twin, `caduceus_kernels::sampling`,
//! on every device (see gpu_support): random rows of vocabularies that are not a multiple of the
//! block (1000, 49152 + 7), every option alone and combined, penalties, NaN/-inf/+inf rows, ties.
//!
//! Exactness: every token must equal the reference's. The kernel computes each weight by the
//! reference's own unfused f32 operations (its exp is the reference's polynomial, not `expf`),
//! and masses are exact fixed-point integers, so neither the device nor the summation order can
//! move a boundary.

mod gpu_support;
/// Allowed-token masks (structured outputs).
mod sampling_allowed;
/// Draws on the edges between tokens' shares of the mass.
mod sampling_edges;

use caduceus_kernels::gpu::sampling::{self, AllowedTokens, LogprobOutputs, SampleArgs, SampleRow};
use caduceus_kernels::gpu::Device;
use caduceus_kernels::sampling::{
    choose_token, penalty_entries, top_logprobs, LogSoftmax, Penalties, PenaltyEntry, RowSampling,
    SampleScratch, Truncation, MAX_LOGPROBS,
};
use gpu_support::*;
use rand::Rng;

/// One row to sample.
#[derive(Clone)]
struct Case {
    s: RowSampling,
    u: f64,
    entries: Vec<PenaltyEntry>,
    logprobs: Option<usize>,
    /// Allowed-token bitset (bit t % 32 of word t / 32 = token t allowed), or no mask.
    allowed: Option<Vec<u32>>,
}

/// The row as the sampler sees it: disallowed tokens at -inf (unchanged without a mask).
fn masked_row(row: &[f32], c: &Case) -> Vec<f32> {
    let Some(bits) = &c.allowed else {
        return row.to_vec();
    };
    let allowed = |t: usize| bits[t / 32] >> (t % 32) & 1 == 1;
    row.iter()
        .enumerate()
        .map(|(t, &l)| if allowed(t) { l } else { f32::NEG_INFINITY })
        .collect()
}

struct GpuOut {
    id: u32,
    logprob: f32,
    top: Vec<(u32, f32)>,
}

fn run(dev: &Device, logits: &[f32], vocab: usize, cases: &[Case], threads: u32) -> Vec<GpuOut> {
    let mut all_entries = Vec::new();
    let rows: Vec<SampleRow> = cases
        .iter()
        .map(|c| {
            let start = all_entries.len() as u32;
            all_entries.extend_from_slice(&c.entries);
            let row = SampleRow::new(&c.s, c.u, start, c.entries.len() as u32, c.logprobs);
            if c.allowed.is_some() {
                row.with_allowed_tokens()
            } else {
                row
            }
        })
        .collect();
    let n = cases.len();
    // Rows without a mask get all-zero words: the kernel must not read them.
    let words = sampling::allowed_words(vocab);
    let bits: Vec<u32> = cases
        .iter()
        .flat_map(|c| c.allowed.clone().unwrap_or_else(|| vec![0; words]))
        .collect();
    let masked = cases.iter().any(|c| c.allowed.is_some()).then(|| {
        let b = dev.upload(&bits).unwrap();
        (b, dev.alloc_zeroed(n * vocab * 4).unwrap())
    });
    let d_logits = dev.upload(logits).unwrap();
    // The launcher copies nothing: the rows go up with the other inputs.
    let rows_buf = dev.upload(&rows).unwrap();
    let entries = (!all_entries.is_empty()).then(|| dev.upload(&all_entries).unwrap());
    let work = entries
        .as_ref()
        .map(|_| dev.alloc_zeroed(n * vocab * 4).unwrap());
    let out_ids = dev.alloc_zeroed(n * 4).unwrap();
    let lp = dev.alloc_zeroed(n * 4).unwrap();
    let top_ids = dev.alloc_zeroed(n * MAX_LOGPROBS * 4).unwrap();
    let top_lp = dev.alloc_zeroed(n * MAX_LOGPROBS * 4).unwrap();
    let nonfinite = dev.alloc_zeroed(n * 4).unwrap();
    let args = SampleArgs {
        logits: &d_logits,
        rows: &rows,
        rows_buf: &rows_buf,
        penalties: entries.as_ref(),
        work: work.as_ref(),
        out_ids: &out_ids,
        out_logprobs: Some(LogprobOutputs {
            logprob: &lp,
            top_ids: &top_ids,
            top_logprobs: &top_lp,
        }),
        allowed: masked
            .as_ref()
            .map(|(bits, masked)| AllowedTokens { bits, masked }),
        out_nonfinite: Some(&nonfinite),
        vocab,
        threads,
    };
    sampling::sample(dev, &args).unwrap();
    let ids: Vec<u32> = dev.download(&out_ids).unwrap();
    // The flag the engine fails a request on: any NaN or infinity in the raw row, mask or not
    // (the CPU backend's test on the same row).
    let flags: Vec<u32> = dev.download(&nonfinite).unwrap();
    for (r, row) in logits.chunks_exact(vocab).take(n).enumerate() {
        let want = row.iter().any(|l| !l.is_finite());
        assert_eq!(flags[r], u32::from(want), "row {r}: non-finite flag");
    }
    let lps: Vec<f32> = dev.download(&lp).unwrap();
    let tids: Vec<u32> = dev.download(&top_ids).unwrap();
    let tlps: Vec<f32> = dev.download(&top_lp).unwrap();
    (0..n)
        .map(|r| {
            let want = cases[r]
                .logprobs
                .map_or(0, |k| k.min(MAX_LOGPROBS).min(vocab));
            let top = (0..want)
                .map(|i| (tids[r * MAX_LOGPROBS + i], tlps[r * MAX_LOGPROBS + i]))
                .collect();
            GpuOut {
                id: ids[r],
                logprob: lps[r],
                top,
            }
        })
        .collect()
}

/// Runs `cases` (row r of `logits` for case r) on every device and compares with the reference.
fn check(what: &str, logits: &[f32], vocab: usize, cases: &[Case], threads: u32) {
    let mut scratch = SampleScratch::default();
    for dev in devices() {
        let got = run(&dev, logits, vocab, cases, threads);
        for (r, (c, g)) in cases.iter().zip(&got).enumerate() {
            let row = &masked_row(&logits[r * vocab..(r + 1) * vocab], c);
            let want = choose_token(row, &c.entries, &c.s, c.u, &mut scratch);
            let tag = format!("{what}: {} row {r} ({:?}, u {})", dev.describe(), c.s, c.u);
            assert_eq!(g.id, want, "{tag}");
            let Some(n) = c.logprobs else { continue };
            let norm = LogSoftmax::new(row);
            close(&tag, g.logprob, norm.logprob(row[g.id as usize]));
            let want_top = top_logprobs(row, n.min(MAX_LOGPROBS), &norm);
            let ids: Vec<u32> = g.top.iter().map(|t| t.0).collect();
            let want_ids: Vec<u32> = want_top.iter().map(|t| t.0).collect();
            assert_eq!(ids, want_ids, "{tag}: top ids");
            for (&(_, a), &(_, b)) in g.top.iter().zip(&want_top) {
                close(&tag, a, b);
            }
        }
    }
}

/// f32 kernel against the f64 reference: 2e-5 absolute (the normaliser of up to 50k terms).
fn close(what: &str, got: f32, want: f32) {
    let ok = if want.is_finite() {
        (got - want).abs() <= 2e-5 + 2e-6 * want.abs()
    } else {
        got == want
    };
    assert!(ok, "{what}: logprob {got}, want {want}");
}

fn draw_case(t: Truncation, u: f64) -> Case {
    Case {
        s: RowSampling {
            penalties: Penalties::default(),
            truncation: Some(t),
        },
        u,
        entries: Vec::new(),
        logprobs: None,
        allowed: None,
    }
}

fn truncation(temperature: f32, top_k: u32, top_p: f32, min_p: f32) -> Truncation {
    Truncation {
        temperature,
        top_k,
        top_p,
        min_p,
    }
}

fn greedy() -> Case {
    Case {
        s: RowSampling {
            penalties: Penalties::default(),
            truncation: None,
        },
        u: 0.0,
        entries: Vec::new(),
        logprobs: None,
        allowed: None,
    }
}

/// `rows` random rows of `vocab` logits in [-scale, scale).
fn rows(seed: u64, rows: usize, vocab: usize, scale: f32) -> Vec<f32> {
    random(&mut rng(seed), rows * vocab, scale)
}

/// Every option alone and a few combinations, each with several uniforms.
fn option_cases(seed: u64) -> Vec<Case> {
    let mut r = rng(seed);
    let mut cases = vec![greedy()];
    let configs = [
        truncation(1.0, 0, 1.0, 0.0),
        truncation(0.6, 0, 1.0, 0.0),
        truncation(1.0, 1, 1.0, 0.0),
        truncation(1.0, 7, 1.0, 0.0),
        truncation(1.3, 50, 1.0, 0.0),
        truncation(1.0, 0, 0.5, 0.0),
        truncation(0.8, 0, 0.9, 0.0),
        truncation(1.0, 0, 1.0, 0.2),
        truncation(0.7, 40, 0.9, 0.05),
        truncation(1.5, 0, 0.3, 0.5),
    ];
    for t in configs {
        for _ in 0..2 {
            cases.push(draw_case(t, r.random()));
        }
    }
    cases
}

#[test]
fn every_option_matches_the_cpu_sampler_on_a_1000_token_vocab() {
    let vocab = 1000;
    let cases = option_cases(1);
    // Scale 6: a few dozen tokens hold most of the mass, as with a real model.
    let logits = rows(2, cases.len(), vocab, 6.0);
    check("options", &logits, vocab, &cases, 0);
}

#[test]
fn large_vocab_rows_with_penalties_and_logprobs_match() {
    let vocab = 49152 + 7;
    let mut r = rng(3);
    let prompt: Vec<u32> = (0..300).map(|_| r.random_range(0..vocab as u32)).collect();
    let output: Vec<u32> = (0..60).map(|_| r.random_range(0..60u32)).collect();
    let mut entries = Vec::new();
    penalty_entries(&prompt, &output, vocab, true, &mut Vec::new(), &mut entries);
    let penalties = Penalties {
        repetition: 1.3,
        frequency: 0.4,
        presence: 0.25,
    };
    let with = |mut c: Case, lp| {
        c.s.penalties = penalties;
        c.entries = entries.clone();
        c.logprobs = lp;
        c
    };
    let cases = vec![
        with(greedy(), Some(20)),
        with(draw_case(truncation(0.9, 40, 0.95, 0.0), 0.37), Some(5)),
        with(draw_case(truncation(1.0, 0, 0.8, 0.02), 0.91), None),
        draw_case(truncation(1.0, 0, 1.0, 0.0), 0.55),
    ];
    let mut logits = rows(4, cases.len(), vocab, 8.0);
    // Make the penalties decide: the first 60 ids (the generated ones) lead every row.
    for row in logits.chunks_mut(vocab) {
        for l in &mut row[..60] {
            *l += 10.0;
        }
    }
    check("large vocab", &logits, vocab, &cases, 0);
}

#[test]
fn penalties_match_for_every_combination() {
    let vocab = 1000;
    let mut r = rng(5);
    let mut cases = Vec::new();
    for (rep, freq, pres) in [
        (1.5, 0.0, 0.0),
        (1.0, 0.7, 0.0),
        (1.0, 0.0, -0.6),
        (0.8, -0.5, 1.2),
    ] {
        let prompt: Vec<u32> = (0..40).map(|_| r.random_range(0..vocab as u32)).collect();
        let output: Vec<u32> = (0..30).map(|_| r.random_range(0..50u32)).collect();
        let mut entries = Vec::new();
        let penalties = Penalties {
            repetition: rep,
            frequency: freq,
            presence: pres,
        };
        penalty_entries(
            &prompt,
            &output,
            vocab,
            rep != 1.0,
            &mut Vec::new(),
            &mut entries,
        );
        for t in [None, Some(truncation(0.5, 0, 1.0, 0.0))] {
            cases.push(Case {
                s: RowSampling {
                    penalties,
                    truncation: t,
                },
                u: r.random(),
                entries: entries.clone(),
                logprobs: Some(3),
                allowed: None,
            });
        }
    }
    let mut logits = rows(6, cases.len(), vocab, 3.0);
    for row in logits.chunks_mut(vocab) {
        for l in &mut row[..50] {
            *l += 4.0;
        }
    }
    check("penalties", &logits, vocab, &cases, 0);
}

#[test]
fn nan_and_infinite_rows_follow_the_cpu_rules() {
    let vocab = 1000;
    let (inf, nan) = (f32::INFINITY, f32::NAN);
    let mut specials: Vec<Vec<f32>> = Vec::new();
    // All masked: the raw argmax fallback, token 0.
    specials.push(vec![f32::NEG_INFINITY; vocab]);
    specials.push(
        (0..vocab)
            .map(|i| if i % 2 == 0 { nan } else { f32::NEG_INFINITY })
            .collect(),
    );
    // +inf logits share the mass; NaN counts as -inf.
    let mut row = rows(7, 1, vocab, 4.0);
    for i in [3, 500, 999] {
        row[i] = inf;
    }
    for i in (0..vocab).step_by(7) {
        row[i] = nan;
    }
    specials.push(row);
    // One finite token among -inf.
    let mut row = vec![f32::NEG_INFINITY; vocab];
    row[777] = -3.0;
    specials.push(row);
    let configs = [
        None,
        Some(truncation(1.0, 0, 1.0, 0.0)),
        Some(truncation(0.5, 2, 0.6, 0.1)),
    ];
    let mut logits = Vec::new();
    let mut cases = Vec::new();
    for (i, row) in specials.iter().enumerate() {
        for (j, t) in configs.iter().enumerate() {
            logits.extend_from_slice(row);
            let mut c = greedy();
            c.s.truncation = *t;
            c.u = ((i * 3 + j) as f64 * 0.29) % 1.0;
            c.logprobs = Some(4);
            cases.push(c);
        }
    }
    check("special rows", &logits, vocab, &cases, 0);
}

#[test]
fn ties_keep_the_lowest_ids_in_top_k_top_p_and_the_top_logprobs() {
    let vocab = 1000;
    // Flat rows: top-k keeps ids 0..k, the 5% nucleus ids 0..50, so the draw is floor(u * kept),
    // an independent check of the reference as well as of the kernel.
    let mut cases = Vec::new();
    let mut expect = Vec::new();
    for (k, p, u) in [
        (10, 1.0, 0.55),
        (0, 0.05, 0.73),
        (300, 0.1, 0.999),
        (0, 1.0, 0.3),
    ] {
        let mut c = draw_case(truncation(1.0, k, p, 0.0), u);
        c.logprobs = Some(20);
        let kept = if p < 1.0 {
            (p as f64 * if k > 0 { k as f64 } else { vocab as f64 }).ceil()
        } else if k > 0 {
            k as f64
        } else {
            vocab as f64
        };
        expect.push((u * kept) as u32);
        cases.push(c);
    }
    // Two-level ties: 30 tokens at 2.0 spread over the row, the rest at 1.0, with top_k = 12.
    let mut tied = vec![1.0f32; vocab];
    for i in 0..30 {
        tied[i * 33 + 5] = 2.0;
    }
    let mut logits = vec![0.0f32; cases.len() * vocab];
    let mut c = draw_case(truncation(1.0, 12, 1.0, 0.0), 0.99);
    c.logprobs = Some(20);
    cases.push(c);
    expect.push(11 * 33 + 5);
    logits.extend_from_slice(&tied);
    let mut scratch = SampleScratch::default();
    for (r, c) in cases.iter().enumerate() {
        let row = &logits[r * vocab..(r + 1) * vocab];
        assert_eq!(
            choose_token(row, &c.entries, &c.s, c.u, &mut scratch),
            expect[r],
            "reference, row {r}"
        );
    }
    // Every surviving weight is exp(0) = 1 on any device, so even the nucleus limits that sit
    // within 1e-9 of a mass boundary (top_p * kept is nearly whole) must be met exactly.
    check("ties", &logits, vocab, &cases, 0);
    // The production geometry (512 threads per row) on the last two rows (a full-row draw, ties
    // at the top-k boundary); the emulation pays an OS thread per CUDA thread.
    check(
        "ties, 512 threads",
        &logits[3 * vocab..],
        vocab,
        &cases[3..],
        512,
    );
}

#[test]
fn the_launcher_refuses_rows_its_buffers_cannot_serve() {
    let dev = &devices()[0];
    let logits = dev.upload(&[0.0f32; 8]).unwrap();
    let ids = dev.alloc_zeroed(4).unwrap();
    let rows_buf = dev.alloc_zeroed(size_of::<SampleRow>()).unwrap();
    let mut c = greedy();
    c.logprobs = Some(2);
    let rows = [SampleRow::new(&c.s, 0.0, 0, 0, c.logprobs)];
    let args = SampleArgs {
        logits: &logits,
        rows: &rows,
        rows_buf: &rows_buf,
        penalties: None,
        work: None,
        out_ids: &ids,
        out_logprobs: None,
        allowed: None,
        out_nonfinite: None,
        vocab: 8,
        threads: 0,
    };
    let err = sampling::sample(dev, &args).unwrap_err().to_string();
    assert!(err.contains("logprobs"), "{err}");
    let args = SampleArgs { vocab: 9, ..args };
    let err = sampling::sample(dev, &args).unwrap_err().to_string();
    assert!(err.contains("sample logits"), "{err}");
}

#[test]
fn a_vocab_smaller_than_a_warp_leaves_warps_idle_and_still_matches() {
    // 7 ids for 128 threads: most warps own no ids; 20 logprobs asked, 7 exist.
    let vocab = 7;
    let mut cases = vec![greedy()];
    for (t, u) in [
        (truncation(1.0, 3, 1.0, 0.0), 0.8),
        (truncation(0.7, 0, 0.6, 0.0), 0.2),
        (truncation(1.0, 0, 1.0, 0.3), 0.999),
    ] {
        cases.push(draw_case(t, u));
    }
    for c in &mut cases {
        c.logprobs = Some(20);
    }
    let logits = rows(8, cases.len(), vocab, 2.0);
    check("tiny vocab", &logits, vocab, &cases, 0);
}

#[test]
fn draws_land_on_the_right_id_at_every_share_boundary_of_a_large_row() {
    // A flat row: every weight is exactly 1, so u = (id + 0.5) / vocab must draw `id` (an
    // independent expectation). The ids sit at the edges of the contiguous shares the draw
    // narrows through (12320 then 3104 ids at 4 warps, 32-id walk steps) and at the row's ends.
    let vocab = 49152 + 7;
    let ids: Vec<u32> = vec![
        0, 31, 32, 3103, 3104, 6207, 12287, 12319, 12320, 15423, 24639, 24640, 36959, 36960, 49151,
        49158,
    ];
    let cases: Vec<Case> = ids
        .iter()
        .map(|&id| {
            draw_case(
                truncation(1.0, 0, 1.0, 0.0),
                (id as f64 + 0.5) / vocab as f64,
            )
        })
        .collect();
    let logits = vec![0.0f32; cases.len() * vocab];
    let mut scratch = SampleScratch::default();
    for (c, &id) in cases.iter().zip(&ids) {
        let row = &logits[..vocab];
        assert_eq!(choose_token(row, &[], &c.s, c.u, &mut scratch), id);
    }
    check("share edges", &logits, vocab, &cases, 0);
}
