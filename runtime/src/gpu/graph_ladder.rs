//! Decode batch sizes that get a CUDA graph, and the padding of a step onto them.
//!
//! A graph replays fixed shapes, so decode steps are padded up to the next captured size
//! (padding tokens write to `PAD_SLOT` and sample nothing). vLLM's ladder: 1, 2, 4, then every
//! multiple of 8, capped at `max_num_seqs`; padding wastes at most 7 rows past 8.

/// The captured batch sizes, ascending, for a server running at most `max_num_seqs` sequences
/// (`max_num_seqs` itself is always the last size so every decode-only step fits a graph).
pub fn graph_batch_sizes(max_num_seqs: usize) -> Vec<usize> {
    let mut sizes: Vec<usize> = [1, 2, 4]
        .into_iter()
        .chain((8..).step_by(8))
        .take_while(|&s| s < max_num_seqs)
        .collect();
    if max_num_seqs > 0 {
        sizes.push(max_num_seqs);
    }
    sizes
}

/// The graph a decode step of `num_seqs` sequences replays: the smallest captured size that
/// holds it, or `None` (run eagerly) when graphs are off or it exceeds every size.
pub fn padded_batch_size(sizes: &[usize], num_seqs: usize) -> Option<usize> {
    if num_seqs == 0 {
        return None;
    }
    sizes.iter().copied().find(|&s| s >= num_seqs)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ladder_is_powers_then_multiples_of_eight_capped() {
        assert_eq!(graph_batch_sizes(1), vec![1]);
        assert_eq!(graph_batch_sizes(3), vec![1, 2, 3]);
        assert_eq!(graph_batch_sizes(20), vec![1, 2, 4, 8, 16, 20]);
        let s = graph_batch_sizes(256);
        assert_eq!(s.len(), 3 + 32);
        assert_eq!(*s.last().unwrap(), 256);
        assert!(s.windows(2).all(|w| w[0] < w[1]));
        assert!(graph_batch_sizes(0).is_empty());
    }

    #[test]
    fn every_batch_pads_to_the_smallest_size_holding_it() {
        for max in [1, 5, 8, 9, 64, 100, 256] {
            let sizes = graph_batch_sizes(max);
            for n in 1..=max {
                let p = padded_batch_size(&sizes, n).expect("every n <= max fits");
                assert!(p >= n && sizes.contains(&p));
                // Minimal: no captured size between n and p.
                assert!(
                    sizes.iter().all(|&s| s < n || s >= p),
                    "max {max} n {n} -> {p}"
                );
                // Waste is bounded: at most 7 rows past 8 (the ladder's step).
                assert!(p - n < 8.max(n / 2 + 1));
            }
            assert_eq!(padded_batch_size(&sizes, max + 1), None);
            assert_eq!(padded_batch_size(&sizes, 0), None);
        }
        assert_eq!(padded_batch_size(&[], 3), None, "graphs off: eager");
    }
}
