//! The domain: named indexes of embeddings, hashed by random-hyperplane LSH over a store.
//! Blocking code (matrix products and store I/O): async callers run it on a blocking thread.
//!
//! Writes go through the data directory's log (`commit`: group commit, acknowledged once
//! durable; `apply`: into the store in large groups later). Queries read the query state that
//! the index owns (`state`: liveness, sketches, the logged tail) over the store's applied data.

mod apply;
mod commit;
mod maintain;
mod state;

use std::cell::RefCell;
use std::collections::HashMap;
use std::ops::Range;
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, RwLock, RwLockReadGuard, RwLockWriteGuard};
use std::thread::JoinHandle;

pub use commit::WriteOptions;
use commit::{LogShared, PreparedItem, WriteRequest};
pub use maintain::{CompactReport, IndexCheck, Problem};
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
/// Extra buckets per table a query may visit.
pub const MAX_PROBES: u32 = 1024;
/// Largest index (in bytes of sketches) that `SearchPlan::Auto` answers by scanning every
/// sketch rather than reading its tables' buckets; see `Engine::with_full_scan_threshold`.
pub const DEFAULT_FULL_SCAN_THRESHOLD_BYTES: u64 = 16 << 20;

#[derive(Debug, thiserror::Error)]
pub enum IndexError {
    #[error("index {0:?} not found")]
    NotFound(String),
    #[error("item {id:?} not found in index {index:?}")]
    ItemNotFound { index: String, id: String },
    #[error("index {0:?} already exists")]
    AlreadyExists(String),
    #[error("{0}")]
    InvalidArgument(String),
    /// The server is shutting down: writes are no longer taken.
    #[error("{0}")]
    Unavailable(String),
    #[error(transparent)]
    Store(StoreError),
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
}

/// An item refused while the rest of its batch goes on.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ItemFailure {
    pub position: u32,
    pub id: String,
    pub message: String,
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
}

impl Default for EngineOptions {
    fn default() -> Self {
        Self { full_scan_threshold: DEFAULT_FULL_SCAN_THRESHOLD_BYTES, write: WriteOptions::default() }
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

impl Engine {
    /// Opens every index of `catalog` with the log in `log_dir`. `default_dim` is the dimension a
    /// create with `dim = 0` gets (the default model's).
    pub fn open(catalog: Arc<dyn Catalog>, log_dir: &Path, default_dim: u32) -> Result<Self, IndexError> {
        Self::open_with(catalog, log_dir, default_dim, EngineOptions::default()).map(|(engine, _)| engine)
    }

    pub fn open_with(
        catalog: Arc<dyn Catalog>,
        log_dir: &Path,
        default_dim: u32,
        options: EngineOptions,
    ) -> Result<(Self, Recovery), IndexError> {
        let started = std::time::Instant::now();
        let (wal, records) = Wal::open(log_dir, options.write.segment_bytes)?;
        tracing::info!(records = records.len(), ms = started.elapsed().as_millis() as u64, "log read");
        let log = Arc::new(LogShared::new(catalog.clone(), wal, options.write.clone()));
        let mut open = HashMap::new();
        let mut by_uid = HashMap::new();
        for def in catalog.list()? {
            let store = catalog.open(&def.name)?.ok_or_else(|| IndexError::NotFound(def.name.clone()))?;
            let (index, applied) = Index::open(store, log.clone(), options.full_scan_threshold)?;
            by_uid.insert(index.store.uid(), (index.clone(), applied));
            open.insert(def.name, index);
        }
        tracing::info!(indexes = open.len(), ms = started.elapsed().as_millis() as u64, "query state loaded");
        let replayed = commit::replay(&records, &by_uid)?;
        for index in open.values() {
            log.register(index.clone());
        }
        let (sender, submissions) = std::sync::mpsc::channel();
        log.set_sender(Some(sender));
        let writer = {
            let log = log.clone();
            std::thread::Builder::new()
                .name("imagelsh-log".into())
                .spawn(move || commit::run_writer(log, submissions))
                .map_err(StoreError::Io)?
        };
        let applier = {
            let log = log.clone();
            std::thread::Builder::new()
                .name("imagelsh-apply".into())
                .spawn(move || apply::run_applier(log))
                .map_err(StoreError::Io)?
        };
        let engine = Self {
            catalog,
            open: Mutex::new(open),
            log,
            writer: Mutex::new(Some(writer)),
            applier: Mutex::new(Some(applier)),
            default_dim,
            full_scan_threshold: options.full_scan_threshold,
        };
        Ok((engine, Recovery { replayed }))
    }

    fn open_indexes(&self) -> std::sync::MutexGuard<'_, HashMap<String, Arc<Index>>> {
        self.open.lock().unwrap_or_else(|e| e.into_inner())
    }

    pub fn create(&self, spec: IndexSpec) -> Result<IndexInfo, IndexError> {
        validate_name(&spec.name)?;
        let shape = LshShape {
            dim: if spec.dim == 0 { self.default_dim } else { spec.dim } as usize,
            hash_bits: if spec.hash_bits == 0 { DEFAULT_HASH_BITS } else { spec.hash_bits },
            tables: if spec.tables == 0 { DEFAULT_TABLES } else { spec.tables },
        };
        let sketch_bits = if spec.sketch_bits == 0 { DEFAULT_SKETCH_BITS } else { spec.sketch_bits };
        let mut planes = Hyperplanes::draw(shape, spec.seed)?;
        let mut sketch = draw_sketch_planes(shape.dim, sketch_bits, spec.seed)?;
        if let Some(center) = &spec.center {
            planes = planes.with_center(center)?;
            sketch = sketch.with_center(center)?;
        }
        let def = IndexDef {
            name: spec.name.clone(),
            dim: shape.dim as u32,
            hash_bits: shape.hash_bits,
            tables: shape.tables,
            seed: spec.seed,
            model: spec.model,
            created_at: std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_secs()),
            sketch_bits,
            stores_vectors: spec.store_vectors.unwrap_or(true),
        };
        let mut open = self.open_indexes();
        let params = IndexParams {
            hyperplanes: &planes.to_row_major(),
            center: spec.center.as_deref(),
            sketch_planes: Some(&sketch.to_row_major()),
        };
        let store = self.catalog.create(&def, params)?;
        let (index, _) = Index::open(store, self.log.clone(), self.full_scan_threshold)?;
        self.log.register(index.clone());
        open.insert(spec.name, index.clone());
        index.info()
    }

    /// The open index of that name.
    pub fn index(&self, name: &str) -> Result<Arc<Index>, IndexError> {
        self.open_indexes().get(name).cloned().ok_or_else(|| IndexError::NotFound(name.to_string()))
    }

    pub fn list(&self) -> Result<Vec<IndexInfo>, IndexError> {
        let defs = self.catalog.list()?;
        defs.iter().map(|def| self.index(&def.name)?.info()).collect()
    }

    pub fn drop_index(&self, name: &str) -> Result<(), IndexError> {
        let mut open = self.open_indexes();
        let index = open.get(name).cloned().ok_or_else(|| IndexError::NotFound(name.to_string()))?;
        index.dropped.store(true, Ordering::Release);
        self.log.unregister(index.store.uid());
        index.store.destroy()?;
        open.remove(name);
        Ok(())
    }

