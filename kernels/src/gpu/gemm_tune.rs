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
use super::gemv::GemvKernel;

/// Which implementation a projection runs.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub enum GemmPolicy {
    /// Time the candidates once per shape bucket and keep the fastest (the GPU default). In
    /// emulation, where nothing is worth timing, the same as [`GemmPolicy::Library`].
    #[default]
    Tuned,
    /// cuBLASLt's heuristic first choice (the host loop in emulation), never timed.
    Library,
    /// Our ring GEMV kernel ([`GemvKernel::Ring`]) wherever it applies
    /// ([`super::gemv::gemv_applies`]), the library elsewhere: for tests and A/B measurements.
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
/// or one of our GEMV kernels.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum GemmChoice<A> {
    Library(A),
    Gemv(GemvKernel),
}

/// One candidate's measurement.
#[derive(Clone, Debug, PartialEq)]
pub struct CandidateTime {
    /// `cublaslt#i` (the heuristic's i-th choice) or a GEMV kernel's name
    /// ([`GemvKernel::name`]).
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

/// Timed rounds (every candidate once per round, interleaved, so drift hits all alike) and
/// launches per timing.
pub const TUNE_ROUNDS: usize = 3;
pub const TUNE_REPS: usize = 2;

/// Where the tuner's timings come from: marks on the device's stream of work (timing events on a
/// GPU; a fake clock in tests).
#[cfg_attr(not(feature = "cuda"), allow(dead_code))]
pub(crate) trait TuneClock {
    type Mark;
    /// Marks the current end of the queued work.
    fn mark(&self) -> Result<Self::Mark, super::GpuError>;
    /// Milliseconds of device work between two marks (may wait for `end`).
    fn ms_between(&self, start: &Self::Mark, end: &Self::Mark) -> Result<f64, super::GpuError>;
}

/// Samples (microseconds per launch) of each candidate: one untimed run each (a candidate whose
/// run fails there is dropped and gets no sample), then [`TUNE_ROUNDS`] interleaved rounds of
/// [`TUNE_REPS`] launches between two marks; a timing whose launches failed is not kept. Marks
/// are read after every launch was queued, so the device never idles waiting for the host.
#[cfg_attr(not(feature = "cuda"), allow(dead_code))]
pub(crate) fn time_candidates<C: TuneClock>(
    clock: &C,
    runs: &[&dyn Fn() -> bool],
) -> Result<Vec<Vec<f64>>, super::GpuError> {
    let ok: Vec<bool> = runs.iter().map(|run| run()).collect();
    let mut marks = Vec::new();
    for _ in 0..TUNE_ROUNDS {
        for (i, run) in runs.iter().enumerate().filter(|(i, _)| ok[*i]) {
            let start = clock.mark()?;
            let fine = (0..TUNE_REPS).fold(true, |fine, _| run() && fine);
            marks.push((i, fine, start, clock.mark()?));
        }
    }
    let mut samples = vec![Vec::new(); runs.len()];
    for (i, fine, start, end) in &marks {
        let ms = clock.ms_between(start, end)?;
        if *fine {
            samples[*i].push(ms * 1e3 / TUNE_REPS as f64);
        }
    }
    Ok(samples)
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

    /// A clock that advances by each launch's cost, as a stream would.
    struct FakeClock(std::cell::Cell<f64>);
    impl TuneClock for FakeClock {
        type Mark = f64;
        fn mark(&self) -> Result<f64, crate::gpu::GpuError> {
            Ok(self.0.get())
        }
        fn ms_between(&self, a: &f64, b: &f64) -> Result<f64, crate::gpu::GpuError> {
            Ok(b - a)
        }
    }

    #[test]
    fn timing_runs_each_candidate_once_untimed_then_interleaved_rounds() {
        let clock = FakeClock(std::cell::Cell::new(0.0));
        let calls = std::cell::RefCell::new(Vec::new());
        // Candidate 0 costs 3 ms a launch, 1 fails outright, 2 costs 1 ms but fails its second
        // timed launch once.
        let failures = std::cell::Cell::new(0);
        let c0 = || {
            calls.borrow_mut().push(0);
            clock.0.set(clock.0.get() + 3.0);
            true
        };
        let c1 = || {
            calls.borrow_mut().push(1);
            false
        };
        let c2 = || {
            calls.borrow_mut().push(2);
            clock.0.set(clock.0.get() + 1.0);
            let n = calls.borrow().iter().filter(|&&c| c == 2).count();
            if n == 3 {
                failures.set(failures.get() + 1);
                return false;
            }
            true
        };
        let runs: [&dyn Fn() -> bool; 3] = [&c0, &c1, &c2];
        let samples = time_candidates(&clock, &runs).unwrap();
        // Untimed: 0, 1, 2 once; then rounds of 0 and 2 (1 dropped), TUNE_REPS launches each.
        let mut want = vec![0, 1, 2];
        for _ in 0..TUNE_ROUNDS {
            want.extend(std::iter::repeat_n(0, TUNE_REPS));
            want.extend(std::iter::repeat_n(2, TUNE_REPS));
        }
        assert_eq!(*calls.borrow(), want);
        assert_eq!(failures.get(), 1);
        // Microseconds per launch; the round whose launch failed left no sample.
        assert_eq!(samples[0], vec![3000.0; TUNE_ROUNDS]);
        assert!(samples[1].is_empty());
        assert_eq!(samples[2], vec![1000.0; TUNE_ROUNDS - 1]);
        assert_eq!(fastest(&samples), Some(2));
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
