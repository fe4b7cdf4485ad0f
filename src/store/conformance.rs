//! One conformance suite for every store backend: each case takes a fresh catalog and checks
//! the contract of `store::{Catalog, IndexStore}` as the index layer relies on it. A backend
//! joins with one line at the bottom (`conformance!(name, || catalog)`). What only a durable
//! backend promises across a reopen is tested beside that backend.

use std::collections::HashMap;
use std::sync::Arc;

use super::{Catalog, IndexDef, IndexParams, IndexStore, ItemWrite, Removal, StoreBatch, StoreError};

pub(super) fn def(name: &str, dim: u32, tables: u32, sketch_bits: u32) -> IndexDef {
    IndexDef {
        name: name.into(),
        dim,
        hash_bits: 8,
        tables,
        seed: 1,
        model: String::new(),
        created_at: 0,
        sketch_bits,
        stores_vectors: true,
        thumbnails: false,
    }
}

fn create(catalog: &dyn Catalog, def: &IndexDef) -> Arc<dyn IndexStore> {
    let hyperplanes = vec![0.5; (def.dim * def.hash_bits * def.tables) as usize];
    let sketch_planes = vec![0.25; (def.dim * def.sketch_bits) as usize];
    let params = IndexParams {
        hyperplanes: &hyperplanes,
        center: None,
        sketch_planes: (def.sketch_bits > 0).then_some(sketch_planes.as_slice()),
    };
    catalog.create(def, params).unwrap()
}

fn write(number: u32, id: &str, codes: &[u64], sketch: &[u64]) -> Arc<ItemWrite> {
    Arc::new(ItemWrite {
        number,
        id: id.into(),
        label: format!("label-{id}"),
        metadata: HashMap::from([("n".to_string(), number.to_string())]),
        codes: codes.to_vec(),
        sketch: sketch.to_vec(),
        thumbnail: None,
    })
}

fn writes(items: Vec<Arc<ItemWrite>>) -> StoreBatch {
    StoreBatch { removals: vec![], items }
}

fn bucket(store: &dyn IndexStore, table: u16, code: u64) -> Vec<u32> {
    let mut out = Vec::new();
    store.bucket(table, code, &mut out).unwrap();
    out.sort();
    out
}

pub(super) fn catalog_creates_lists_and_drops(catalog: &dyn Catalog) {
    let a = create(catalog, &def("a", 2, 1, 0));
    create(catalog, &def("b", 2, 1, 0));
    assert!(matches!(
        catalog.create(&def("a", 2, 1, 0), IndexParams { hyperplanes: &[0.0; 16], center: None, sketch_planes: None }),
        Err(StoreError::AlreadyExists(_))
    ));
    assert_eq!(catalog.list().unwrap().iter().map(|d| d.name.as_str()).collect::<Vec<_>>(), ["a", "b"]);
    let opened = catalog.open("a").unwrap().unwrap();
    assert_eq!((opened.def(), opened.uid()), (a.def(), a.uid()));
    assert_eq!(opened.hyperplanes().unwrap(), vec![0.5; 16]);
    assert!(catalog.open("nope").unwrap().is_none());
    a.destroy().unwrap();
    assert!(catalog.open("a").unwrap().is_none());
    assert!(matches!(a.write_vectors(0, &[&[1.0, 2.0]]), Err(StoreError::Dropped(_))));
    assert!(matches!(a.apply(&[&writes(vec![write(0, "x", &[1], &[])])], 1), Err(StoreError::Dropped(_))));
    let again = create(catalog, &def("a", 2, 1, 0));
    assert_ne!(again.uid(), a.uid(), "uids are never reused");
}