    /// Applies every logged batch to the store now (tests, benchmarks, backups).
    pub fn apply_now(&self) -> Result<(), IndexError> {
        while self.log.pending() > 0 {
            apply::apply_pending(&self.log)?;
        }
        Ok(())
    }

    /// Stops as a crash would leave the store: logged batches not yet applied stay in the log
    /// only (tests of recovery within one process, which cannot kill itself).
    #[cfg(test)]
    fn abandon(self) {
        self.log.signal().abandon = true;
        drop(self);
    }

    /// Stops taking writes, applies everything logged to the store, syncs it and stops the
    /// threads; later writes fail with `Unavailable`. Also run (errors ignored) on drop.
    pub fn close(&self) -> Result<(), IndexError> {
        self.log.set_sender(None);
        let writer = self.writer.lock().unwrap_or_else(|e| e.into_inner()).take();
        if let Some(writer) = writer {
            let _ = writer.join();
        }
        self.log.signal().stop = true;
        self.log.work.notify_all();
        self.log.room.notify_all();
        let applier = self.applier.lock().unwrap_or_else(|e| e.into_inner()).take();
        if let Some(applier) = applier {
            let _ = applier.join();
        }
        let result = self.catalog.sync().map_err(IndexError::from);
        let pending = if self.log.signal().abandon { 0 } else { self.log.pending() };
        self.log.clear();
        result?;
        if pending > 0 {
            return Err(IndexError::Unavailable(format!(
                "{pending} logged writes were not applied; the next start takes them from the log"
            )));
        }
        Ok(())
    }
}

impl Drop for Engine {
    fn drop(&mut self) {
        if let Err(error) = self.close() {
            tracing::warn!(%error, "closing the engine");
        }
    }
}

