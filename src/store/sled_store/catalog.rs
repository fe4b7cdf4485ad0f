//! The registry of indexes: creating, opening, listing and dropping them, garbage left by an
//! interrupted create or drop, backups and compaction of the whole database.

use super::*;

pub struct SledCatalog {
    pub(super) sled: Arc<Sled>,
    pub(super) vectors_dir: PathBuf,
    /// Serialises creation so that two creates of one name cannot both succeed.
    pub(super) create_lock: Mutex<()>,
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
    pub(super) fn collect_garbage(&self, db: &OpenDb) -> Result<(), StoreError> {
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

    pub(super) fn open_record(&self, record: IndexRecord) -> Result<Arc<dyn IndexStore>, StoreError> {
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

impl Catalog for SledCatalog {
    fn create(&self, def: &IndexDef, params: IndexParams<'_>) -> Result<Arc<dyn IndexStore>, StoreError> {
        let _guard = self.create_lock.lock().unwrap_or_else(|e| e.into_inner());
        let _writing = self.sled.writes.read().unwrap_or_else(|e| e.into_inner());
        let record = self.sled.with(|db| {
            if db.catalog.contains_key(def.name.as_bytes())? {
                return Err(StoreError::AlreadyExists(def.name.clone()));
            }
            let uid = db.db.generate_id()?;
            let record = record_of(def, uid);
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
