//! The domain: named indexes of embeddings, hashed by random-hyperplane LSH over a store.
//! Blocking code (matrix products and store I/O): async callers run it on a blocking thread.
//!
//! Writes go through the data directory's log (`commit`: group commit, acknowledged once
//! durable; `apply`: into the store in large groups later). Queries read the query state that
//! the index owns (`state`: liveness, sketches, the logged tail) over the store's applied data.
//!
//! This file holds the domain's types and one open index (its state and records); the rest,
//! one job per file: `engine` (the indexes of a data directory and their threads), `ingest`,
//! `query` (options, plan, candidates from the tables or a scan), `rank` (votes, sketches,
//! exact re-rank and the one top-k selection), `hits` (assembly and the tie rule), `maintain`
//! (offline check and compaction).

mod apply;
mod backup;
mod commit;
mod engine;
mod hits;
mod ingest;
mod lookup;
mod maintain;
mod query;
mod rank;
mod shared;
mod state;

use std::cell::RefCell;
use std::collections::HashMap;
use std::ops::Range;
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, RwLock, RwLockReadGuard, RwLockWriteGuard};
use std::thread::JoinHandle;

pub use backup::{BackupReport, walk as backup_files};
pub use commit::WriteOptions;
use commit::{LogShared, PreparedItem, WriteRequest};
pub use lookup::{FoundItem, Lookup, LookupFields};
pub use maintain::{CompactReport, IndexCheck, Problem};
use rank::{Candidate, QuerySketch, Ranked, best_first};
pub use shared::{SharedEngine, SharedIndex};
use state::{QueryState, TailId};

use ndarray::Array2;

use crate::lsh::{
    AsymmetricQuery, Hyperplanes, LshError, LshShape, VoteCounter, cosine, draw_sketch_planes, estimated_cosine,
    hamming, nearest_sketches, probe_codes, rescore_nearest, sketch_shape,
};
use crate::store::{Catalog, IndexDef, IndexParams, IndexStore, Position, StoreError, StoredItem, Wal};

/// Defaults chosen from BENCHMARKS.md: the smallest configuration that reaches recall@10 ≥ 0.9
/// on Fashion-MNIST embeddings with the model's center, sketch pre-ranking and exact re-ranking.
pub const DEFAULT_HASH_BITS: u32 = 12;
pub const DEFAULT_TABLES: u32 = 16;
pub const DEFAULT_PROBES: u32 = 2;
pub const DEFAULT_SKETCH_BITS: u32 = 512;
/// Candidates (best by sketch) re-ranked exactly when a query does not say: recall@10 0.977 by
/// full scan on Fashion-MNIST, where 50 gives 0.926 and 200 0.994 (BENCHMARKS.md).
pub const DEFAULT_RERANK_DEPTH: u32 = 100;
pub const MAX_RERANK_DEPTH: u32 = 100_000;
/// Candidates nearest by Hamming distance kept per re-ranked one, for the asymmetric re-score
/// (`lsh::AsymmetricQuery`) that picks which are re-ranked exactly: on Fashion-MNIST, scan at
/// depth 50, recall 0.832 without the re-score, 0.907 at 2×, 0.926 at 4×, 0.929 at 8× (the 8×
/// costs a third of the queries/s; measured once by varying this constant).
pub const ASYMMETRIC_PRESELECTION: usize = 4;
/// The original notebook's K and L, still reachable by asking for them.
pub const NOTEBOOK_HASH_BITS: u32 = 8;
pub const NOTEBOOK_TABLES: u32 = 10;
pub const DEFAULT_TOP_K: u32 = 10;
pub const MAX_TOP_K: u32 = 10_000;
pub const MAX_ID_BYTES: usize = 1024;
pub const MAX_NAME_BYTES: usize = 128;
/// Hard bounds on a new index's shape, whatever the service's configuration.
pub const MAX_DIM: u32 = 65_536;
pub const MAX_PLANE_BYTES: u64 = 1 << 30;

/// A new index's shape with its defaults filled in (`Engine::shape_for`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct IndexShape {
    pub dim: u32,
    pub hash_bits: u32,
    pub tables: u32,
    pub sketch_bits: u32,
}