fn validate_name(name: &str) -> Result<(), IndexError> {
    let ok = !name.is_empty()
        && name.len() <= MAX_NAME_BYTES
        && name.chars().all(|c| c.is_ascii_alphanumeric() || matches!(c, '_' | '-' | '.'));
    if ok {
        Ok(())
    } else {
        Err(IndexError::InvalidArgument(format!(
            "index name must be 1 to {MAX_NAME_BYTES} characters of A-Z a-z 0-9 _ - . (got {name:?})"
        )))
    }
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
        let name = &def.name;
        let shape = LshShape { dim: def.dim as usize, hash_bits: def.hash_bits, tables: def.tables };
        let corrupt = |e: LshError| StoreError::Corrupt(format!("hyperplanes of index {name:?}: {e}"));
        let mut planes = Hyperplanes::from_row_major(shape, store.hyperplanes()?).map_err(corrupt)?;
        let mut sketch = match (def.sketch_bits, store.sketch_planes()?) {
            (0, _) => None,
            (bits, Some(matrix)) => {
                let shape = sketch_shape(shape.dim, bits).map_err(corrupt)?;
                Some(Hyperplanes::from_row_major(shape, matrix).map_err(corrupt)?)
            }
            (_, None) => return Err(StoreError::Corrupt(format!("index {name:?} lacks its sketch hyperplanes")).into()),
        };
        if let Some(center) = store.center()? {
            planes = planes.with_center(&center).map_err(corrupt)?;
            sketch = sketch.map(|s| s.with_center(&center)).transpose().map_err(corrupt)?;
        }
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
        let def = self.def();
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

    fn check_vector(&self, vector: &[f32]) -> Result<(), String> {
        let dim = self.def().dim as usize;
        if vector.len() != dim {
            return Err(format!(
                "embedding has {} values, index {:?} has dimension {dim}",
                vector.len(),
                self.def().name
            ));
        }
        if let Some(i) = vector.iter().position(|x| !x.is_finite()) {
            return Err(format!("embedding value {i} is {}, not a finite number", vector[i]));
        }
        Ok(())
    }

    fn check_item(&self, item: &VectorItem) -> Result<(), String> {
        if item.id.is_empty() {
            return Err("item id is empty".into());
        }
        if item.id.len() > MAX_ID_BYTES {
            return Err(format!("item id is {} bytes, the limit is {MAX_ID_BYTES}", item.id.len()));
        }
        self.check_vector(&item.vector)
    }

    /// Indexes the valid items (with their positions in the request) in one atomic write,
    /// durable when this returns; invalid ones come back as failures.
    pub fn ingest(self: &Arc<Self>, items: Vec<(u32, VectorItem)>) -> Result<IngestOutcome, IndexError> {
        let mut outcome = IngestOutcome::default();
        let mut valid = Vec::with_capacity(items.len());
        for (position, item) in items {
            match self.check_item(&item) {
                Ok(()) => valid.push(item),
                Err(message) => outcome.failures.push(ItemFailure { position, id: item.id, message }),
            }
        }
        if valid.is_empty() {
            return Ok(outcome);
        }
        let batch = self.batch(valid.iter().map(|i| i.vector.as_slice()), valid.len())?;
        let codes = self.planes.codes(batch.view())?;
        let sketches = self.sketch.as_ref().map(|s| s.codes(batch.view())).transpose()?;
        let prepared: Vec<PreparedItem> = valid
            .into_iter()
            .enumerate()
            .map(|(row, item)| PreparedItem {
                id: item.id,
                label: item.label,
                metadata: item.metadata,
                codes: codes.row(row).to_vec(),
                sketch: sketches.as_ref().map_or_else(Vec::new, |s| s.row(row).to_vec()),
                vector: item.vector,
            })
            .collect();
        let count = prepared.len() as u32;
        self.log.submit(self.clone(), WriteRequest::Upsert(prepared))?;
        outcome.indexed = count;
        Ok(outcome)
    }

    /// `rows` vectors as one `rows × dim` matrix.
    fn batch<'a>(&self, vectors: impl Iterator<Item = &'a [f32]>, rows: usize) -> Result<Array2<f32>, IndexError> {
        let dim = self.def().dim as usize;
        let mut flat = Vec::with_capacity(rows * dim);
        vectors.for_each(|v| flat.extend_from_slice(v));
        Array2::from_shape_vec((rows, dim), flat).map_err(|e| IndexError::InvalidArgument(e.to_string()))
    }

    /// Deletes the items with these ids, durably; returns how many existed.
    pub fn delete(self: &Arc<Self>, ids: &[String]) -> Result<usize, IndexError> {
        self.log.submit(self.clone(), WriteRequest::Delete(ids.to_vec()))
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

    pub fn query(&self, by: QueryBy, options: &QueryOptions) -> Result<QueryResult, IndexError> {
        let _reading = self.readers.read().unwrap_or_else(|e| e.into_inner());
        let top_k = match options.top_k {
            0 => DEFAULT_TOP_K,
            k if k > MAX_TOP_K => {
                return Err(IndexError::InvalidArgument(format!("top_k {k} is over the limit of {MAX_TOP_K}")));
            }
            k => k,
        } as usize;
        let probes = options.probes.unwrap_or(DEFAULT_PROBES);
        if probes > MAX_PROBES {
            return Err(IndexError::InvalidArgument(format!("probes {probes} is over the limit of {MAX_PROBES}")));
        }
        if options.rerank_depth > MAX_RERANK_DEPTH {
            return Err(IndexError::InvalidArgument(format!(
                "rerank_depth {} is over the limit of {MAX_RERANK_DEPTH}",
                options.rerank_depth
            )));
        }
        let (vector, exclude) = match by {
            QueryBy::Vector(v) => {
                self.check_vector(&v).map_err(IndexError::InvalidArgument)?;
                (v, None)
            }
            QueryBy::Id(id) => {
                if !self.def().stores_vectors {
                    return Err(IndexError::InvalidArgument(format!(
                        "index {:?} does not store embeddings: query it by embedding or image",
                        self.def().name
                    )));
                }
                let number = self
                    .item_number(&id)?
                    .ok_or_else(|| IndexError::ItemNotFound { index: self.def().name.clone(), id: id.clone() })?;
                (self.store.vector(number)?, Some(number))
            }
        };
        let rerank = options.rerank.unwrap_or(true);
        let depth = (if options.rerank_depth == 0 { DEFAULT_RERANK_DEPTH } else { options.rerank_depth }) as usize;
        if self.plan(options.plan, rerank, options.min_votes)? == SearchPlan::Scan {
            return self.scan(&vector, exclude, probes, top_k, depth.max(top_k));
        }
        VOTES.with_borrow_mut(|votes| {
            votes.clear();
            self.gather_votes(&vector, probes, votes)?;
            if let Some(number) = exclude {
                votes.remove(number);
            }
            let ranked = if rerank {
                self.rank_by_similarity(&vector, &mut *votes, options.min_votes, top_k, depth.max(top_k))?
            } else {
                Self::rank_by_votes(votes, options.min_votes, top_k)
            };
            let candidates = votes.candidates() as u32;
            Ok(QueryResult { hits: self.hits(ranked, top_k, None)?, candidates, plan: SearchPlan::Tables })
        })
    }

    /// The plan a query runs: `Tables` or `Scan`.
    fn plan(&self, asked: SearchPlan, rerank: bool, min_votes: u32) -> Result<SearchPlan, IndexError> {
        // A scan ranks by similarity and counts votes for the hits alone: it cannot rank by
        // votes or filter by them.
        let scannable = rerank && min_votes == 0 && self.sketch.is_some();
        match asked {
            SearchPlan::Tables => Ok(SearchPlan::Tables),
            SearchPlan::Scan if scannable => Ok(SearchPlan::Scan),
            SearchPlan::Scan => Err(IndexError::InvalidArgument(match self.sketch {
                None => format!("index {:?} keeps no sketches (layout < 3): it cannot be scanned", self.def().name),
                Some(_) => "a scan ranks by similarity: it needs rerank and no min_votes".into(),
            })),
            SearchPlan::Auto => {
                let bytes = 8 * self.state().sketches().len() as u64;
                let small = self.full_scan_threshold > 0 && bytes <= self.full_scan_threshold;
                Ok(if scannable && small { SearchPlan::Scan } else { SearchPlan::Tables })
            }
        }
    }

    /// How many Hamming-nearest candidates a query keeps for the asymmetric re-score, and how
    /// many of those it keeps for the exact re-rank (with embeddings) or as hits (without: the
    /// sketch's estimate is then the similarity, and ranks by Hamming distance alone).
    fn sketch_depths(&self, top_k: usize, depth: usize) -> (usize, usize) {
        if self.def().stores_vectors { (depth.saturating_mul(ASYMMETRIC_PRESELECTION), depth) } else { (top_k, top_k) }
    }

    /// The `SearchPlan::Scan` query: every live item's sketch against the query's, the
    /// `ASYMMETRIC_PRESELECTION × depth` nearest re-scored by the asymmetric estimate, the best
    /// `depth` re-ranked exactly (without embeddings: the `top_k` nearest by their sketch's
    /// estimate), votes for the hits.
    fn scan(
        &self,
        vector: &[f32],
        exclude: Option<u32>,
        probes: u32,
        top_k: usize,
        depth: usize,
    ) -> Result<QueryResult, IndexError> {
        let sketch = self.sketch.as_ref().ok_or_else(|| IndexError::InvalidArgument("no sketches to scan".into()))?;
        let query = QuerySketch::new(sketch, vector)?;
        let (preselect, keep) = self.sketch_depths(top_k, depth);
        let (nearest, scanned) = {
            let state = self.state();
            let (words, live) = (state.sketches(), state.live_words());
            let by_hamming = nearest_sketches(&query.words, words, live, exclude, preselect);
            let scanned: u32 = live.iter().map(|w| w.count_ones()).sum();
            (query.rescore(words, by_hamming, |&(number, _)| number, keep), scanned)
        };
        // Votes are counted below, for the hits alone.
        let ranked = self.similarities(vector, nearest.into_iter().map(|(number, d)| (d, number, 0)).collect())?;
        let mut probed = self.probed_codes(vector, probes)?;
        probed.iter_mut().for_each(|codes| codes.sort_unstable());
        let hits = self.hits(best_first(ranked, top_k), top_k, Some(&probed))?;
        // A query by id scans its own item too, but it is no candidate.
        Ok(QueryResult {
            hits,
            candidates: scanned.saturating_sub(u32::from(exclude.is_some())),
            plan: SearchPlan::Scan,
        })
    }

    /// The codes a query visits in each table: its own, then `probes` more, nearest first.
    fn probed_codes(&self, vector: &[f32], probes: u32) -> Result<Vec<Vec<u64>>, IndexError> {
        let projections = self.planes.project_one(vector)?;
        let codes = self.planes.codes_of(projections.view());
        let k = self.def().hash_bits as usize;
        let probed = codes
            .row(0)
            .iter()
            .enumerate()
            .map(|(table, &code)| {
                let table_projections = projections.row(0).slice(ndarray::s![table * k..(table + 1) * k]).to_vec();
                std::iter::once(code).chain(probe_codes(&table_projections, code, probes as usize)).collect()
            })
            .collect();
        Ok(probed)
    }

    /// Adds the live items of the buckets of the query's codes, and `probes` more per table,
    /// to `votes`: the store's applied part of each bucket and the logged tail's.
    fn gather_votes(&self, vector: &[f32], probes: u32, votes: &mut VoteCounter) -> Result<(), IndexError> {
        let probed = self.probed_codes(vector, probes)?;
        // The tail's part first, the store's second (see `QueryState::tail_bucket`).
        let tails: Vec<Vec<Vec<u32>>> = {
            let state = self.state();
            let tail_of = |(table, codes): (usize, &Vec<u64>)| -> Vec<Vec<u32>> {
                codes.iter().map(|&code| state.tail_bucket(table, code).to_vec()).collect()
            };
            probed.iter().enumerate().map(tail_of).collect()
        };
        let mut bucket = Vec::new();
        for (table, (codes, tails)) in probed.iter().zip(&tails).enumerate() {
            // An item is in one bucket per table, so visiting several counts it at most once.
            for (&code, tail) in codes.iter().zip(tails) {
                bucket.clear();
                self.store.bucket(table as u16, code, &mut bucket)?;
                let applied_up_to = bucket.iter().max().copied();
                bucket.extend(tail.iter().filter(|&&n| applied_up_to.is_none_or(|highest| n > highest)));
                // Items replaced or deleted since the store's copy was written.
                let state = self.state();
                bucket.retain(|&n| state.is_live(n));
                drop(state);
                votes.add_bucket(&bucket);
            }
        }
        Ok(())
    }

    /// Candidates with their votes, ordered best first by votes (ties: every item tied with the
    /// `top_k`-th, to be broken by id once the ids are read).
    fn rank_by_votes(votes: &VoteCounter, min_votes: u32, top_k: usize) -> Vec<Ranked> {
        let mut ranked: Vec<Ranked> = votes
            .contenders(top_k, min_votes)
            .into_iter()
            .map(|(number, votes)| Ranked { number, votes, similarity: 0.0 })
            .collect();
        ranked.sort_by_key(|r| std::cmp::Reverse(r.votes));
        ranked
    }

    /// Candidates ordered by cosine similarity with the query, best first, at most `top_k`.
    ///
    /// With sketches, all candidates are ranked by Hamming distance first (a few popcounts
    /// each), the nearest `ASYMMETRIC_PRESELECTION × depth` re-scored against the query's
    /// projections, and only the best `depth` compared exactly; without stored embeddings the
    /// sketch distance gives the (estimated) similarity itself. An index without sketches
    /// compares every candidate exactly.
    fn rank_by_similarity(
        &self,
        vector: &[f32],
        votes: &mut VoteCounter,
        min_votes: u32,
        top_k: usize,
        depth: usize,
    ) -> Result<Vec<Ranked>, IndexError> {
        let Some(sketch) = &self.sketch else {
            let candidates = votes.at_least(min_votes);
            return Ok(best_first(self.exact(vector, &candidates)?, top_k));
        };
        let query = QuerySketch::new(sketch, vector)?;
        let bits = self.def().sketch_bits;
        let words = query.words.len();
        let (preselect, keep) = self.sketch_depths(top_k, depth);
        let mut by_distance: Vec<(u32, u32, u32)> = Vec::new();
        {
            let state = self.state();
            let sketches = state.sketches();
            votes.for_each_at_least(min_votes, |number, votes| {
                let start = number as usize * words;
                // An item without a sketch (not expected) ranks last rather than failing the query.
                let distance = sketches.get(start..start + words).map_or(bits, |s| hamming(&query.words, s));
                by_distance.push((distance, number, votes));
            });
            nearest(&mut by_distance, preselect, bits);
            by_distance = query.rescore(sketches, std::mem::take(&mut by_distance), |&(_, number, _)| number, keep);
        }
        Ok(best_first(self.similarities(vector, by_distance)?, top_k))
    }

    /// The similarity of each `(sketch distance, number, votes)` with the query: exact, against
    /// the stored embedding, or the sketch's estimate where the index keeps no embeddings.
    fn similarities(&self, vector: &[f32], nearest: Vec<(u32, u32, u32)>) -> Result<Vec<Ranked>, IndexError> {
        if self.def().stores_vectors {
            let numbers: Vec<(u32, u32)> = nearest.iter().map(|&(_, number, votes)| (number, votes)).collect();
            return self.exact(vector, &numbers);
        }
        let bits = self.def().sketch_bits;
        Ok(nearest
            .into_iter()
            .map(|(d, number, votes)| Ranked { number, votes, similarity: estimated_cosine(d, bits) })
            .collect())
    }

    /// Exact cosine similarity of `vector` with each candidate's stored embedding.
    fn exact(&self, vector: &[f32], candidates: &[(u32, u32)]) -> Result<Vec<Ranked>, IndexError> {
        let numbers: Vec<u32> = candidates.iter().map(|&(number, _)| number).collect();
        let mut ranked = Vec::with_capacity(candidates.len());
        self.store.for_each_vector(&numbers, &mut |i, stored| {
            let (number, votes) = candidates[i];
            ranked.push(Ranked { number, votes, similarity: cosine(vector, stored) });
        })?;
        Ok(ranked)
    }

    /// Hits for ranked candidates, in rank order; equal scores are ordered by id. With `probed`
    /// (the codes the query visits in each table, each table's sorted), votes are counted from
    /// the items' codes.
    fn hits(&self, ranked: Vec<Ranked>, top_k: usize, probed: Option<&[Vec<u64>]>) -> Result<Vec<Hit>, IndexError> {
        let numbers: Vec<u32> = ranked.iter().map(|r| r.number).collect();
        let by_number: HashMap<u32, Ranked> = ranked.iter().map(|r| (r.number, *r)).collect();
        let tables = self.def().tables as f32;
        let mut hits: Vec<Hit> = self
            .items(&numbers)?
            .into_iter()
            .map(|item| {
                let mut r = by_number[&item.number];
                if let Some(probed) = probed {
                    r.votes = item
                        .codes
                        .iter()
                        .zip(probed)
                        .filter(|(code, visited)| visited.binary_search(code).is_ok())
                        .count() as u32;
                }
                Hit {
                    id: item.id,
                    label: item.label,
                    votes: r.votes,
                    score: r.votes as f32 / tables,
                    similarity: r.similarity,
                    metadata: item.metadata,
                }
            })
            .collect();
        hits.sort_by(|a, b| {
            b.similarity.total_cmp(&a.similarity).then(b.votes.cmp(&a.votes)).then_with(|| a.id.cmp(&b.id))
        });
        hits.truncate(top_k);
        Ok(hits)
    }
}

