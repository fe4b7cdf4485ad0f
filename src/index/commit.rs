//! Group commit: one writer per data directory takes the batches of every stream and index in
//! flight, gives their items numbers, writes their embeddings, and makes them all durable with
//! one fsync sequence (embeddings first, then the log), then acknowledges each. Only then does
//! the index's query state take them in: queries see exactly what was acknowledged.
//!
//! The applier (`apply.rs`) later moves logged batches into the store in large groups; at start
//! the log's tail past each index's applied position is taken back in (`replay`).

use std::collections::{BTreeSet, HashMap, HashSet};
use std::sync::atomic::AtomicU64;
use std::sync::mpsc;
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use prost::Message;

use super::state::TailId;
use super::{Index, IndexError};
use crate::storage_proto::{LogBatch, LoggedItem, LoggedRemoval};
use crate::store::{Catalog, ItemWrite, LogRecord, Position, Removal, StoreBatch, StoreError, Wal};

/// How the write path trades memory and restart time for throughput; see `Default` for the
/// measured reasons.
#[derive(Debug, Clone)]
pub struct WriteOptions {
    /// A log segment is closed (and may be deleted once applied) past this size.
    pub segment_bytes: u64,
    /// The applier starts once this many item writes and removals are pending…
    pub apply_after_operations: usize,
    /// …or once the oldest pending one has waited this long.
    pub apply_delay: Duration,
    /// Item writes and removals applied to the store in one atomic write at most.
    pub max_apply_operations: usize,
    /// Writers wait while this many are pending: it bounds the tail replayed at start and the
    /// memory the tail takes.
    pub max_lag_operations: usize,
    /// fsync embeddings and the log before acknowledging (off: an ack survives a crash of the
    /// process but not of the machine; for tests and benchmarks of everything else).
    pub fsync: bool,
    /// The store's own files are rewritten (`Catalog::compact`) once the items removed since
    /// the last rewrite reach this share of the live items (0: never while serving)…
    pub compact_removed_share: f64,
    /// …and at least this many.
    pub compact_min_removed: u64,
}

impl Default for WriteOptions {
    fn default() -> Self {
        Self {
            segment_bytes: 32 << 20,
            // Measured (examples of `store.apply` alone at 1M items, K=12, L=16): groups of
            // 32k items applied at 16k items/s, groups of 131k at 22k (each bucket's open chunk
            // is rewritten once per group, whatever its size).
            apply_after_operations: 65_536,
            apply_delay: Duration::from_millis(500),
            max_apply_operations: 131_072,
            max_lag_operations: 262_144,
            fsync: true,
            // Measured (replace-heavy benchmark, 100k ids loaded 5 times): sled reuses dead
            // pages' space only in part, and grows ~1.5× per load that replaces everything.
            compact_removed_share: 0.5,
            compact_min_removed: 65_536,
        }
    }
}

/// An item ready to be written: validated, hashed and sketched.
#[derive(Debug, Clone)]
pub(crate) struct PreparedItem {
    pub id: String,
    pub label: String,
    pub metadata: HashMap<String, String>,
    pub codes: Vec<u64>,
    pub sketch: Vec<u64>,
    pub vector: Vec<f32>,
    pub thumbnail: Option<Vec<u8>>,
}

pub(crate) enum WriteRequest {
    /// Items in request order: of a repeated id the last wins.
    Upsert(Vec<PreparedItem>),
    Delete(Vec<String>),
}

/// Items written, or ids found and deleted.
pub(crate) type WriteOutcome = usize;

pub(crate) struct Submission {
    index: Arc<Index>,
    request: WriteRequest,
    reply: mpsc::SyncSender<Result<WriteOutcome, IndexError>>,
}