pub(super) fn applied_batches_fill_buckets_records_ids_and_counters(catalog: &dyn Catalog) {
    let store = create(catalog, &def("a", 2, 2, 128));
    let empty = store.load().unwrap();
    assert_eq!((empty.next, empty.count, empty.applied, empty.sketches.len()), (0, 0, 0, 0));
    assert_eq!(store.applied_position().unwrap(), 0);
    let first = writes(vec![write(0, "x", &[1, 5], &[1, 2]), write(1, "y", &[1, 6], &[3, 4])]);
    store.apply(&[&first], 7).unwrap();
    assert_eq!(store.applied_position().unwrap(), 7, "recorded with the batches, before any sync");
    catalog.sync().unwrap();
    assert_eq!((bucket(&*store, 0, 1), bucket(&*store, 1, 6)), (vec![0, 1], vec![1]));
    assert_eq!((store.item_number("x").unwrap(), store.item_number("z").unwrap()), (Some(0), None));
    let items = store.items(&[1, 9, 0]).unwrap();
    assert_eq!(items.iter().map(|i| (i.number, i.id.as_str())).collect::<Vec<_>>(), [(1, "y"), (0, "x")]);
    assert_eq!((items[1].label.as_str(), items[1].codes.as_slice()), ("label-x", &[1u64, 5][..]));
    assert_eq!(items[1].metadata["n"], "0");
    let loaded = store.load().unwrap();
    assert_eq!((loaded.next, loaded.count, loaded.applied), (2, 2, 7));
    assert_eq!((loaded.live, loaded.sketches), (vec![0b11], vec![1, 2, 3, 4]));
}

pub(super) fn replaces_and_deletes_in_one_group_leave_no_trace(catalog: &dyn Catalog) {
    let store = create(catalog, &def("a", 1, 2, 0));
    let first = writes(vec![write(0, "x", &[1, 5], &[]), write(1, "y", &[1, 6], &[])]);
    // x replaced (0 → 2), then y deleted, applied with the batch that wrote them.
    let second = StoreBatch {
        removals: vec![Removal { number: 0, codes: vec![1, 5], deleted_id: None }],
        items: vec![write(2, "x", &[2, 6], &[])],
    };
    let third = StoreBatch {
        removals: vec![Removal { number: 1, codes: vec![1, 6], deleted_id: Some("y".into()) }],
        items: vec![],
    };
    store.apply(&[&first, &second, &third], 3).unwrap();
    assert!(bucket(&*store, 0, 1).is_empty() && bucket(&*store, 1, 5).is_empty());
    assert_eq!((bucket(&*store, 0, 2), bucket(&*store, 1, 6)), (vec![2], vec![2]));
    assert_eq!((store.item_number("x").unwrap(), store.item_number("y").unwrap()), (Some(2), None));
    assert_eq!(store.items(&[0, 1, 2]).unwrap().iter().map(|i| i.number).collect::<Vec<_>>(), [2]);
    let loaded = store.load().unwrap();
    assert_eq!((loaded.next, loaded.count, loaded.applied, loaded.live), (3, 1, 3, vec![0b100]));
    // Removing what a bucket does not hold is corruption, and changes nothing.
    let bogus =
        StoreBatch { removals: vec![Removal { number: 2, codes: vec![9, 9], deleted_id: None }], items: vec![] };
    assert!(matches!(store.apply(&[&bogus], 4), Err(StoreError::Corrupt(_))));
    assert_eq!((store.load().unwrap().applied, store.item_number("x").unwrap()), (3, Some(2)));
}

pub(super) fn large_buckets_grow_and_shrink(catalog: &dyn Catalog) {
    let store = create(catalog, &def("a", 1, 1, 0));
    let n = 700u32;
    for (position, first) in (1..).zip((0..n).step_by(100)) {
        let items = (first..n.min(first + 100)).map(|i| write(i, &i.to_string(), &[7], &[])).collect();
        store.apply(&[&writes(items)], position).unwrap();
    }
    assert_eq!(bucket(&*store, 0, 7), (0..n).collect::<Vec<_>>());
    let removals = (0..n - 3).map(|i| Removal { number: i, codes: vec![7], deleted_id: Some(i.to_string()) }).collect();
    store.apply(&[&StoreBatch { removals, items: vec![] }], 10).unwrap();
    assert_eq!(bucket(&*store, 0, 7), [n - 3, n - 2, n - 1]);
    store.apply(&[&writes(vec![write(n, "new", &[7], &[])])], 11).unwrap();
    assert_eq!(bucket(&*store, 0, 7).len(), 4);
    assert_eq!(store.items(&[5, n]).unwrap().len(), 1);
    assert_eq!(store.load().unwrap().count, 4);
}

