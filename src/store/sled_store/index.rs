//! One index's tree: its hyperplanes, buckets, records and embeddings as queries read them.

use super::*;

pub(super) struct SledIndex {
    pub(super) def: IndexDef,
    pub(super) record: IndexRecord,
    pub(super) sled: Arc<Sled>,
    /// The name of the index's tree.
    pub(super) tree: String,
    pub(super) vectors: Option<RecordFile>,
    /// Sketches of applied items (read back whole at `load`; queries use the caller's copy).
    pub(super) sketches: Option<RecordFile>,
    pub(super) vectors_dir: PathBuf,
    /// Applying is read-modify-write of buckets and counters: one writer at a time.
    pub(super) writer: Mutex<()>,
    pub(super) dropped: AtomicBool,
}

impl SledIndex {
    pub(super) fn check_live(&self) -> Result<(), StoreError> {
        if self.dropped.load(Ordering::Acquire) {
            return Err(StoreError::Dropped(self.def.name.clone()));
        }
        Ok(())
    }

    pub(super) fn lock_writer(&self) -> Result<std::sync::MutexGuard<'_, ()>, StoreError> {
        let guard = self.writer.lock().unwrap_or_else(|e| e.into_inner());
        self.check_live()?;
        Ok(guard)
    }

    /// Runs `f` on the index's tree of the open database.
    pub(super) fn with_tree<T>(&self, f: impl FnOnce(&sled::Tree) -> Result<T, StoreError>) -> Result<T, StoreError> {
        self.sled.with(|db| f(&db.db.open_tree(&self.tree)?))
    }

    pub(super) fn words_per_item(&self) -> usize {
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

/// Appends the item numbers in bucket `code` of `table` to `out`.
pub(super) fn read_bucket(tree: &sled::Tree, table: u16, code: u64, out: &mut Vec<u32>) -> Result<(), StoreError> {
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

/// The live item numbers (below `next`) as a bit set: the members of table 0's buckets, which
/// hold every live item once. Reading them is a scan of about `items / CHUNK_CAPACITY + 2^K`
/// chunks, where reading the item records would be a scan of all items.
pub(super) fn live_items(tree: &sled::Tree, next: u32) -> Result<Vec<u64>, StoreError> {
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
