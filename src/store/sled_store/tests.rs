use super::apply::item_record_bytes;
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