impl IndexShape {
    /// Bytes of its hyperplanes and sketch planes (f32), saturating: what creating it draws.
    pub fn plane_bytes(&self) -> u64 {
        let planes = u64::from(self.hash_bits) * u64::from(self.tables) + u64::from(self.sketch_bits);
        u64::from(self.dim).saturating_mul(planes).saturating_mul(4)
    }
    /// The shape's fixed maxima (bits per code, tables, sketch bits), checked before the
    /// configurable limits derived from them: past these a shape is invalid, not too large.
    pub fn check_fixed_maxima(&self) -> Result<(), IndexError> {
        LshShape { dim: self.dim.max(1) as usize, hash_bits: self.hash_bits, tables: self.tables }.validate()?;
        crate::lsh::sketch_shape(self.dim.max(1) as usize, self.sketch_bits)?;
        Ok(())
    }
}
/// Extra buckets per table a query may visit.
pub const MAX_PROBES: u32 = 1024;
/// Largest index (in bytes of sketches) that `SearchPlan::Auto` answers by scanning every
/// sketch rather than reading its tables' buckets; see `Engine::with_full_scan_threshold`.
pub const DEFAULT_FULL_SCAN_THRESHOLD_BYTES: u64 = 16 << 20;

#[derive(Debug, thiserror::Error)]
pub enum IndexError {
    #[error("index {} not found", crate::limits::quote(.0))]
    NotFound(String),
    #[error("item {} not found in index {}", crate::limits::quote(.id), crate::limits::quote(.index))]
    ItemNotFound { index: String, id: String },
    #[error("index {} already exists", crate::limits::quote(.0))]
    AlreadyExists(String),
    #[error("{0}")]
    InvalidArgument(String),
    /// The server is shutting down: writes are no longer taken.
    #[error("{0}")]
    Unavailable(String),
    #[error(transparent)]
    Store(StoreError),
}

/// What kind of failure an `IndexError` is: what the layers above map it by, without looking
/// into the store's errors.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum IndexErrorKind {
    /// An index or item that does not exist (or an index dropped meanwhile).
    NotFound,
    AlreadyExists,
    InvalidArgument,
    /// Writes are not taken now (shutting down, or stopped after a failed write).
    Unavailable,
    /// A bound of the data itself was reached (an index's item numbers).
    Exhausted,
    /// The data cannot serve this as it is (a newer layout, a database in use, no embeddings).
    Precondition,
    /// Stored data failed a check.
    Damaged,
    /// The disk or the storage backend failed.
    Storage,
}

impl IndexError {
    pub fn kind(&self) -> IndexErrorKind {
        match self {
            Self::NotFound(_) | Self::ItemNotFound { .. } => IndexErrorKind::NotFound,
            Self::AlreadyExists(_) => IndexErrorKind::AlreadyExists,
            Self::InvalidArgument(_) => IndexErrorKind::InvalidArgument,
            Self::Unavailable(_) => IndexErrorKind::Unavailable,
            Self::Store(store) => match store {
                StoreError::Corrupt(_)
                | StoreError::Decode(_)
                | StoreError::LogDamaged { .. }
                | StoreError::LogBehindStore { .. } => IndexErrorKind::Damaged,
                StoreError::ItemNumbersExhausted(_) => IndexErrorKind::Exhausted,
                // The domain refuses what needs embeddings before asking the store for them.
                StoreError::LayoutTooNew { .. } | StoreError::InUse(_) | StoreError::VectorsNotStored(_) => {
                    IndexErrorKind::Precondition
                }
                StoreError::AlreadyExists(_) => IndexErrorKind::AlreadyExists,
                StoreError::Dropped(_) => IndexErrorKind::NotFound,
                StoreError::Backend(_) | StoreError::Io(_) => IndexErrorKind::Storage,
                StoreError::Unavailable(_) => IndexErrorKind::Unavailable,
            },
        }
    }
}

impl From<StoreError> for IndexError {
    fn from(e: StoreError) -> Self {
        match e {
            StoreError::AlreadyExists(name) => Self::AlreadyExists(name),
            StoreError::Dropped(name) => Self::NotFound(name),
            other => Self::Store(other),
        }
    }
}

impl From<LshError> for IndexError {
    fn from(e: LshError) -> Self {
        Self::InvalidArgument(e.to_string())
    }
}

/// A create request; zeros mean defaults.
#[derive(Debug, Clone, Default)]
pub struct IndexSpec {
    pub name: String,
    pub dim: u32,
    pub hash_bits: u32,
    pub tables: u32,
    pub seed: u64,
    pub model: String,
    /// Subtracted from every vector before hashing.
    pub center: Option<Vec<f32>>,
    /// 0 means `DEFAULT_SKETCH_BITS`.
    pub sketch_bits: u32,
    /// Keep every item's embedding (exact re-ranking, queries by id); `None` means yes.
    pub store_vectors: Option<bool>,
    /// Keep a thumbnail of each image item.
    pub thumbnails: bool,
}

