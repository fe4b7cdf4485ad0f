//! One index's writes: a group of logged batches applied to its tree in one atomic batch, each
//! bucket's open chunk and each record chunk rewritten once per group.

use super::*;

impl SledIndex {
    /// Applies the batches to `tree` in one `apply_batch`; returns the bytes of keys and values
    /// it wrote (what a crash before the next checkpoint makes sled replay).
    pub(super) fn apply_to(
        &self,
        tree: &sled::Tree,
        batches: &[&StoreBatch],
        position: u64,
    ) -> Result<u64, StoreError> {
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
pub(super) struct WriteBatch {
    pub(super) batch: sled::Batch,
    pub(super) bytes: u64,
}

impl WriteBatch {
    pub(super) fn insert(&mut self, key: impl AsRef<[u8]>, value: impl AsRef<[u8]>) {
        self.bytes += (key.as_ref().len() + value.as_ref().len()) as u64;
        self.batch.insert(key.as_ref(), value.as_ref());
    }

    pub(super) fn remove(&mut self, key: impl AsRef<[u8]>) {
        self.bytes += key.as_ref().len() as u64;
        self.batch.remove(key.as_ref());
    }
}

pub(super) fn edit<'a>(
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
pub(super) struct RecordEdits {
    /// Chunks from this one on held no item before the apply: nothing to read.
    pub(super) fresh_from: u32,
    pub(super) chunks: HashMap<u32, BTreeMap<u32, Vec<u8>>>,
}

impl RecordEdits {
    pub(super) fn new(next: u32) -> Self {
        Self { fresh_from: next.div_ceil(keys::RECORDS_PER_CHUNK), chunks: HashMap::new() }
    }

    /// The records of the chunk holding item `number`, loaded on first use.
    pub(super) fn chunk(&mut self, tree: &sled::Tree, number: u32) -> Result<&mut BTreeMap<u32, Vec<u8>>, StoreError> {
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

    pub(super) fn write(self, batch: &mut WriteBatch) {
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
pub(super) fn item_record_bytes(item: &ItemWrite) -> Vec<u8> {
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

/// Pending changes to one bucket within a write batch.
///
/// A bucket is an open chunk (key chunk number `OPEN_CHUNK`, value: sealed-chunk count u32 LE
/// then items) plus sealed chunks `0, 1, …` of `CHUNK_CAPACITY` items. An append reads and
/// rewrites only the open chunk (a point read); a removal also loads the sealed ones.
pub(super) struct BucketEdit {
    pub(super) table: u16,
    pub(super) code: u64,
    /// Sealed chunks created so far (the next sealed chunk's number; numbers are never reused).
    pub(super) sealed_count: u32,
    pub(super) open: Vec<u32>,
    pub(super) open_dirty: bool,
    pub(super) sealed: BTreeMap<u32, Vec<u32>>,
    pub(super) sealed_dirty: BTreeSet<u32>,
    pub(super) sealed_loaded: bool,
}

impl BucketEdit {
    pub(super) fn load_open(tree: &sled::Tree, table: u16, code: u64) -> Result<Self, StoreError> {
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

    pub(super) fn load_sealed(&mut self, tree: &sled::Tree) -> Result<(), StoreError> {
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

    pub(super) fn append(&mut self, item: u32) {
        self.open.push(item);
        self.open_dirty = true;
        if self.open.len() == CHUNK_CAPACITY {
            let chunk = self.sealed_count;
            self.sealed_count += 1;
            self.sealed.insert(chunk, std::mem::take(&mut self.open));
            self.sealed_dirty.insert(chunk);
        }
    }

    pub(super) fn remove(&mut self, tree: &sled::Tree, item: u32) -> Result<(), StoreError> {
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

    pub(super) fn write(self, batch: &mut WriteBatch) {
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

pub(super) fn chunk_number(key: &[u8]) -> Result<u32, StoreError> {
    keys::parse_bucket_chunk(key).map(|(_, _, chunk)| chunk).ok_or_else(|| StoreError::Corrupt("bucket key".into()))
}
