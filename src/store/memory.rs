//! An in-memory store: a second implementation of the contract, held to the same conformance
//! suite as sled (`conformance.rs`). It keeps nothing across processes; it serves tests of the
//! layers above without a disk, and keeps the contract honest about what is sled's and what is
//! every backend's.

use std::collections::{BTreeMap, HashMap};
use std::ops::Range;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, RwLock, Weak};

use super::{Catalog, IndexDef, IndexParams, IndexStore, StoreBatch, StoreError, StoreRepair, StoredItem, StoredState};

type Registry = Mutex<BTreeMap<String, Arc<MemoryIndex>>>;

#[derive(Default)]
pub struct MemoryCatalog {
    indexes: Arc<Registry>,
    next_uid: AtomicU64,
}

impl MemoryCatalog {
    pub fn new() -> Self {
        Self::default()
    }

    fn indexes(&self) -> std::sync::MutexGuard<'_, BTreeMap<String, Arc<MemoryIndex>>> {
        self.indexes.lock().unwrap_or_else(|e| e.into_inner())
    }
}

impl Catalog for MemoryCatalog {
    fn create(&self, def: &IndexDef, params: IndexParams<'_>) -> Result<Arc<dyn IndexStore>, StoreError> {
        let mut indexes = self.indexes();
        if indexes.contains_key(&def.name) {
            return Err(StoreError::AlreadyExists(def.name.clone()));
        }
        let index = Arc::new(MemoryIndex {
            def: def.clone(),
            uid: self.next_uid.fetch_add(1, Ordering::Relaxed) + 1,
            hyperplanes: params.hyperplanes.to_vec(),
            center: params.center.map(<[f32]>::to_vec),
            sketch_planes: params.sketch_planes.map(<[f32]>::to_vec),
            data: RwLock::new(Data { buckets: vec![HashMap::new(); def.tables as usize], ..Default::default() }),
            dropped: AtomicBool::new(false),
            catalog: Arc::downgrade(&self.indexes),
        });
        indexes.insert(def.name.clone(), index.clone());
        Ok(index)
    }

    fn open(&self, name: &str) -> Result<Option<Arc<dyn IndexStore>>, StoreError> {
        Ok(self.indexes().get(name).map(|i| i.clone() as Arc<dyn IndexStore>))
    }

    fn list(&self) -> Result<Vec<IndexDef>, StoreError> {
        Ok(self.indexes().values().map(|i| i.def.clone()).collect())
    }

    fn sync(&self) -> Result<(), StoreError> {
        Ok(())
    }
}

struct MemoryIndex {
    def: IndexDef,
    uid: u64,
    hyperplanes: Vec<f32>,
    center: Option<Vec<f32>>,
    sketch_planes: Option<Vec<f32>>,
    data: RwLock<Data>,
    dropped: AtomicBool,
    /// The catalog's registry, to leave at `destroy` (weak: the registry holds the index).
    catalog: Weak<Registry>,
}

#[derive(Default)]
struct Data {
    next: u32,
    count: u64,
    applied: u64,
    /// Per table, code → item numbers.
    buckets: Vec<HashMap<u64, Vec<u32>>>,
    records: HashMap<u32, StoredItem>,
    ids: HashMap<String, u32>,
    /// Item `n`'s embedding at `n × dim`.
    vectors: Vec<f32>,
    sketches: Vec<u64>,
    thumbnails: HashMap<u32, Vec<u8>>,
}

impl MemoryIndex {
    fn check_live(&self) -> Result<(), StoreError> {
        match self.dropped.load(Ordering::Acquire) {
            true => Err(StoreError::Dropped(self.def.name.clone())),
            false => Ok(()),
        }
    }

    fn data(&self) -> std::sync::RwLockReadGuard<'_, Data> {
        self.data.read().unwrap_or_else(|e| e.into_inner())
    }

    fn data_mut(&self) -> std::sync::RwLockWriteGuard<'_, Data> {
        self.data.write().unwrap_or_else(|e| e.into_inner())
    }
}

impl IndexStore for MemoryIndex {
    fn def(&self) -> &IndexDef {
        &self.def
    }

    fn uid(&self) -> u64 {
        self.uid
    }

    fn hyperplanes(&self) -> Result<Vec<f32>, StoreError> {
        Ok(self.hyperplanes.clone())
    }

    fn center(&self) -> Result<Option<Vec<f32>>, StoreError> {
        Ok(self.center.clone())
    }

