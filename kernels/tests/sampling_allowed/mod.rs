//! Allowed-token bitsets (structured outputs) in the sampling kernel against the CPU sampler
//! given the same mask (`masked_row`: disallowed tokens at -inf before anything reads the row),
//! so penalties, greedy, truncation, the draw, the all-masked fallback and the logprobs all see
//! the masked row on both sides.

use super::*;

/// A bitset over `vocab` tokens allowing each with probability `p`, plus `always`.
fn bitset(r: &mut impl Rng, vocab: usize, p: f64, always: &[usize]) -> Vec<u32> {
    let mut bits = vec![0u32; sampling::allowed_words(vocab)];
    for t in 0..vocab {
        if r.random_bool(p) || always.contains(&t) {
            bits[t / 32] |= 1 << (t % 32);
        }
    }
    bits
}

fn argmax(row: &[f32]) -> usize {
    (0..row.len())
        .max_by(|&a, &b| row[a].total_cmp(&row[b]).then(b.cmp(&a)))
        .unwrap_or(0)
}

#[test]
fn allowed_token_masks_match_the_cpu_sampler_given_the_same_mask() {
    // Not a multiple of 32: the last word of each bitset is partial.
    let vocab = 1000;
    let mut r = rng(20);
    let configs = [
        truncation(1.0, 0, 1.0, 0.0),
        truncation(0.7, 20, 1.0, 0.0),
        truncation(1.0, 0, 0.8, 0.0),
        truncation(0.9, 40, 0.9, 0.05),
    ];
    let mut cases = Vec::new();
    // Greedy must take the best allowed token, not the row's argmax (forbidden below).
    cases.push(greedy());
    // One allowed token, in the partial last word, with its logprob.
    cases.push(Case {
        logprobs: Some(3),
        ..greedy()
    });
    for t in configs {
        for _ in 0..2 {
            cases.push(draw_case(t, r.random()));
        }
    }
    // Penalties on a masked row, with top logprobs (which must be allowed tokens only).
    let mut entries = Vec::new();
    let prompt: Vec<u32> = (0..50).map(|_| r.random_range(0..vocab as u32)).collect();
    penalty_entries(
        &prompt,
        &prompt[..10],
        vocab,
        true,
        &mut Vec::new(),
        &mut entries,
    );
    let mut penalised = draw_case(truncation(0.8, 0, 0.95, 0.0), r.random());
    penalised.s.penalties = Penalties {
        repetition: 1.3,
        frequency: 0.5,
        presence: 0.2,
    };
    penalised.entries = entries;
    penalised.logprobs = Some(5);
    cases.push(penalised);
    let logits = rows(21, cases.len() + 2, vocab, 6.0);
    let row = |i: usize| &logits[i * vocab..(i + 1) * vocab];
    for (i, c) in cases.iter_mut().enumerate() {
        let best = argmax(row(i));
        let mut bits = match i {
            1 => bitset(&mut r, vocab, 0.0, &[vocab - 1]),
            _ => bitset(&mut r, vocab, 0.3, &[]),
        };
        bits[best / 32] &= !(1 << (best % 32));
        c.allowed = Some(bits);
    }
    // A row without a mask amid masked ones, and a mask allowing nothing (every logit -inf:
    // both samplers fall back to token 0).
    cases.push(draw_case(truncation(1.0, 0, 1.0, 0.0), 0.5));
    cases.push(Case {
        allowed: Some(vec![0; sampling::allowed_words(vocab)]),
        logprobs: Some(2),
        ..draw_case(truncation(1.0, 0, 1.0, 0.0), 0.5)
    });
    check("allowed tokens", &logits, vocab, &cases, 0);
    // The reference itself honours the masks (so the comparison above is not vacuous).
    let mut scratch = SampleScratch::default();
    for (i, c) in cases.iter().enumerate().take(cases.len() - 2) {
        let masked = masked_row(row(i), c);
        let t = choose_token(&masked, &c.entries, &c.s, c.u, &mut scratch) as usize;
        let bits = c.allowed.as_ref().map_or(0, |b| b[t / 32] >> (t % 32) & 1);
        assert_eq!(bits, 1, "row {i}: token {t} is not allowed");
        assert_ne!(t, argmax(row(i)), "row {i}: the forbidden argmax was drawn");
    }
}

#[test]
fn a_masked_row_without_bitsets_is_refused() {
    let dev = &devices()[0];
    let logits = dev.upload(&[0.0f32; 8]).unwrap();
    let ids = dev.alloc_zeroed(4).unwrap();
    let rows_buf = dev.alloc_zeroed(size_of::<SampleRow>()).unwrap();
    let rows = [SampleRow::new(&greedy().s, 0.0, 0, 0, None).with_allowed_tokens()];
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
    assert!(err.contains("allowed-token mask"), "{err}");
    // Bitsets shorter than one word per row.
    let (short, masked) = (dev.alloc_zeroed(2).unwrap(), dev.alloc_zeroed(32).unwrap());
    let args = SampleArgs {
        allowed: Some(AllowedTokens {
            bits: &short,
            masked: &masked,
        }),
        ..args
    };
    let err = sampling::sample(dev, &args).unwrap_err().to_string();
    assert!(err.contains("allowed bits"), "{err}");
}