#[derive(Debug, Clone, PartialEq)]
pub struct IndexInfo {
    pub def: IndexDef,
    pub items: u64,
    pub centered: bool,
}

/// An item with its embedding, as it arrives.
#[derive(Debug, Clone, Default)]
pub struct VectorItem {
    pub id: String,
    pub label: String,
    pub metadata: HashMap<String, String>,
    pub vector: Vec<f32>,
    /// A JPEG made from the image, for an index that keeps thumbnails.
    pub thumbnail: Option<Vec<u8>>,
}

/// An item refused while the rest of its batch goes on.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ItemFailure {
    pub position: u32,
    pub id: String,
    pub message: String,
    pub reason: RefusalReason,
}

/// Why an item was refused, in a few kinds (a metric's label: bounded, unlike the message).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RefusalReason {
    /// A field over a limit (id, label, metadata).
    Limit,
    /// Neither an image nor an embedding.
    NoContent,
    /// An image where the server runs no model, or a model the index does not hold.
    Model,
    /// An image that cannot be decoded, is truncated or too large.
    Image,
    /// An embedding of the wrong dimension, not finite, or without direction; an empty id.
    Embedding,
}

impl RefusalReason {
    pub fn as_str(self) -> &'static str {
        match self {
            RefusalReason::Limit => "limit",
            RefusalReason::NoContent => "no_content",
            RefusalReason::Model => "model",
            RefusalReason::Image => "image",
            RefusalReason::Embedding => "embedding",
        }
    }
}

#[derive(Debug, Default)]
pub struct IngestOutcome {
    pub indexed: u32,
    pub failures: Vec<ItemFailure>,
}

#[derive(Debug, Clone)]
pub enum QueryBy {
    Vector(Vec<f32>),
    /// A stored item's embedding; the item itself is left out of the hits.
    Id(String),
}

/// How a query finds its candidates.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum SearchPlan {
    /// `Scan` when the query ranks by similarity with no `min_votes` and the index's sketches
    /// fit the engine's full-scan threshold; `Tables` otherwise.
    #[default]
    Auto,
    /// The items in the query's buckets (and probed ones) of every table.
    Tables,
    /// Every live item, by sketch distance: at small sizes a sequential scan of the sketches
    /// costs less than reading buckets that hold a large share of the index anyway. Votes are
    /// then counted for the hits alone, from their stored codes, and may be 0.
    Scan,
}

#[derive(Debug, Clone, Default)]
pub struct QueryOptions {
    /// 0 means `DEFAULT_TOP_K`.
    pub top_k: u32,
    pub min_votes: u32,
    /// Extra buckets to visit in every table (multi-probe); `None` means `DEFAULT_PROBES`.
    pub probes: Option<u32>,
    /// Rank the candidates by cosine similarity (`None` means yes): exact, with the stored
    /// embeddings of the `rerank_depth` candidates that the sketches rank best (Hamming
    /// distance, then the asymmetric re-score); estimated from the sketches when the index
    /// keeps no embeddings. Otherwise candidates rank by votes.
    pub rerank: Option<bool>,
    /// 0 means `DEFAULT_RERANK_DEPTH`; never fewer than `top_k`.
    pub rerank_depth: u32,
    pub plan: SearchPlan,
}

#[derive(Debug, Clone, PartialEq)]
pub struct Hit {
    pub id: String,
    pub label: String,
    pub votes: u32,
    /// votes / L.
    pub score: f32,
    pub similarity: f32,
    pub metadata: HashMap<String, String>,
}

/// An index's size now.
#[derive(Debug, Clone, PartialEq)]
pub struct IndexSize {
    pub name: String,
    pub items: u64,
    /// Item writes and removals acknowledged (logged) but not yet applied to the store.
    pub unapplied: u64,
}

#[derive(Debug, Default)]
pub struct QueryResult {
    pub hits: Vec<Hit>,
    /// Items that collided with the query (`Tables`), or live items scanned (`Scan`).
    pub candidates: u32,
    /// The plan that ran: `Tables` or `Scan`.
    pub plan: SearchPlan,
}

/// How an engine runs; `Default` holds the measured defaults.
#[derive(Debug, Clone)]
pub struct EngineOptions {
    /// Largest index (bytes of sketches) that `SearchPlan::Auto` answers by a full scan (0: never).
    pub full_scan_threshold: u64,
    pub write: WriteOptions,
    /// Open a damaged log by cutting it back, and continue a log that fell behind the store's
    /// positions (`imagelsh check --repair`); otherwise either is a start-up error.
    pub repair_log: bool,
}

