//! How each projection shape picks its implementation ([`GemmPolicy`]) and what the tuner
//! measured ([`TuneRecord`]).
//!
//! cuBLASLt's heuristic names one algorithm per shape without running anything, and at the
//! skinny shapes of decode (a handful of rows against a 4096 x 14336 weight) its first choice can
//! be far from the memory roofline. Under [`GemmPolicy::Tuned`] the first call of each
//! [`GemmKey`] (before any graph is captured: warm-up runs every bucket) times the heuristic's
//! top candidates and, for up to [`super::gemv::GEMV_MAX_ROWS`] rows, our own GEMV kernel, on the
//! call's own operands, and caches the fastest for the key, as TensorRT-LLM tunes its GEMM
//! tactics at start. Only buckets of up to 512 rows are tuned (decode batches, captured in
//! graphs at start); prefill's larger ones keep the heuristic's choice. A tuning step that cannot run (no memory for a scratch output, a stream
//! being captured, an event failing) falls back to the heuristic's choice and says so in its
//! record.

use super::gemm_cache::GemmKey;

/// Which implementation a projection runs.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub enum GemmPolicy {
    /// Time the candidates once per shape bucket and keep the fastest (the GPU default). In
    /// emulation, where nothing is worth timing, the same as [`GemmPolicy::Library`].
    #[default]
    Tuned,
    /// cuBLASLt's heuristic first choice (the host loop in emulation), never timed.
    Library,
    /// Our GEMV kernel wherever it applies ([`super::gemv::gemv_applies`]), the library
    /// elsewhere: for tests and A/B measurements.
    Gemv,
}

impl GemmPolicy {
    /// The name used in configs and reports.
    pub fn name(self) -> &'static str {
        match self {
            GemmPolicy::Tuned => "tuned",
            GemmPolicy::Library => "library",
            GemmPolicy::Gemv => "gemv",
        }
    }

    /// Parses [`Self::name`].
    pub fn from_name(s: &str) -> Option<GemmPolicy> {
        [GemmPolicy::Tuned, GemmPolicy::Library, GemmPolicy::Gemv]
            .into_iter()
            .find(|p| p.name() == s)
    }
}

/// What a key's calls run: a library algorithm (`A`: cuBLASLt's, `()` for the emulated host loop)
/// or our GEMV kernel.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum GemmChoice<A> {
    Library(A),
    Gemv,
}

/// One candidate's measurement.
#[derive(Clone, Debug, PartialEq)]
pub struct CandidateTime {
    /// `cublaslt#i` (the heuristic's i-th choice) or `gemv`.
    pub name: String,
    /// Best of the timed repetitions, microseconds (`None`: it could not run this shape).
    pub us: Option<f64>,
}

/// What the tuner did for one key.
#[derive(Clone, Debug, PartialEq)]
pub struct TuneRecord {
    pub key: GemmKey,
    /// The row count it was timed at (the first call's; the key holds its bucket).
    pub m: usize,
    pub candidates: Vec<CandidateTime>,
    /// The candidate kept.
    pub chosen: String,
    /// Why the heuristic's choice was kept untimed, when it was.
    pub fallback: Option<String>,
}

/// The index of the fastest candidate: the lowest best-of-samples, over candidates with at least
/// one finite sample (`None` when none has). Ties keep the earlier candidate (the heuristic's
/// order), so an equal GEMV never displaces the library.
pub fn fastest(samples: &[Vec<f64>]) -> Option<usize> {
    let best: Vec<Option<f64>> = samples.iter().map(|s| best_of(s)).collect();
    let mut pick: Option<(usize, f64)> = None;
    for (i, b) in best.iter().enumerate() {
        if let Some(t) = *b {
            if pick.is_none_or(|(_, p)| t < p) {
                pick = Some((i, t));
            }
        }
    }
    pick.map(|(i, _)| i)
}

/// The smallest finite sample.
pub fn best_of(samples: &[f64]) -> Option<f64> {
    samples
        .iter()
        .copied()
        .filter(|t| t.is_finite())
        .min_by(f64::total_cmp)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_fastest_is_the_lowest_best_sample_and_ties_keep_the_earlier() {
        let s = |v: &[f64]| v.to_vec();
        // Candidate 1's best (2.0) beats candidate 0's (3.0) despite a worse median.
        assert_eq!(fastest(&[s(&[3.0, 3.1]), s(&[9.0, 2.0])]), Some(1));
        // A tie keeps the heuristic's (earlier) choice.
        assert_eq!(fastest(&[s(&[2.0]), s(&[2.0])]), Some(0));
        // Failed candidates (no sample, NaN, infinite) never win; none at all gives None.
        assert_eq!(
            fastest(&[s(&[]), s(&[f64::NAN, 5.0]), s(&[f64::INFINITY])]),
            Some(1)
        );
        assert_eq!(fastest(&[s(&[]), s(&[f64::NAN])]), None);
        assert_eq!(fastest(&[]), None);
    }

    #[test]
    fn policy_names_round_trip() {
        for p in [GemmPolicy::Tuned, GemmPolicy::Library, GemmPolicy::Gemv] {
            assert_eq!(GemmPolicy::from_name(p.name()), Some(p));
        }
        assert_eq!(GemmPolicy::from_name("fast"), None);
        assert_eq!(GemmPolicy::default(), GemmPolicy::Tuned);
    }
}
