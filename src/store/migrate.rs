//! On-disk layout versions. Each version is described by a file in `migrations/` (embedded
//! here) and reached from the one before by one step; at open, the steps from the stored
//! version up to `CURRENT_VERSION` run in order. A newer layout is refused, never opened.

use super::{StoreError, keys};

/// The layout this build writes.
pub const CURRENT_VERSION: u32 = 4;

const META_TREE: &str = "meta";
const VERSION_KEY: &[u8] = b"layout_version";
pub(crate) const CATALOG_TREE: &str = "catalog";

#[derive(Debug)]
pub struct Migration {
    /// The version this step produces.
    pub version: u32,
    pub name: &'static str,
    /// The layout description from `migrations/`.
    pub description: &'static str,
    apply: fn(&sled::Db) -> Result<(), StoreError>,
}

pub const MIGRATIONS: &[Migration] = &[
    Migration {
        version: 1,
        name: "initial_layout",
        description: include_str!("../../migrations/0001_initial_layout.md"),
        apply: initial_layout,
    },
    Migration {
        version: 2,
        name: "index_centers",
        description: include_str!("../../migrations/0002_index_centers.md"),
        apply: index_centers,
    },
    Migration {
        version: 3,
        name: "item_sketches",
        description: include_str!("../../migrations/0003_item_sketches.md"),
        apply: item_sketches,
    },
    Migration {
        version: 4,
        name: "write_ahead_log",
        description: include_str!("../../migrations/0004_write_ahead_log.md"),
        apply: write_ahead_log,
    },
];

/// Version 1: a catalog of indexes, one tree per index, vector files beside the database.
fn initial_layout(db: &sled::Db) -> Result<(), StoreError> {
    db.open_tree(CATALOG_TREE)?;
    Ok(())
}

/// Version 2: an index may hold a center (key `M` of its tree) that codes are computed from.
/// Indexes written under version 1 have none and keep hashing as before: nothing to rewrite.
/// The version matters to older builds, which would ignore the center and hash differently.
fn index_centers(_: &sled::Db) -> Result<(), StoreError> {
    Ok(())
}

/// Version 3: an index may keep item sketches (`IndexRecord.sketch_bits`, key `S`, a sketch
/// file) and may keep no embeddings (`IndexRecord.vectors_omitted`). Version-2 indexes have
/// neither field set and work as before: nothing to rewrite. Older builds must refuse such data.
fn item_sketches(_: &sled::Db) -> Result<(), StoreError> {
    Ok(())
}

/// Version 4: acknowledged batches go through a write-ahead log (`wal/`) and reach each index's
/// tree later, with the applied log position (key `A`; version-3 indexes have none: nothing
/// applied from a log, and no log to replay). Item records move from one key per item (`I`) to
/// chunks of `RECORDS_PER_CHUNK` (`R`). Older builds must refuse such data, or they would lose
/// what is logged and not yet applied.
fn write_ahead_log(db: &sled::Db) -> Result<(), StoreError> {
    for name in db.tree_names() {
        if name.starts_with(b"index/") {
            chunk_item_records(&db.open_tree(name)?)?;
        }
    }
    Ok(())
}

/// Moves the `I` records of an index tree into `R` chunks, a bounded number per atomic batch
/// (a crash in between leaves both forms, and a rerun moves the rest into the same chunks).
fn chunk_item_records(tree: &sled::Tree) -> Result<(), StoreError> {
    use std::collections::BTreeMap;
    const PER_BATCH: usize = 65_536;
    loop {
        let mut chunks: BTreeMap<u32, BTreeMap<u32, Vec<u8>>> = BTreeMap::new();
        let mut batch = sled::Batch::default();
        let mut moved = 0;
        for entry in tree.scan_prefix(keys::ITEM_PREFIX).take(PER_BATCH) {
            let (key, value) = entry?;
            let number = keys::parse_item(&key).ok_or_else(|| StoreError::Corrupt("item record key".into()))?;
            chunks.entry(number / keys::RECORDS_PER_CHUNK).or_default().insert(number, value.to_vec());
            batch.remove(key);
            moved += 1;
        }
        if moved == 0 {
            return Ok(());
        }
        for (chunk, mut records) in chunks {
            if let Some(existing) = tree.get(keys::record_chunk(chunk))? {
                let decoded = keys::decode_record_chunk(&existing)
                    .ok_or_else(|| StoreError::Corrupt(format!("record chunk {chunk}")))?;
                for (number, record) in decoded {
                    records.entry(number).or_insert_with(|| record.to_vec());
                }
            }
            let value = keys::encode_record_chunk(records.iter().map(|(n, r)| (*n, r.as_slice())));
            batch.insert(&keys::record_chunk(chunk), value);
        }
        tree.apply_batch(batch)?;
    }
}

