//! Offline maintenance of a data directory (`imagelsh compact`, `imagelsh check`): run on an
//! engine that nothing else uses, after the log is applied.

use std::collections::HashMap;
use std::fmt;

use super::{Engine, Index, IndexError};
use crate::store::{BucketEntry, Compaction, StoreError, StoreRepair};

/// What `Engine::compact` did.
#[derive(Debug, Clone)]
pub struct CompactReport {
    /// Bytes of removed items' records given back (holes punched again counted again).
    pub reclaimed: u64,
    /// The rewrite of the store's own files, where the backend has one.
    pub store: Option<Compaction>,
}

/// One thing `Engine::check` found wrong in an index.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Problem {
    /// A bucket entry names an item that has no record (removed, or never applied).
    EntryWithoutItem(BucketEntry),
    /// A bucket entry names a live item whose codes put it in another bucket of that table.
    MisplacedEntry(BucketEntry),
    /// A live item appears twice in one table.
    DuplicateEntry(BucketEntry),
    /// A live item is missing from a table.
    MissingEntry(BucketEntry),
    /// The stored live-item count disagrees with the records.
    Count { stored: u64, records: u64 },
    /// An id does not lead to its item.
    IdNotFound { id: String, number: u32, found: Option<u32> },
    /// An item's embedding fails its checksum (or is missing).
    BadEmbedding { id: String, number: u32 },
}

impl fmt::Display for Problem {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let at = |e: &BucketEntry| format!("item {} in bucket {:x} of table {}", e.number, e.code, e.table);
        match self {
            Self::EntryWithoutItem(e) => write!(f, "{} has no record", at(e)),
            Self::MisplacedEntry(e) => write!(f, "{}: its codes put it elsewhere", at(e)),
            Self::DuplicateEntry(e) => write!(f, "{} is listed twice", at(e)),
            Self::MissingEntry(e) => write!(f, "{} is missing", at(e)),
            Self::Count { stored, records } => write!(f, "live count is {stored}, {records} items have records"),
            Self::IdNotFound { id, number, found } => {
                write!(f, "id {id:?} should name item {number}, names {found:?}")
            }
            Self::BadEmbedding { id, number } => write!(f, "embedding of item {number} ({id:?}) fails its checksum"),
        }
    }
}

/// What `Engine::check` found in one index, and what it repaired.
#[derive(Debug, Clone)]
pub struct IndexCheck {
    pub index: String,
    pub items: u64,
    /// Bucket entries read, over all tables.
    pub entries: u64,
    pub problems: Vec<Problem>,
    pub repaired: bool,
}

/// Items whose records are read per store call (bounded memory per read).
const READ_CHUNK: u32 = 4096;

impl Engine {
    /// Applies the log, frees every removed item's records and rewrites the store's files.
    pub fn compact(&self) -> Result<CompactReport, IndexError> {
        self.apply_now()?;
        let _applying = self.log.applying.lock().unwrap_or_else(|e| e.into_inner());
        let mut reclaimed = 0;
        for index in self.open_indexes().values() {
            reclaimed += index.reclaim_all()?;
        }
        let store = super::apply::compact(&self.log)?;
        Ok(CompactReport { reclaimed, store })
    }

    /// Verifies every index (after applying the log: opening replayed it, which checks the log
    /// against the files): every item with a record is in all L tables exactly once, in the
    /// bucket of its codes; no bucket entry lacks an item; the count matches; each id leads to
    /// its item; each embedding passes its checksum. With `repair`, bucket entries, the count
    /// and ids are fixed, and items whose embedding is lost are deleted.
    pub fn check(&self, repair: bool) -> Result<Vec<IndexCheck>, IndexError> {
        self.apply_now()?;
        let indexes: Vec<_> = self.open_indexes().values().cloned().collect();
        let mut reports = Vec::new();
        for index in indexes {
            let mut report = check_index(&index)?;
            if repair && !report.problems.is_empty() {
                repair_index(&index, &report.problems)?;
                self.apply_now()?;
                report.repaired = true;
            }
            reports.push(report);
        }
        reports.sort_by(|a, b| a.index.cmp(&b.index));
        Ok(reports)
    }
}