pub(super) fn embeddings_are_written_read_and_cut(catalog: &dyn Catalog) {
    let store = create(catalog, &def("a", 2, 1, 0));
    store.write_vectors(0, &[&[1.0, 2.0], &[3.0, 4.0], &[5.0, 6.0]]).unwrap();
    store.sync_vectors().unwrap();
    let mut seen = Vec::new();
    store.for_each_vector(&[2, 0], &mut |i, v| seen.push((i, v.to_vec()))).unwrap();
    assert_eq!(seen, [(0, vec![5.0, 6.0]), (1, vec![1.0, 2.0])]);
    assert!(matches!(store.write_vectors(3, &[&[1.0]]), Err(StoreError::Corrupt(_))), "wrong dimension");
    store.cut_vectors(2).unwrap();
    assert!(store.vector(2).is_err());
    assert_eq!(store.vector(1).unwrap(), [3.0, 4.0]);
    assert!(matches!(store.cut_vectors(5), Err(StoreError::Corrupt(_))), "committed embeddings missing");
    let lean = create(catalog, &IndexDef { stores_vectors: false, ..def("lean", 2, 1, 0) });
    lean.write_vectors(0, &[&[1.0, 2.0]]).unwrap();
    assert!(matches!(lean.vector(0), Err(StoreError::VectorsNotStored(_))));
}

pub(super) fn sketches_of_the_wrong_size_are_refused(catalog: &dyn Catalog) {
    let store = create(catalog, &def("a", 2, 1, 128));
    let wrong = writes(vec![write(0, "x", &[1], &[1])]);
    assert!(matches!(store.apply(&[&wrong], 1), Err(StoreError::Corrupt(_))));
    assert_eq!(store.load().unwrap().applied, 0, "a refused group changes nothing");
}

pub(super) fn reclaimed_and_compacted_stores_keep_every_live_item(catalog: &dyn Catalog) {
    let store = create(catalog, &def("a", 2, 2, 64));
    let items: Vec<_> =
        (0..200u32).map(|i| write(i, &format!("i{i}"), &[u64::from(i % 3), 9], &[u64::from(i)])).collect();
    let vectors: Vec<[f32; 2]> = (0..200).map(|i| [i as f32, 1.0]).collect();
    store.write_vectors(0, &vectors.iter().map(|v| v.as_slice()).collect::<Vec<_>>()).unwrap();
    store.sync_vectors().unwrap();
    store.apply(&[&writes(items)], 1).unwrap();
    // Items 10..150 deleted; their records may then be freed.
    let removals = (10..150u32)
        .map(|i| Removal { number: i, codes: vec![u64::from(i % 3), 9], deleted_id: Some(format!("i{i}")) })
        .collect();
    store.apply(&[&StoreBatch { removals, items: vec![] }], 2).unwrap();
    catalog.sync().unwrap();
    let dead = std::slice::from_ref(&(10..150));
    store.reclaim(dead).unwrap();
    catalog.compact().unwrap();
    let uid = store.uid();
    let store = catalog.open("a").unwrap().unwrap();
    assert_eq!(store.uid(), uid);
    let loaded = store.load().unwrap();
    assert_eq!((loaded.next, loaded.count, loaded.applied), (200, 60, 2));
    let live: Vec<u32> = (0..200).filter(|&n| loaded.live[n as usize / 64] & (1 << (n % 64)) != 0).collect();
    assert_eq!(live, (0..10).chain(150..200).collect::<Vec<_>>());
    for n in [0u32, 9, 150, 199] {
        assert_eq!(loaded.sketches[n as usize], u64::from(n), "sketch of live item {n}");
        assert_eq!(store.vector(n).unwrap(), vectors[n as usize]);
    }
    assert_eq!(bucket(&*store, 1, 9), live);
    assert_eq!(store.items(&[5, 50, 155]).unwrap().iter().map(|i| i.id.as_str()).collect::<Vec<_>>(), ["i5", "i155"]);
    assert_eq!(store.item_number("i160").unwrap(), Some(160));
    // The catalog still works after the rewrite: writes land, uids stay unique.
    store.apply(&[&writes(vec![write(200, "new", &[0, 9], &[7])])], 3).unwrap();
    assert_eq!(store.load().unwrap().count, 61);
    assert_ne!(create(catalog, &def("b", 2, 1, 0)).uid(), uid);
}