/// The `top_k` best by similarity, best first, and any more tied with the `top_k`-th: `hits`
/// orders ties by votes, then id (a scan knows votes only once the hits' records are read).
fn best_first(mut ranked: Vec<Ranked>, top_k: usize) -> Vec<Ranked> {
    ranked.sort_by(|a, b| b.similarity.total_cmp(&a.similarity));
    let Some(last) = ranked.get(top_k.saturating_sub(1)).map(|r| r.similarity) else {
        return ranked;
    };
    let end = top_k + ranked[top_k..].iter().take_while(|r| r.similarity == last).count();
    ranked.truncate(end);
    ranked
}

/// Keeps the `keep` entries of smallest distance (`(distance, ..)`, distances ≤ `bits`), in
/// ascending item order as they came. A histogram of the distances finds the cut-off in one
/// pass, where a selection would shuffle thousands of entries.
fn nearest<T>(entries: &mut Vec<(u32, T, T)>, keep: usize, bits: u32) {
    if entries.len() <= keep {
        return;
    }
    let mut histogram = vec![0usize; bits as usize + 1];
    entries.iter().for_each(|e| histogram[e.0.min(bits) as usize] += 1);
    let (mut cutoff, mut below) = (0u32, 0usize);
    for (distance, &count) in histogram.iter().enumerate() {
        if below + count >= keep {
            cutoff = distance as u32;
            break;
        }
        below += count;
    }
    // All entries nearer than the cut-off, and as many at it as fit.
    let mut at_cutoff = keep - below;
    entries.retain(|e| {
        e.0 < cutoff
            || (e.0 == cutoff && at_cutoff > 0 && {
                at_cutoff -= 1;
                true
            })
    });
}

/// A query against the sketches: its own sketch for Hamming distances, and its projections
/// for the asymmetric re-score of the nearest.
struct QuerySketch {
    words: Vec<u64>,
    projections: Vec<f32>,
}

