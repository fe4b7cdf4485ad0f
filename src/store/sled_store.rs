//! The sled implementation of the store: one tree per index (layout in `migrations/`), and a
//! vector file per index beside the database.

use std::collections::hash_map::Entry;
use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::fs::File;
use std::ops::Range;
use std::path::{Path, PathBuf};
use std::sync::atomic::AtomicU64;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, Instant};

use prost::Message;

use super::durable::{BlobSync, create_dir_durably, sync_blobs, sync_dir};
use super::keys;
use super::migrate::{self, CATALOG_TREE};
use super::records::{self, Access, RecordFile};
use super::{
    Catalog, Compaction, IndexDef, IndexParams, IndexStore, ItemWrite, StoreBatch, StoreError, StoreRepair, StoredItem,
    StoredState,
};
use crate::storage_proto::{IndexRecord, ItemRecord};

/// Item numbers per bucket chunk: an append rewrites one open chunk of at most 512 bytes,
/// however large the bucket grows. Every rewrite lands in sled's log until its segment is
/// cleaned: at 1M items, K=12, L=16 (~244 items a bucket) 512-item chunks left 20 KB of disk per
/// item and a 21 s crash recovery; smaller chunks cost a few more point reads per query.
/// Readers take chunks of any size, so changing this needs no migration.
const CHUNK_CAPACITY: usize = 128;
const INDEX_TREE_PREFIX: &str = "index/";

#[derive(Debug, Clone)]
pub struct SledOptions {
    /// sled's page cache, bytes.
    pub cache_capacity: u64,
    /// fsync the database file at every sync, so that what was applied survives power loss and
    /// not only a crash of the process (sled's own flush uses sync_file_range).
    pub fsync: bool,
    /// Bytes applied after which a checkpoint closes and reopens the database (0: never). sled
    /// 0.34 writes its page-table snapshot only while opening, and after a crash replays every
    /// log write since: 968 ms to open after a 1M ingest never checkpointed (K=12, L=16).
    pub checkpoint_bytes: u64,
}

impl Default for SledOptions {
    fn default() -> Self {
        Self { cache_capacity: 512 << 20, fsync: true, checkpoint_bytes: 256 << 20 }
    }
}

impl From<sled::Error> for StoreError {
    fn from(e: sled::Error) -> Self {
        match e {
            sled::Error::Io(io) => Self::Io(io),
            other => Self::Backend(Box::new(other)),
        }
    }
}

/// The open database: replaced whole by a checkpoint, which closes and reopens it.
struct OpenDb {
    db: sled::Db,
    catalog: sled::Tree,
    db_file: Option<File>,
    dir: PathBuf,
    /// sled's large values live in files of their own that sled never fsyncs.
    blobs: BlobSync,
}

impl OpenDb {
    fn open(sled_dir: &Path, options: &SledOptions) -> Result<Self, StoreError> {
        // No background flusher: every sync is ours, and a checkpoint's close must not wait for
        // a flusher thread to let go of the file.
        let config = sled::Config::new().path(sled_dir).cache_capacity(options.cache_capacity).flush_every_ms(None);
        let db = open_sled(config)?;
        migrate::run(&db)?;
        let catalog = db.open_tree(CATALOG_TREE)?;
        let db_file = if options.fsync { File::open(sled_dir.join("db")).ok() } else { None };
        if options.fsync && db_file.is_none() {
            tracing::warn!("sled's data file not found; applied writes rely on sled's flush alone");
        }
        Ok(Self { db, catalog, db_file, dir: sled_dir.to_path_buf(), blobs: BlobSync::default() })
    }

    /// Makes writes durable: sled's flush, an fsync of the blob files it wrote since the last
    /// time (before the file whose log refers to them), then an fsync of its file.
    fn commit(&self) -> Result<(), StoreError> {
        self.db.flush()?;
        if let Some(file) = &self.db_file {
            self.blobs.sync_new(&self.dir)?;
            file.sync_data()?;
        }
        Ok(())
    }
}

/// The database every handle of one data directory goes through.
struct Sled {
    dir: PathBuf,
    options: SledOptions,
    /// `None` only if a checkpoint could not reopen the database.
    open: RwLock<Option<OpenDb>>,
    /// Bytes applied since the database was last opened.
    written: AtomicU64,
    /// Held shared by everything that writes the database, exclusively by a rewrite (which
    /// copies it and must not miss a write).
    writes: RwLock<()>,
}

impl Sled {
    /// Runs `f` on the open database (a checkpoint waits for it, and it for a checkpoint).
    fn with<T>(&self, f: impl FnOnce(&OpenDb) -> Result<T, StoreError>) -> Result<T, StoreError> {
        let open = self.open.read().unwrap_or_else(|e| e.into_inner());
        match &*open {
            Some(db) => f(db),
            None => Err(StoreError::Io(std::io::Error::other(
                "the database could not be reopened after a checkpoint; restart the server",
            ))),
        }
    }

    /// Closes and reopens the database: sled writes its snapshot, and a later crash replays
    /// only what is written after this. Reads and writes wait meanwhile.
    fn checkpoint(&self) -> Result<Duration, StoreError> {
        let started = Instant::now();
        let mut open = self.open.write().unwrap_or_else(|e| e.into_inner());
        if let Some(db) = open.take() {
            if let Err(e) = db.commit() {
                *open = Some(db);
                return Err(e);
            }
            drop(db);
        }
        crate::failpoint::crash_point("checkpoint-closed");
        *open = Some(OpenDb::open(&self.dir, &self.options)?);
        self.written.store(0, Ordering::Relaxed);
        Ok(started.elapsed())
    }

    /// Rewrites the database into a fresh one, which holds only live data (sled reuses the
    /// space of dead pages but never gives its file's high-water mark back), and swaps it in.
    /// Reads go on during the copy; writes wait; everything waits during the swap, which
    /// closes the old database and opens the new one (already snapshotted: a short open).
    fn rewrite(&self) -> Result<Compaction, StoreError> {
        let started = Instant::now();
        let _writes = self.writes.write().unwrap_or_else(|e| e.into_inner());
        let before = dir_bytes(&self.dir)?;
        let copy_dir = rewrite_dir(&self.dir);
        if copy_dir.exists() {
            std::fs::remove_dir_all(&copy_dir)?;
        }
        self.copy_into(&copy_dir)?;
        crate::failpoint::crash_point("compaction-copied");
        let copied = started.elapsed();
        let swap_started = Instant::now();
        {
            let mut open = self.open.write().unwrap_or_else(|e| e.into_inner());
            if let Some(db) = open.take() {
                drop(db);
            }
            let old_dir = replaced_dir(&self.dir);
            std::fs::rename(&self.dir, &old_dir)?;
            crate::failpoint::crash_point("compaction-swapped");
            std::fs::rename(&copy_dir, &self.dir)?;
            if let Some(parent) = self.dir.parent() {
                sync_dir(parent)?;
            }
            *open = Some(OpenDb::open(&self.dir, &self.options)?);
            self.written.store(0, Ordering::Relaxed);
        }
        let paused = swap_started.elapsed();
        std::fs::remove_dir_all(replaced_dir(&self.dir))?;
        Ok(Compaction { before, after: dir_bytes(&self.dir)?, copied, paused })
    }

