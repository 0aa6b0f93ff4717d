//! Fault injection for tests: the seam that proves a failure stays small and visible (one
//! request's bad logits or adapter slot fails that request alone; a panic inside a step kills the
//! engine loudly; a stuck step trips the stall watchdog; a dying adapter loader is restarted).
//! Compiled only with the `fault-injection` feature, which the runtime's own tests enable and no
//! release build does: nothing here can fire in production.
//!
//! Requests are picked by a predicate on the [`EngineRequest`] (tests usually match a sampling
//! seed), evaluated once when the request is admitted.

use std::collections::HashMap;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Condvar, Mutex};

use caduceus_scheduler::{RequestId, SchedulerOutput};

use super::request::EngineRequest;

/// Picks the requests a fault applies to.
pub type RequestMatcher = Arc<dyn Fn(&EngineRequest) -> bool + Send + Sync>;

/// The faults to inject; each `None` is off.
#[derive(Clone, Default)]
pub struct FaultPlan {
    /// Matching requests get NaN in their logits row.
    pub nan_logits: Option<RequestMatcher>,
    /// Matching requests fail to get an adapter slot.
    pub slot_failure: Option<RequestMatcher>,
    /// The step that schedules a matching request panics (on the engine thread).
    pub panic_in_step: Option<RequestMatcher>,
    /// Every step that schedules a matching request waits on the latch until it is released.
    pub hold_step: Option<(RequestMatcher, Arc<StepLatch>)>,
    /// The adapter loader thread panics when it is next asked to load this adapter (once).
    pub loader_panic: Option<Arc<str>>,
}

impl FaultPlan {
    /// A matcher for the requests sampled with `seed` (how HTTP tests single one out).
    pub fn seed(seed: u64) -> RequestMatcher {
        Arc::new(move |r: &EngineRequest| r.sampling.seed == Some(seed))
    }

    /// A plan that holds every step scheduling a request sampled with `seed` on the returned
    /// latch, until it is released (nothing else injected).
    pub fn hold_steps_of(seed: u64) -> (FaultPlan, Arc<StepLatch>) {
        let latch = Arc::new(StepLatch::default());
        let plan = FaultPlan {
            hold_step: Some((Self::seed(seed), latch.clone())),
            ..FaultPlan::default()
        };
        (plan, latch)
    }
}

/// Holds steps until released: an engine stuck mid-step, on demand, or stepped one step at a
/// time while armed ([`StepLatch::pass_one`]).
#[derive(Debug, Default)]
pub struct StepLatch {
    gate: Mutex<Gate>,
    changed: Condvar,
    num_held: AtomicUsize,
}

/// The latch's state under its lock.
#[derive(Debug, Default)]
struct Gate {
    released: bool,
    /// Steps that may pass while armed (one each), granted by [`StepLatch::pass_one`].
    passes: usize,
    /// A step waits on the latch now.
    waiting: bool,
}

impl StepLatch {
    fn gate(&self) -> std::sync::MutexGuard<'_, Gate> {
        self.gate.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Lets every held and future step through.
    pub fn release(&self) {
        self.gate().released = true;
        self.changed.notify_all();
    }

    /// Holds steps again from the next one on (a step already past the latch runs on); passes
    /// not yet used are void.
    pub fn arm(&self) {
        let mut gate = self.gate();
        gate.released = false;
        gate.passes = 0;
    }

    /// While armed, lets one step through: the one waiting now, or else the next to arrive.
    pub fn pass_one(&self) {
        self.gate().passes += 1;
        self.changed.notify_all();
    }

    /// Whether a step waits on the latch now (the steps before it are done).
    pub fn is_waiting(&self) -> bool {
        self.gate().waiting
    }

    /// Steps that have found the latch armed so far (waited, or used a pass).
    pub fn num_held(&self) -> usize {
        self.num_held.load(Ordering::Acquire)
    }

    fn wait(&self) {
        let mut gate = self.gate();
        if gate.released {
            return;
        }
        self.num_held.fetch_add(1, Ordering::AcqRel);
        gate.waiting = true;
        while !gate.released && gate.passes == 0 {
            gate = self.changed.wait(gate).unwrap_or_else(|e| e.into_inner());
        }
        gate.waiting = false;
        if !gate.released {
            gate.passes -= 1;
        }
    }
}