/// Runs every case of the suite against a backend, each on a catalog of its own.
macro_rules! store_conformance {
    ($backend:ident, $catalog:expr) => {
        mod $backend {
            use super::*;
            use crate::store::conformance as suite;

            #[test]
            fn catalog_creates_lists_and_drops() {
                suite::catalog_creates_lists_and_drops(&$catalog);
            }
            #[test]
            fn applied_batches_fill_buckets_records_ids_and_counters() {
                suite::applied_batches_fill_buckets_records_ids_and_counters(&$catalog);
            }
            #[test]
            fn replaces_and_deletes_in_one_group_leave_no_trace() {
                suite::replaces_and_deletes_in_one_group_leave_no_trace(&$catalog);
            }
            #[test]
            fn large_buckets_grow_and_shrink() {
                suite::large_buckets_grow_and_shrink(&$catalog);
            }
            #[test]
            fn embeddings_are_written_read_and_cut() {
                suite::embeddings_are_written_read_and_cut(&$catalog);
            }
            #[test]
            fn reclaimed_and_compacted_stores_keep_every_live_item() {
                suite::reclaimed_and_compacted_stores_keep_every_live_item(&$catalog);
            }
            #[test]
            fn thumbnails_follow_their_items_and_stay_out_of_records() {
                suite::thumbnails_follow_their_items_and_stay_out_of_records(&$catalog);
            }
            #[test]
            fn sketches_of_the_wrong_size_are_refused() {
                suite::sketches_of_the_wrong_size_are_refused(&$catalog);
            }
        }
    };
}

pub(super) fn thumbnails_follow_their_items_and_stay_out_of_records(catalog: &dyn Catalog) {
    let store = create(catalog, &IndexDef { thumbnails: true, ..def("thumbs", 2, 1, 0) });
    let with = |number: u32, id: &str, jpeg: &[u8]| {
        Arc::new(ItemWrite { thumbnail: Some(jpeg.to_vec()), ..(*write(number, id, &[1], &[])).clone() })
    };
    let first = writes(vec![with(0, "a", b"jpeg-a"), write(1, "b", &[1], &[]), with(2, "c", b"jpeg-c")]);
    // "c" is replaced by item 3 (a new thumbnail), "a" is deleted.
    let second = StoreBatch {
        removals: vec![
            Removal { number: 2, codes: vec![1], deleted_id: None },
            Removal { number: 0, codes: vec![1], deleted_id: Some("a".into()) },
        ],
        items: vec![with(3, "c", b"jpeg-c2")],
    };
    store.apply(&[&first], 1).unwrap();
    assert_eq!(
        store.thumbnails(&[0, 1, 2, 9]).unwrap(),
        [Some(b"jpeg-a".to_vec()), None, Some(b"jpeg-c".to_vec()), None]
    );
    store.apply(&[&second], 2).unwrap();
    assert_eq!(store.thumbnails(&[0, 2, 3]).unwrap(), [None, None, Some(b"jpeg-c2".to_vec())]);
    // Read back as an item, a thumbnail is not part of the record.
    assert_eq!(store.items(&[3]).unwrap()[0].label, "label-c");
    assert!(catalog.open("thumbs").unwrap().unwrap().def().thumbnails);

    // An index without thumbnails keeps none, whatever the writes carry.
    let plain = create(catalog, &def("plain", 2, 1, 0));
    plain.apply(&[&writes(vec![with(0, "a", b"jpeg-a")])], 1).unwrap();
    assert_eq!(plain.thumbnails(&[0]).unwrap(), [None]);
}

mod backends {
    use super::super::{MemoryCatalog, SledCatalog, SledOptions};

    /// A sled catalog in a temporary directory that lives as long as the catalog.
    struct TempSled {
        catalog: SledCatalog,
        _dir: tempfile::TempDir,
    }

    impl std::ops::Deref for TempSled {
        type Target = SledCatalog;
        fn deref(&self) -> &SledCatalog {
            &self.catalog
        }
    }

    fn sled() -> TempSled {
        let dir = tempfile::tempdir().unwrap();
        let catalog = SledCatalog::open(dir.path(), &SledOptions { fsync: false, ..Default::default() }).unwrap();
        TempSled { catalog, _dir: dir }
    }

    store_conformance!(sled_store, *sled());
    store_conformance!(memory_store, MemoryCatalog::new());
}