/// What the writer thread, the applier and the indexes share.
pub(crate) struct LogShared {
    pub(crate) catalog: Arc<dyn Catalog>,
    pub(crate) options: WriteOptions,
    wal: Mutex<LogFile>,
    /// Open indexes by store uid: the applier's work list.
    indexes: Mutex<HashMap<u64, Arc<Index>>>,
    sender: Mutex<Option<mpsc::Sender<Submission>>>,
    signal: Mutex<Signal>,
    /// Held while a group is applied: the applier thread and `Engine::apply_now` must never
    /// apply the same batches twice.
    pub(crate) applying: Mutex<()>,
    /// Wakes the applier (work logged, or stop).
    pub(crate) work: Condvar,
    /// Wakes writers waiting for the applier to catch up.
    pub(crate) room: Condvar,
    /// Items removed by applied batches since the store's files were last rewritten.
    pub(crate) removed_since_compaction: AtomicU64,
}

struct LogFile {
    wal: Wal,
    /// Set when a write or fsync of the log or the store failed: what reached the disk is then
    /// unknown (a failed fsync may have dropped the pages), so nothing more is acknowledged until
    /// restart.
    failed: bool,
}

#[derive(Debug, Default)]
pub(crate) struct Signal {
    pub(crate) stop: bool,
    /// Stop without applying what is pending (tests of recovery, in one process).
    pub(crate) abandon: bool,
    /// When the oldest batch not yet applied was logged.
    pub(crate) oldest: Option<Instant>,
}

impl LogShared {
    pub(crate) fn new(catalog: Arc<dyn Catalog>, wal: Wal, options: WriteOptions) -> Self {
        Self {
            catalog,
            options,
            wal: Mutex::new(LogFile { wal, failed: false }),
            indexes: Mutex::new(HashMap::new()),
            sender: Mutex::new(None),
            signal: Mutex::new(Signal::default()),
            applying: Mutex::new(()),
            work: Condvar::new(),
            room: Condvar::new(),
            removed_since_compaction: AtomicU64::new(0),
        }
    }

    pub(crate) fn signal(&self) -> MutexGuard<'_, Signal> {
        self.signal.lock().unwrap_or_else(|e| e.into_inner())
    }

    pub(crate) fn indexes(&self) -> Vec<Arc<Index>> {
        self.indexes.lock().unwrap_or_else(|e| e.into_inner()).values().cloned().collect()
    }

    pub(crate) fn register(&self, index: Arc<Index>) {
        self.indexes.lock().unwrap_or_else(|e| e.into_inner()).insert(index.store.uid(), index);
    }

    pub(crate) fn unregister(&self, uid: u64) {
        self.indexes.lock().unwrap_or_else(|e| e.into_inner()).remove(&uid);
        self.room.notify_all();
    }

    pub(crate) fn clear(&self) {
        self.indexes.lock().unwrap_or_else(|e| e.into_inner()).clear();
    }

    /// Item writes and removals logged and not yet applied, over all indexes.
    pub(crate) fn pending(&self) -> usize {
        self.indexes().iter().map(|i| i.state().pending()).sum()
    }

    /// Stops taking writes until the process restarts: something that was to make acknowledged
    /// writes durable failed, and what reached the disk is unknown.
    pub(crate) fn fail_stop(&self) {
        self.wal.lock().unwrap_or_else(|e| e.into_inner()).failed = true;
    }

    /// Whether writes stopped after a failure (`fail_stop`, or a failed write of the log).
    pub(crate) fn failed(&self) -> bool {
        self.wal.lock().unwrap_or_else(|e| e.into_inner()).failed
    }

    /// The position the log's next record will get.
    pub(crate) fn next_position(&self) -> Position {
        self.wal.lock().unwrap_or_else(|e| e.into_inner()).wal.next_position()
    }

    /// Starts the log afresh at `position` (`Wal::restart_at`).
    pub(crate) fn restart_log_at(&self, position: Position) -> Result<(), StoreError> {
        self.wal.lock().unwrap_or_else(|e| e.into_inner()).wal.restart_at(position)
    }

    /// The log's directory.
    pub(crate) fn log_dir(&self) -> std::path::PathBuf {
        self.wal.lock().unwrap_or_else(|e| e.into_inner()).wal.dir().to_path_buf()
    }

    /// Deletes log segments that every open index has applied.
    /// What to keep is decided under the log's lock, which the writer holds until every batch
    /// it wrote is pending in its index: a batch logged meanwhile is never behind `keep_from`.
    pub(crate) fn drop_applied_log(&self) -> Result<(), StoreError> {
        crate::failpoint::test_hook("drop-applied-log");
        let mut log = self.wal.lock().unwrap_or_else(|e| e.into_inner());
        let first_needed = self.indexes().iter().filter_map(|i| i.state().first_pending()).min();
        let keep_from = first_needed.unwrap_or(log.wal.next_position());
        log.wal.remove_before(keep_from)?;
        Ok(())
    }

    pub(crate) fn set_sender(&self, sender: Option<mpsc::Sender<Submission>>) {
        *self.sender.lock().unwrap_or_else(|e| e.into_inner()) = sender;
    }

    /// Hands a write to the writer thread and waits until it is durable (or refused).
    pub(crate) fn submit(&self, index: Arc<Index>, request: WriteRequest) -> Result<WriteOutcome, IndexError> {
        let (reply, answer) = mpsc::sync_channel(1);
        let sender = self.sender.lock().unwrap_or_else(|e| e.into_inner()).clone();
        let shutting_down = || IndexError::Unavailable("the server is shutting down".into());
        sender.ok_or_else(shutting_down)?.send(Submission { index, request, reply }).map_err(|_| shutting_down())?;
        answer.recv().map_err(|_| shutting_down())?
    }
}

