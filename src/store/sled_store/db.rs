//! The database every handle of a data directory goes through: opening it (waiting for its
//! lock), syncing it durably, checkpoints (close and reopen) and rewrites (copy and swap).

use super::*;

/// The open database: replaced whole by a checkpoint, which closes and reopens it.
pub(super) struct OpenDb {
    pub(super) db: sled::Db,
    pub(super) catalog: sled::Tree,
    pub(super) db_file: Option<File>,
    pub(super) dir: PathBuf,
    /// sled's large values live in files of their own that sled never fsyncs.
    pub(super) blobs: BlobSync,
}

impl OpenDb {
    pub(super) fn open(sled_dir: &Path, options: &SledOptions) -> Result<Self, StoreError> {
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
    pub(super) fn commit(&self) -> Result<(), StoreError> {
        self.db.flush()?;
        if let Some(file) = &self.db_file {
            self.blobs.sync_new(&self.dir)?;
            file.sync_data()?;
        }
        Ok(())
    }
}

/// The database every handle of one data directory goes through.
pub(super) struct Sled {
    pub(super) dir: PathBuf,
    pub(super) options: SledOptions,
    /// `None` only if a checkpoint could not reopen the database.
    pub(super) open: RwLock<Option<OpenDb>>,
    /// Bytes applied since the database was last opened.
    pub(super) written: AtomicU64,
    /// Held shared by everything that writes the database, exclusively by a rewrite (which
    /// copies it and must not miss a write).
    pub(super) writes: RwLock<()>,
}

impl Sled {
    /// Runs `f` on the open database (a checkpoint waits for it, and it for a checkpoint).
    pub(super) fn with<T>(&self, f: impl FnOnce(&OpenDb) -> Result<T, StoreError>) -> Result<T, StoreError> {
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
    pub(super) fn checkpoint(&self) -> Result<Duration, StoreError> {
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
    pub(super) fn rewrite(&self) -> Result<Compaction, StoreError> {
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
    pub(super) fn copy_into(&self, copy_dir: &Path) -> Result<(), StoreError> {
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
pub(super) fn sync_closed(sled_dir: &Path) -> Result<(), StoreError> {
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
pub(super) const DEFAULT_TREE: &[u8] = b"__sled__default";

/// Where a rewrite builds the new database, beside the live one.
pub(super) fn rewrite_dir(sled_dir: &Path) -> PathBuf {
    sled_dir.with_file_name("sled.rewrite")
}

/// Where the old database goes during the swap.
pub(super) fn replaced_dir(sled_dir: &Path) -> PathBuf {
    sled_dir.with_file_name("sled.replaced")
}

/// Finishes or undoes a rewrite that a crash interrupted: a complete copy is renamed into place
/// only after the old database was moved aside, so an old database aside means the copy is
/// complete; a copy beside a database in place is abandoned.
pub(super) fn recover_rewrite(sled_dir: &Path) -> Result<(), StoreError> {
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
pub(super) fn dir_bytes(path: &Path) -> Result<u64, StoreError> {
    use std::os::unix::fs::MetadataExt;
    let mut total = 0;
    for entry in std::fs::read_dir(path)? {
        let entry = entry?;
        let meta = entry.metadata()?;
        total += if meta.is_dir() { dir_bytes(&entry.path())? } else { meta.blocks() * 512 };
    }
    Ok(total)
}

/// Opens a sled database, waiting up to `LOCK_WAIT` for its file lock: sled releases the lock
/// only when its background threads let go of the file, some time after the last handle is
/// dropped (a restart right after a stop, the checkpoint right after the server's own handles).
pub(super) fn open_sled(config: sled::Config) -> Result<sled::Db, StoreError> {
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