/// Which faults one admitted request carries.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
struct Marks {
    nan_logits: bool,
    slot_failure: bool,
    panic_in_step: bool,
    hold_step: bool,
}

/// The executor's side of a [`FaultPlan`]: the plan plus the marks of admitted requests.
#[derive(Default)]
pub(super) struct Faults {
    plan: FaultPlan,
    marked: HashMap<RequestId, Marks>,
}

impl Faults {
    /// Faults from `plan` for requests admitted from now on.
    pub fn new(plan: FaultPlan) -> Self {
        Faults {
            plan,
            marked: HashMap::new(),
        }
    }

    /// Evaluates the plan's matchers on a request being admitted.
    pub fn mark(&mut self, id: RequestId, req: &EngineRequest) {
        let hit = |m: &Option<RequestMatcher>| m.as_ref().is_some_and(|m| m(req));
        let marks = Marks {
            nan_logits: hit(&self.plan.nan_logits),
            slot_failure: hit(&self.plan.slot_failure),
            panic_in_step: hit(&self.plan.panic_in_step),
            hold_step: self.plan.hold_step.as_ref().is_some_and(|(m, _)| m(req)),
        };
        if marks != Marks::default() {
            self.marked.insert(id, marks);
        }
    }

    fn marks(&self, id: &RequestId) -> Marks {
        self.marked.get(id).copied().unwrap_or_default()
    }

    /// At the start of a step: panics or holds if a scheduled request asks for it.
    pub fn before_step(&self, sched: &SchedulerOutput) {
        let marks: Vec<Marks> = sched.scheduled.iter().map(|r| self.marks(&r.id)).collect();
        if marks.iter().any(|m| m.panic_in_step) {
            panic!("injected fault: panic inside an engine step");
        }
        if let Some((_, latch)) = &self.plan.hold_step {
            if marks.iter().any(|m| m.hold_step) {
                latch.wait();
            }
        }
    }

    /// Whether `id`'s adapter slot acquire must fail.
    pub fn fails_slot(&self, id: RequestId) -> bool {
        self.marks(&id).slot_failure
    }

    /// The logits rows (one per entry of `ids`) of marked requests, for the backend to poison.
    pub fn poisoned_rows(&self, ids: &[RequestId]) -> Vec<usize> {
        ids.iter()
            .enumerate()
            .filter(|(_, id)| self.marks(id).nan_logits)
            .map(|(row, _)| row)
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::{Duration, Instant};

    /// Waits up to 10 s for `done`.
    fn eventually(done: impl Fn() -> bool) -> bool {
        let start = Instant::now();
        while !done() {
            if start.elapsed() > Duration::from_secs(10) {
                return false;
            }
            std::thread::sleep(Duration::from_millis(1));
        }
        true
    }

    #[test]
    fn an_armed_latch_lets_one_step_through_per_pass_and_all_once_released() {
        let latch = Arc::new(StepLatch::default());
        let passed = Arc::new(AtomicUsize::new(0));
        let steps = {
            let (latch, passed) = (latch.clone(), passed.clone());
            std::thread::spawn(move || {
                for _ in 0..5 {
                    latch.wait();
                    passed.fetch_add(1, Ordering::AcqRel);
                }
            })
        };
        assert!(eventually(|| latch.is_waiting()));
        assert_eq!(passed.load(Ordering::Acquire), 0);
        for n in 1..=2 {
            latch.pass_one();
            // The step passes, and the next one waits again.
            assert!(eventually(|| passed.load(Ordering::Acquire) == n));
            assert!(eventually(
                || latch.is_waiting() && latch.num_held() == n + 1
            ));
        }
        latch.pass_one();
        assert!(eventually(|| passed.load(Ordering::Acquire) == 3));
        latch.release();
        steps.join().unwrap();
        assert_eq!(passed.load(Ordering::Acquire), 5);
        assert!(!latch.is_waiting());
    }

    #[test]
    fn passes_not_used_when_the_latch_is_armed_again_are_void() {
        let latch = Arc::new(StepLatch::default());
        latch.pass_one();
        latch.arm();
        let step = {
            let latch = latch.clone();
            std::thread::spawn(move || latch.wait())
        };
        assert!(eventually(|| latch.is_waiting()));
        std::thread::sleep(Duration::from_millis(20));
        assert!(!step.is_finished(), "a void pass let the step through");
        latch.release();
        step.join().unwrap();
    }
}