/// Batches of one group, submissions beyond this wait for the next.
const MAX_GROUP_SUBMISSIONS: usize = 256;
/// Embedding bytes in one group at most (the writes before the fsync).
const MAX_GROUP_VECTOR_BYTES: usize = 64 << 20;

/// The writer thread: runs until every sender is gone.
pub(crate) fn run_writer(shared: Arc<LogShared>, submissions: mpsc::Receiver<Submission>) {
    while let Ok(first) = submissions.recv() {
        let mut bytes = first.request.vector_bytes();
        let mut group = vec![first];
        while group.len() < MAX_GROUP_SUBMISSIONS && bytes < MAX_GROUP_VECTOR_BYTES {
            match submissions.try_recv() {
                Ok(more) => {
                    bytes += more.request.vector_bytes();
                    group.push(more);
                }
                Err(_) => break,
            }
        }
        wait_for_room(&shared);
        commit_group(&shared, group);
    }
}

impl WriteRequest {
    fn vector_bytes(&self) -> usize {
        match self {
            Self::Upsert(items) => items.iter().map(|i| 4 * i.vector.len()).sum(),
            Self::Delete(_) => 0,
        }
    }
}

/// Waits while the applier is too far behind (bounded: the tail replayed at start stays short).
fn wait_for_room(shared: &LogShared) {
    let max = shared.options.max_lag_operations;
    let mut signal = shared.signal();
    while !signal.stop && shared.pending() >= max {
        shared.work.notify_all();
        signal = shared.room.wait_timeout(signal, Duration::from_millis(50)).unwrap_or_else(|e| e.into_inner()).0;
    }
}

/// Numbers and id fates decided earlier in the same group, per index uid.
#[derive(Default)]
struct GroupView {
    next: HashMap<u64, u32>,
    /// `None`: deleted in this group.
    ids: HashMap<(u64, String), Option<CurrentItem>>,
}

/// The item an id names, with its codes (to take it out of its buckets).
#[derive(Debug, Clone)]
struct CurrentItem {
    number: u32,
    codes: Vec<u64>,
}