    /// Copies every tree into a fresh database at `copy_dir`, snapshotted and synced. The
    /// caller holds `writes` exclusively (the copy must not miss a write).
    fn copy_into(&self, copy_dir: &Path) -> Result<(), StoreError> {
        self.with(|old| {
            let copy = open_sled(sled::Config::new().path(copy_dir).flush_every_ms(None))?;
            for name in old.db.tree_names() {
                let (from, to) = match &*name == DEFAULT_TREE {
                    true => ((*old.db).clone(), (*copy).clone()),
                    false => (old.db.open_tree(&name)?, copy.open_tree(&name)?),
                };
                let mut batch = sled::Batch::default();
                let mut in_batch = 0;
                for entry in from.iter() {
                    let (key, value) = entry?;
                    batch.insert(key, value);
                    in_batch += 1;
                    if in_batch == 4096 {
                        to.apply_batch(std::mem::take(&mut batch))?;
                        in_batch = 0;
                    }
                }
                to.apply_batch(batch)?;
            }
            // Index uids are never reused: the copy's id generator starts past the old one's.
            let floor = old.db.generate_id()?;
            while copy.generate_id()? < floor {}
            copy.flush()?;
            Ok(())
        })?;
        // Opened once more and closed, the copy writes its snapshot: its first open is short.
        open_sled(sled::Config::new().path(copy_dir).flush_every_ms(None))?.flush()?;
        sync_closed(copy_dir)
    }
}

/// Makes a closed sled database durable whole: its files (blobs first), then their directories
/// (sled's flush syncs file ranges, not the file's size or its directory entries).
fn sync_closed(sled_dir: &Path) -> Result<(), StoreError> {
    sync_blobs(sled_dir, None)?;
    for entry in std::fs::read_dir(sled_dir)? {
        let entry = entry?;
        if entry.file_type()?.is_file() {
            File::open(entry.path())?.sync_all()?;
        }
    }
    sync_dir(sled_dir)?;
    if let Some(parent) = sled_dir.parent() {
        sync_dir(parent)?;
    }
    Ok(())
}

/// sled's name for its default tree (listed by `tree_names` with the others).
const DEFAULT_TREE: &[u8] = b"__sled__default";

/// Where a rewrite builds the new database, beside the live one.
fn rewrite_dir(sled_dir: &Path) -> PathBuf {
    sled_dir.with_file_name("sled.rewrite")
}

/// Where the old database goes during the swap.
fn replaced_dir(sled_dir: &Path) -> PathBuf {
    sled_dir.with_file_name("sled.replaced")
}

/// Finishes or undoes a rewrite that a crash interrupted: a complete copy is renamed into place
/// only after the old database was moved aside, so an old database aside means the copy is
/// complete; a copy beside a database in place is abandoned.
fn recover_rewrite(sled_dir: &Path) -> Result<(), StoreError> {
    let (copy, replaced) = (rewrite_dir(sled_dir), replaced_dir(sled_dir));
    if !sled_dir.exists() && replaced.exists() {
        let from = if copy.exists() { &copy } else { &replaced };
        tracing::warn!(from = %from.display(), "finishing a database rewrite interrupted by a crash");
        std::fs::rename(from, sled_dir)?;
    }
    for leftover in [copy, replaced] {
        if leftover.exists() {
            std::fs::remove_dir_all(&leftover)?;
        }
    }
    Ok(())
}

/// Bytes of disk a directory tree takes (allocated blocks).
fn dir_bytes(path: &Path) -> Result<u64, StoreError> {
    use std::os::unix::fs::MetadataExt;
    let mut total = 0;
    for entry in std::fs::read_dir(path)? {
        let entry = entry?;
        let meta = entry.metadata()?;
        total += if meta.is_dir() { dir_bytes(&entry.path())? } else { meta.blocks() * 512 };
    }
    Ok(total)
}

pub struct SledCatalog {
    sled: Arc<Sled>,
    vectors_dir: PathBuf,
    /// Serialises creation so that two creates of one name cannot both succeed.
    create_lock: Mutex<()>,
}

impl SledCatalog {
    /// Opens (or creates) the data directory, applying layout migrations first.
    pub fn open(data_dir: &Path, options: &SledOptions) -> Result<Self, StoreError> {
        let sled_dir = data_dir.join("sled");
        let vectors_dir = data_dir.join("vectors");
        create_dir_durably(&vectors_dir)?;
        recover_rewrite(&sled_dir)?;
        create_dir_durably(&sled_dir)?;
        let open = OpenDb::open(&sled_dir, options)?;
        // The files sled made at its first open (its main file, the blob directory).
        sync_dir(&sled_dir)?;
        let sled = Sled {
            dir: sled_dir,
            options: options.clone(),
            open: RwLock::new(Some(open)),
            written: AtomicU64::new(0),
            writes: RwLock::new(()),
        };
        let this = Self { sled: Arc::new(sled), vectors_dir, create_lock: Mutex::new(()) };
        this.sled.with(|db| this.collect_garbage(db))?;
        Ok(this)
    }

    /// Opens a database only to bring its layout up to date (`imagelsh migrate`).
    pub fn migrate(data_dir: &Path) -> Result<(u32, Vec<&'static migrate::Migration>), StoreError> {
        let db = open_sled(sled::Config::new().path(data_dir.join("sled")))?;
        let before = migrate::stored_version(&db)?;
        let applied = migrate::run(&db)?;
        db.flush()?;
        drop(db);
        sync_closed(&data_dir.join("sled"))?;
        Ok((before, applied))
    }

    /// Opens and closes the database (which nothing else may hold open) so that sled writes a
    /// snapshot of its page table. sled 0.34 snapshots only while opening, and its recovery
    /// replays every log write since the last snapshot: after a long ingest that replay is most of
    /// a restart (15.6 s after 1M items at K=12, L=16). Run at a clean shutdown, it moves the cost from the next
    /// start to this stop.
    pub fn checkpoint_closed(data_dir: &Path) -> Result<(), StoreError> {
        let db = open_sled(sled::Config::new().path(data_dir.join("sled")))?;
        db.flush()?;
        drop(db);
        sync_closed(&data_dir.join("sled"))
    }

    /// Removes trees and vector files of indexes that are not in the catalog: left behind by a
    /// crash during create or drop.
    fn collect_garbage(&self, db: &OpenDb) -> Result<(), StoreError> {
        let mut live = BTreeSet::new();
        for entry in db.catalog.iter() {
            let (_, value) = entry?;
            live.insert(IndexRecord::decode(&*value)?.uid);
        }
        for name in db.db.tree_names() {
            let Some(uid) = std::str::from_utf8(&name).ok().and_then(|n| n.strip_prefix(INDEX_TREE_PREFIX)) else {
                continue;
            };
            if u64::from_str_radix(uid, 16).is_ok_and(|uid| !live.contains(&uid)) {
                tracing::info!(tree = uid, "removing index tree left by an interrupted create or drop");
                db.db.drop_tree(&name)?;
            }
        }
        for entry in std::fs::read_dir(&self.vectors_dir)? {
            let path = entry?.path();
            let uid = path.file_stem().and_then(|s| s.to_str()).and_then(|s| u64::from_str_radix(s, 16).ok());
            if uid.is_some_and(|uid| !live.contains(&uid)) {
                std::fs::remove_file(&path)?;
            }
        }
        Ok(())
    }

