//! The applier: moves logged batches into the store in large groups, so that each bucket chunk
//! is rewritten once per group rather than once per batch. Each index's group is one atomic
//! store write that records the group's last log position; once the store has synced, the
//! query state forgets those batches and log segments behind every index are deleted.

use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use super::IndexError;
use super::commit::LogShared;
use crate::store::{Compaction, StoreError};

/// Runs until told to stop, and then applies everything still pending before it returns.
pub(crate) fn run_applier(shared: Arc<LogShared>) {
    // Space that a crash between an apply and its reclaim left behind.
    for index in shared.indexes() {
        if let Err(error) = index.reclaim_all() {
            tracing::warn!(%error, index = %index.def().name, "freeing removed items' records failed");
        }
    }
    loop {
        let stopping = {
            let mut signal = shared.signal();
            loop {
                let pending = shared.pending();
                if signal.stop {
                    if pending == 0 || signal.abandon {
                        return;
                    }
                    break true;
                }
                let waited = signal.oldest.map_or(Duration::ZERO, |t| t.elapsed());
                if pending >= shared.options.apply_after_operations
                    || (pending > 0 && waited >= shared.options.apply_delay)
                {
                    break false;
                }
                let timeout = if pending > 0 { shared.options.apply_delay - waited } else { Duration::from_secs(1) };
                signal = shared.work.wait_timeout(signal, timeout).unwrap_or_else(|e| e.into_inner()).0;
            }
        };
        match apply_pending(&shared) {
            Ok(()) => {}
            Err(error) if shared.failed() => {
                tracing::error!(
                    %error,
                    "a write to the log or the store failed: no more writes are taken, and the log is kept; \
                     restart the server to recover every acknowledged write from it"
                );
                return;
            }
            Err(error) => {
                // A retry is safe: a round applies only batches past each index's stored position.
                tracing::error!(%error, "applying logged batches to the store failed; they stay in the log");
                if stopping {
                    return;
                }
                std::thread::sleep(Duration::from_secs(1));
            }
        }
    }
}

/// Whether the items removed since the last rewrite of the store's files (`since`) are due one.
fn compaction_due(shared: &LogShared, since: u64) -> bool {
    let share = shared.options.compact_removed_share;
    if share <= 0.0 || since < shared.options.compact_min_removed {
        return false;
    }
    let live: u64 = shared.indexes().iter().map(|index| index.state().count()).sum();
    since as f64 >= share * live as f64
}

/// Rewrites the store's files; the caller holds `applying` (nothing is applied meanwhile).
pub(crate) fn compact(shared: &LogShared) -> Result<Option<Compaction>, IndexError> {
    let done = shared.catalog.compact()?;
    if let Some(done) = done {
        shared.removed_since_compaction.store(0, Ordering::Relaxed);
        crate::telemetry::seconds(crate::telemetry::COMPACTION, done.copied + done.paused);
        tracing::info!(
            before_mb = done.before >> 20,
            after_mb = done.after >> 20,
            copy_ms = done.copied.as_millis() as u64,
            pause_ms = done.paused.as_millis() as u64,
            "store rewritten: writes waited during the copy, reads and writes during the pause"
        );
    }
    Ok(done)
}

/// One round: every index's oldest pending batches (up to `max_apply_operations`) into the
/// store, one sync, then the query state and the log catch up.
pub(crate) fn apply_pending(shared: &LogShared) -> Result<(), IndexError> {
    let _applying = shared.applying.lock().unwrap_or_else(|e| e.into_inner());
    if shared.failed() {
        // After a failed write or sync nothing moves from the log until a restart.
        return Err(IndexError::Unavailable(
            "an earlier write to the log or the store failed; restart the server to recover what was acknowledged"
                .into(),
        ));
    }
    let started = Instant::now();
    let mut applied = Vec::new();
    let mut operations = 0;
    for index in shared.indexes() {
        let batches = index.state().unapplied(shared.options.max_apply_operations);
        let Some(&(last, _)) = batches.last() else { continue };
        // A round that failed after this index's store took its batches (another index's
        // apply, or the sync) leaves them in the query state: the store's position says which
        // it holds already, and they are never applied twice.
        let stored = match index.store.applied_position() {
            Ok(stored) => stored,
            Err(StoreError::Dropped(_)) => continue,
            Err(e) => return Err(e.into()),
        };
        let fresh: Vec<_> = batches.iter().filter(|(position, _)| *position > stored).map(|(_, b)| &**b).collect();
        let outcome = if fresh.is_empty() { Ok(()) } else { index.store.apply(&fresh, last) };
        match outcome {
            Ok(()) => {
                crate::failpoint::crash_point("group-applied");
                operations += fresh.iter().map(|b| b.items.len() + b.removals.len()).sum::<usize>();
                let removed: Vec<u32> = batches.iter().flat_map(|(_, b)| b.removals.iter().map(|r| r.number)).collect();
                applied.push((index, last, removed));
            }
            // Dropped meanwhile: its batches go with it.
            Err(StoreError::Dropped(_)) => {}
            Err(e) => return Err(e.into()),
        }
    }
    if applied.is_empty() {
        return Ok(());
    }
    // A failed sync may have dropped the pages it could not write (Linux marks them clean): a
    // retry could succeed without them, and the log behind them would then be deleted. Stop
    // taking writes instead; the next start replays the log (PostgreSQL's fsync rule since 2018).
    if let Err(e) = shared.catalog.sync() {
        shared.fail_stop();
        return Err(e.into());
    }
    crate::failpoint::crash_point("store-synced");
    for (index, last, _) in &applied {
        index.state_mut().applied(*last);
    }
    shared.drop_applied_log()?;
    crate::failpoint::crash_point("log-dropped");
    // The store holds the removals durably now: the removed items' records can go.
    let mut reclaimed = 0;
    for (index, _, removed) in &applied {
        match index.reclaim_removed(removed) {
            Ok(bytes) => reclaimed += bytes,
            Err(IndexError::Store(StoreError::Dropped(_))) => {}
            Err(e) => return Err(e),
        }
    }
    if reclaimed > 0 {
        crate::failpoint::crash_point("space-reclaimed");
    }
    let removed: usize = applied.iter().map(|(_, _, r)| r.len()).sum();
    let since = shared.removed_since_compaction.fetch_add(removed as u64, Ordering::Relaxed) + removed as u64;
    if compaction_due(shared, since) {
        compact(shared)?;
    } else if let Some(pause) = shared.catalog.checkpoint(false)? {
        crate::telemetry::seconds(crate::telemetry::CHECKPOINT, pause);
        tracing::info!(ms = pause.as_millis() as u64, "store checkpointed: reads and writes waited this long");
    }
    {
        let mut signal = shared.signal();
        signal.oldest = (shared.pending() > 0).then(Instant::now);
    }
    shared.room.notify_all();
    crate::telemetry::seconds(crate::telemetry::APPLY, started.elapsed());
    metrics::histogram!(crate::telemetry::APPLY_ITEMS).record(operations as f64);
    tracing::debug!(operations, reclaimed, ms = started.elapsed().as_millis() as u64, "applied logged batches");
    Ok(())
}