fn commit_group(shared: &LogShared, group: Vec<Submission>) {
    let mut view = GroupView::default();
    let mut ready: Vec<(Submission, Arc<StoreBatch>, WriteOutcome)> = Vec::new();
    // Submissions with nothing to log (ids already gone) are answered with their group: what
    // they answer may rest on a removal earlier in it, which is not durable before the fsync.
    let mut nothing_to_log: Vec<(Submission, WriteOutcome)> = Vec::new();
    for mut submission in group {
        let request = std::mem::replace(&mut submission.request, WriteRequest::Delete(Vec::new()));
        match prepare(&submission.index, request, &mut view) {
            Ok((batch, outcome)) if batch.items.is_empty() && batch.removals.is_empty() => {
                nothing_to_log.push((submission, outcome));
            }
            Ok((batch, outcome)) => ready.push((submission, Arc::new(batch), outcome)),
            Err(e) => {
                let _ = submission.reply.send(Err(e));
            }
        }
    }
    // Embeddings before the log entries that make them count.
    let mut synced: HashSet<u64> = HashSet::new();
    let mut failed: HashMap<u64, String> = HashMap::new();
    for (submission, _, _) in &ready {
        let uid = submission.index.store.uid();
        if shared.options.fsync
            && synced.insert(uid)
            && let Err(e) = submission.index.store.sync_vectors()
        {
            failed.insert(uid, e.to_string());
        }
    }
    let (ready, refused): (Vec<_>, Vec<_>) =
        ready.into_iter().partition(|(s, _, _)| !failed.contains_key(&s.index.store.uid()));
    let refusal = |message: &str| IndexError::Store(StoreError::Io(std::io::Error::other(message.to_string())));
    for (submission, _, _) in refused {
        let _ = submission.reply.send(Err(refusal(&failed[&submission.index.store.uid()])));
    }
    let logged_any = !ready.is_empty();
    let written = if logged_any { log_group(shared, &ready) } else { Ok(()) };
    if let Err(e) = &written {
        tracing::error!(error = %e, "writing the log failed: nothing more is acknowledged");
    }
    let log_error = written.as_ref().err().map(|e| e.to_string());
    for (submission, _, outcome) in ready {
        let _ = submission.reply.send(log_error.as_deref().map_or(Ok(outcome), |m| Err(refusal(m))));
    }
    for (submission, outcome) in nothing_to_log {
        // Refused with the index (or the log) whose earlier removal it may rest on.
        let message = failed.get(&submission.index.store.uid()).map(String::as_str).or(log_error.as_deref());
        let _ = submission.reply.send(message.map_or(Ok(outcome), |m| Err(refusal(m))));
    }
    if logged_any && written.is_ok() {
        let mut signal = shared.signal();
        signal.oldest.get_or_insert_with(Instant::now);
        shared.work.notify_all();
    }
}

/// Writes the group's batches to the log, makes them durable, and hands each to its index's
/// query state before the log's lock is let go (`drop_applied_log` decides under that lock).
fn log_group(shared: &LogShared, ready: &[(Submission, Arc<StoreBatch>, WriteOutcome)]) -> Result<(), StoreError> {
    let payloads: Vec<Vec<u8>> =
        ready.iter().map(|(s, batch, _)| encode(s.index.store.uid(), batch).encode_to_vec()).collect();
    let mut log = shared.wal.lock().unwrap_or_else(|e| e.into_inner());
    if log.failed {
        return Err(StoreError::Io(std::io::Error::other(
            "an earlier write to the log or the store failed; restart the server to recover what was acknowledged",
        )));
    }
    crate::failpoint::crash_point("vectors-synced");
    let appended = log.wal.append(&payloads);
    crate::failpoint::crash_point("log-written");
    let written = match shared.options.fsync {
        true => appended.and_then(|first| log.wal.sync().map(|()| first)),
        false => appended,
    };
    let first = match written {
        Ok(first) => first,
        Err(e) => {
            log.failed = true;
            return Err(e);
        }
    };
    for ((submission, batch, _), position) in ready.iter().zip(first..) {
        submission.index.state_mut().logged(position, batch.clone());
    }
    Ok(())
}

