//! Replays a schedule against a server. Open loop: each request leaves at its scheduled time (held back
//! only by the `--max-concurrency` safety cap, and the lag is reported). Closed loop: C clients, each
//! sending its next request when the previous one ends. The first Ctrl-C stops sending and waits for the
//! requests in flight; a second one gives up on them.

use crate::client::ApiClient;
use crate::outcome::RequestOutcome;
use crate::schedule::{Pacing, Schedule};
use indicatif::{ProgressBar, ProgressStyle};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::{mpsc, watch, Semaphore};
use tokio::time::Instant;

#[derive(Debug, Clone, PartialEq)]
pub struct RunConfig {
    pub pacing: Pacing,
    /// Open loop: most requests in flight at once (a guard against exhausting sockets).
    pub max_concurrency: usize,
    /// Stop sending after this many seconds (closed loop with `--duration`).
    pub stop_after_s: Option<f64>,
    /// Send requests for model `.0` to model `.1` (the B side of `compare` may name the base differently).
    pub rename_model: Option<(String, String)>,
    pub progress: bool,
}

/// Everything a run produced; outcomes are sorted by schedule index.
#[derive(Debug, Clone)]
pub struct RunResult {
    pub outcomes: Vec<RequestOutcome>,
    /// From the start of the run to the last completion.
    pub duration_s: f64,
    pub interrupted: bool,
    /// Scheduled requests never sent (interrupted, or a closed-loop run that hit its duration).
    pub not_sent: usize,
}

pub async fn run(client: &ApiClient, schedule: Arc<Schedule>, cfg: &RunConfig) -> RunResult {
    let t0 = Instant::now();
    let (tx, mut rx) = mpsc::unbounded_channel::<RequestOutcome>();
    let (stop_tx, stop_rx) = watch::channel(false);
    let sent = Arc::new(AtomicUsize::new(0));
    let total = schedule.requests.len();
    let ctx = Dispatch {
        client: client.clone(),
        schedule,
        rename: cfg.rename_model.clone(),
        tx,
        stop: stop_rx,
        sent: sent.clone(),
        t0,
    };
    match cfg.pacing {
        Pacing::Open(_) => {
            tokio::spawn(ctx.open_loop(cfg.max_concurrency.max(1)));
        }
        Pacing::Closed { concurrency } => {
            let next = Arc::new(AtomicUsize::new(0));
            for _ in 0..concurrency.max(1) {
                tokio::spawn(
                    ctx.clone()
                        .closed_loop_worker(next.clone(), cfg.stop_after_s),
                );
            }
            drop(ctx);
        }
    }

    let bar = progress_bar(cfg.progress, total);
    let mut outcomes = Vec::with_capacity(total);
    let mut errors = 0usize;
    let mut interrupted = false;
    let ctrl_c = tokio::signal::ctrl_c();
    tokio::pin!(ctrl_c);
    loop {
        tokio::select! {
            o = rx.recv() => {
                let Some(o) = o else { break };
                errors += usize::from(!o.ok());
                outcomes.push(o);
                bar.inc(1);
                let in_flight = sent.load(Ordering::Relaxed).saturating_sub(outcomes.len());
                bar.set_message(format!("in flight {in_flight}, errors {errors}"));
            }
            _ = &mut ctrl_c, if !interrupted => {
                interrupted = true;
                let _ = stop_tx.send(true);
                bar.println("interrupted: no new requests; waiting for those in flight (Ctrl-C again to abandon them)");
            }
            _ = tokio::signal::ctrl_c(), if interrupted => break,
        }
    }
    bar.finish_and_clear();
    // As vLLM: from the start of the run to the last completion.
    let duration_s = outcomes.iter().map(|o| o.end_s()).fold(0.0, f64::max);
    outcomes.sort_by_key(|o| o.index);
    RunResult {
        not_sent: total - sent.load(Ordering::Relaxed).min(total),
        duration_s,
        outcomes,
        interrupted,
    }
}

fn progress_bar(enabled: bool, total: usize) -> ProgressBar {
    if !enabled {
        return ProgressBar::hidden();
    }
    let bar = ProgressBar::new(total as u64);
    if let Ok(style) = ProgressStyle::with_template(
        "{elapsed_precise} [{bar:40.cyan/blue}] {pos}/{len} ({per_sec}) {msg}",
    ) {
        bar.set_style(style.progress_chars("=> "));
    }
    bar.enable_steady_tick(Duration::from_millis(200));
    bar
}

#[derive(Clone)]
struct Dispatch {
    client: ApiClient,
    schedule: Arc<Schedule>,
    rename: Option<(String, String)>,
    tx: mpsc::UnboundedSender<RequestOutcome>,
    stop: watch::Receiver<bool>,
    sent: Arc<AtomicUsize>,
    t0: Instant,
}

impl Dispatch {
    fn model_for(&self, i: usize) -> String {
        let m = &self.schedule.requests[i].model;
        match &self.rename {
            Some((from, to)) if from == m => to.clone(),
            _ => m.clone(),
        }
    }

    async fn open_loop(mut self, max_concurrency: usize) {
        let permits = Arc::new(Semaphore::new(max_concurrency));
        for i in 0..self.schedule.requests.len() {
            let at = self.t0 + Duration::from_secs_f64(self.schedule.requests[i].send_at_s);
            let permit = tokio::select! {
                p = async {
                    tokio::time::sleep_until(at).await;
                    permits.clone().acquire_owned().await
                } => p,
                _ = self.stop.wait_for(|s| *s) => return,
            };
            let Ok(permit) = permit else { return };
            self.sent.fetch_add(1, Ordering::Relaxed);
            let (client, schedule, tx, t0) = (
                self.client.clone(),
                self.schedule.clone(),
                self.tx.clone(),
                self.t0,
            );
            let model = self.model_for(i);
            tokio::spawn(async move {
                let o = client
                    .send(&schedule.requests[i], &model, t0.into_std())
                    .await;
                drop(permit);
                let _ = tx.send(o);
            });
        }
    }

    async fn closed_loop_worker(self, next: Arc<AtomicUsize>, stop_after_s: Option<f64>) {
        loop {
            if *self.stop.borrow()
                || stop_after_s.is_some_and(|d| self.t0.elapsed().as_secs_f64() >= d)
            {
                return;
            }
            let i = next.fetch_add(1, Ordering::Relaxed);
            if i >= self.schedule.requests.len() {
                return;
            }
            self.sent.fetch_add(1, Ordering::Relaxed);
            let o = self
                .client
                .send(
                    &self.schedule.requests[i],
                    &self.model_for(i),
                    self.t0.into_std(),
                )
                .await;
            if self.tx.send(o).is_err() {
                return;
            }
        }
    }
}
