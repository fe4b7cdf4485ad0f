//! Persistence of indexes. The domain (`crate::index`) depends on the traits here, never on
//! sled; the store knows nothing of gRPC or of how codes are computed.

pub mod cluster;
#[cfg(test)]
mod conformance;
mod durable;
mod keys;
mod memory;
pub mod migrate;
mod records;
mod sled_store;
pub mod wal;

use std::collections::HashMap;
use std::ops::Range;
use std::sync::Arc;

pub(crate) use durable::sync_dir;
pub use memory::MemoryCatalog;
pub use sled_store::{SledCatalog, SledOptions};
pub use wal::{LogRecord, Position, Wal};

/// Entry points for the fuzz targets in `fuzz/`: the readers of what is on disk, over files a
/// fuzzer writes. Not an API.
#[doc(hidden)]
pub mod fuzzing {
    use std::path::Path;

    use super::StoreError;
    use super::records::{Access, RecordFile};

    /// Opens the file at `path` as a record file of `payload_len`-byte payloads, reads the
    /// records of `items` and the first `committed` whole, then cuts it to `committed`.
    pub fn read_record_file(path: &Path, payload_len: usize, committed: u32, items: &[u32]) -> Result<(), StoreError> {
        let file = RecordFile::open(path, payload_len, Access::Mapped)?;
        let _ = file.read_many(items, |_, payload| assert_eq!(payload.len(), payload_len));
        let _ = file.read_all(committed, |n| n % 3 != 0, |_, payload| assert_eq!(payload.len(), payload_len));
        file.cut_to(committed)
    }
}

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// The backend's own error (its detail boxed: the contract names no backend).
    #[error("storage backend: {0}")]
    Backend(Box<dyn std::error::Error + Send + Sync>),
    #[error("i/o: {0}")]
    Io(#[from] std::io::Error),
    #[error("corrupt record: {0}")]
    Corrupt(String),
    #[error("corrupt record: {0}")]
    Decode(#[from] prost::DecodeError),
    #[error(
        "the database has on-disk layout version {found}, newer than version {supported} that \
         this imagelsh understands; run a newer imagelsh (it was never opened by this one)"
    )]
    LayoutTooNew { found: u32, supported: u32 },
    #[error("index {0:?} already exists")]
    AlreadyExists(String),
    /// The backend cannot take this now and a retry may succeed: a shared store's node
    /// unreachable or failing over, or fewer replicas than the acknowledgement needs.
    #[error("{0}")]
    Unavailable(String),
    #[error("index {0:?} was dropped")]
    Dropped(String),
    #[error("index {0:?} has used all 2^32 item numbers")]
    ItemNumbersExhausted(String),
    #[error("index {0:?} does not store embeddings")]
    VectorsNotStored(String),
    /// A log segment other than the last is damaged: records after the damage were
    /// acknowledged once, so the log is not cut back on its own.
    #[error(
        "the write-ahead log segment {segment} is damaged at byte {offset} and {later} later segments \
         follow it: acknowledged writes may be lost; `imagelsh check --repair` cuts the log back to the \
         damage (losing what follows it), or restore a backup"
    )]
    LogDamaged { segment: std::path::PathBuf, offset: u64, later: usize },
    /// The log starts past positions the store holds are missing (a lost or replaced `wal/`).
    #[error(
        "the write-ahead log ends at position {log_next} but index {index:?} has applied up to \
         {applied}: the log was lost or replaced; `imagelsh check --repair` continues its positions \
         after the store's, or restore a backup"
    )]
    LogBehindStore { index: String, applied: u64, log_next: u64 },
    /// Another process holds the database open.
    #[error(
        "the database in {0} is in use by another process (an imagelsh server, or `imagelsh check` or \
         `compact`): stop it first; commands that work on a data directory offline need it alone"
    )]
    InUse(std::path::PathBuf),
}

/// The definition an index record holds.
pub(crate) fn def_of(r: &crate::storage_proto::IndexRecord) -> IndexDef {
    IndexDef {
        name: r.name.clone(),
        dim: r.dim,
        hash_bits: r.hash_bits,
        tables: r.tables,
        seed: r.seed,
        model: r.model.clone(),
        created_at: r.created_at,
        sketch_bits: r.sketch_bits,
        stores_vectors: !r.vectors_omitted,
        thumbnails: r.thumbnails,
    }
}

/// The record of index `def` under `uid` (a catalog entry).
pub(crate) fn record_of(def: &IndexDef, uid: u64) -> crate::storage_proto::IndexRecord {
    crate::storage_proto::IndexRecord {
        name: def.name.clone(),
        uid,
        dim: def.dim,
        hash_bits: def.hash_bits,
        tables: def.tables,
        seed: def.seed,
        model: def.model.clone(),
        created_at: def.created_at,
        sketch_bits: def.sketch_bits,
        vectors_omitted: !def.stores_vectors,
        thumbnails: def.thumbnails,
    }
}