impl QuerySketch {
    fn new(sketch: &Hyperplanes, vector: &[f32]) -> Result<Self, IndexError> {
        let projections = sketch.project_one(vector)?;
        let words = sketch.codes_of(projections.view()).row(0).to_vec();
        Ok(Self { words, projections: projections.row(0).to_vec() })
    }

    /// The `keep` of the Hamming-nearest `entries` that the asymmetric estimate ranks best (all
    /// of them, untouched, when they fit).
    fn rescore<E: Copy>(&self, sketches: &[u64], entries: Vec<E>, number: impl Fn(&E) -> u32, keep: usize) -> Vec<E> {
        if entries.len() <= keep {
            return entries;
        }
        let asymmetric = AsymmetricQuery::new(&self.projections);
        rescore_nearest(&asymmetric, sketches, self.words.len(), &entries, number, keep)
    }
}

/// A candidate's place in a ranking.
#[derive(Debug, Clone, Copy)]
struct Ranked {
    number: u32,
    votes: u32,
    /// Cosine with the query (exact or estimated); 0 when ranked by votes.
    similarity: f32,
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::{SledCatalog, SledOptions};

    fn engine(dir: &std::path::Path) -> Engine {
        let catalog = SledCatalog::open(dir, &SledOptions { fsync: false, ..Default::default() }).unwrap();
        Engine::open(Arc::new(catalog), &dir.join("wal"), 4).unwrap()
    }

    fn vec_item(id: &str, v: &[f32]) -> VectorItem {
        VectorItem { id: id.into(), vector: v.to_vec(), ..Default::default() }
    }

    fn tables() -> QueryOptions {
        QueryOptions { plan: SearchPlan::Tables, ..Default::default() }
    }

    fn scan() -> QueryOptions {
        QueryOptions { plan: SearchPlan::Scan, ..Default::default() }
    }

    #[test]
    fn defaults_are_the_measured_ones_and_dim_of_the_model() {
        let dir = tempfile::tempdir().unwrap();
        let info = engine(dir.path()).create(IndexSpec { name: "a".into(), ..Default::default() }).unwrap();
        assert_eq!((info.def.dim, info.def.hash_bits, info.def.tables, info.items), (4, 12, 16, 0));
        assert_eq!((info.def.sketch_bits, info.def.stores_vectors), (DEFAULT_SKETCH_BITS, true));
    }

    proptest::proptest! {
        #[test]
        fn nearest_keeps_the_smallest_distances(distances in proptest::collection::vec(0u32..=64, 0..300), keep in 1usize..100) {
            let mut entries: Vec<(u32, u32, u32)> = distances.iter().enumerate().map(|(i, &d)| (d, i as u32, 0)).collect();
            let mut sorted = distances.clone();
            sorted.sort_unstable();
            nearest(&mut entries, keep, 64);
            proptest::prop_assert_eq!(entries.len(), keep.min(distances.len()));
            let mut kept: Vec<u32> = entries.iter().map(|e| e.0).collect();
            kept.sort_unstable();
            proptest::prop_assert_eq!(kept, sorted[..keep.min(sorted.len())].to_vec());
            proptest::prop_assert!(entries.windows(2).all(|w| w[0].1 < w[1].1), "item order kept");
        }
    }

    #[test]
    fn bad_names_and_shapes_are_invalid_arguments() {
        let dir = tempfile::tempdir().unwrap();
        let e = engine(dir.path());
        for name in ["", "a b", "é", &"x".repeat(129)] {
            assert!(matches!(
                e.create(IndexSpec { name: name.into(), ..Default::default() }),
                Err(IndexError::InvalidArgument(_))
            ));
        }
        assert!(matches!(
            e.create(IndexSpec { name: "a".into(), hash_bits: 65, ..Default::default() }),
            Err(IndexError::InvalidArgument(_))
        ));
        assert!(matches!(
            e.create(IndexSpec { name: "a".into(), tables: 257, ..Default::default() }),
            Err(IndexError::InvalidArgument(_))
        ));
    }

    #[test]
    fn bad_items_fail_alone() {
        let dir = tempfile::tempdir().unwrap();
        let e = engine(dir.path());
        e.create(IndexSpec { name: "a".into(), ..Default::default() }).unwrap();
        let index = e.index("a").unwrap();
        let outcome = index
            .ingest(vec![
                (0, vec_item("ok", &[1., 2., 3., 4.])),
                (1, vec_item("", &[1., 2., 3., 4.])),
                (2, vec_item("short", &[1., 2.])),
                (3, vec_item("nan", &[1., f32::NAN, 3., 4.])),
                (4, vec_item("inf", &[1., 2., f32::INFINITY, 4.])),
                (5, vec_item("ok2", &[4., 3., 2., 1.])),
            ])
            .unwrap();
        assert_eq!(outcome.indexed, 2);
        assert_eq!(outcome.failures.iter().map(|f| f.position).collect::<Vec<_>>(), [1, 2, 3, 4]);
        assert_eq!(index.info().unwrap().items, 2);
    }

    #[test]
    fn query_orders_by_votes_then_id_and_excludes_itself() {
        let dir = tempfile::tempdir().unwrap();
        let e = engine(dir.path());
        e.create(IndexSpec { name: "a".into(), hash_bits: 4, tables: 8, seed: 3, ..Default::default() }).unwrap();
        let index = e.index("a").unwrap();
        let q = [1.0, 0.2, 0.1, 0.0];
        index
            .ingest(vec![
                (0, vec_item("same-b", &q)),
                (1, vec_item("same-a", &q)),
                (2, vec_item("near", &[1.0, 0.25, 0.1, 0.05])),
                (3, vec_item("opposite", &[-1.0, -0.2, -0.1, 0.0])),
            ])
            .unwrap();
        let by_votes = QueryOptions { rerank: Some(false), probes: Some(0), ..Default::default() };
        let result = index.query(QueryBy::Vector(q.to_vec()), &by_votes).unwrap();
        let ids: Vec<&str> = result.hits.iter().map(|h| h.id.as_str()).collect();
        assert_eq!(&ids[..2], ["same-a", "same-b"]);
        assert_eq!(result.hits[0].votes, 8);
        assert_eq!(result.hits[0].score, 1.0);
        assert!(!ids.contains(&"opposite"), "the opposite vector shares no bucket");
        let by_id = index.query(QueryBy::Id("same-a".into()), &by_votes).unwrap();
        assert_eq!(by_id.hits[0].id, "same-b");
        assert!(by_id.hits.iter().all(|h| h.id != "same-a"));
        let strict = index
            .query(QueryBy::Vector(q.to_vec()), &QueryOptions { top_k: 1, min_votes: 8, ..by_votes.clone() })
            .unwrap();
        assert_eq!(strict.hits.len(), 1);
        assert!(matches!(
            index.query(QueryBy::Id("nope".into()), &QueryOptions::default()),
            Err(IndexError::ItemNotFound { .. })
        ));
    }