/// Decides what a request does: item numbers, which items it replaces or deletes (with their
/// codes, so that applying it reads no records), and writes the embeddings of new items.
fn prepare(
    index: &Index,
    request: WriteRequest,
    view: &mut GroupView,
) -> Result<(StoreBatch, WriteOutcome), IndexError> {
    index.check_not_dropped()?;
    let uid = index.store.uid();
    match request {
        WriteRequest::Upsert(items) => {
            // The last occurrence of a repeated id wins, as if the items were sent one by one.
            let mut last: HashMap<&str, usize> = HashMap::with_capacity(items.len());
            for (i, item) in items.iter().enumerate() {
                last.insert(&item.id, i);
            }
            let keep: Vec<bool> = items.iter().enumerate().map(|(i, it)| last[it.id.as_str()] == i).collect();
            let items: Vec<PreparedItem> = items.into_iter().zip(keep).filter(|(_, k)| *k).map(|(it, _)| it).collect();
            let first = match view.next.get(&uid) {
                Some(&next) => next,
                None => index.state().next(),
            };
            let end = u32::try_from(u64::from(first) + items.len() as u64)
                .map_err(|_| StoreError::ItemNumbersExhausted(index.def().name.clone()))?;
            let mut batch = StoreBatch::default();
            for (number, item) in (first..).zip(&items) {
                if let Some(old) = current(index, uid, &item.id, view)? {
                    batch.removals.push(Removal { number: old.number, codes: old.codes, deleted_id: None });
                }
                batch.items.push(Arc::new(ItemWrite {
                    number,
                    id: item.id.clone(),
                    label: item.label.clone(),
                    metadata: item.metadata.clone(),
                    codes: item.codes.clone(),
                    sketch: item.sketch.clone(),
                    thumbnail: item.thumbnail.clone(),
                }));
            }
            let vectors: Vec<&[f32]> = items.iter().map(|i| i.vector.as_slice()).collect();
            index.store.write_vectors(first, &vectors)?;
            crate::failpoint::crash_point("vectors-written");
            for item in &batch.items {
                view.ids.insert(
                    (uid, item.id.clone()),
                    Some(CurrentItem { number: item.number, codes: item.codes.clone() }),
                );
            }
            view.next.insert(uid, end);
            let written = batch.items.len();
            Ok((batch, written))
        }
        WriteRequest::Delete(ids) => {
            let mut batch = StoreBatch::default();
            let unique: BTreeSet<String> = ids.into_iter().collect();
            for id in unique {
                if let Some(old) = current(index, uid, &id, view)? {
                    view.ids.insert((uid, id.clone()), None);
                    batch.removals.push(Removal { number: old.number, codes: old.codes, deleted_id: Some(id) });
                }
            }
            let deleted = batch.removals.len();
            Ok((batch, deleted))
        }
    }
}

/// The item an id names now (number and codes), counting what this group decided already and
/// what is logged but not applied.
fn current(index: &Index, uid: u64, id: &str, view: &GroupView) -> Result<Option<CurrentItem>, IndexError> {
    if let Some(fate) = view.ids.get(&(uid, id.to_string())) {
        return Ok(fate.clone());
    }
    let stored = {
        let state = index.state();
        match state.id(id) {
            TailId::Deleted => return Ok(None),
            TailId::Live(number) => {
                let codes = state.tail_item(number).map(|it| it.codes.clone());
                return codes
                    .map(|codes| Some(CurrentItem { number, codes }))
                    .ok_or_else(|| StoreError::Corrupt(format!("logged item {number} is missing")).into());
            }
            TailId::Unknown => index.store.item_number(id)?,
        }
    };
    let Some(number) = stored else { return Ok(None) };
    let item = index.store.items(&[number])?.pop();
    let item = item.ok_or_else(|| StoreError::Corrupt(format!("item {number} has an id but no record")))?;
    Ok(Some(CurrentItem { number, codes: item.codes }))
}

