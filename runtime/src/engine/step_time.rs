//! Keeps engine steps near `scheduler.max_step_ms` when the step token budget was sized from a
//! start-up probe (`cli/step_budget.rs`). The probe times one prompt on the base model; real
//! steps mix adapters, decodes over long contexts and a busier machine, and on the 2-core CPU
//! they ran a third over the target under a flood (333 ms for the probe's 250 ms budget). So the
//! cost of a token is re-measured on every step that used at least 80% of the budget, smoothed,
//! and the budget follows it, a bounded step at a time.

/// Steps below this share of the budget say little about the cost of a full one: a step also
/// has a fixed cost (about 13 ms on the 2-core CPU, more with many decodes), which a half-full
/// step spreads over half the tokens. Such steps are common by design beside a flood, whose
/// prefill may fill only `scheduler.backlog_prefill_percent` of the budget; timed as full ones
/// they shrank the budget by a tenth.
const MIN_FILL: f64 = 0.8;
/// Weight of the newest step in the smoothed cost per token.
const SMOOTHING: f64 = 0.2;
/// The budget moves at most this fraction per step.
const MAX_CHANGE: f64 = 0.1;
/// Nor does it move for less than this fraction: step times jitter by a few percent.
const DEADBAND: f64 = 0.03;

/// The step token budget as a feedback loop on measured step time.
#[derive(Clone, Debug)]
pub struct StepTimer {
    target_ms: f64,
    min_budget: usize,
    max_budget: usize,
    /// Smoothed milliseconds per scheduled token; `None` until a full enough step was seen.
    ms_per_token: Option<f64>,
}

impl StepTimer {
    /// Steers the budget toward steps of `target_ms`, within `[min_budget, max_budget]`.
    pub fn new(target_ms: u64, min_budget: usize, max_budget: usize) -> Self {
        StepTimer {
            target_ms: target_ms as f64,
            min_budget: min_budget.max(1),
            max_budget: max_budget.max(min_budget.max(1)),
            ms_per_token: None,
        }
    }

    /// Records a step that scheduled `tokens` of a `budget`-token budget and took `ms`; returns
    /// the new budget when it should change.
    pub fn observe(&mut self, tokens: usize, budget: usize, ms: f64) -> Option<usize> {
        let timed = ms.is_finite() && ms > 0.0;
        if budget == 0 || (tokens as f64) < MIN_FILL * budget as f64 || !timed {
            return None;
        }
        let cost = ms / tokens as f64;
        let smoothed = match self.ms_per_token {
            Some(prev) => prev + SMOOTHING * (cost - prev),
            None => cost,
        };
        self.ms_per_token = Some(smoothed);
        let wanted = self.target_ms / smoothed;
        if (wanted - budget as f64).abs() < DEADBAND * budget as f64 {
            return None;
        }
        let step = (budget as f64 * MAX_CHANGE).max(1.0);
        let next = wanted
            .clamp(budget as f64 - step, budget as f64 + step)
            .clamp(self.min_budget as f64, self.max_budget as f64)
            .round() as usize;
        (next != budget).then_some(next)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Runs 200 full steps on a machine where a step costs `fixed + per_token * tokens` ms.
    fn settle(timer: &mut StepTimer, mut budget: usize, fixed: f64, per_token: f64) -> usize {
        for _ in 0..200 {
            let ms = fixed + per_token * budget as f64;
            if let Some(b) = timer.observe(budget, budget, ms) {
                budget = b;
            }
        }
        budget
    }

    #[test]
    fn the_budget_settles_where_a_full_step_takes_the_target() {
        // The probe said 148 tokens fit 250 ms; real steps cost 30 ms + 2.1 ms a token.
        let mut timer = StepTimer::new(250, 32, 2048);
        let budget = settle(&mut timer, 148, 30.0, 2.1);
        let ms = 30.0 + 2.1 * budget as f64;
        assert!((ms - 250.0).abs() < 10.0, "budget {budget} gives {ms} ms");
        // The machine gets faster: the budget grows back.
        let faster = settle(&mut timer, budget, 10.0, 1.0);
        assert!((10.0 + faster as f64 - 250.0).abs() < 10.0, "{faster}");
    }

    #[test]
    fn it_moves_a_bounded_step_at_a_time_within_its_limits() {
        let mut timer = StepTimer::new(250, 32, 2048);
        // One step 10x too slow: at most 10% down.
        assert_eq!(timer.observe(200, 200, 2500.0), Some(180));
        // Never below the floor, never above the ceiling.
        let mut low = StepTimer::new(250, 32, 2048);
        assert_eq!(settle(&mut low, 40, 0.0, 100.0), 32);
        let mut high = StepTimer::new(250, 32, 64);
        assert_eq!(settle(&mut high, 60, 0.0, 0.01), 64);
    }

    #[test]
    fn small_steps_and_nonsense_times_change_nothing() {
        let mut timer = StepTimer::new(250, 32, 2048);
        // A decode-only step of 5 tokens says nothing about a full one.
        assert_eq!(timer.observe(5, 200, 400.0), None);
        // Nor does a half-full one (a flood's prefill held to half the budget beside a quiet
        // adapter): its fixed cost would look like a dearer token.
        assert_eq!(timer.observe(100, 200, 400.0), None);
        assert_eq!(timer.observe(200, 200, 0.0), None);
        assert_eq!(timer.observe(200, 200, f64::NAN), None);
        assert_eq!(timer.observe(0, 0, 10.0), None);
        // On target, or within the dead band of 3%: no change.
        assert_eq!(timer.observe(125, 125, 250.0), None);
        assert_eq!(timer.observe(125, 125, 255.0), None);
    }
}