impl Default for EngineOptions {
    fn default() -> Self {
        Self {
            full_scan_threshold: DEFAULT_FULL_SCAN_THRESHOLD_BYTES,
            write: WriteOptions::default(),
            repair_log: false,
        }
    }
}

/// All indexes of one data directory, with its write-ahead log and the threads that write it
/// (group commit) and apply it to the store.
pub struct Engine {
    catalog: Arc<dyn Catalog>,
    open: Mutex<HashMap<String, Arc<Index>>>,
    log: Arc<LogShared>,
    writer: Mutex<Option<JoinHandle<()>>>,
    applier: Mutex<Option<JoinHandle<()>>>,
    default_dim: u32,
    full_scan_threshold: u64,
}

/// What opening an engine found in its log.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Recovery {
    /// Logged batches taken back in (acknowledged, not yet applied to the store).
    pub replayed: usize,
}

/// One open index: its hyperplanes and query state in memory, its data in the store.
pub struct Index {
    store: Arc<dyn IndexStore>,
    planes: Hyperplanes,
    /// Sketch hyperplanes; `None` for indexes written before layout 3.
    sketch: Option<Hyperplanes>,
    /// Bytes of sketches up to which `SearchPlan::Auto` scans.
    full_scan_threshold: u64,
    state: RwLock<QueryState>,
    /// Held shared by every query while it reads embeddings; the applier takes it exclusively
    /// (and lets go at once) before freeing removed items' records, so that a query that saw
    /// such an item live before its removal has finished reading it.
    readers: RwLock<()>,
    log: Arc<LogShared>,
    dropped: AtomicBool,
}

thread_local! {
    /// One vote counter per query thread, reused: it grows to the largest item number seen.
    static VOTES: RefCell<VoteCounter> = RefCell::default();
}

impl Index {
    /// The index over `store`, with its query state loaded; also returns the store's applied
    /// log position.
    fn open(
        store: Arc<dyn IndexStore>,
        log: Arc<LogShared>,
        full_scan_threshold: u64,
    ) -> Result<(Arc<Self>, Position), IndexError> {
        let def = store.def().clone();
        let (planes, sketch) = planes_of(&def, store.hyperplanes()?, store.center()?, store.sketch_planes()?)?;
        let stored = store.load()?;
        let applied = stored.applied;
        let state = QueryState::new(stored, def.tables as usize, def.sketch_bits as usize / 64);
        let index = Self {
            store,
            planes,
            sketch,
            full_scan_threshold,
            state: RwLock::new(state),
            readers: RwLock::new(()),
            log,
            dropped: AtomicBool::new(false),
        };
        Ok((Arc::new(index), applied))
    }

