//! The sled implementation of the store: one tree per index (layout in `migrations/`), and a
//! vector file per index beside the database. `db`: the database's life (open, sync,
//! checkpoint, rewrite); `catalog`: the registry of indexes; `index`: an index's reads;
//! `apply`: an index's writes (groups of logged batches into buckets and records).

mod apply;
mod catalog;
mod db;
mod index;
#[cfg(test)]
mod tests;

use apply::{WriteBatch, edit};
pub use catalog::SledCatalog;
use db::{OpenDb, Sled, open_sled, recover_rewrite, sync_closed};
use index::SledIndex;

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
    StoredState, def_of, record_of,
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

fn tree_name(uid: u64) -> String {
    format!("{INDEX_TREE_PREFIX}{uid:016x}")
}

fn vector_path(dir: &Path, uid: u64) -> PathBuf {
    dir.join(format!("{uid:016x}.f32"))
}

fn sketch_path(dir: &Path, uid: u64) -> PathBuf {
    dir.join(format!("{uid:016x}.sketch"))
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
