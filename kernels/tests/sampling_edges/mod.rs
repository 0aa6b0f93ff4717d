//! Draws placed on the edges between tokens: `u` is chosen so the reference's draw target lies a
//! few units of mass (out of ~2^50) beside where one token's share ends and the next begins.
//! Any weight of the kernel's at or before that edge differing from the reference's by one bit
//! moves its prefix by far more than that, and the token by one, so these rows check that the
//! kernel computes the reference's weights bit for bit, which random draws almost never could.

use super::*;
use caduceus_kernels::sampling::{draw_target, survivors, Candidate, SurvivorScratch};

/// How close to an edge a target is placed, in units of fixed-point mass: an f64 uniform only
/// reaches a multiple of ~total / 2^53 (8 units for a total of 2^56).
const SLACK: u64 = 64;

/// A uniform whose target over `total` lies in `[lo, hi]`, searched from `lo / total` one f64
/// step at a time (`None` if no f64 lands there).
fn uniform_with_target(lo: u64, hi: u64, total: u64) -> Option<f64> {
    let mut u = lo as f64 / total as f64;
    for _ in 0..4096 {
        let target = draw_target(u, total);
        if (lo..=hi).contains(&target) {
            return Some(u);
        }
        u = if target < lo {
            u.next_up()
        } else {
            u.next_down()
        };
    }
    None
}

/// For `edges` random survivors of `t` over `row`, two draws: just before the end of its share
/// (it is drawn) and just past it (the next survivor is).
fn edge_uniforms(row: &[f32], t: &Truncation, edges: usize, r: &mut impl Rng) -> Vec<f64> {
    let mut cand: Vec<Candidate> = Vec::new();
    survivors(row, t, &mut SurvivorScratch::default(), &mut cand);
    let total: u64 = cand.iter().map(|c| c.q).sum();
    let ends: Vec<u64> = cand
        .iter()
        .scan(0u64, |acc, c| {
            *acc += c.q;
            Some(*acc)
        })
        .collect();
    let mut us = Vec::new();
    for _ in 0..edges {
        // The last end is the total: nothing lies past it.
        let end = ends[r.random_range(0..ends.len().saturating_sub(1).max(1))];
        us.extend(uniform_with_target(
            end.saturating_sub(SLACK),
            end - 1,
            total,
        ));
        us.extend(uniform_with_target(end, end + SLACK, total));
    }
    us
}

#[test]
fn draws_beside_every_edge_see_the_same_weights() {
    let vocab = 1000;
    let mut r = rng(31);
    let configs = [
        truncation(0.7, 0, 1.0, 0.0),
        truncation(1.3, 0, 0.95, 0.0),
        truncation(1.0, 50, 0.9, 0.0),
        truncation(0.9, 0, 1.0, 0.01),
    ];
    let (mut cases, mut logits) = (Vec::new(), Vec::new());
    for (i, t) in configs.iter().enumerate() {
        let row = rows(40 + i as u64, 1, vocab, 6.0);
        for u in edge_uniforms(&row, t, 12, &mut r) {
            cases.push(draw_case(*t, u));
            logits.extend_from_slice(&row);
        }
    }
    assert!(cases.len() >= 80, "{} edge draws", cases.len());
    check("edges", &logits, vocab, &cases, 0);
}