    fn open_record(&self, record: IndexRecord) -> Result<Arc<dyn IndexStore>, StoreError> {
        let tree = tree_name(record.uid);
        self.sled.with(|db| Ok(db.db.open_tree(&tree)?))?;
        let def = def_of(&record);
        // Records are cut back to what is committed by `load` (sketches) and by the caller,
        // which knows what the log holds beyond the store (`cut_vectors`).
        let vectors = match def.stores_vectors {
            true => Some(RecordFile::open(
                &vector_path(&self.vectors_dir, record.uid),
                4 * def.dim as usize,
                Access::Mapped,
            )?),
            false => None,
        };
        let sketches = match def.sketch_bits {
            0 => None,
            bits => {
                Some(RecordFile::open(&sketch_path(&self.vectors_dir, record.uid), bits as usize / 8, Access::Whole)?)
            }
        };
        Ok(Arc::new(SledIndex {
            def,
            record,
            sled: self.sled.clone(),
            tree,
            vectors,
            sketches,
            vectors_dir: self.vectors_dir.clone(),
            writer: Mutex::new(()),
            dropped: AtomicBool::new(false),
        }))
    }
}

/// Opens a sled database, waiting up to `LOCK_WAIT` for its file lock: sled releases the lock
/// only when its background threads let go of the file, some time after the last handle is
/// dropped (a restart right after a stop, the checkpoint right after the server's own handles).
fn open_sled(config: sled::Config) -> Result<sled::Db, StoreError> {
    const LOCK_WAIT: std::time::Duration = std::time::Duration::from_secs(10);
    let started = std::time::Instant::now();
    loop {
        match config.open() {
            // sled 0.34 reports a held lock only as an i/o error of kind `Other` with this text
            // (no error kind of its own); matched here, in one place.
            Err(sled::Error::Io(e)) if e.to_string().contains("could not acquire lock") => {
                if started.elapsed() >= LOCK_WAIT {
                    return Err(StoreError::InUse(config.path.clone()));
                }
                std::thread::sleep(std::time::Duration::from_millis(50));
            }
            other => return Ok(other?),
        }
    }
}

fn tree_name(uid: u64) -> String {
    format!("{INDEX_TREE_PREFIX}{uid:016x}")
}

fn vector_path(dir: &Path, uid: u64) -> PathBuf {
    dir.join(format!("{uid:016x}.f32"))
}

fn sketch_path(dir: &Path, uid: u64) -> PathBuf {
    dir.join(format!("{uid:016x}.sketch"))
}

fn def_of(r: &IndexRecord) -> IndexDef {
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

fn read_u32(tree: &sled::Tree, key: &[u8]) -> Result<u32, StoreError> {
    let v = tree.get(key)?.ok_or_else(|| StoreError::Corrupt("missing item counter".into()))?;
    keys::decode_u32(&v).ok_or_else(|| StoreError::Corrupt("item counter".into()))
}

fn read_applied(tree: &sled::Tree) -> Result<u64, StoreError> {
    match tree.get(keys::APPLIED)? {
        None => Ok(0),
        Some(v) => keys::decode_u64(&v).ok_or_else(|| StoreError::Corrupt("applied log position".into())),
    }
}

fn read_u64(tree: &sled::Tree, key: &[u8]) -> Result<u64, StoreError> {
    let v = tree.get(key)?.ok_or_else(|| StoreError::Corrupt("missing item count".into()))?;
    keys::decode_u64(&v).ok_or_else(|| StoreError::Corrupt("item count".into()))
}

impl Catalog for SledCatalog {
    fn create(&self, def: &IndexDef, params: IndexParams<'_>) -> Result<Arc<dyn IndexStore>, StoreError> {
        let _guard = self.create_lock.lock().unwrap_or_else(|e| e.into_inner());
        let _writing = self.sled.writes.read().unwrap_or_else(|e| e.into_inner());
        let record = self.sled.with(|db| {
            if db.catalog.contains_key(def.name.as_bytes())? {
                return Err(StoreError::AlreadyExists(def.name.clone()));
            }
            let uid = db.db.generate_id()?;
            let record = IndexRecord {
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
            };
            // The tree first, the catalog entry last: a crash in between leaves an orphan tree
            // that the next open removes, never a catalog entry without its data.
            let tree = db.db.open_tree(tree_name(uid))?;
            let mut batch = sled::Batch::default();
            batch.insert(keys::HYPERPLANES, keys::encode_f32s(params.hyperplanes));
            if let Some(center) = params.center {
                batch.insert(keys::CENTER, keys::encode_f32s(center));
            }
            if let Some(planes) = params.sketch_planes {
                batch.insert(keys::SKETCH_PLANES, keys::encode_f32s(planes));
            }
            batch.insert(keys::NEXT_ITEM, &0u32.to_be_bytes());
            batch.insert(keys::ITEM_COUNT, &0u64.to_be_bytes());
            tree.apply_batch(batch)?;
            db.catalog.insert(def.name.as_bytes(), record.encode_to_vec())?;
            db.commit()?;
            Ok(record)
        })?;
        let store = self.open_record(record)?;
        // The new index's record files: their names durable before anything written to them is
        // acknowledged.
        sync_dir(&self.vectors_dir)?;
        Ok(store)
    }

    fn open(&self, name: &str) -> Result<Option<Arc<dyn IndexStore>>, StoreError> {
        match self.sled.with(|db| Ok(db.catalog.get(name.as_bytes())?))? {
            None => Ok(None),
            Some(v) => self.open_record(IndexRecord::decode(&*v)?).map(Some),
        }
    }

    fn list(&self) -> Result<Vec<IndexDef>, StoreError> {
        self.sled.with(|db| db.catalog.iter().map(|entry| Ok(def_of(&IndexRecord::decode(&*entry?.1)?))).collect())
    }

    fn sync(&self) -> Result<(), StoreError> {
        self.sled.with(OpenDb::commit)
    }

    fn checkpoint(&self, force: bool) -> Result<Option<Duration>, StoreError> {
        let due = self.sled.options.checkpoint_bytes > 0
            && self.sled.written.load(Ordering::Relaxed) >= self.sled.options.checkpoint_bytes;
        if !(force || due) {
            return Ok(None);
        }
        self.sled.checkpoint().map(Some)
    }

    fn backup(&self, to: &Path) -> Result<(), StoreError> {
        // Writes wait for the whole copy: the record files below are read while no apply or
        // create changes what the database copy refers to.
        let _writes = self.sled.writes.write().unwrap_or_else(|e| e.into_inner());
        self.sled.copy_into(&to.join("sled"))?;
        let vectors = to.join("vectors");
        std::fs::create_dir_all(&vectors)?;
        for entry in std::fs::read_dir(&self.vectors_dir)? {
            let entry = entry?;
            if entry.file_type()?.is_file() {
                // Removed items' records are holes: copied as holes, not as zeros.
                crate::sparse::copy_sparse(&entry.path(), &vectors.join(entry.file_name()))?;
            }
        }
        sync_dir(&vectors)?;
        sync_dir(to)
    }

    fn compact(&self) -> Result<Option<Compaction>, StoreError> {
        self.sled.rewrite().map(Some)
    }
}

struct SledIndex {
    def: IndexDef,
    record: IndexRecord,
    sled: Arc<Sled>,
    /// The name of the index's tree.
    tree: String,
    vectors: Option<RecordFile>,
    /// Sketches of applied items (read back whole at `load`; queries use the caller's copy).
    sketches: Option<RecordFile>,
    vectors_dir: PathBuf,
    /// Applying is read-modify-write of buckets and counters: one writer at a time.
    writer: Mutex<()>,
    dropped: AtomicBool,
}

impl SledIndex {
    fn check_live(&self) -> Result<(), StoreError> {
        if self.dropped.load(Ordering::Acquire) {
            return Err(StoreError::Dropped(self.def.name.clone()));
        }
        Ok(())
    }

    fn lock_writer(&self) -> Result<std::sync::MutexGuard<'_, ()>, StoreError> {
        let guard = self.writer.lock().unwrap_or_else(|e| e.into_inner());
        self.check_live()?;
        Ok(guard)
    }

    /// Runs `f` on the index's tree of the open database.
    fn with_tree<T>(&self, f: impl FnOnce(&sled::Tree) -> Result<T, StoreError>) -> Result<T, StoreError> {
        self.sled.with(|db| f(&db.db.open_tree(&self.tree)?))
    }

    fn words_per_item(&self) -> usize {
        self.def.sketch_bits as usize / 64
    }
}