/// What defines an index, fixed at creation.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct IndexDef {
    pub name: String,
    pub dim: u32,
    pub hash_bits: u32,
    pub tables: u32,
    pub seed: u64,
    /// The model whose embeddings the index holds; empty when fed vectors only.
    pub model: String,
    /// Unix seconds.
    pub created_at: u64,
    /// Bits of each item's sketch; 0 when the index keeps none.
    pub sketch_bits: u32,
    /// Whether the index keeps every item's embedding (for exact re-ranking and queries by id).
    pub stores_vectors: bool,
    /// Whether the index keeps a thumbnail of each image item (apart from what queries read).
    pub thumbnails: bool,
}

/// What an index is created with besides its definition; matrices are row-major f32.
#[derive(Debug, Clone, Copy)]
pub struct IndexParams<'a> {
    pub hyperplanes: &'a [f32],
    /// Subtracted from vectors before hashing and sketching.
    pub center: Option<&'a [f32]>,
    /// The sketch hyperplanes, when `sketch_bits > 0`.
    pub sketch_planes: Option<&'a [f32]>,
}

/// An item as a logged batch writes it: its item number is assigned when the batch is logged.
#[derive(Debug, Clone, PartialEq)]
pub struct ItemWrite {
    pub number: u32,
    pub id: String,
    pub label: String,
    pub metadata: HashMap<String, String>,
    /// One code per table.
    pub codes: Vec<u64>,
    /// `sketch_bits / 64` words, empty when the index keeps no sketches.
    pub sketch: Vec<u64>,
    /// A JPEG, in indexes that keep thumbnails (`None` for an item ingested as an embedding).
    pub thumbnail: Option<Vec<u8>>,
}

/// An item a logged batch takes out of its buckets: replaced (its id now names another item) or
/// deleted (`deleted_id` is then forgotten too).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Removal {
    pub number: u32,
    pub codes: Vec<u64>,
    pub deleted_id: Option<String>,
}

/// One acknowledged batch of one index, as the store applies it: removals first, then writes.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct StoreBatch {
    pub removals: Vec<Removal>,
    pub items: Vec<Arc<ItemWrite>>,
}

/// An item as read back; `number` is the store's internal item number.
#[derive(Debug, Clone, PartialEq)]
pub struct StoredItem {
    pub number: u32,
    pub id: String,
    pub label: String,
    pub metadata: HashMap<String, String>,
    /// The item's code in each table.
    pub codes: Vec<u64>,
}

/// What an index's query state starts from: everything the store has applied.
#[derive(Debug, Clone, Default)]
pub struct StoredState {
    /// Item numbers below this one have been used.
    pub next: u32,
    /// Live items.
    pub count: u64,
    /// The last log position applied to this index (0: none).
    pub applied: u64,
    /// Live item numbers: bit `n % 64` of word `n / 64`.
    pub live: Vec<u64>,
    /// Item `n`'s sketch at words `n × w .. (n + 1) × w`, for items below `next`; empty when the
    /// index keeps no sketches.
    pub sketches: Vec<u64>,
}

/// The registry of indexes.
pub trait Catalog: Send + Sync {
    /// Creates an index, durably.
    fn create(&self, def: &IndexDef, params: IndexParams<'_>) -> Result<Arc<dyn IndexStore>, StoreError>;
    /// Opens an existing index; `None` if there is none of that name.
    fn open(&self, name: &str) -> Result<Option<Arc<dyn IndexStore>>, StoreError>;
    fn list(&self) -> Result<Vec<IndexDef>, StoreError>;
    /// Makes every applied batch durable (`IndexStore::apply` alone need not).
    fn sync(&self) -> Result<(), StoreError>;
    /// Bounds the backend's own crash recovery, when enough was applied since the last time or
    /// when `force`d (sled replays everything written since it last opened its database: a
    /// checkpoint closes and reopens it, and reads and writes wait meanwhile). Returns how long
    /// it took, or `None` when nothing was due.
    fn checkpoint(&self, force: bool) -> Result<Option<std::time::Duration>, StoreError> {
        let _ = force;
        Ok(None)
    }
    /// Writes a consistent copy of everything applied into the fresh directory `to`, laid out as
    /// the data directory the backend opens (writes wait, reads go on). The caller makes sure
    /// that nothing is applied or reclaimed meanwhile.
    fn backup(&self, to: &std::path::Path) -> Result<(), StoreError> {
        let _ = to;
        Err(StoreError::Backend("this storage backend keeps no files to back up".into()))
    }
    /// Rewrites the backend's own files so that the space of removed data comes back (for sled:
    /// a copy into a fresh database, swapped in). `None` where the backend has nothing to do.
    fn compact(&self) -> Result<Option<Compaction>, StoreError> {
        Ok(None)
    }
}

/// What a rewrite of the backend's files did (`Catalog::compact`).
#[derive(Debug, Clone, Copy)]
pub struct Compaction {
    /// Bytes of disk the backend's files took before and after.
    pub before: u64,
    pub after: u64,
    /// Time copying (writes waited, reads went on) and swapping (everything waited).
    pub copied: std::time::Duration,
    pub paused: std::time::Duration,
}

/// One entry of a bucket: item `number` in bucket `code` of `table`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct BucketEntry {
    pub table: u16,
    pub code: u64,
    pub number: u32,
}

