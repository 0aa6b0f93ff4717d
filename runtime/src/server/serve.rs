//! Running the app on a socket: serve until a shutdown signal, then drain (new requests get 503,
//! in-flight ones finish within the grace period), or stop at once when the engine dies.

use std::future::{Future, IntoFuture};
use std::time::Duration;

use tokio::net::TcpListener;

use super::app::app;
use super::state::{AppState, Phase};

/// How serving ended; the process exits non-zero only for [`ServeOutcome::EngineFailed`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ServeOutcome {
    /// Shut down on request after every in-flight request finished.
    Drained,
    /// Shut down on request; this many requests were still running when the grace period ended.
    GraceExpired { in_flight: usize },
    /// The engine thread stopped: the orchestrator should restart the process.
    EngineFailed,
}

/// Serves `state` on `listener` until `shutdown` resolves or the engine dies.
pub async fn run_server(
    listener: TcpListener,
    state: AppState,
    grace: Duration,
    shutdown: impl Future<Output = ()> + Send,
) -> std::io::Result<ServeOutcome> {
    let lifecycle = state.lifecycle.clone();
    let engine = state.engine.clone();
    let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
    let server = axum::serve(listener, app(state))
        .with_graceful_shutdown(async {
            let _ = stop_rx.await;
        })
        .into_future();
    let server = tokio::spawn(server);
    let outcome = tokio::select! {
        _ = shutdown => {
            lifecycle.set_phase(Phase::Draining);
            tracing::info!(in_flight = lifecycle.in_flight(), grace_s = grace.as_secs_f64(), "shutdown requested: draining");
            match tokio::time::timeout(grace, lifecycle.idle()).await {
                Ok(()) => ServeOutcome::Drained,
                Err(_) => ServeOutcome::GraceExpired { in_flight: lifecycle.in_flight() },
            }
        }
        _ = engine_stopped(&engine) => {
            lifecycle.set_phase(Phase::Failed);
            tracing::error!("the engine thread stopped; refusing requests and exiting");
            ServeOutcome::EngineFailed
        }
    };
    let _ = stop_tx.send(());
    // Idle connections close at once; a stream cut by an expired grace period must not hold
    // the exit back.
    let _ = tokio::time::timeout(Duration::from_secs(2), server).await;
    engine.shutdown();
    Ok(outcome)
}

async fn engine_stopped(engine: &crate::engine::EngineHandle) {
    while engine.is_alive() {
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Resolves on SIGINT or SIGTERM.
pub async fn shutdown_signal() {
    let ctrl_c = async {
        let _ = tokio::signal::ctrl_c().await;
    };
    #[cfg(unix)]
    let term = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut s) => {
                s.recv().await;
            }
            Err(_) => std::future::pending::<()>().await,
        }
    };
    #[cfg(not(unix))]
    let term = std::future::pending::<()>();
    tokio::select! {
        _ = ctrl_c => {}
        _ = term => {}
    }
}