impl IndexStore for SledIndex {
    fn def(&self) -> &IndexDef {
        &self.def
    }

    fn uid(&self) -> u64 {
        self.record.uid
    }

    fn hyperplanes(&self) -> Result<Vec<f32>, StoreError> {
        let bytes = self.with_tree(|tree| Ok(tree.get(keys::HYPERPLANES)?))?;
        let bytes = bytes.ok_or_else(|| StoreError::Corrupt("missing hyperplanes".into()))?;
        Ok(keys::decode_f32s(&bytes))
    }

    fn center(&self) -> Result<Option<Vec<f32>>, StoreError> {
        Ok(self.with_tree(|tree| Ok(tree.get(keys::CENTER)?))?.map(|bytes| keys::decode_f32s(&bytes)))
    }

    fn sketch_planes(&self) -> Result<Option<Vec<f32>>, StoreError> {
        Ok(self.with_tree(|tree| Ok(tree.get(keys::SKETCH_PLANES)?))?.map(|bytes| keys::decode_f32s(&bytes)))
    }

    fn load(&self) -> Result<StoredState, StoreError> {
        self.with_tree(|tree| {
            let next = read_u32(tree, keys::NEXT_ITEM)?;
            let count = read_u64(tree, keys::ITEM_COUNT)?;
            let applied = read_applied(tree)?;
            let live = live_items(tree, next)?;
            let mut sketches = Vec::new();
            if let Some(file) = &self.sketches {
                // Records past `next` belong to a group whose sled batch never committed.
                file.cut_to(next)?;
                sketches.reserve(next as usize * self.words_per_item());
                // Dead items' records may have been reclaimed.
                let is_live = |n: u32| live.get(n as usize / 64).is_some_and(|w| w & (1 << (n % 64)) != 0);
                file.read_all(next, is_live, |_, payload| records::get_u64s(payload, &mut sketches))?;
            }
            Ok(StoredState { next, count, applied, live, sketches })
        })
    }

    fn applied_position(&self) -> Result<u64, StoreError> {
        self.check_live()?;
        self.with_tree(read_applied)
    }

    fn write_vectors(&self, first: u32, vectors: &[&[f32]]) -> Result<(), StoreError> {
        self.check_live()?;
        let Some(file) = &self.vectors else { return Ok(()) };
        let dim = self.def.dim as usize;
        if let Some(bad) = vectors.iter().find(|v| v.len() != dim) {
            return Err(StoreError::Corrupt(format!(
                "an embedding of {} values in an index of dimension {dim}",
                bad.len()
            )));
        }
        file.write_batch(first, vectors.len(), |i, buf| records::put_f32s(vectors[i], buf))
    }

    fn sync_vectors(&self) -> Result<(), StoreError> {
        match &self.vectors {
            Some(file) => file.sync(),
            None => Ok(()),
        }
    }

    fn cut_vectors(&self, committed: u32) -> Result<(), StoreError> {
        match &self.vectors {
            Some(file) => file.cut_to(committed),
            None => Ok(()),
        }
    }

    fn apply(&self, batches: &[&StoreBatch], position: u64) -> Result<(), StoreError> {
        let _writer = self.lock_writer()?;
        let _writing = self.sled.writes.read().unwrap_or_else(|e| e.into_inner());
        let written = self.with_tree(|tree| self.apply_to(tree, batches, position))?;
        self.sled.written.fetch_add(written, Ordering::Relaxed);
        Ok(())
    }

    fn bucket(&self, table: u16, code: u64, out: &mut Vec<u32>) -> Result<(), StoreError> {
        self.with_tree(|tree| read_bucket(tree, table, code, out))
    }

    fn items(&self, numbers: &[u32]) -> Result<Vec<StoredItem>, StoreError> {
        self.with_tree(|tree| {
            let mut chunks: HashMap<u32, Option<sled::IVec>> = HashMap::new();
            let mut items = Vec::with_capacity(numbers.len());
            for &number in numbers {
                let chunk = number / keys::RECORDS_PER_CHUNK;
                let value = match chunks.entry(chunk) {
                    Entry::Occupied(e) => e.into_mut(),
                    Entry::Vacant(v) => v.insert(tree.get(keys::record_chunk(chunk))?),
                };
                let Some(value) = value else { continue };
                let records = keys::decode_record_chunk(value)
                    .ok_or_else(|| StoreError::Corrupt(format!("record chunk {chunk} of index {:?}", self.def.name)))?;
                if let Some((_, bytes)) = records.iter().find(|(n, _)| *n == number) {
                    let r = ItemRecord::decode(*bytes)?;
                    items.push(StoredItem { number, id: r.id, label: r.label, metadata: r.metadata, codes: r.codes });
                }
            }
            Ok(items)
        })
    }

    fn thumbnails(&self, numbers: &[u32]) -> Result<Vec<Option<Vec<u8>>>, StoreError> {
        if !self.def.thumbnails {
            return Ok(vec![None; numbers.len()]);
        }
        self.with_tree(|tree| numbers.iter().map(|&n| Ok(tree.get(keys::thumbnail(n))?.map(|v| v.to_vec()))).collect())
    }