    pub(crate) fn state(&self) -> RwLockReadGuard<'_, QueryState> {
        self.state.read().unwrap_or_else(|e| e.into_inner())
    }

    pub(crate) fn state_mut(&self) -> RwLockWriteGuard<'_, QueryState> {
        self.state.write().unwrap_or_else(|e| e.into_inner())
    }

    pub(crate) fn check_not_dropped(&self) -> Result<(), IndexError> {
        match self.dropped.load(Ordering::Acquire) {
            true => Err(IndexError::NotFound(self.def().name.clone())),
            false => Ok(()),
        }
    }

    pub fn def(&self) -> &IndexDef {
        self.store.def()
    }

    pub fn info(&self) -> Result<IndexInfo, IndexError> {
        Ok(IndexInfo { def: self.def().clone(), items: self.state().count(), centered: self.planes.is_centered() })
    }

    /// Whether embeddings of `model` (of dimension `dim`) belong in this index.
    pub fn accepts_model(&self, model: &str, dim: u32) -> Result<(), IndexError> {
        accepts_model(self.def(), model, dim)
    }

    /// Frees the records of items that the applied batches removed (and of removed neighbours,
    /// so that whole file-system blocks come free); returns the bytes freed.
    fn reclaim_removed(&self, removed: &[u32]) -> Result<u64, IndexError> {
        // Far enough that a block of small sketch records next to a removed item comes free.
        const REACH: u32 = 256;
        let runs = self.state().reclaimable(removed, REACH);
        self.reclaim_runs(&runs)
    }

    /// Frees the records of every item the store holds as removed (a pass over liveness; at
    /// start and by `imagelsh compact`, for what an interrupted reclaim left); returns the bytes
    /// freed, holes already punched counted again.
    pub fn reclaim_all(&self) -> Result<u64, IndexError> {
        let runs = self.state().all_reclaimable();
        self.reclaim_runs(&runs)
    }

    fn reclaim_runs(&self, runs: &[Range<u32>]) -> Result<u64, IndexError> {
        if runs.is_empty() {
            return Ok(0);
        }
        // Every query from now on sees these items as removed; wait for those that started before.
        drop(self.readers.write().unwrap_or_else(|e| e.into_inner()));
        Ok(self.store.reclaim(runs)?)
    }

    /// The live item an id names, logged or applied.
    fn item_number(&self, id: &str) -> Result<Option<u32>, IndexError> {
        match self.state().id(id) {
            TailId::Live(number) => return Ok(Some(number)),
            TailId::Deleted => return Ok(None),
            TailId::Unknown => {}
        }
        // Not in the tail: the store has it (a batch leaves the tail only once applied).
        Ok(self.store.item_number(id)?)
    }

    /// The thumbnails of the items with these numbers, in order: logged ones from the tail, the
    /// rest from the store.
    fn thumbnails(&self, numbers: &[u32]) -> Result<Vec<Option<Vec<u8>>>, IndexError> {
        let mut out = vec![None; numbers.len()];
        // (slot in `out`, item number) of the items the tail does not hold.
        let mut applied: Vec<(usize, u32)> = Vec::new();
        {
            let state = self.state();
            for (slot, &number) in numbers.iter().enumerate() {
                match state.tail_item(number) {
                    Some(it) => out[slot] = it.thumbnail.clone(),
                    None => applied.push((slot, number)),
                }
            }
        }
        let wanted: Vec<u32> = applied.iter().map(|&(_, number)| number).collect();
        for ((slot, _), thumbnail) in applied.into_iter().zip(self.store.thumbnails(&wanted)?) {
            out[slot] = thumbnail;
        }
        Ok(out)
    }

    /// The items with these numbers: logged ones from the tail, the rest from the store.
    fn items(&self, numbers: &[u32]) -> Result<Vec<StoredItem>, IndexError> {
        let mut items = Vec::with_capacity(numbers.len());
        let mut applied = Vec::new();
        {
            let state = self.state();
            for &number in numbers {
                match state.tail_item(number) {
                    Some(it) => items.push(StoredItem {
                        number,
                        id: it.id.clone(),
                        label: it.label.clone(),
                        metadata: it.metadata.clone(),
                        codes: it.codes.clone(),
                    }),
                    None => applied.push(number),
                }
            }
        }
        items.extend(self.store.items(&applied)?);
        Ok(items)
    }
}

/// Whether embeddings of `model` (of dimension `dim`) belong in index `def`.
fn accepts_model(def: &IndexDef, model: &str, dim: u32) -> Result<(), IndexError> {
    if def.dim != dim {
        return Err(IndexError::InvalidArgument(format!(
            "index {:?} has dimension {}, the model {model:?} produces {dim}",
            def.name, def.dim
        )));
    }
    if !def.model.is_empty() && def.model != model {
        return Err(IndexError::InvalidArgument(format!(
            "index {:?} holds embeddings of model {:?}, this server runs {model:?}",
            def.name, def.model
        )));
    }
    Ok(())
}

/// An index's hashing and sketch planes from its stored matrices, centred when it has a center.
fn planes_of(
    def: &IndexDef,
    hyperplanes: Vec<f32>,
    center: Option<Vec<f32>>,
    sketch_planes: Option<Vec<f32>>,
) -> Result<(Hyperplanes, Option<Hyperplanes>), IndexError> {
    let name = &def.name;
    let shape = LshShape { dim: def.dim as usize, hash_bits: def.hash_bits, tables: def.tables };
    let corrupt = |e: LshError| StoreError::Corrupt(format!("hyperplanes of index {name:?}: {e}"));
    let mut planes = Hyperplanes::from_row_major(shape, hyperplanes).map_err(corrupt)?;
    let mut sketch = match (def.sketch_bits, sketch_planes) {
        (0, _) => None,
        (bits, Some(matrix)) => {
            let shape = sketch_shape(shape.dim, bits).map_err(corrupt)?;
            Some(Hyperplanes::from_row_major(shape, matrix).map_err(corrupt)?)
        }
        (_, None) => return Err(StoreError::Corrupt(format!("index {name:?} lacks its sketch hyperplanes")).into()),
    };
    if let Some(center) = center {
        planes = planes.with_center(&center).map_err(corrupt)?;
        sketch = sketch.map(|s| s.with_center(&center)).transpose().map_err(corrupt)?;
    }
    Ok((planes, sketch))
}

#[cfg(test)]
mod tests;