    fn sketch_planes(&self) -> Result<Option<Vec<f32>>, StoreError> {
        Ok(self.sketch_planes.clone())
    }

    fn load(&self) -> Result<StoredState, StoreError> {
        let data = self.data();
        let mut live = vec![0u64; (data.next as usize).div_ceil(64)];
        for &n in data.records.keys() {
            live[n as usize / 64] |= 1 << (n % 64);
        }
        let words = self.def.sketch_bits as usize / 64;
        let sketches = data.sketches.get(..data.next as usize * words).unwrap_or(&data.sketches).to_vec();
        Ok(StoredState { next: data.next, count: data.count, applied: data.applied, live, sketches })
    }

    fn write_vectors(&self, first: u32, vectors: &[&[f32]]) -> Result<(), StoreError> {
        self.check_live()?;
        if !self.def.stores_vectors {
            return Ok(());
        }
        let dim = self.def.dim as usize;
        if let Some(bad) = vectors.iter().find(|v| v.len() != dim) {
            return Err(StoreError::Corrupt(format!(
                "an embedding of {} values in an index of dimension {dim}",
                bad.len()
            )));
        }
        let mut data = self.data_mut();
        let start = first as usize * dim;
        data.vectors.resize(start, 0.0);
        vectors.iter().for_each(|v| data.vectors.extend_from_slice(v));
        Ok(())
    }

    fn sync_vectors(&self) -> Result<(), StoreError> {
        Ok(())
    }

    fn cut_vectors(&self, committed: u32) -> Result<(), StoreError> {
        if !self.def.stores_vectors {
            return Ok(());
        }
        let want = committed as usize * self.def.dim as usize;
        let mut data = self.data_mut();
        if data.vectors.len() < want {
            return Err(StoreError::Corrupt(format!("{} embeddings held, {committed} committed", data.vectors.len())));
        }
        data.vectors.truncate(want);
        Ok(())
    }

    fn applied_position(&self) -> Result<u64, StoreError> {
        self.check_live()?;
        Ok(self.data().applied)
    }

    fn apply(&self, batches: &[&StoreBatch], position: u64) -> Result<(), StoreError> {
        self.check_live()?;
        let mut data = self.data_mut();
        // All or nothing: the changes are made to a copy of what they touch, then swapped in.
        let mut next = data.next;
        let mut count = data.count;
        let mut buckets = data.buckets.clone();
        let mut records = data.records.clone();
        let mut ids = data.ids.clone();
        let mut sketches = data.sketches.clone();
        let mut thumbnails = data.thumbnails.clone();
        let words = self.def.sketch_bits as usize / 64;
        for batch in batches {
            for removal in &batch.removals {
                for (table, code) in removal.codes.iter().enumerate() {
                    let members = buckets.get_mut(table).and_then(|b| b.get_mut(code));
                    let position = members.as_ref().and_then(|m| m.iter().position(|&n| n == removal.number));
                    match (members, position) {
                        (Some(members), Some(p)) => {
                            members.remove(p);
                        }
                        _ => {
                            return Err(StoreError::Corrupt(format!(
                                "item {} missing from bucket {code:x} of table {table}",
                                removal.number
                            )));
                        }
                    }
                }
                records.remove(&removal.number);
                thumbnails.remove(&removal.number);
                if let Some(id) = &removal.deleted_id {
                    ids.remove(id);
                }
                count = count.checked_sub(1).ok_or_else(|| StoreError::Corrupt("live item count".into()))?;
            }
            for item in &batch.items {
                if words > 0 && item.sketch.len() != words {
                    return Err(StoreError::Corrupt(format!(
                        "item {:?} has a sketch of {} words, the index keeps {words}",
                        item.id,
                        item.sketch.len()
                    )));
                }
                for (table, &code) in item.codes.iter().enumerate() {
                    if let Some(b) = buckets.get_mut(table) {
                        b.entry(code).or_default().push(item.number);
                    }
                }
                let stored = StoredItem {
                    number: item.number,
                    id: item.id.clone(),
                    label: item.label.clone(),
                    metadata: item.metadata.clone(),
                    codes: item.codes.clone(),
                };
                records.insert(item.number, stored);
                if let Some(thumbnail) = item.thumbnail.clone().filter(|_| self.def.thumbnails) {
                    thumbnails.insert(item.number, thumbnail);
                }
                ids.insert(item.id.clone(), item.number);
                if words > 0 {
                    let start = item.number as usize * words;
                    sketches.resize(sketches.len().max(start + words), 0);
                    sketches[start..start + words].copy_from_slice(&item.sketch);
                }
                count += 1;
                next = next.max(item.number + 1);
            }
        }
        *data = Data {
            next,
            count,
            applied: position,
            buckets,
            records,
            ids,
            vectors: std::mem::take(&mut data.vectors),
            sketches,
            thumbnails,
        };
        Ok(())
    }