    fn item_number(&self, id: &str) -> Result<Option<u32>, StoreError> {
        match self.with_tree(|tree| Ok(tree.get(keys::id(id))?))? {
            None => Ok(None),
            Some(v) => {
                keys::decode_u32(&v).map(Some).ok_or_else(|| StoreError::Corrupt(format!("item number of id {id:?}")))
            }
        }
    }

    fn for_each_vector(&self, numbers: &[u32], f: &mut dyn FnMut(usize, &[f32])) -> Result<(), StoreError> {
        let vectors = self.vectors.as_ref().ok_or_else(|| StoreError::VectorsNotStored(self.def.name.clone()))?;
        let mut scratch = Vec::new();
        vectors.read_many(numbers, |i, payload| f(i, records::f32s_of(payload, &mut scratch)))
    }

    fn for_each_bucket(&self, table: u16, f: &mut dyn FnMut(u64, &[u32])) -> Result<(), StoreError> {
        self.with_tree(|tree| {
            // Chunks sort by (code, chunk), the open chunk last: a bucket's chunks are adjacent.
            let mut current: Option<u64> = None;
            let mut members = Vec::new();
            for entry in tree.scan_prefix(keys::table_prefix(table)) {
                let (key, value) = entry?;
                let corrupt = || StoreError::Corrupt(format!("bucket chunk {key:?} of table {table}"));
                let (_, code, chunk) = keys::parse_bucket_chunk(&key).ok_or_else(corrupt)?;
                if current != Some(code) {
                    if let Some(done) = current.filter(|_| !members.is_empty()) {
                        f(done, &members);
                    }
                    members.clear();
                    current = Some(code);
                }
                if chunk == keys::OPEN_CHUNK {
                    keys::decode_open_chunk(&value, &mut members).ok_or_else(corrupt)?;
                } else {
                    keys::decode_items(&value, &mut members);
                }
            }
            if let Some(done) = current.filter(|_| !members.is_empty()) {
                f(done, &members);
            }
            Ok(())
        })
    }

    fn repair(&self, repair: &StoreRepair) -> Result<(), StoreError> {
        let _writer = self.lock_writer()?;
        let _writing = self.sled.writes.read().unwrap_or_else(|e| e.into_inner());
        let written = self.with_tree(|tree| {
            let mut edits = HashMap::new();
            for entry in &repair.remove {
                edit(tree, &mut edits, entry.table, entry.code)?.remove(tree, entry.number)?;
            }
            for entry in &repair.add {
                edit(tree, &mut edits, entry.table, entry.code)?.append(entry.number);
            }
            let mut batch = WriteBatch::default();
            for edit in edits.into_values() {
                edit.write(&mut batch);
            }
            if let Some(count) = repair.count {
                batch.insert(keys::ITEM_COUNT, count.to_be_bytes());
            }
            for (id, number) in &repair.ids {
                batch.insert(keys::id(id), number.to_be_bytes());
            }
            let bytes = batch.bytes;
            tree.apply_batch(batch.batch)?;
            Ok(bytes)
        })?;
        self.sled.written.fetch_add(written, Ordering::Relaxed);
        self.sled.with(OpenDb::commit)
    }

    fn reclaim(&self, dead: &[Range<u32>]) -> Result<u64, StoreError> {
        let mut freed = 0;
        for file in [&self.vectors, &self.sketches].into_iter().flatten() {
            freed += file.reclaim(dead)?;
        }
        Ok(freed)
    }

    fn destroy(&self) -> Result<(), StoreError> {
        let _writer = self.lock_writer()?;
        let _writing = self.sled.writes.read().unwrap_or_else(|e| e.into_inner());
        self.dropped.store(true, Ordering::Release);
        // The catalog entry first: once it is gone the index no longer exists, and a crash
        // before the rest leaves garbage that the next open collects.
        self.sled.with(|db| {
            db.catalog.remove(self.def.name.as_bytes())?;
            db.commit()?;
            db.db.drop_tree(&self.tree)?;
            Ok(())
        })?;
        for path in [vector_path(&self.vectors_dir, self.record.uid), sketch_path(&self.vectors_dir, self.record.uid)] {
            if let Err(e) = std::fs::remove_file(&path)
                && e.kind() != std::io::ErrorKind::NotFound
            {
                return Err(e.into());
            }
        }
        Ok(())
    }
}

impl SledIndex {
    /// Applies the batches to `tree` in one `apply_batch`; returns the bytes of keys and values
    /// it wrote (what a crash before the next checkpoint makes sled replay).
    fn apply_to(&self, tree: &sled::Tree, batches: &[&StoreBatch], position: u64) -> Result<u64, StoreError> {
        let mut next = read_u32(tree, keys::NEXT_ITEM)?;
        let mut count = read_u64(tree, keys::ITEM_COUNT)?;
        let corrupt_count = || StoreError::Corrupt(format!("live item count of index {:?}", self.def.name));
        let mut batch = WriteBatch::default();
        let mut edits = HashMap::new();
        let mut records = RecordEdits::new(next);
        let mut written: Vec<&ItemWrite> = Vec::new();
        for logged in batches {
            for removal in &logged.removals {
                for (table, &code) in removal.codes.iter().enumerate() {
                    edit(tree, &mut edits, table as u16, code)?.remove(tree, removal.number)?;
                }
                records.chunk(tree, removal.number)?.remove(&removal.number);
                if self.def.thumbnails {
                    batch.remove(keys::thumbnail(removal.number));
                }
                if let Some(id) = &removal.deleted_id {
                    batch.remove(keys::id(id));
                }
                count = count.checked_sub(1).ok_or_else(corrupt_count)?;
            }
            for item in &logged.items {
                for (table, &code) in item.codes.iter().enumerate() {
                    edit(tree, &mut edits, table as u16, code)?.append(item.number);
                }
                records.chunk(tree, item.number)?.insert(item.number, item_record_bytes(item));
                batch.insert(keys::id(&item.id), item.number.to_be_bytes());
                if let Some(thumbnail) = item.thumbnail.as_deref().filter(|_| self.def.thumbnails) {
                    batch.insert(keys::thumbnail(item.number), thumbnail);
                }
                count += 1;
                let after = item.number.checked_add(1);
                next = next.max(after.ok_or_else(|| StoreError::ItemNumbersExhausted(self.def.name.clone()))?);
                written.push(item);
            }
        }
        // Sketch records first: the sled batch below is what makes them count (`load` cuts the
        // file back to the applied items).
        if let Some(file) = &self.sketches
            && let Some(first) = written.first().map(|it| it.number)
        {
            let words = self.words_per_item();
            if let Some(bad) = written.iter().find(|it| it.sketch.len() != words) {
                return Err(StoreError::Corrupt(format!(
                    "item {:?} has a sketch of {} words, the index keeps {words}",
                    bad.id,
                    bad.sketch.len()
                )));
            }
            if written.iter().zip(first..).any(|(it, n)| it.number != n) {
                return Err(StoreError::Corrupt("applied items are not numbered consecutively".into()));
            }
            file.write_batch(first, written.len(), |i, buf| records::put_u64s(&written[i].sketch, buf))?;
            file.sync()?;
        }
        for edit in edits.into_values() {
            edit.write(&mut batch);
        }
        records.write(&mut batch);
        batch.insert(keys::NEXT_ITEM, next.to_be_bytes());
        batch.insert(keys::ITEM_COUNT, count.to_be_bytes());
        batch.insert(keys::APPLIED, position.to_be_bytes());
        let bytes = batch.bytes;
        tree.apply_batch(batch.batch)?;
        Ok(bytes)
    }
}

