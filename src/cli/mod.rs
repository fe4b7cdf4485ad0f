//! The client commands (`ingest`, `query`, `stats`, `demo`): flags, the calls, and what they print.

pub mod backup;
pub mod bench_model;
pub mod demo;
pub mod ingest;
pub mod query;
pub mod stats;

use tokio_util::sync::CancellationToken;

/// The first Ctrl-C (or SIGTERM) cancels `stop` so that a job can finish what is in flight;
/// a second one ends the process at once.
pub fn stop_on_signal(what: &'static str) -> CancellationToken {
    let stop = CancellationToken::new();
    let token = stop.clone();
    tokio::spawn(async move {
        let Ok(mut terminate) = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) else {
            return;
        };
        let next = async {
            tokio::select! {
                _ = tokio::signal::ctrl_c() => {}
                _ = terminate.recv() => {}
            }
        };
        next.await;
        eprintln!("{what} interrupted: waiting for the batches in flight (again to quit at once)");
        token.cancel();
        let again = async {
            tokio::select! {
                _ = tokio::signal::ctrl_c() => {}
                _ = terminate.recv() => {}
            }
        };
        again.await;
        std::process::exit(130);
    });
    stop
}
