//! Per-second view of a run: what was sent, what finished, tokens streamed, and the average number of
//! requests in flight in each second, so saturation and warm-up effects are visible.

use crate::outcome::RequestOutcome;
use serde::Serialize;

#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Second {
    /// Start of the bucket, seconds from the start of the run.
    pub t: f64,
    /// Bucket width: the last bucket ends at the last completion and may be shorter.
    pub width_s: f64,
    pub sent: usize,
    pub completed: usize,
    pub failed: usize,
    /// Output tokens whose chunk arrived in this second (a request's usage count is spread evenly over its
    /// text chunks).
    pub output_tokens: f64,
    /// Time-averaged requests in flight over the bucket's width.
    pub in_flight: f64,
    /// Mean TTFT of the successful requests sent in this second.
    pub mean_ttft_ms: Option<f64>,
}

/// Buckets of `width_s` seconds covering the run (the last one may be partial).
pub fn time_series(outcomes: &[RequestOutcome], width_s: f64) -> Vec<Second> {
    let end = outcomes.iter().map(|o| o.end_s()).fold(0.0, f64::max);
    if outcomes.is_empty() || width_s <= 0.0 {
        return Vec::new();
    }
    let n = ((end / width_s).ceil() as usize).max(1);
    let bucket = |t: f64| ((t / width_s).floor().max(0.0) as usize).min(n - 1);
    let mut out: Vec<Second> = (0..n)
        .map(|i| Second {
            t: i as f64 * width_s,
            width_s: (end - i as f64 * width_s).min(width_s),
            sent: 0,
            completed: 0,
            failed: 0,
            output_tokens: 0.0,
            in_flight: 0.0,
            mean_ttft_ms: None,
        })
        .collect();
    let mut ttft_sum = vec![(0.0, 0usize); n];
    for o in outcomes {
        out[bucket(o.start_s)].sent += 1;
        let b = bucket(o.end_s());
        if o.ok() {
            out[b].completed += 1;
        } else {
            out[b].failed += 1;
        }
        if let (Some(ttft), true) = (o.ttft_s, o.ok()) {
            let s = &mut ttft_sum[bucket(o.start_s)];
            s.0 += ttft * 1000.0;
            s.1 += 1;
        }
        let chunks = o.chunk_times_s();
        if !chunks.is_empty() {
            let per_chunk = o.output_tokens as f64 / chunks.len() as f64;
            for t in chunks {
                out[bucket(t)].output_tokens += per_chunk;
            }
        }
        // In flight over [start, end): add the overlap with each bucket.
        let (s, e) = (o.start_s, o.end_s());
        for (i, sec) in out
            .iter_mut()
            .enumerate()
            .take(bucket(e) + 1)
            .skip(bucket(s))
        {
            let lo = s.max(i as f64 * width_s);
            let hi = e.min((i + 1) as f64 * width_s);
            if hi > lo && sec.width_s > 0.0 {
                sec.in_flight += (hi - lo) / sec.width_s;
            }
        }
    }
    for (sec, (sum, count)) in out.iter_mut().zip(ttft_sum) {
        sec.mean_ttft_ms = (count > 0).then(|| sum / count as f64);
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn o(start: f64, ttft: f64, itl: &[f64], tokens: u64) -> RequestOutcome {
        RequestOutcome {
            index: 0,
            model: "m".into(),
            adapter_rank: None,
            scheduled_s: start,
            start_s: start,
            ttft_s: Some(ttft),
            itl_s: itl.to_vec(),
            e2el_s: ttft + itl.iter().sum::<f64>(),
            prompt_tokens: None,
            output_tokens: tokens,
            error: None,
        }
    }

    #[test]
    fn buckets_count_tokens_and_in_flight() {
        // A: 0.5 -> 2.5 s with chunks at 1.0, 1.5, 2.5 (usage says 6 tokens: 2 per chunk).
        // B: 1.2 -> 1.8 s, one chunk at 1.8.
        let outs = vec![o(0.5, 0.5, &[0.5, 1.0], 6), o(1.2, 0.6, &[], 1)];
        let ts = time_series(&outs, 1.0);
        assert_eq!(ts.len(), 3);
        assert_eq!(ts.iter().map(|s| s.sent).collect::<Vec<_>>(), vec![1, 1, 0]);
        assert_eq!(
            ts.iter().map(|s| s.completed).collect::<Vec<_>>(),
            vec![0, 1, 1]
        );
        assert_eq!(
            ts.iter().map(|s| s.output_tokens).collect::<Vec<_>>(),
            vec![0.0, 5.0, 2.0]
        );
        let inf: Vec<f64> = ts.iter().map(|s| s.in_flight).collect();
        // The last bucket is [2, 2.5): A is in flight for all of it.
        assert_eq!(ts[2].width_s, 0.5);
        for (a, b) in inf.iter().zip([0.5, 1.6, 1.0]) {
            assert!((a - b).abs() < 1e-9, "{inf:?}");
        }
        assert_eq!(ts[0].mean_ttft_ms, Some(500.0));
        assert!(time_series(&[], 1.0).is_empty());
    }
}