/// A sled batch that counts the bytes it writes.
#[derive(Default)]
struct WriteBatch {
    batch: sled::Batch,
    bytes: u64,
}

impl WriteBatch {
    fn insert(&mut self, key: impl AsRef<[u8]>, value: impl AsRef<[u8]>) {
        self.bytes += (key.as_ref().len() + value.as_ref().len()) as u64;
        self.batch.insert(key.as_ref(), value.as_ref());
    }

    fn remove(&mut self, key: impl AsRef<[u8]>) {
        self.bytes += key.as_ref().len() as u64;
        self.batch.remove(key.as_ref());
    }
}

/// Appends the item numbers in bucket `code` of `table` to `out`.
fn read_bucket(tree: &sled::Tree, table: u16, code: u64, out: &mut Vec<u32>) -> Result<(), StoreError> {
    // Point lookups, not a prefix scan: sled 0.34's iterators copy every node they visit, and a
    // query reads L × (1 + probes) buckets. A bucket with sealed chunks always has an open
    // chunk, which says how many sealed chunks were created.
    let Some(open) = tree.get(keys::bucket_chunk(table, code, keys::OPEN_CHUNK))? else {
        return Ok(());
    };
    let sealed = keys::decode_open_chunk(&open, out)
        .ok_or_else(|| StoreError::Corrupt(format!("open chunk of bucket {code:x} in table {table}")))?;
    for chunk in 0..sealed {
        // Chunks emptied by deletes are gone.
        if let Some(items) = tree.get(keys::bucket_chunk(table, code, chunk))? {
            keys::decode_items(&items, out);
        }
    }
    Ok(())
}

fn edit<'a>(
    tree: &sled::Tree,
    edits: &'a mut HashMap<(u16, u64), BucketEdit>,
    table: u16,
    code: u64,
) -> Result<&'a mut BucketEdit, StoreError> {
    Ok(match edits.entry((table, code)) {
        Entry::Occupied(e) => e.into_mut(),
        Entry::Vacant(v) => v.insert(BucketEdit::load_open(tree, table, code)?),
    })
}

/// Pending changes to record chunks within one apply: each chunk is read (if it can hold items
/// from before) and written once.
struct RecordEdits {
    /// Chunks from this one on held no item before the apply: nothing to read.
    fresh_from: u32,
    chunks: HashMap<u32, BTreeMap<u32, Vec<u8>>>,
}

impl RecordEdits {
    fn new(next: u32) -> Self {
        Self { fresh_from: next.div_ceil(keys::RECORDS_PER_CHUNK), chunks: HashMap::new() }
    }

    /// The records of the chunk holding item `number`, loaded on first use.
    fn chunk(&mut self, tree: &sled::Tree, number: u32) -> Result<&mut BTreeMap<u32, Vec<u8>>, StoreError> {
        let chunk = number / keys::RECORDS_PER_CHUNK;
        Ok(match self.chunks.entry(chunk) {
            Entry::Occupied(e) => e.into_mut(),
            Entry::Vacant(v) => {
                let mut records = BTreeMap::new();
                if chunk < self.fresh_from
                    && let Some(value) = tree.get(keys::record_chunk(chunk))?
                {
                    let decoded = keys::decode_record_chunk(&value)
                        .ok_or_else(|| StoreError::Corrupt(format!("record chunk {chunk}")))?;
                    records.extend(decoded.into_iter().map(|(n, r)| (n, r.to_vec())));
                }
                v.insert(records)
            }
        })
    }

    fn write(self, batch: &mut WriteBatch) {
        for (chunk, records) in self.chunks {
            let key = keys::record_chunk(chunk);
            match records.is_empty() {
                true => batch.remove(key),
                false => batch.insert(key, keys::encode_record_chunk(records.iter().map(|(n, r)| (*n, r.as_slice())))),
            }
        }
    }
}

/// `item` as an encoded `ItemRecord`, from borrowed fields: applying a group writes one per
/// item, and building the message would copy its id, label, metadata and codes first.
fn item_record_bytes(item: &ItemWrite) -> Vec<u8> {
    use prost::encoding::{hash_map, string, uint64};
    // Field numbers and proto3 defaults (empty fields omitted) as in storage.proto's ItemRecord.
    let len = if item.id.is_empty() { 0 } else { string::encoded_len(1, &item.id) }
        + if item.label.is_empty() { 0 } else { string::encoded_len(2, &item.label) }
        + hash_map::encoded_len(string::encoded_len, string::encoded_len, 3, &item.metadata)
        + uint64::encoded_len_packed(4, &item.codes);
    let mut buf = Vec::with_capacity(len);
    if !item.id.is_empty() {
        string::encode(1, &item.id, &mut buf);
    }
    if !item.label.is_empty() {
        string::encode(2, &item.label, &mut buf);
    }
    hash_map::encode(
        string::encode,
        string::encoded_len,
        string::encode,
        string::encoded_len,
        3,
        &item.metadata,
        &mut buf,
    );
    uint64::encode_packed(4, &item.codes, &mut buf);
    buf
}

/// The live item numbers (below `next`) as a bit set: the members of table 0's buckets, which
/// hold every live item once. Reading them is a scan of about `items / CHUNK_CAPACITY + 2^K`
/// chunks, where reading the item records would be a scan of all items.
fn live_items(tree: &sled::Tree, next: u32) -> Result<Vec<u64>, StoreError> {
    let mut live = vec![0u64; (next as usize).div_ceil(64)];
    let mut numbers = Vec::new();
    for entry in tree.scan_prefix(keys::table_prefix(0)) {
        let (key, value) = entry?;
        let corrupt = || StoreError::Corrupt(format!("bucket chunk {key:?} of table 0"));
        let (_, _, chunk) = keys::parse_bucket_chunk(&key).ok_or_else(corrupt)?;
        numbers.clear();
        if chunk == keys::OPEN_CHUNK {
            keys::decode_open_chunk(&value, &mut numbers).ok_or_else(corrupt)?;
        } else {
            keys::decode_items(&value, &mut numbers);
        }
        for &n in &numbers {
            let word = live.get_mut(n as usize / 64).ok_or_else(corrupt)?;
            *word |= 1 << (n % 64);
        }
    }
    Ok(live)
}

/// Pending changes to one bucket within a write batch.
///
/// A bucket is an open chunk (key chunk number `OPEN_CHUNK`, value: sealed-chunk count u32 LE
/// then items) plus sealed chunks `0, 1, …` of `CHUNK_CAPACITY` items. An append reads and
/// rewrites only the open chunk (a point read); a removal also loads the sealed ones.
struct BucketEdit {
    table: u16,
    code: u64,
    /// Sealed chunks created so far (the next sealed chunk's number; numbers are never reused).
    sealed_count: u32,
    open: Vec<u32>,
    open_dirty: bool,
    sealed: BTreeMap<u32, Vec<u32>>,
    sealed_dirty: BTreeSet<u32>,
    sealed_loaded: bool,
}

