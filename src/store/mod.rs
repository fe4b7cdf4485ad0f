//! Persistence of indexes. The domain (`crate::index`) depends on the traits here, never on
//! sled; the store knows nothing of gRPC or of how codes are computed.

mod keys;
pub mod migrate;
mod records;
mod sled_store;

use std::collections::HashMap;
use std::sync::Arc;

pub use sled_store::{SledCatalog, SledOptions};

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("storage engine: {0}")]
    Sled(#[from] sled::Error),
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
    #[error("index {0:?} was dropped")]
    Dropped(String),
    #[error("index {0:?} has used all 2^32 item numbers")]
    ItemNumbersExhausted(String),
    #[error("index {0:?} does not store embeddings")]
    VectorsNotStored(String),
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

/// An item to write with everything the store keeps of it.
#[derive(Debug, Clone)]
pub struct NewItem {
    pub id: String,
    pub label: String,
    pub metadata: HashMap<String, String>,
    /// One code per table.
    pub codes: Vec<u64>,
    /// `sketch_bits / 64` words, empty when the index keeps no sketches.
    pub sketch: Vec<u64>,
    /// Ignored when the index does not store embeddings.
    pub vector: Vec<f32>,
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

/// Every item's sketch, as the store holds them in memory.
#[derive(Debug, Clone, Copy)]
pub struct SketchView<'a> {
    /// Item `n`'s sketch at words `n × w .. (n + 1) × w`; records of items deleted or replaced
    /// stay (their numbers are not reused).
    pub words: &'a [u64],
    /// Live item numbers: bit `n % 64` of word `n / 64`.
    pub live: &'a [u64],
}

/// The registry of indexes.
pub trait Catalog: Send + Sync {
    /// Creates an index, durably.
    fn create(&self, def: &IndexDef, params: IndexParams<'_>) -> Result<Arc<dyn IndexStore>, StoreError>;
    /// Opens an existing index; `None` if there is none of that name.
    fn open(&self, name: &str) -> Result<Option<Arc<dyn IndexStore>>, StoreError>;
    fn list(&self) -> Result<Vec<IndexDef>, StoreError>;
    /// Writes everything buffered to disk (at shutdown).
    fn flush(&self) -> Result<(), StoreError>;
}

/// The stored data of one index: buckets keyed by table and code, items, vectors.
pub trait IndexStore: Send + Sync {
    fn def(&self) -> &IndexDef;
    fn hyperplanes(&self) -> Result<Vec<f32>, StoreError>;
    /// The vector subtracted before hashing, if the index has one.
    fn center(&self) -> Result<Option<Vec<f32>>, StoreError>;
    /// The sketch hyperplanes, if the index keeps sketches.
    fn sketch_planes(&self) -> Result<Option<Vec<f32>>, StoreError>;
    /// Inserts the items, replacing any with the same id (the last of a repeated id wins).
    /// Atomic: after any crash every item is in all of its buckets or in none. Durable on return.
    fn upsert(&self, items: &[NewItem]) -> Result<(), StoreError>;
    /// Removes the items with these ids; returns how many existed. Atomic and durable.
    fn delete(&self, ids: &[String]) -> Result<usize, StoreError>;
    /// Appends the item numbers in bucket `code` of `table` to `out`.
    fn bucket(&self, table: u16, code: u64, out: &mut Vec<u32>) -> Result<(), StoreError>;
    /// The items with these numbers, skipping numbers with no live item.
    fn items(&self, numbers: &[u32]) -> Result<Vec<StoredItem>, StoreError>;
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
    /// Calls `f` with every item's sketch, `sketch_bits / 64` words per item number, and the set
    /// of live items (held in memory: ranking thousands of candidates, or scanning them all,
    /// must not touch the disk). Items numbered past the end, and indexes without sketches,
    /// have none.
    fn with_sketches(&self, f: &mut dyn FnMut(SketchView<'_>));
    /// Live items.
    fn len(&self) -> Result<u64, StoreError>;
    fn is_empty(&self) -> Result<bool, StoreError> {
        Ok(self.len()? == 0)
    }
    /// Removes the index and all its data; later calls on this handle fail with `Dropped`.
    fn destroy(&self) -> Result<(), StoreError>;
}