    #[test]
    fn probes_widen_the_candidates_and_keep_votes_per_table() {
        let dir = tempfile::tempdir().unwrap();
        let e = engine(dir.path());
        e.create(IndexSpec { name: "a".into(), hash_bits: 16, tables: 4, seed: 5, ..Default::default() }).unwrap();
        let index = e.index("a").unwrap();
        let items = (0..200)
            .map(|i| (i, vec_item(&format!("{i}"), &[(i as f32).sin(), (i as f32 * 0.7).cos(), 0.3, -0.2])))
            .collect();
        index.ingest(items).unwrap();
        let q = vec![0.4, 0.5, 0.3, -0.2];
        let plain =
            index.query(QueryBy::Vector(q.clone()), &QueryOptions { top_k: 200, probes: Some(0), ..tables() }).unwrap();
        let probed =
            index.query(QueryBy::Vector(q), &QueryOptions { top_k: 200, probes: Some(8), ..tables() }).unwrap();
        assert!(probed.candidates > plain.candidates, "{} vs {}", probed.candidates, plain.candidates);
        assert!(probed.hits.iter().all(|h| h.votes <= 4));
    }

    #[test]
    fn centered_index_keeps_its_center_across_opens() {
        let dir = tempfile::tempdir().unwrap();
        let spec = IndexSpec {
            name: "c".into(),
            hash_bits: 8,
            tables: 4,
            center: Some(vec![1.0, 1.0, 1.0, 1.0]),
            ..Default::default()
        };
        let first = {
            let e = engine(dir.path());
            assert!(e.create(spec).unwrap().centered);
            let index = e.index("c").unwrap();
            index
                .ingest(vec![(0, vec_item("x", &[1.1, 0.9, 1.2, 0.8])), (1, vec_item("y", &[0.9, 1.1, 0.8, 1.2]))])
                .unwrap();
            index.query(QueryBy::Vector(vec![1.1, 0.9, 1.2, 0.8]), &QueryOptions::default()).unwrap().hits
        };
        let e = engine(dir.path());
        let index = e.index("c").unwrap();
        assert!(index.info().unwrap().centered);
        assert_eq!(
            index.query(QueryBy::Vector(vec![1.1, 0.9, 1.2, 0.8]), &QueryOptions::default()).unwrap().hits,
            first
        );
        let bad = IndexSpec { name: "d".into(), center: Some(vec![0.0; 3]), ..Default::default() };
        assert!(matches!(e.create(bad), Err(IndexError::InvalidArgument(_))));
    }

    /// `n` pseudo-random vectors (uniform in [-1, 1) plus an offset, like uncentred embeddings).
    fn spread(n: usize, dim: usize) -> Vec<(u32, VectorItem)> {
        use rand::{RngExt, SeedableRng};
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(n as u64);
        (0..n)
            .map(|i| {
                let v: Vec<f32> = (0..dim).map(|d| rng.random_range(-1.0f32..1.0) + 0.1 * d as f32).collect();
                (i as u32, vec_item(&format!("i{i}"), &v))
            })
            .collect()
    }

    #[test]
    fn sketch_prefilter_keeps_the_exact_order_of_what_it_reranks() {
        let dir = tempfile::tempdir().unwrap();
        let e = engine(dir.path());
        e.create(IndexSpec { name: "a".into(), hash_bits: 4, tables: 4, seed: 2, ..Default::default() }).unwrap();
        let index = e.index("a").unwrap();
        let items = spread(400, 4);
        let query = items[17].1.vector.clone();
        index.ingest(items).unwrap();
        let all = QueryOptions { top_k: 5, rerank_depth: MAX_RERANK_DEPTH, ..tables() };
        let exact = index.query(QueryBy::Vector(query.clone()), &all).unwrap();
        // The item itself is at sketch distance 0: always within any depth, always first.
        let shallow = QueryOptions { top_k: 5, rerank_depth: 5, ..tables() };
        let cheap = index.query(QueryBy::Vector(query), &shallow).unwrap();
        assert_eq!((exact.hits[0].id.as_str(), cheap.hits[0].id.as_str()), ("i17", "i17"));
        assert!((cheap.hits[0].similarity - 1.0).abs() < 1e-5);
        assert!(cheap.hits.windows(2).all(|w| w[0].similarity >= w[1].similarity));
        // What the shallow query returns is exact, just possibly not the best 5.
        for hit in &cheap.hits {
            if let Some(same) = exact.hits.iter().find(|h| h.id == hit.id) {
                assert_eq!(same.similarity, hit.similarity);
            }
        }
    }

    /// Both plans re-rank exactly the `depth` that the asymmetric estimate ranks best among the
    /// `ASYMMETRIC_PRESELECTION × depth` nearest by Hamming distance, not the Hamming-nearest.
    #[test]
    fn both_plans_rerank_the_asymmetric_best_of_the_hamming_nearest() {
        let dir = tempfile::tempdir().unwrap();
        let e = engine(dir.path());
        let dim = 16;
        // Two-bit codes in four tables and three probes: every item is a candidate of the tables.
        e.create(IndexSpec { name: "a".into(), dim, hash_bits: 2, tables: 4, seed: 7, ..Default::default() }).unwrap();
        let index = e.index("a").unwrap();
        let items = spread(400, dim as usize);
        let queries: Vec<Vec<f32>> =
            items.iter().step_by(20).map(|(_, it)| it.vector.iter().map(|x| x + 0.3).collect()).collect();
        index.ingest(items).unwrap();
        let depth = 5;
        // Some query must pick other items than the Hamming distance would, and other items than
        // an exact comparison of all the preselected would, or a plan skipping either step passes.
        let (mut rescore_mattered, mut preselection_mattered) = (false, false);
        for query in queries {
            let sketch = QuerySketch::new(index.sketch.as_ref().unwrap(), &query).unwrap();
            let (preselected, by_hamming, expected) = {
                let state = index.state();
                let (words, live) = (state.sketches(), state.live_words());
                let preselected = nearest_sketches(&sketch.words, words, live, None, depth * ASYMMETRIC_PRESELECTION);
                let expected = sketch.rescore(words, preselected.clone(), |&(number, _)| number, depth);
                (preselected, nearest_sketches(&sketch.words, words, live, None, depth), expected)
            };
            rescore_mattered |= expected != by_hamming;
            let mut exact: Vec<(f32, u32)> = preselected
                .iter()
                .map(|&(number, _)| (cosine(&query, &index.store.vector(number).unwrap()), number))
                .collect();
            exact.sort_by(|a, b| b.0.total_cmp(&a.0));
            let mut exact_best: Vec<u32> = exact.iter().take(depth).map(|&(_, number)| number).collect();
            exact_best.sort_unstable();
            let numbers: Vec<u32> = expected.iter().map(|&(number, _)| number).collect();
            preselection_mattered |= exact_best != numbers;
            let mut expected_ids: Vec<String> = index.items(&numbers).unwrap().into_iter().map(|i| i.id).collect();
            expected_ids.sort();
            for plan in [SearchPlan::Scan, SearchPlan::Tables] {
                let options = QueryOptions {
                    top_k: depth as u32,
                    rerank_depth: depth as u32,
                    probes: Some(3),
                    plan,
                    ..Default::default()
                };
                let result = index.query(QueryBy::Vector(query.clone()), &options).unwrap();
                assert_eq!(result.candidates, 400, "{plan:?}");
                let mut ids: Vec<String> = result.hits.into_iter().map(|h| h.id).collect();
                ids.sort();
                assert_eq!(ids, expected_ids, "{plan:?}");
            }
        }
        assert!(rescore_mattered, "the re-score picked what Hamming distance picks for every query: no test");
        assert!(
            preselection_mattered,
            "the re-score picked the exact best of the preselected for every query: no test"
        );
    }