impl BucketEdit {
    fn load_open(tree: &sled::Tree, table: u16, code: u64) -> Result<Self, StoreError> {
        let mut edit = Self {
            table,
            code,
            sealed_count: 0,
            open: Vec::new(),
            open_dirty: false,
            sealed: BTreeMap::new(),
            sealed_dirty: BTreeSet::new(),
            sealed_loaded: false,
        };
        if let Some(value) = tree.get(keys::bucket_chunk(table, code, keys::OPEN_CHUNK))? {
            edit.sealed_count = keys::decode_open_chunk(&value, &mut edit.open)
                .ok_or_else(|| StoreError::Corrupt(format!("open chunk of bucket {code:x} in table {table}")))?;
        }
        edit.sealed_loaded = edit.sealed_count == 0;
        Ok(edit)
    }

    fn load_sealed(&mut self, tree: &sled::Tree) -> Result<(), StoreError> {
        if self.sealed_loaded {
            return Ok(());
        }
        for entry in tree.scan_prefix(keys::bucket_prefix(self.table, self.code)) {
            let (key, value) = entry?;
            let chunk = chunk_number(&key)?;
            if chunk != keys::OPEN_CHUNK {
                self.sealed.entry(chunk).or_insert_with(|| {
                    let mut items = Vec::new();
                    keys::decode_items(&value, &mut items);
                    items
                });
            }
        }
        self.sealed_loaded = true;
        Ok(())
    }

    fn append(&mut self, item: u32) {
        self.open.push(item);
        self.open_dirty = true;
        if self.open.len() == CHUNK_CAPACITY {
            let chunk = self.sealed_count;
            self.sealed_count += 1;
            self.sealed.insert(chunk, std::mem::take(&mut self.open));
            self.sealed_dirty.insert(chunk);
        }
    }

    fn remove(&mut self, tree: &sled::Tree, item: u32) -> Result<(), StoreError> {
        if let Some(pos) = self.open.iter().position(|&i| i == item) {
            self.open.remove(pos);
            self.open_dirty = true;
            return Ok(());
        }
        self.load_sealed(tree)?;
        for (&chunk, items) in self.sealed.iter_mut() {
            if let Some(pos) = items.iter().position(|&i| i == item) {
                items.remove(pos);
                self.sealed_dirty.insert(chunk);
                return Ok(());
            }
        }
        Err(StoreError::Corrupt(format!("item {item} missing from bucket {:x} of table {}", self.code, self.table)))
    }

    fn write(self, batch: &mut WriteBatch) {
        for chunk in self.sealed_dirty {
            let key = keys::bucket_chunk(self.table, self.code, chunk);
            match self.sealed.get(&chunk) {
                Some(items) if !items.is_empty() => batch.insert(key, keys::encode_items(items)),
                _ => batch.remove(key),
            }
        }
        if self.open_dirty {
            let key = keys::bucket_chunk(self.table, self.code, keys::OPEN_CHUNK);
            if self.open.is_empty() && self.sealed_count == 0 {
                batch.remove(key);
            } else {
                batch.insert(key, keys::encode_open_chunk(self.sealed_count, &self.open));
            }
        }
    }
}