fn encode(index_uid: u64, batch: &StoreBatch) -> LogBatch {
    LogBatch {
        index_uid,
        first: batch.items.first().map_or(0, |i| i.number),
        items: batch
            .items
            .iter()
            .map(|it| LoggedItem {
                id: it.id.clone(),
                label: it.label.clone(),
                metadata: it.metadata.clone(),
                codes: it.codes.clone(),
                sketch: it.sketch.clone(),
                thumbnail: it.thumbnail.clone().unwrap_or_default(),
            })
            .collect(),
        removals: batch
            .removals
            .iter()
            .map(|r| LoggedRemoval {
                number: r.number,
                codes: r.codes.clone(),
                deleted_id: r.deleted_id.clone().unwrap_or_default(),
            })
            .collect(),
    }
}

/// A log record's index uid and batch.
pub(crate) fn decode(record: &LogRecord) -> Result<(u64, StoreBatch), StoreError> {
    let logged = LogBatch::decode(record.payload.as_slice())?;
    let items = (logged.first..)
        .zip(logged.items)
        .map(|(number, it)| {
            Arc::new(ItemWrite {
                number,
                id: it.id,
                label: it.label,
                metadata: it.metadata,
                codes: it.codes,
                sketch: it.sketch,
                thumbnail: (!it.thumbnail.is_empty()).then_some(it.thumbnail),
            })
        })
        .collect();
    let removals = logged
        .removals
        .into_iter()
        .map(|r| Removal {
            number: r.number,
            codes: r.codes,
            deleted_id: (!r.deleted_id.is_empty()).then_some(r.deleted_id),
        })
        .collect();
    Ok((logged.index_uid, StoreBatch { removals, items }))
}

/// Takes the log's batches (position, index uid, batch; oldest first), which the caller kept
/// only past their index's applied position, back into the indexes' query state. Then cuts
/// embedding files back to what was logged. Returns how many were taken in.
pub(crate) fn replay(
    batches: Vec<(Position, u64, StoreBatch)>,
    indexes: &HashMap<u64, (Arc<Index>, Position)>,
) -> Result<usize, IndexError> {
    let mut taken = 0;
    for (position, uid, batch) in batches {
        let Some((index, _)) = indexes.get(&uid) else { continue };
        index.state_mut().logged(position, Arc::new(batch));
        taken += 1;
    }
    for (index, _) in indexes.values() {
        let next = index.state().next();
        index.store.cut_vectors(next)?;
    }
    Ok(taken)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::index::{Engine, IndexSpec, VectorItem};
    use crate::store::MemoryCatalog;

    /// Loss window 2: a delete answered `deleted: 0` only because an earlier submission of its
    /// group deleted the id is answered with the group: when the group's log write fails, it
    /// fails too, and the id stays live.
    #[test]
    fn a_delete_resting_on_its_group_is_answered_with_the_group() {
        let dir = tempfile::tempdir().unwrap();
        let engine = Engine::open(Arc::new(MemoryCatalog::new()), &dir.path().join("wal"), 4).unwrap();
        engine.create(IndexSpec { name: "a".into(), hash_bits: 4, tables: 2, ..Default::default() }).unwrap();
        let index = engine.index("a").unwrap();
        let item = VectorItem { id: "x".into(), vector: vec![1.0, 2.0, 3.0, 4.0], ..Default::default() };
        index.ingest(vec![(0, item)]).unwrap();
        // The next write of the log fails.
        engine.log.fail_stop();
        let (first, first_answer) = mpsc::sync_channel(1);
        let (second, second_answer) = mpsc::sync_channel(1);
        let delete =
            |reply| Submission { index: index.clone(), request: WriteRequest::Delete(vec!["x".into()]), reply };
        commit_group(&engine.log, vec![delete(first), delete(second)]);
        assert!(first_answer.recv().unwrap().is_err(), "the delete that reached the log");
        let second = second_answer.recv().unwrap();
        assert!(second.is_err(), "the delete resting on it was answered {second:?}");
        assert_eq!(index.state().count(), 1, "x is still live");
    }
}