/// Fixes that `imagelsh check --repair` makes to an index's persisted structures, atomically.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct StoreRepair {
    /// Entries to take out of their buckets (one occurrence each).
    pub remove: Vec<BucketEntry>,
    /// Entries to put into their buckets.
    pub add: Vec<BucketEntry>,
    /// The live item count, when it is wrong.
    pub count: Option<u64>,
    /// Ids that must name these items.
    pub ids: Vec<(String, u32)>,
}

impl StoreRepair {
    pub fn is_empty(&self) -> bool {
        self.remove.is_empty() && self.add.is_empty() && self.count.is_none() && self.ids.is_empty()
    }
}

/// The persisted data of one index: buckets keyed by table and code, items, embeddings.
///
/// Writes come in two steps: an ingest writes the embeddings of its items (`write_vectors`,
/// made durable by `sync_vectors` before the batch is logged); the logged batches are applied
/// later, many at a time (`apply`). Query-time state (sketches, liveness, what is logged but not
/// yet applied) belongs to the caller, which gets it at open (`load`).
pub trait IndexStore: Send + Sync {
    fn def(&self) -> &IndexDef;
    /// Never reused, also across a drop and a create of the same name.
    fn uid(&self) -> u64;
    fn hyperplanes(&self) -> Result<Vec<f32>, StoreError>;
    /// The vector subtracted before hashing, if the index has one.
    fn center(&self) -> Result<Option<Vec<f32>>, StoreError>;
    /// The sketch hyperplanes, if the index keeps sketches.
    fn sketch_planes(&self) -> Result<Option<Vec<f32>>, StoreError>;
    /// The applied state: counters, liveness and sketches of applied items.
    fn load(&self) -> Result<StoredState, StoreError>;
    /// The log position of the last batch applied (0: none), as `apply` recorded it: a caller
    /// that applies again after a failure skips the batches up to it.
    fn applied_position(&self) -> Result<u64, StoreError>;
    /// Writes the embeddings of items `first, first + 1, …` (not yet durable). A no-op when the
    /// index keeps no embeddings.
    fn write_vectors(&self, first: u32, vectors: &[&[f32]]) -> Result<(), StoreError>;
    /// Makes every written embedding durable.
    fn sync_vectors(&self) -> Result<(), StoreError>;
    /// Drops embeddings of items from `committed` on (written but never logged); fails if
    /// embeddings of items below it are missing.
    fn cut_vectors(&self, committed: u32) -> Result<(), StoreError>;
    /// Applies the batches in order, atomically, with `position` (the log position of the last)
    /// as the new applied position. After a crash the index holds all of them or none.
    fn apply(&self, batches: &[&StoreBatch], position: u64) -> Result<(), StoreError>;
    /// Appends the item numbers in bucket `code` of `table` to `out` (applied batches only; may
    /// include items a later batch removes).
    fn bucket(&self, table: u16, code: u64, out: &mut Vec<u32>) -> Result<(), StoreError>;
    /// The applied items with these numbers, skipping numbers with no item.
    fn items(&self, numbers: &[u32]) -> Result<Vec<StoredItem>, StoreError>;
    /// The thumbnails of the applied items with these numbers, in order (`None`: no item, or one
    /// without a thumbnail). Never read by queries.
    fn thumbnails(&self, numbers: &[u32]) -> Result<Vec<Option<Vec<u8>>>, StoreError>;
    /// The number of the applied item with this id.
    fn item_number(&self, id: &str) -> Result<Option<u32>, StoreError>;
    /// Calls `f(i, embedding)` with the stored embedding of each of `numbers` in turn (re-ranking:
    /// read in place where possible, the next one fetched while one is used).
    fn for_each_vector(&self, numbers: &[u32], f: &mut dyn FnMut(usize, &[f32])) -> Result<(), StoreError>;
    /// The stored embedding of item `number`.
    fn vector(&self, number: u32) -> Result<Vec<f32>, StoreError> {
        let mut out = Vec::new();
        self.for_each_vector(&[number], &mut |_, v| out = v.to_vec())?;
        Ok(out)
    }
    /// Calls `f(code, items)` for every non-empty bucket of `table` (a full pass: offline checks).
    fn for_each_bucket(&self, table: u16, f: &mut dyn FnMut(u64, &[u32])) -> Result<(), StoreError>;
    /// Applies `repair` in one atomic write.
    fn repair(&self, repair: &StoreRepair) -> Result<(), StoreError>;
    /// Frees the space of the embedding and sketch records of the items in `dead` (runs of
    /// item numbers): items removed by applied batches, whose records are never read again.
    /// Returns the bytes freed (0 where the backend cannot free part of a record).
    fn reclaim(&self, dead: &[Range<u32>]) -> Result<u64, StoreError>;
    /// Removes the index and all its data; later calls on this handle fail with `Dropped`.
    fn destroy(&self) -> Result<(), StoreError>;
}