    /// The exact top `k` of the live items by cosine, leaving out `skip`.
    fn brute_force<'a>(live: &'a HashMap<String, Vec<f32>>, query: &[f32], k: usize, skip: &str) -> Vec<&'a str> {
        let mut all: Vec<(f32, &str)> =
            live.iter().filter(|(id, _)| *id != skip).map(|(id, v)| (cosine(query, v), id.as_str())).collect();
        all.sort_by(|a, b| b.0.total_cmp(&a.0).then(a.1.cmp(b.1)));
        all.into_iter().take(k).map(|(_, id)| id).collect()
    }

    #[test]
    fn scan_finds_the_exact_top_k_of_live_items_with_table_votes() {
        let dir = tempfile::tempdir().unwrap();
        let dim = 8;
        let mut live: HashMap<String, Vec<f32>> = HashMap::new();
        let query = {
            let e = engine(dir.path());
            e.create(IndexSpec { name: "a".into(), dim, hash_bits: 6, tables: 6, seed: 4, ..Default::default() })
                .unwrap();
            let index = e.index("a").unwrap();
            let items = spread(300, dim as usize);
            live.extend(items.iter().map(|(_, it)| (it.id.clone(), it.vector.clone())));
            let query = items[40].1.vector.clone();
            index.ingest(items).unwrap();
            // Replace the query's twin and nine more; delete ten: their old records must not surface.
            let replaced: Vec<(u32, VectorItem)> = (40..50)
                .map(|i| (0, vec_item(&format!("i{i}"), &query.iter().map(|x| -x - i as f32).collect::<Vec<_>>())))
                .collect();
            live.extend(replaced.iter().map(|(_, it)| (it.id.clone(), it.vector.clone())));
            index.ingest(replaced).unwrap();
            let deleted: Vec<String> = (50..60).map(|i| format!("i{i}")).collect();
            assert_eq!(index.delete(&deleted).unwrap(), 10);
            deleted.iter().for_each(|id| drop(live.remove(id)));
            query
        };
        // After a reopen, liveness comes back from the buckets.
        let e = engine(dir.path());
        let index = e.index("a").unwrap();
        let exhaustive = QueryOptions { top_k: 10, rerank_depth: MAX_RERANK_DEPTH, ..scan() };
        let result = index.query(QueryBy::Vector(query.clone()), &exhaustive).unwrap();
        assert_eq!((result.plan, result.candidates), (SearchPlan::Scan, 290));
        let ids: Vec<&str> = result.hits.iter().map(|h| h.id.as_str()).collect();
        assert_eq!(ids, brute_force(&live, &query, 10, ""));
        // Votes are the tables plan's for the same items.
        let by_tables = QueryOptions { probes: Some(3), ..exhaustive.clone() };
        let scanned = index
            .query(QueryBy::Vector(query.clone()), &QueryOptions { plan: SearchPlan::Scan, ..by_tables.clone() })
            .unwrap();
        let tabled = index
            .query(QueryBy::Vector(query.clone()), &QueryOptions { plan: SearchPlan::Tables, ..by_tables })
            .unwrap();
        assert_eq!(tabled.plan, SearchPlan::Tables);
        for hit in &tabled.hits {
            if let Some(same) = scanned.hits.iter().find(|h| h.id == hit.id) {
                assert_eq!(
                    (same.votes, same.score, same.similarity),
                    (hit.votes, hit.score, hit.similarity),
                    "{}",
                    hit.id
                );
            }
        }
        // By id: the item itself is left out.
        let by_id = index.query(QueryBy::Id("i7".into()), &exhaustive).unwrap();
        assert_eq!(
            by_id.hits.iter().map(|h| h.id.as_str()).collect::<Vec<_>>(),
            brute_force(&live, &live["i7"], 10, "i7")
        );
    }

    #[test]
    fn scan_orders_exact_ties_by_votes_then_id() {
        let dir = tempfile::tempdir().unwrap();
        let e = engine(dir.path());
        e.create(IndexSpec { name: "a".into(), hash_bits: 4, tables: 4, ..Default::default() }).unwrap();
        let index = e.index("a").unwrap();
        let q = [0.9, 0.1, 0.3, 0.2];
        let mut items = spread(40, 4);
        // Duplicates of the query, the later id first (a lower item number).
        items.push((40, vec_item("dup-b", &q)));
        items.push((41, vec_item("dup-a", &q)));
        index.ingest(items).unwrap();
        let top = index.query(QueryBy::Vector(q.to_vec()), &QueryOptions { top_k: 1, ..scan() }).unwrap();
        assert_eq!(top.hits.iter().map(|h| h.id.as_str()).collect::<Vec<_>>(), ["dup-a"]);
        assert_eq!(top.hits[0].votes, 4);
    }

    #[test]
    fn auto_scans_small_indexes_when_the_query_allows_it() {
        let dir = tempfile::tempdir().unwrap();
        let catalog =
            Arc::new(SledCatalog::open(dir.path(), &SledOptions { fsync: false, ..Default::default() }).unwrap());
        let e = Engine::open(catalog.clone(), &dir.path().join("wal"), 4).unwrap();
        e.create(IndexSpec { name: "a".into(), hash_bits: 4, tables: 4, ..Default::default() }).unwrap();
        let index = e.index("a").unwrap();
        index.ingest(spread(50, 4)).unwrap();
        let q = || QueryBy::Vector(vec![0.5, 0.1, 0.2, 0.3]);
        let plan_of = |o: &QueryOptions| index.query(q(), o).unwrap().plan;
        assert_eq!(plan_of(&QueryOptions::default()), SearchPlan::Scan);
        assert_eq!(plan_of(&QueryOptions { min_votes: 1, ..Default::default() }), SearchPlan::Tables);
        assert_eq!(plan_of(&QueryOptions { rerank: Some(false), ..Default::default() }), SearchPlan::Tables);
        assert_eq!(plan_of(&tables()), SearchPlan::Tables);
        for refused in [QueryOptions { min_votes: 1, ..scan() }, QueryOptions { rerank: Some(false), ..scan() }] {
            assert!(matches!(index.query(q(), &refused), Err(IndexError::InvalidArgument(_))), "{refused:?}");
        }
        // Over the threshold (here: any sketches at all), AUTO reads the tables.
        drop(index);
        drop(e);
        let options = EngineOptions { full_scan_threshold: 0, ..Default::default() };
        let (e, _) = Engine::open_with(catalog, &dir.path().join("wal"), 4, options).unwrap();
        let index = e.index("a").unwrap();
        assert_eq!(index.query(q(), &QueryOptions::default()).unwrap().plan, SearchPlan::Tables);
        assert_eq!(index.query(q(), &scan()).unwrap().plan, SearchPlan::Scan);
        e.create(IndexSpec { name: "empty".into(), ..Default::default() }).unwrap();
        let empty = e.index("empty").unwrap().query(q(), &QueryOptions::default()).unwrap();
        assert_eq!((empty.plan, empty.hits.len()), (SearchPlan::Tables, 0), "0 means never, even with no sketches");
    }

    #[test]
    fn index_without_embeddings_ranks_by_estimated_cosine() {
        let dir = tempfile::tempdir().unwrap();
        let spec = IndexSpec {
            name: "s".into(),
            hash_bits: 4,
            tables: 4,
            sketch_bits: 1024,
            store_vectors: Some(false),
            ..Default::default()
        };
        let items = spread(200, 4);
        let query = items[5].1.vector.clone();
        let first = {
            let e = engine(dir.path());
            let info = e.create(spec).unwrap();
            assert_eq!((info.def.stores_vectors, info.def.sketch_bits), (false, 1024));
            let index = e.index("s").unwrap();
            index.ingest(items.clone()).unwrap();
            assert!(matches!(
                index.query(QueryBy::Id("i5".into()), &QueryOptions::default()),
                Err(IndexError::InvalidArgument(_))
            ));
            index.query(QueryBy::Vector(query.clone()), &QueryOptions::default()).unwrap()
        };
        assert_eq!(first.hits[0].id, "i5");
        assert_eq!(first.hits[0].similarity, 1.0, "distance 0 estimates cosine 1");
        for hit in &first.hits {
            let number: usize = hit.id[1..].parse().unwrap();
            let exact = cosine(&query, &items[number].1.vector);
            assert!((hit.similarity - exact).abs() < 0.2, "{}: estimate {} exact {exact}", hit.id, hit.similarity);
        }
        assert!(
            std::fs::read_dir(dir.path().join("vectors"))
                .unwrap()
                .all(|f| { f.unwrap().path().extension().is_some_and(|x| x == "sketch") }),
            "no vector file"
        );
        // The sketches come back from disk.
        let e = engine(dir.path());
        let again = e.index("s").unwrap().query(QueryBy::Vector(query), &QueryOptions::default()).unwrap();
        assert_eq!(again.hits, first.hits);
    }

    fn small_log() -> EngineOptions {
        let write = WriteOptions {
            segment_bytes: 4 << 10,
            apply_after_operations: 1 << 30,
            apply_delay: std::time::Duration::from_secs(3600),
            fsync: false,
            ..Default::default()
        };
        EngineOptions { write, ..Default::default() }
    }

    fn log_segments(dir: &std::path::Path) -> usize {
        std::fs::read_dir(dir.join("wal")).unwrap().count()
    }

    /// Logged batches are queryable before they are applied, after a crash (the engine is
    /// forgotten, not closed) they come back from the log, and once applied the log shrinks.
    #[test]
    fn logged_batches_are_queryable_replayed_and_then_applied() {
        let dir = tempfile::tempdir().unwrap();
        let items = spread(300, 4);
        let open = || {
            let catalog = SledCatalog::open(dir.path(), &SledOptions { fsync: false, ..Default::default() }).unwrap();
            Engine::open_with(Arc::new(catalog), &dir.path().join("wal"), 4, small_log()).unwrap()
        };
        let expected = {
            let (e, recovery) = open();
            assert_eq!(recovery.replayed, 0);
            e.create(IndexSpec { name: "a".into(), hash_bits: 4, tables: 3, ..Default::default() }).unwrap();
            let index = e.index("a").unwrap();
            for chunk in items.chunks(10) {
                index.ingest(chunk.to_vec()).unwrap();
            }
            let replaced = vec![(0, vec_item("i3", &[9.0, -1.0, 2.0, 0.5]))];
            index.ingest(replaced).unwrap();
            assert_eq!(index.delete(&["i4".into(), "nope".into()]).unwrap(), 1);
            assert_eq!(index.state().pending(), 303, "nothing applied yet");
            assert!(log_segments(dir.path()) > 2);
            let results: Vec<_> = [tables(), scan()]
                .iter()
                .map(|o| index.query(QueryBy::Vector(items[17].1.vector.clone()), o).unwrap().hits)
                .collect();
            assert_eq!(results[0][0].id, "i17");
            assert_eq!(results[0], results[1], "both plans see the logged tail");
            assert_eq!(index.query(QueryBy::Id("i3".into()), &tables()).unwrap().hits.len(), 10);
            assert_eq!(index.info().unwrap().items, 299);
            e.abandon();
            results
        };
        let (e, recovery) = open();
        assert_eq!(recovery.replayed, 32);
        let index = e.index("a").unwrap();
        let query = |index: &Index| index.query(QueryBy::Vector(items[17].1.vector.clone()), &tables()).unwrap().hits;
        assert_eq!(query(&index), expected[0]);
        assert_eq!(index.info().unwrap().items, 299);
        e.apply_now().unwrap();
        assert_eq!(index.state().pending(), 0);
        assert_eq!(log_segments(dir.path()), 1, "applied segments are deleted");
        assert_eq!(query(&index), expected[0], "the same answer from the store");
        assert!(matches!(index.query(QueryBy::Id("i4".into()), &tables()), Err(IndexError::ItemNotFound { .. })));
        drop(index);
        drop(e);
        let (e, recovery) = open();
        assert_eq!(recovery.replayed, 0, "a closed engine applied everything");
        assert_eq!(query(&e.index("a").unwrap()), expected[0]);
    }

    /// The layers above the store run as well on the in-memory backend.
    #[test]
    fn an_engine_over_the_memory_store_ingests_replaces_and_queries() {
        let dir = tempfile::tempdir().unwrap();
        let catalog = Arc::new(crate::store::MemoryCatalog::new());
        let e = Engine::open(catalog, &dir.path().join("wal"), 4).unwrap();
        e.create(IndexSpec { name: "m".into(), hash_bits: 4, tables: 4, ..Default::default() }).unwrap();
        let index = e.index("m").unwrap();
        let items = spread(200, 4);
        index.ingest(items.clone()).unwrap();
        e.apply_now().unwrap();
        index.ingest(vec![(0, vec_item("i9", &[5.0, 5.0, -5.0, 1.0]))]).unwrap();
        for plan in [tables(), scan()] {
            let hits = index.query(QueryBy::Vector(items[30].1.vector.clone()), &plan).unwrap().hits;
            assert_eq!(hits[0].id, "i30", "{plan:?}");
            let moved = index.query(QueryBy::Vector(vec![5.0, 5.0, -5.0, 1.0]), &plan).unwrap().hits;
            assert_eq!(moved[0].id, "i9", "{plan:?}");
        }
        e.apply_now().unwrap();
        assert_eq!(index.info().unwrap().items, 200);
        assert_eq!(index.query(QueryBy::Id("i9".into()), &tables()).unwrap().hits.len(), 10);
    }

    #[test]
    fn dropped_index_is_not_found_and_name_is_reusable() {
        let dir = tempfile::tempdir().unwrap();
        let e = engine(dir.path());
        e.create(IndexSpec { name: "a".into(), ..Default::default() }).unwrap();
        assert!(matches!(
            e.create(IndexSpec { name: "a".into(), ..Default::default() }),
            Err(IndexError::AlreadyExists(_))
        ));
        let old = e.index("a").unwrap();
        e.drop_index("a").unwrap();
        assert!(matches!(e.index("a"), Err(IndexError::NotFound(_))));
        assert!(matches!(old.ingest(vec![(0, vec_item("x", &[1., 2., 3., 4.]))]), Err(IndexError::NotFound(_))));
        e.create(IndexSpec { name: "a".into(), ..Default::default() }).unwrap();
        assert_eq!(e.list().unwrap().len(), 1);
    }
}