/// The stored layout version; 0 for a database imagelsh never wrote.
pub fn stored_version(db: &sled::Db) -> Result<u32, StoreError> {
    let meta = db.open_tree(META_TREE)?;
    match meta.get(VERSION_KEY)? {
        None => Ok(0),
        Some(v) => super::keys::decode_u32(&v).ok_or_else(|| StoreError::Corrupt("layout version".into())),
    }
}

/// Brings the database to `CURRENT_VERSION`; returns the steps applied.
pub fn run(db: &sled::Db) -> Result<Vec<&'static Migration>, StoreError> {
    let found = stored_version(db)?;
    if found > CURRENT_VERSION {
        return Err(StoreError::LayoutTooNew { found, supported: CURRENT_VERSION });
    }
    let meta = db.open_tree(META_TREE)?;
    let mut applied = Vec::new();
    for step in MIGRATIONS.iter().filter(|m| m.version > found) {
        tracing::info!(version = step.version, name = step.name, "applying layout migration");
        (step.apply)(db)?;
        meta.insert(VERSION_KEY, &step.version.to_be_bytes())?;
        db.flush()?;
        applied.push(step);
    }
    Ok(applied)
}

/// Marks a database as written by a given layout version (tests of the version checks).
#[doc(hidden)]
pub fn force_version(db: &sled::Db, version: u32) -> Result<(), StoreError> {
    db.open_tree(META_TREE)?.insert(VERSION_KEY, &version.to_be_bytes())?;
    db.flush()?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn temp_db() -> sled::Db {
        sled::Config::new().temporary(true).open().unwrap()
    }

    #[test]
    fn fresh_database_is_brought_to_current_version() {
        let db = temp_db();
        assert_eq!(stored_version(&db).unwrap(), 0);
        let applied = run(&db).unwrap();
        assert_eq!(applied.len(), MIGRATIONS.len());
        assert_eq!(stored_version(&db).unwrap(), CURRENT_VERSION);
        assert!(run(&db).unwrap().is_empty(), "a second run applies nothing");
    }

    #[test]
    fn newer_layout_is_refused() {
        let db = temp_db();
        force_version(&db, CURRENT_VERSION + 1).unwrap();
        let err = run(&db).unwrap_err();
        assert!(
            matches!(err, StoreError::LayoutTooNew { found, supported } if found == CURRENT_VERSION + 1 && supported == CURRENT_VERSION)
        );
        assert!(err.to_string().contains("newer"));
    }

    #[test]
    fn steps_are_contiguous_and_each_has_its_file() {
        for (i, m) in MIGRATIONS.iter().enumerate() {
            assert_eq!(m.version, i as u32 + 1);
            assert!(!m.description.trim().is_empty());
        }
        assert_eq!(MIGRATIONS.last().map(|m| m.version), Some(CURRENT_VERSION));
        let dir = concat!(env!("CARGO_MANIFEST_DIR"), "/migrations");
        let files = std::fs::read_dir(dir)
            .unwrap()
            .filter(|e| e.as_ref().unwrap().path().extension().is_some_and(|x| x == "md"))
            .count();
        assert_eq!(files, MIGRATIONS.len(), "one file in migrations/ per layout version");
    }
}