    fn bucket(&self, table: u16, code: u64, out: &mut Vec<u32>) -> Result<(), StoreError> {
        if let Some(members) = self.data().buckets.get(table as usize).and_then(|b| b.get(&code)) {
            out.extend_from_slice(members);
        }
        Ok(())
    }

    fn items(&self, numbers: &[u32]) -> Result<Vec<StoredItem>, StoreError> {
        let data = self.data();
        Ok(numbers.iter().filter_map(|n| data.records.get(n).cloned()).collect())
    }

    fn thumbnails(&self, numbers: &[u32]) -> Result<Vec<Option<Vec<u8>>>, StoreError> {
        let data = self.data();
        Ok(numbers.iter().map(|n| data.thumbnails.get(n).cloned()).collect())
    }

    fn item_number(&self, id: &str) -> Result<Option<u32>, StoreError> {
        Ok(self.data().ids.get(id).copied())
    }

    fn for_each_vector(&self, numbers: &[u32], f: &mut dyn FnMut(usize, &[f32])) -> Result<(), StoreError> {
        if !self.def.stores_vectors {
            return Err(StoreError::VectorsNotStored(self.def.name.clone()));
        }
        let dim = self.def.dim as usize;
        let data = self.data();
        for (i, &n) in numbers.iter().enumerate() {
            let start = n as usize * dim;
            let v = data
                .vectors
                .get(start..start + dim)
                .ok_or_else(|| StoreError::Corrupt(format!("no record of item {n}")))?;
            f(i, v);
        }
        Ok(())
    }

    fn for_each_bucket(&self, table: u16, f: &mut dyn FnMut(u64, &[u32])) -> Result<(), StoreError> {
        self.check_live()?;
        let data = self.data();
        let mut buckets: Vec<(&u64, &Vec<u32>)> =
            data.buckets.get(table as usize).map(|b| b.iter().collect()).unwrap_or_default();
        buckets.sort_unstable_by_key(|(code, _)| **code);
        for (code, members) in buckets.into_iter().filter(|(_, m)| !m.is_empty()) {
            f(*code, members);
        }
        Ok(())
    }

    fn repair(&self, repair: &StoreRepair) -> Result<(), StoreError> {
        self.check_live()?;
        let mut data = self.data_mut();
        let mut buckets = data.buckets.clone();
        for entry in &repair.remove {
            let members = buckets.get_mut(entry.table as usize).and_then(|b| b.get_mut(&entry.code));
            let position = members.as_ref().and_then(|m| m.iter().position(|&n| n == entry.number));
            match (members, position) {
                (Some(members), Some(p)) => drop(members.remove(p)),
                _ => return Err(StoreError::Corrupt(format!("{entry:?} is not in its bucket"))),
            }
        }
        for entry in &repair.add {
            if let Some(b) = buckets.get_mut(entry.table as usize) {
                b.entry(entry.code).or_default().push(entry.number);
            }
        }
        data.buckets = buckets;
        if let Some(count) = repair.count {
            data.count = count;
        }
        for (id, number) in &repair.ids {
            data.ids.insert(id.clone(), *number);
        }
        Ok(())
    }

    fn reclaim(&self, _dead: &[Range<u32>]) -> Result<u64, StoreError> {
        // Embeddings sit in one dense array indexed by item number: a slot cannot be freed
        // without renumbering, and this backend lives only as long as its process anyway.
        Ok(0)
    }

    fn destroy(&self) -> Result<(), StoreError> {
        self.check_live()?;
        self.dropped.store(true, Ordering::Release);
        *self.data_mut() = Data::default();
        if let Some(registry) = self.catalog.upgrade() {
            let mut indexes = registry.lock().unwrap_or_else(|e| e.into_inner());
            if indexes.get(&self.def.name).is_some_and(|i| i.uid == self.uid) {
                indexes.remove(&self.def.name);
            }
        }
        Ok(())
    }
}