fn chunk_number(key: &[u8]) -> Result<u32, StoreError> {
    keys::parse_bucket_chunk(key).map(|(_, _, chunk)| chunk).ok_or_else(|| StoreError::Corrupt("bucket key".into()))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn def(name: &str, dim: u32, tables: u32) -> IndexDef {
        crate::store::conformance::def(name, dim, tables, 0)
    }

    fn planes(hyperplanes: &[f32]) -> IndexParams<'_> {
        IndexParams { hyperplanes, center: None, sketch_planes: None }
    }

    fn write(number: u32, id: &str, codes: &[u64]) -> Arc<ItemWrite> {
        Arc::new(ItemWrite {
            number,
            id: id.into(),
            label: format!("label-{id}"),
            metadata: HashMap::new(),
            codes: codes.to_vec(),
            sketch: Vec::new(),
            thumbnail: None,
        })
    }

    fn bucket(store: &dyn IndexStore, table: u16, code: u64) -> Vec<u32> {
        let mut out = Vec::new();
        store.bucket(table, code, &mut out).unwrap();
        out.sort();
        out
    }

    #[test]
    fn online_checkpoint_reopens_under_open_handles() {
        let dir = tempfile::tempdir().unwrap();
        let options = SledOptions { checkpoint_bytes: 1, ..Default::default() };
        let catalog = SledCatalog::open(dir.path(), &options).unwrap();
        assert!(catalog.checkpoint(false).unwrap().is_none(), "nothing applied, nothing due");
        let store = catalog.create(&def("a", 2, 1), planes(&[1.0; 16])).unwrap();
        store.apply(&[&StoreBatch { removals: vec![], items: vec![write(0, "x", &[3])] }], 1).unwrap();
        assert!(catalog.checkpoint(false).unwrap().is_some(), "due after a byte");
        // The same handles read and write the reopened database.
        assert_eq!(bucket(&*store, 0, 3), [0]);
        store.apply(&[&StoreBatch { removals: vec![], items: vec![write(1, "y", &[3])] }], 2).unwrap();
        assert!(catalog.checkpoint(true).unwrap().is_some());
        assert_eq!(store.item_number("y").unwrap(), Some(1));
        drop(store);
        drop(catalog);
        let catalog = SledCatalog::open(dir.path(), &options).unwrap();
        let store = catalog.open("a").unwrap().unwrap();
        assert_eq!((bucket(&*store, 0, 3), store.load().unwrap().applied), (vec![0, 1], 2));
    }

    #[test]
    fn checkpoint_after_close_keeps_everything() {
        let dir = tempfile::tempdir().unwrap();
        let catalog = SledCatalog::open(dir.path(), &SledOptions::default()).unwrap();
        let store = catalog.create(&def("a", 2, 1), planes(&[1.0; 16])).unwrap();
        store.write_vectors(0, &[&[1.0, 2.0]]).unwrap();
        store.sync_vectors().unwrap();
        store.apply(&[&StoreBatch { removals: vec![], items: vec![write(0, "x", &[3])] }], 1).unwrap();
        catalog.sync().unwrap();
        drop(store);
        drop(catalog);
        SledCatalog::checkpoint_closed(dir.path()).unwrap();
        let catalog = SledCatalog::open(dir.path(), &SledOptions::default()).unwrap();
        let store = catalog.open("a").unwrap().unwrap();
        assert_eq!(bucket(&*store, 0, 3), [0]);
        store.cut_vectors(1).unwrap();
        assert_eq!(store.vector(0).unwrap(), [1.0, 2.0]);
    }

    fn copy_dir(from: &Path, to: &Path) {
        std::fs::create_dir_all(to).unwrap();
        for entry in std::fs::read_dir(from).unwrap().flatten() {
            match entry.file_type().unwrap().is_dir() {
                true => copy_dir(&entry.path(), &to.join(entry.file_name())),
                false => drop(std::fs::copy(entry.path(), to.join(entry.file_name())).unwrap()),
            }
        }
    }

    #[test]
    fn a_rewrite_interrupted_at_any_step_opens_with_everything() {
        let dir = tempfile::tempdir().unwrap();
        {
            let catalog = SledCatalog::open(dir.path(), &SledOptions::default()).unwrap();
            let store = catalog.create(&def("a", 2, 1), planes(&[1.0; 16])).unwrap();
            store.apply(&[&StoreBatch { removals: vec![], items: vec![write(0, "x", &[3])] }], 1).unwrap();
            catalog.sync().unwrap();
        }
        SledCatalog::checkpoint_closed(dir.path()).unwrap();
        let (live, copy, aside) =
            (dir.path().join("sled"), dir.path().join("sled.rewrite"), dir.path().join("sled.replaced"));
        let reopen = || {
            let catalog = SledCatalog::open(dir.path(), &SledOptions::default()).unwrap();
            assert_eq!(bucket(&*catalog.open("a").unwrap().unwrap(), 0, 3), [0]);
            assert!(!copy.exists() && !aside.exists(), "leftovers removed");
        };
        // Crash during the copy: a partial copy beside the database in place.
        std::fs::create_dir_all(&copy).unwrap();
        std::fs::write(copy.join("db"), b"partial").unwrap();
        reopen();
        // Crash between the two renames: the old database aside, the complete copy not yet in place.
        copy_dir(&live, &copy);
        std::fs::rename(&live, &aside).unwrap();
        reopen();
        // Crash after the swap, before the old database was removed.
        copy_dir(&live, &aside);
        reopen();
    }

    #[test]
    fn sketches_of_applied_items_are_loaded_and_indexes_may_keep_no_vectors() {
        let dir = tempfile::tempdir().unwrap();
        let lean = IndexDef { sketch_bits: 128, stores_vectors: false, ..def("lean", 2, 1) };
        let sketch_planes = [0.5f32; 2 * 128];
        {
            let catalog = SledCatalog::open(dir.path(), &SledOptions::default()).unwrap();
            let params = IndexParams { hyperplanes: &[1.0; 16], center: None, sketch_planes: Some(&sketch_planes) };
            let store = catalog.create(&lean, params).unwrap();
            let with_sketch = |n: u32, id: &str, words: [u64; 2]| {
                Arc::new(ItemWrite { sketch: words.to_vec(), ..(*write(n, id, &[1])).clone() })
            };
            let items = vec![with_sketch(0, "a", [1, 2]), with_sketch(1, "b", [3, 4])];
            store.apply(&[&StoreBatch { removals: vec![], items }], 1).unwrap();
            let wrong = Arc::new(ItemWrite { sketch: vec![1], ..(*write(2, "c", &[1])).clone() });
            assert!(matches!(
                store.apply(&[&StoreBatch { removals: vec![], items: vec![wrong] }], 2),
                Err(StoreError::Corrupt(_))
            ));
            assert!(matches!(store.vector(0), Err(StoreError::VectorsNotStored(_))));
            catalog.sync().unwrap();
        }
        let catalog = SledCatalog::open(dir.path(), &SledOptions::default()).unwrap();
        assert_eq!(catalog.list().unwrap(), vec![lean]);
        let store = catalog.open("lean").unwrap().unwrap();
        assert_eq!(store.sketch_planes().unwrap().unwrap(), sketch_planes);
        let loaded = store.load().unwrap();
        assert_eq!((loaded.sketches, loaded.live, loaded.applied), (vec![1, 2, 3, 4], vec![0b11], 1));
        let files: Vec<_> = std::fs::read_dir(dir.path().join("vectors")).unwrap().map(|f| f.unwrap().path()).collect();
        assert!(files.iter().all(|f| f.extension().is_some_and(|x| x == "sketch")), "{files:?}");
    }

    #[test]
    fn reopen_keeps_everything_and_drop_removes_it() {
        let dir = tempfile::tempdir().unwrap();
        {
            let catalog = SledCatalog::open(dir.path(), &SledOptions::default()).unwrap();
            let store = catalog.create(&def("a", 2, 1), planes(&[1.5; 2 * 8])).unwrap();
            store.write_vectors(0, &[&[1.0, 2.0]]).unwrap();
            store.sync_vectors().unwrap();
            store.apply(&[&StoreBatch { removals: vec![], items: vec![write(0, "x", &[3])] }], 1).unwrap();
            catalog.sync().unwrap();
            assert!(matches!(catalog.create(&def("a", 2, 1), planes(&[0.0; 16])), Err(StoreError::AlreadyExists(_))));
        }
        let catalog = SledCatalog::open(dir.path(), &SledOptions::default()).unwrap();
        assert_eq!(catalog.list().unwrap(), vec![def("a", 2, 1)]);
        let store = catalog.open("a").unwrap().unwrap();
        assert_eq!(store.hyperplanes().unwrap(), vec![1.5; 16]);
        assert_eq!(bucket(&*store, 0, 3), [0]);
        assert_eq!(store.vector(0).unwrap(), [1.0, 2.0]);
        store.destroy().unwrap();
        assert!(matches!(store.write_vectors(1, &[&[0.0, 0.0]]), Err(StoreError::Dropped(_))));
        assert!(catalog.open("a").unwrap().is_none());
        assert_eq!(std::fs::read_dir(dir.path().join("vectors")).unwrap().count(), 0);
    }

    proptest::proptest! {
        #[test]
        fn item_records_encode_as_the_message_does(
            id in ".{0,20}", label in ".{0,20}", codes in proptest::collection::vec(proptest::num::u64::ANY, 0..20),
            metadata in proptest::collection::hash_map(".{0,8}", ".{0,8}", 0..5),
        ) {
            let item = ItemWrite { number: 3, id, label, metadata, codes, sketch: vec![], thumbnail: None };
            let message = ItemRecord {
                id: item.id.clone(),
                label: item.label.clone(),
                metadata: item.metadata.clone(),
                codes: item.codes.clone(),
            };
            let bytes = item_record_bytes(&item);
            proptest::prop_assert_eq!(ItemRecord::decode(bytes.as_slice()).unwrap(), message.clone());
            proptest::prop_assert_eq!(bytes.len(), message.encoded_len());
        }
    }

    #[test]
    fn newer_layout_is_refused_at_open() {
        let dir = tempfile::tempdir().unwrap();
        drop(SledCatalog::open(dir.path(), &SledOptions::default()).unwrap());
        {
            let db = sled::open(dir.path().join("sled")).unwrap();
            migrate::force_version(&db, migrate::CURRENT_VERSION + 1).unwrap();
        }
        let err = SledCatalog::open(dir.path(), &SledOptions::default()).err().unwrap();
        assert!(matches!(err, StoreError::LayoutTooNew { .. }), "{err}");
    }
}