fn check_index(index: &Index) -> Result<IndexCheck, IndexError> {
    let def = index.def().clone();
    let tables = def.tables as usize;
    let stored = index.store.load()?;
    // Every record: its id and codes, by item number.
    let mut records: HashMap<u32, (String, Vec<u64>)> = HashMap::new();
    for first in (0..stored.next).step_by(READ_CHUNK as usize) {
        let numbers: Vec<u32> = (first..stored.next.min(first + READ_CHUNK)).collect();
        for item in index.store.items(&numbers)? {
            records.insert(item.number, (item.id, item.codes));
        }
    }
    let mut problems = Vec::new();
    let mut entries = 0;
    for table in 0..tables {
        let mut seen = vec![false; stored.next as usize];
        index.store.for_each_bucket(table as u16, &mut |code, members| {
            for &number in members {
                entries += 1;
                let entry = BucketEntry { table: table as u16, code, number };
                match records.get(&number) {
                    None => problems.push(Problem::EntryWithoutItem(entry)),
                    Some((_, codes)) if codes.get(table) != Some(&code) => {
                        problems.push(Problem::MisplacedEntry(entry))
                    }
                    Some(_) => match seen.get_mut(number as usize) {
                        Some(s) if *s => problems.push(Problem::DuplicateEntry(entry)),
                        Some(s) => *s = true,
                        None => problems.push(Problem::EntryWithoutItem(entry)),
                    },
                }
            }
        })?;
        let mut missing: Vec<BucketEntry> = records
            .iter()
            .filter(|(n, _)| !seen.get(**n as usize).copied().unwrap_or(false))
            .filter_map(|(&number, (_, codes))| {
                codes.get(table).map(|&code| BucketEntry { table: table as u16, code, number })
            })
            .collect();
        missing.sort();
        problems.extend(missing.into_iter().map(Problem::MissingEntry));
    }
    if stored.count != records.len() as u64 {
        problems.push(Problem::Count { stored: stored.count, records: records.len() as u64 });
    }
    let mut numbers: Vec<u32> = records.keys().copied().collect();
    numbers.sort_unstable();
    for &number in &numbers {
        let id = &records[&number].0;
        let found = index.store.item_number(id)?;
        if found != Some(number) {
            problems.push(Problem::IdNotFound { id: id.clone(), number, found });
        }
    }
    if def.stores_vectors {
        for chunk in numbers.chunks(READ_CHUNK as usize) {
            if vectors_readable(index, chunk)? {
                continue;
            }
            // A record in this chunk fails: find which, one by one.
            for &number in chunk {
                if !vectors_readable(index, &[number])? {
                    problems.push(Problem::BadEmbedding { id: records[&number].0.clone(), number });
                }
            }
        }
    }
    Ok(IndexCheck { index: def.name, items: records.len() as u64, entries, problems, repaired: false })
}

/// Whether the embeddings of `numbers` are all there and pass their checksums.
fn vectors_readable(index: &Index, numbers: &[u32]) -> Result<bool, IndexError> {
    match index.store.for_each_vector(numbers, &mut |_, _| ()) {
        Ok(()) => Ok(true),
        Err(StoreError::Corrupt(_)) => Ok(false),
        Err(e) => Err(e.into()),
    }
}

fn repair_index(index: &std::sync::Arc<Index>, problems: &[Problem]) -> Result<(), IndexError> {
    let mut fix = StoreRepair::default();
    let mut lost = Vec::new();
    for problem in problems {
        match problem {
            Problem::EntryWithoutItem(e) | Problem::MisplacedEntry(e) | Problem::DuplicateEntry(e) => {
                fix.remove.push(*e)
            }
            Problem::MissingEntry(e) => fix.add.push(*e),
            Problem::Count { records, .. } => fix.count = Some(*records),
            Problem::IdNotFound { id, number, .. } => fix.ids.push((id.clone(), *number)),
            Problem::BadEmbedding { id, .. } => lost.push(id.clone()),
        }
    }
    // A misplaced entry also counts as missing from its right bucket, which the sweep reported.
    index.store.repair(&fix)?;
    // The buckets are whole again; an item without its embedding goes the normal way (logged,
    // applied), and its id with it.
    if !lost.is_empty() {
        index.delete(&lost)?;
    }
    Ok(())
}
