use super::*;
use crate::store::{SledCatalog, SledOptions};

fn engine(dir: &std::path::Path) -> Engine {
    let catalog = SledCatalog::open(dir, &SledOptions { fsync: false, ..Default::default() }).unwrap();
    Engine::open(Arc::new(catalog), &dir.join("wal"), 4).unwrap()
}

fn vec_item(id: &str, v: &[f32]) -> VectorItem {
    VectorItem { id: id.into(), vector: v.to_vec(), ..Default::default() }
}

fn tables() -> QueryOptions {
    QueryOptions { plan: SearchPlan::Tables, ..Default::default() }
}

fn scan() -> QueryOptions {
    QueryOptions { plan: SearchPlan::Scan, ..Default::default() }
}

#[test]
fn defaults_are_the_measured_ones_and_dim_of_the_model() {
    let dir = tempfile::tempdir().unwrap();
    let info = engine(dir.path()).create(IndexSpec { name: "a".into(), ..Default::default() }).unwrap();
    assert_eq!((info.def.dim, info.def.hash_bits, info.def.tables, info.items), (4, 12, 16, 0));
    assert_eq!((info.def.sketch_bits, info.def.stores_vectors), (DEFAULT_SKETCH_BITS, true));
}

proptest::proptest! {
    #[test]
    fn nearest_keeps_the_smallest_distances(distances in proptest::collection::vec(0u32..=64, 0..300), keep in 1usize..100) {
        let mut entries: Vec<rank::Candidate> = distances
            .iter()
            .enumerate()
            .map(|(i, &distance)| rank::Candidate { number: i as u32, votes: 0, distance })
            .collect();
        let mut sorted = distances.clone();
        sorted.sort_unstable();
        rank::nearest(&mut entries, keep, 64);
        proptest::prop_assert_eq!(entries.len(), keep.min(distances.len()));
        let mut kept: Vec<u32> = entries.iter().map(|e| e.distance).collect();
        kept.sort_unstable();
        proptest::prop_assert_eq!(kept, sorted[..keep.min(sorted.len())].to_vec());
        proptest::prop_assert!(entries.windows(2).all(|w| w[0].number < w[1].number), "item order kept");
    }
}

#[test]
fn bad_names_and_shapes_are_invalid_arguments() {
    let dir = tempfile::tempdir().unwrap();
    let e = engine(dir.path());
    for name in ["", "a b", "é", &"x".repeat(129)] {
        assert!(matches!(
            e.create(IndexSpec { name: name.into(), ..Default::default() }),
            Err(IndexError::InvalidArgument(_))
        ));
    }
    assert!(matches!(
        e.create(IndexSpec { name: "a".into(), hash_bits: 65, ..Default::default() }),
        Err(IndexError::InvalidArgument(_))
    ));
    assert!(matches!(
        e.create(IndexSpec { name: "a".into(), tables: 257, ..Default::default() }),
        Err(IndexError::InvalidArgument(_))
    ));
}

#[test]
fn bad_items_fail_alone() {
    let dir = tempfile::tempdir().unwrap();
    let e = engine(dir.path());
    e.create(IndexSpec { name: "a".into(), ..Default::default() }).unwrap();
    let index = e.index("a").unwrap();
    let outcome = index
        .ingest(vec![
            (0, vec_item("ok", &[1., 2., 3., 4.])),
            (1, vec_item("", &[1., 2., 3., 4.])),
            (2, vec_item("short", &[1., 2.])),
            (3, vec_item("nan", &[1., f32::NAN, 3., 4.])),
            (4, vec_item("inf", &[1., 2., f32::INFINITY, 4.])),
            (5, vec_item("ok2", &[4., 3., 2., 1.])),
        ])
        .unwrap();
    assert_eq!(outcome.indexed, 2);
    assert_eq!(outcome.failures.iter().map(|f| f.position).collect::<Vec<_>>(), [1, 2, 3, 4]);
    assert_eq!(index.info().unwrap().items, 2);
}

#[test]
fn query_orders_by_votes_then_id_and_excludes_itself() {
    let dir = tempfile::tempdir().unwrap();
    let e = engine(dir.path());
    e.create(IndexSpec { name: "a".into(), hash_bits: 4, tables: 8, seed: 3, ..Default::default() }).unwrap();
    let index = e.index("a").unwrap();
    let q = [1.0, 0.2, 0.1, 0.0];
    index
        .ingest(vec![
            (0, vec_item("same-b", &q)),
            (1, vec_item("same-a", &q)),
            (2, vec_item("near", &[1.0, 0.25, 0.1, 0.05])),
            (3, vec_item("opposite", &[-1.0, -0.2, -0.1, 0.0])),
        ])
        .unwrap();
    let by_votes = QueryOptions { rerank: Some(false), probes: Some(0), ..Default::default() };
    let result = index.query(QueryBy::Vector(q.to_vec()), &by_votes).unwrap();
    let ids: Vec<&str> = result.hits.iter().map(|h| h.id.as_str()).collect();
    assert_eq!(&ids[..2], ["same-a", "same-b"]);
    assert_eq!(result.hits[0].votes, 8);
    assert_eq!(result.hits[0].score, 1.0);
    assert!(!ids.contains(&"opposite"), "the opposite vector shares no bucket");
    let by_id = index.query(QueryBy::Id("same-a".into()), &by_votes).unwrap();
    assert_eq!(by_id.hits[0].id, "same-b");
    assert!(by_id.hits.iter().all(|h| h.id != "same-a"));
    let strict =
        index.query(QueryBy::Vector(q.to_vec()), &QueryOptions { top_k: 1, min_votes: 8, ..by_votes.clone() }).unwrap();
    assert_eq!(strict.hits.len(), 1);
    assert!(matches!(
        index.query(QueryBy::Id("nope".into()), &QueryOptions::default()),
        Err(IndexError::ItemNotFound { .. })
    ));
}

#[test]
fn probes_widen_the_candidates_and_keep_votes_per_table() {
    let dir = tempfile::tempdir().unwrap();
    let e = engine(dir.path());
    e.create(IndexSpec { name: "a".into(), hash_bits: 16, tables: 4, seed: 5, ..Default::default() }).unwrap();
    let index = e.index("a").unwrap();
    let items = (0..200)
        .map(|i| (i, vec_item(&format!("{i}"), &[(i as f32).sin(), (i as f32 * 0.7).cos(), 0.3, -0.2])))
        .collect();
    index.ingest(items).unwrap();
    let q = vec![0.4, 0.5, 0.3, -0.2];
    let plain =
        index.query(QueryBy::Vector(q.clone()), &QueryOptions { top_k: 200, probes: Some(0), ..tables() }).unwrap();
    let probed = index.query(QueryBy::Vector(q), &QueryOptions { top_k: 200, probes: Some(8), ..tables() }).unwrap();
    assert!(probed.candidates > plain.candidates, "{} vs {}", probed.candidates, plain.candidates);
    assert!(probed.hits.iter().all(|h| h.votes <= 4));
}

#[test]
fn centered_index_keeps_its_center_across_opens() {
    let dir = tempfile::tempdir().unwrap();
    let spec = IndexSpec {
        name: "c".into(),
        hash_bits: 8,
        tables: 4,
        center: Some(vec![1.0, 1.0, 1.0, 1.0]),
        ..Default::default()
    };
    let first = {
        let e = engine(dir.path());
        assert!(e.create(spec).unwrap().centered);
        let index = e.index("c").unwrap();
        index
            .ingest(vec![(0, vec_item("x", &[1.1, 0.9, 1.2, 0.8])), (1, vec_item("y", &[0.9, 1.1, 0.8, 1.2]))])
            .unwrap();
        index.query(QueryBy::Vector(vec![1.1, 0.9, 1.2, 0.8]), &QueryOptions::default()).unwrap().hits
    };
    let e = engine(dir.path());
    let index = e.index("c").unwrap();
    assert!(index.info().unwrap().centered);
    assert_eq!(index.query(QueryBy::Vector(vec![1.1, 0.9, 1.2, 0.8]), &QueryOptions::default()).unwrap().hits, first);
    let bad = IndexSpec { name: "d".into(), center: Some(vec![0.0; 3]), ..Default::default() };
    assert!(matches!(e.create(bad), Err(IndexError::InvalidArgument(_))));
}

/// `n` pseudo-random vectors (uniform in [-1, 1) plus an offset, like uncentred embeddings).
fn spread(n: usize, dim: usize) -> Vec<(u32, VectorItem)> {
    use rand::{RngExt, SeedableRng};
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(n as u64);
    (0..n)
        .map(|i| {
            let v: Vec<f32> = (0..dim).map(|d| rng.random_range(-1.0f32..1.0) + 0.1 * d as f32).collect();
            (i as u32, vec_item(&format!("i{i}"), &v))
        })
        .collect()
}

#[test]
fn sketch_prefilter_keeps_the_exact_order_of_what_it_reranks() {
    let dir = tempfile::tempdir().unwrap();
    let e = engine(dir.path());
    e.create(IndexSpec { name: "a".into(), hash_bits: 4, tables: 4, seed: 2, ..Default::default() }).unwrap();
    let index = e.index("a").unwrap();
    let items = spread(400, 4);
    let query = items[17].1.vector.clone();
    index.ingest(items).unwrap();
    let all = QueryOptions { top_k: 5, rerank_depth: MAX_RERANK_DEPTH, ..tables() };
    let exact = index.query(QueryBy::Vector(query.clone()), &all).unwrap();
    // The item itself is at sketch distance 0: always within any depth, always first.
    let shallow = QueryOptions { top_k: 5, rerank_depth: 5, ..tables() };
    let cheap = index.query(QueryBy::Vector(query), &shallow).unwrap();
    assert_eq!((exact.hits[0].id.as_str(), cheap.hits[0].id.as_str()), ("i17", "i17"));
    assert!((cheap.hits[0].similarity - 1.0).abs() < 1e-5);
    assert!(cheap.hits.windows(2).all(|w| w[0].similarity >= w[1].similarity));
    // What the shallow query returns is exact, just possibly not the best 5.
    for hit in &cheap.hits {
        if let Some(same) = exact.hits.iter().find(|h| h.id == hit.id) {
            assert_eq!(same.similarity, hit.similarity);
        }
    }
}

/// Both plans re-rank exactly the `depth` that the asymmetric estimate ranks best among the
/// `ASYMMETRIC_PRESELECTION × depth` nearest by Hamming distance, not the Hamming-nearest.
#[test]
fn both_plans_rerank_the_asymmetric_best_of_the_hamming_nearest() {
    let dir = tempfile::tempdir().unwrap();
    let e = engine(dir.path());
    let dim = 16;
    // Two-bit codes in four tables and three probes: every item is a candidate of the tables.
    e.create(IndexSpec { name: "a".into(), dim, hash_bits: 2, tables: 4, seed: 7, ..Default::default() }).unwrap();
    let index = e.index("a").unwrap();
    let items = spread(400, dim as usize);
    let queries: Vec<Vec<f32>> =
        items.iter().step_by(20).map(|(_, it)| it.vector.iter().map(|x| x + 0.3).collect()).collect();
    index.ingest(items).unwrap();
    let depth = 5;
    // Some query must pick other items than the Hamming distance would, and other items than
    // an exact comparison of all the preselected would, or a plan skipping either step passes.
    let (mut rescore_mattered, mut preselection_mattered) = (false, false);
    for query in queries {
        let sketch = QuerySketch::new(index.sketch.as_ref().unwrap(), &query).unwrap();
        let (preselected, by_hamming, expected) = {
            let state = index.state();
            let (words, live) = (state.sketches(), state.live_words());
            let preselected = nearest_sketches(&sketch.words, words, live, None, depth * ASYMMETRIC_PRESELECTION);
            let expected = sketch.rescore(words, preselected.clone(), |&(number, _)| number, depth);
            (preselected, nearest_sketches(&sketch.words, words, live, None, depth), expected)
        };
        rescore_mattered |= expected != by_hamming;
        let mut exact: Vec<(f32, u32)> = preselected
            .iter()
            .map(|&(number, _)| (cosine(&query, &index.store.vector(number).unwrap()), number))
            .collect();
        exact.sort_by(|a, b| b.0.total_cmp(&a.0));
        let mut exact_best: Vec<u32> = exact.iter().take(depth).map(|&(_, number)| number).collect();
        exact_best.sort_unstable();
        let numbers: Vec<u32> = expected.iter().map(|&(number, _)| number).collect();
        preselection_mattered |= exact_best != numbers;
        let mut expected_ids: Vec<String> = index.items(&numbers).unwrap().into_iter().map(|i| i.id).collect();
        expected_ids.sort();
        for plan in [SearchPlan::Scan, SearchPlan::Tables] {
            let options = QueryOptions {
                top_k: depth as u32,
                rerank_depth: depth as u32,
                probes: Some(3),
                plan,
                ..Default::default()
            };
            let result = index.query(QueryBy::Vector(query.clone()), &options).unwrap();
            assert_eq!(result.candidates, 400, "{plan:?}");
            let mut ids: Vec<String> = result.hits.into_iter().map(|h| h.id).collect();
            ids.sort();
            assert_eq!(ids, expected_ids, "{plan:?}");
        }
    }
    assert!(rescore_mattered, "the re-score picked what Hamming distance picks for every query: no test");
    assert!(preselection_mattered, "the re-score picked the exact best of the preselected for every query: no test");
}

/// The exact top `k` of the live items by cosine, leaving out `skip`.
fn brute_force<'a>(live: &'a HashMap<String, Vec<f32>>, query: &[f32], k: usize, skip: &str) -> Vec<&'a str> {
    let mut all: Vec<(f32, &str)> =
        live.iter().filter(|(id, _)| *id != skip).map(|(id, v)| (cosine(query, v), id.as_str())).collect();
    all.sort_by(|a, b| b.0.total_cmp(&a.0).then(a.1.cmp(b.1)));
    all.into_iter().take(k).map(|(_, id)| id).collect()
}

#[test]
fn scan_finds_the_exact_top_k_of_live_items_with_table_votes() {
    let dir = tempfile::tempdir().unwrap();
    let dim = 8;
    let mut live: HashMap<String, Vec<f32>> = HashMap::new();
    let query = {
        let e = engine(dir.path());
        e.create(IndexSpec { name: "a".into(), dim, hash_bits: 6, tables: 6, seed: 4, ..Default::default() }).unwrap();
        let index = e.index("a").unwrap();
        let items = spread(300, dim as usize);
        live.extend(items.iter().map(|(_, it)| (it.id.clone(), it.vector.clone())));
        let query = items[40].1.vector.clone();
        index.ingest(items).unwrap();
        // Replace the query's twin and nine more; delete ten: their old records must not surface.
        let replaced: Vec<(u32, VectorItem)> = (40..50)
            .map(|i| (0, vec_item(&format!("i{i}"), &query.iter().map(|x| -x - i as f32).collect::<Vec<_>>())))
            .collect();
        live.extend(replaced.iter().map(|(_, it)| (it.id.clone(), it.vector.clone())));
        index.ingest(replaced).unwrap();
        let deleted: Vec<String> = (50..60).map(|i| format!("i{i}")).collect();
        assert_eq!(index.delete(&deleted).unwrap(), 10);
        deleted.iter().for_each(|id| drop(live.remove(id)));
        query
    };
    // After a reopen, liveness comes back from the buckets.
    let e = engine(dir.path());
    let index = e.index("a").unwrap();
    let exhaustive = QueryOptions { top_k: 10, rerank_depth: MAX_RERANK_DEPTH, ..scan() };
    let result = index.query(QueryBy::Vector(query.clone()), &exhaustive).unwrap();
    assert_eq!((result.plan, result.candidates), (SearchPlan::Scan, 290));
    let ids: Vec<&str> = result.hits.iter().map(|h| h.id.as_str()).collect();
    assert_eq!(ids, brute_force(&live, &query, 10, ""));
    // Votes are the tables plan's for the same items.
    let by_tables = QueryOptions { probes: Some(3), ..exhaustive.clone() };
    let scanned = index
        .query(QueryBy::Vector(query.clone()), &QueryOptions { plan: SearchPlan::Scan, ..by_tables.clone() })
        .unwrap();
    let tabled =
        index.query(QueryBy::Vector(query.clone()), &QueryOptions { plan: SearchPlan::Tables, ..by_tables }).unwrap();
    assert_eq!(tabled.plan, SearchPlan::Tables);
    for hit in &tabled.hits {
        if let Some(same) = scanned.hits.iter().find(|h| h.id == hit.id) {
            assert_eq!((same.votes, same.score, same.similarity), (hit.votes, hit.score, hit.similarity), "{}", hit.id);
        }
    }
    // By id: the item itself is left out.
    let by_id = index.query(QueryBy::Id("i7".into()), &exhaustive).unwrap();
    assert_eq!(by_id.hits.iter().map(|h| h.id.as_str()).collect::<Vec<_>>(), brute_force(&live, &live["i7"], 10, "i7"));
}

#[test]
fn scan_orders_exact_ties_by_votes_then_id() {
    let dir = tempfile::tempdir().unwrap();
    let e = engine(dir.path());
    e.create(IndexSpec { name: "a".into(), hash_bits: 4, tables: 4, ..Default::default() }).unwrap();
    let index = e.index("a").unwrap();
    let q = [0.9, 0.1, 0.3, 0.2];
    let mut items = spread(40, 4);
    // Duplicates of the query, the later id first (a lower item number).
    items.push((40, vec_item("dup-b", &q)));
    items.push((41, vec_item("dup-a", &q)));
    index.ingest(items).unwrap();
    let top = index.query(QueryBy::Vector(q.to_vec()), &QueryOptions { top_k: 1, ..scan() }).unwrap();
    assert_eq!(top.hits.iter().map(|h| h.id.as_str()).collect::<Vec<_>>(), ["dup-a"]);
    assert_eq!(top.hits[0].votes, 4);
}

#[test]
fn auto_scans_small_indexes_when_the_query_allows_it() {
    let dir = tempfile::tempdir().unwrap();
    let catalog = Arc::new(SledCatalog::open(dir.path(), &SledOptions { fsync: false, ..Default::default() }).unwrap());
    let e = Engine::open(catalog.clone(), &dir.path().join("wal"), 4).unwrap();
    e.create(IndexSpec { name: "a".into(), hash_bits: 4, tables: 4, ..Default::default() }).unwrap();
    let index = e.index("a").unwrap();
    index.ingest(spread(50, 4)).unwrap();
    let q = || QueryBy::Vector(vec![0.5, 0.1, 0.2, 0.3]);
    let plan_of = |o: &QueryOptions| index.query(q(), o).unwrap().plan;
    assert_eq!(plan_of(&QueryOptions::default()), SearchPlan::Scan);
    assert_eq!(plan_of(&QueryOptions { min_votes: 1, ..Default::default() }), SearchPlan::Tables);
    assert_eq!(plan_of(&QueryOptions { rerank: Some(false), ..Default::default() }), SearchPlan::Tables);
    assert_eq!(plan_of(&tables()), SearchPlan::Tables);
    for refused in [QueryOptions { min_votes: 1, ..scan() }, QueryOptions { rerank: Some(false), ..scan() }] {
        assert!(matches!(index.query(q(), &refused), Err(IndexError::InvalidArgument(_))), "{refused:?}");
    }
    // Over the threshold (here: any sketches at all), AUTO reads the tables.
    drop(index);
    drop(e);
    let options = EngineOptions { full_scan_threshold: 0, ..Default::default() };
    let (e, _) = Engine::open_with(catalog, &dir.path().join("wal"), 4, options).unwrap();
    let index = e.index("a").unwrap();
    assert_eq!(index.query(q(), &QueryOptions::default()).unwrap().plan, SearchPlan::Tables);
    assert_eq!(index.query(q(), &scan()).unwrap().plan, SearchPlan::Scan);
    e.create(IndexSpec { name: "empty".into(), ..Default::default() }).unwrap();
    let empty = e.index("empty").unwrap().query(q(), &QueryOptions::default()).unwrap();
    assert_eq!((empty.plan, empty.hits.len()), (SearchPlan::Tables, 0), "0 means never, even with no sketches");
}

#[test]
fn index_without_embeddings_ranks_by_estimated_cosine() {
    let dir = tempfile::tempdir().unwrap();
    let spec = IndexSpec {
        name: "s".into(),
        hash_bits: 4,
        tables: 4,
        sketch_bits: 1024,
        store_vectors: Some(false),
        ..Default::default()
    };
    let items = spread(200, 4);
    let query = items[5].1.vector.clone();
    let first = {
        let e = engine(dir.path());
        let info = e.create(spec).unwrap();
        assert_eq!((info.def.stores_vectors, info.def.sketch_bits), (false, 1024));
        let index = e.index("s").unwrap();
        index.ingest(items.clone()).unwrap();
        assert!(matches!(
            index.query(QueryBy::Id("i5".into()), &QueryOptions::default()),
            Err(IndexError::InvalidArgument(_))
        ));
        index.query(QueryBy::Vector(query.clone()), &QueryOptions::default()).unwrap()
    };
    assert_eq!(first.hits[0].id, "i5");
    assert_eq!(first.hits[0].similarity, 1.0, "distance 0 estimates cosine 1");
    for hit in &first.hits {
        let number: usize = hit.id[1..].parse().unwrap();
        let exact = cosine(&query, &items[number].1.vector);
        assert!((hit.similarity - exact).abs() < 0.2, "{}: estimate {} exact {exact}", hit.id, hit.similarity);
    }
    assert!(
        std::fs::read_dir(dir.path().join("vectors"))
            .unwrap()
            .all(|f| { f.unwrap().path().extension().is_some_and(|x| x == "sketch") }),
        "no vector file"
    );
    // The sketches come back from disk.
    let e = engine(dir.path());
    let again = e.index("s").unwrap().query(QueryBy::Vector(query), &QueryOptions::default()).unwrap();
    assert_eq!(again.hits, first.hits);
}

fn small_log() -> EngineOptions {
    let write = WriteOptions {
        segment_bytes: 4 << 10,
        apply_after_operations: 1 << 30,
        apply_delay: std::time::Duration::from_secs(3600),
        fsync: false,
        ..Default::default()
    };
    EngineOptions { write, ..Default::default() }
}

/// An engine over sled in `dir` with `small_log`'s options.
fn open_small_log(dir: &std::path::Path) -> (Engine, Recovery) {
    let catalog = SledCatalog::open(dir, &SledOptions { fsync: false, ..Default::default() }).unwrap();
    Engine::open_with(Arc::new(catalog), &dir.join("wal"), 4, small_log()).unwrap()
}

fn log_segments(dir: &std::path::Path) -> usize {
    std::fs::read_dir(dir.join("wal")).unwrap().count()
}

/// Logged batches are queryable before they are applied, after a crash (the engine is
/// forgotten, not closed) they come back from the log, and once applied the log shrinks.
#[test]
fn logged_batches_are_queryable_replayed_and_then_applied() {
    let dir = tempfile::tempdir().unwrap();
    let items = spread(300, 4);
    let open = || open_small_log(dir.path());
    let expected = {
        let (e, recovery) = open();
        assert_eq!(recovery.replayed, 0);
        e.create(IndexSpec { name: "a".into(), hash_bits: 4, tables: 3, ..Default::default() }).unwrap();
        let index = e.index("a").unwrap();
        for chunk in items.chunks(10) {
            index.ingest(chunk.to_vec()).unwrap();
        }
        let replaced = vec![(0, vec_item("i3", &[9.0, -1.0, 2.0, 0.5]))];
        index.ingest(replaced).unwrap();
        assert_eq!(index.delete(&["i4".into(), "nope".into()]).unwrap(), 1);
        assert_eq!(index.state().pending(), 303, "nothing applied yet");
        assert!(log_segments(dir.path()) > 2);
        let results: Vec<_> = [tables(), scan()]
            .iter()
            .map(|o| index.query(QueryBy::Vector(items[17].1.vector.clone()), o).unwrap().hits)
            .collect();
        assert_eq!(results[0][0].id, "i17");
        assert_eq!(results[0], results[1], "both plans see the logged tail");
        assert_eq!(index.query(QueryBy::Id("i3".into()), &tables()).unwrap().hits.len(), 10);
        assert_eq!(index.info().unwrap().items, 299);
        e.abandon();
        results
    };
    let (e, recovery) = open();
    assert_eq!(recovery.replayed, 32);
    let index = e.index("a").unwrap();
    let query = |index: &Index| index.query(QueryBy::Vector(items[17].1.vector.clone()), &tables()).unwrap().hits;
    assert_eq!(query(&index), expected[0]);
    assert_eq!(index.info().unwrap().items, 299);
    e.apply_now().unwrap();
    assert_eq!(index.state().pending(), 0);
    assert_eq!(log_segments(dir.path()), 1, "applied segments are deleted");
    assert_eq!(query(&index), expected[0], "the same answer from the store");
    assert!(matches!(index.query(QueryBy::Id("i4".into()), &tables()), Err(IndexError::ItemNotFound { .. })));
    drop(index);
    drop(e);
    let (e, recovery) = open();
    assert_eq!(recovery.replayed, 0, "a closed engine applied everything");
    assert_eq!(query(&e.index("a").unwrap()), expected[0]);
}

/// The layers above the store run as well on the in-memory backend.
#[test]
fn an_engine_over_the_memory_store_ingests_replaces_and_queries() {
    let dir = tempfile::tempdir().unwrap();
    let catalog = Arc::new(crate::store::MemoryCatalog::new());
    let e = Engine::open(catalog, &dir.path().join("wal"), 4).unwrap();
    e.create(IndexSpec { name: "m".into(), hash_bits: 4, tables: 4, ..Default::default() }).unwrap();
    let index = e.index("m").unwrap();
    let items = spread(200, 4);
    index.ingest(items.clone()).unwrap();
    e.apply_now().unwrap();
    index.ingest(vec![(0, vec_item("i9", &[5.0, 5.0, -5.0, 1.0]))]).unwrap();
    for plan in [tables(), scan()] {
        let hits = index.query(QueryBy::Vector(items[30].1.vector.clone()), &plan).unwrap().hits;
        assert_eq!(hits[0].id, "i30", "{plan:?}");
        let moved = index.query(QueryBy::Vector(vec![5.0, 5.0, -5.0, 1.0]), &plan).unwrap().hits;
        assert_eq!(moved[0].id, "i9", "{plan:?}");
    }
    e.apply_now().unwrap();
    assert_eq!(index.info().unwrap().items, 200);
    assert_eq!(index.query(QueryBy::Id("i9".into()), &tables()).unwrap().hits.len(), 10);
}

#[test]
fn dropped_index_is_not_found_and_name_is_reusable() {
    let dir = tempfile::tempdir().unwrap();
    let e = engine(dir.path());
    e.create(IndexSpec { name: "a".into(), ..Default::default() }).unwrap();
    assert!(matches!(
        e.create(IndexSpec { name: "a".into(), ..Default::default() }),
        Err(IndexError::AlreadyExists(_))
    ));
    let old = e.index("a").unwrap();
    e.drop_index("a").unwrap();
    assert!(matches!(e.index("a"), Err(IndexError::NotFound(_))));
    assert!(matches!(old.ingest(vec![(0, vec_item("x", &[1., 2., 3., 4.]))]), Err(IndexError::NotFound(_))));
    e.create(IndexSpec { name: "a".into(), ..Default::default() }).unwrap();
    assert_eq!(e.list().unwrap().len(), 1);
}

/// Loss window 1: a group logged while `drop_applied_log` runs (after the applier decided what
/// is applied, before it takes the log's lock) keeps its segments; nothing acknowledged is
/// lost at the next start.
#[test]
fn batches_logged_while_the_applied_log_is_dropped_keep_their_segments() {
    let dir = tempfile::tempdir().unwrap();
    let items = spread(200, 4);
    let open = || open_small_log(dir.path());
    {
        let (e, _) = open();
        e.create(IndexSpec { name: "a".into(), hash_bits: 4, tables: 3, ..Default::default() }).unwrap();
        let index = e.index("a").unwrap();
        e.apply_now().unwrap();
        let data = dir.path().to_path_buf();
        crate::failpoint::set_test_hook("drop-applied-log", move || {
            for chunk in items.chunks(20) {
                index.ingest(chunk.to_vec()).unwrap();
            }
            assert!(log_segments(&data) > 2, "the groups rolled the log");
        });
        e.log.drop_applied_log().unwrap();
        e.abandon();
    }
    let (e, recovery) = open();
    assert_eq!(recovery.replayed, 10);
    assert_eq!(e.index("a").unwrap().info().unwrap().items, 200, "every acknowledged item");
}

/// Loss window 5: a round that failed after one index's store took its batches (here: they
/// are applied to the store behind the query state's back, as such a round leaves them) never
/// applies them twice: counts, buckets and records stay exact.
#[test]
fn batches_a_failed_round_applied_are_not_applied_again() {
    let dir = tempfile::tempdir().unwrap();
    let catalog = SledCatalog::open(dir.path(), &SledOptions { fsync: false, ..Default::default() }).unwrap();
    let (e, _) = Engine::open_with(Arc::new(catalog), &dir.path().join("wal"), 4, small_log()).unwrap();
    e.create(IndexSpec { name: "a".into(), hash_bits: 4, tables: 3, ..Default::default() }).unwrap();
    let index = e.index("a").unwrap();
    let items = spread(60, 4);
    index.ingest(items[..30].to_vec()).unwrap();
    index.delete(&["i3".into()]).unwrap();
    let half = index.state().unapplied(usize::MAX);
    let refs: Vec<_> = half.iter().map(|(_, b)| &**b).collect();
    index.store.apply(&refs, half.last().unwrap().0).unwrap();
    index.ingest(items[30..].to_vec()).unwrap();
    e.apply_now().unwrap();
    assert_eq!(index.store.load().unwrap().count, 59);
    let reports = e.check(false).unwrap();
    assert!(reports.iter().all(|r| r.problems.is_empty()), "{reports:?}");
    let hits = index.query(QueryBy::Vector(items[40].1.vector.clone()), &tables()).unwrap().hits;
    assert_eq!((hits[0].id.as_str(), hits[0].votes), ("i40", 3), "one vote per table, not two");
}

/// Loss window 7: a log whose positions restarted below what the store applied (its `wal/`
/// lost) is refused at start, and `repair_log` continues it after the store's positions, so
/// that what is acknowledged next is replayed after a crash.
#[test]
fn a_log_behind_the_store_is_refused_and_repair_continues_it() {
    let dir = tempfile::tempdir().unwrap();
    let items = spread(40, 4);
    let catalog =
        || Arc::new(SledCatalog::open(dir.path(), &SledOptions { fsync: false, ..Default::default() }).unwrap());
    let wal = dir.path().join("wal");
    {
        let (e, _) = Engine::open_with(catalog(), &wal, 4, small_log()).unwrap();
        e.create(IndexSpec { name: "a".into(), hash_bits: 4, tables: 3, ..Default::default() }).unwrap();
        e.index("a").unwrap().ingest(items[..20].to_vec()).unwrap();
    }
    std::fs::remove_dir_all(&wal).unwrap();
    match Engine::open_with(catalog(), &wal, 4, small_log()) {
        Err(IndexError::Store(StoreError::LogBehindStore { index, applied: 1, log_next: 1 })) => assert_eq!(index, "a"),
        Err(other) => panic!("expected LogBehindStore, got {other}"),
        Ok(_) => panic!("a log behind the store opened"),
    }
    {
        let (e, _) = Engine::open_with(catalog(), &wal, 4, EngineOptions { repair_log: true, ..small_log() }).unwrap();
        e.index("a").unwrap().ingest(items[20..].to_vec()).unwrap();
        e.abandon();
    }
    let (e, recovery) = Engine::open_with(catalog(), &wal, 4, small_log()).unwrap();
    assert_eq!(recovery.replayed, 1, "the batch after the repair is replayed, not skipped");
    assert_eq!(e.index("a").unwrap().info().unwrap().items, 40);
}

/// Loss window 6: once a dropped index lets go of its log (its segments may then be deleted),
/// its catalog entry is durably gone: a crash right there (here: a panic after the log is cut)
/// never brings the index back with its logged batches missing.
#[test]
fn a_dropped_index_lets_go_of_its_log_only_once_it_is_gone() {
    let dir = tempfile::tempdir().unwrap();
    let open = || open_small_log(dir.path());
    {
        let (e, _) = open();
        e.create(IndexSpec { name: "a".into(), hash_bits: 4, tables: 3, ..Default::default() }).unwrap();
        let index = e.index("a").unwrap();
        for chunk in spread(200, 4).chunks(20) {
            index.ingest(chunk.to_vec()).unwrap();
        }
        let log = e.log.clone();
        crate::failpoint::set_test_hook("index-log-released", move || {
            log.drop_applied_log().unwrap();
            panic!("the process dies here");
        });
        let dropped = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| e.drop_index("a")));
        assert!(dropped.is_err(), "the hook ran");
        e.abandon();
    }
    let (e, _) = open();
    match e.index("a") {
        Err(IndexError::NotFound(_)) => {}
        Ok(index) => panic!("the dropped index came back with {} of 200 items", index.info().unwrap().items),
        Err(other) => panic!("{other}"),
    }
}

/// A catalog whose sync fails on demand (a disk that reports an fsync error).
struct FailingSync {
    inner: crate::store::MemoryCatalog,
    fail: std::sync::atomic::AtomicBool,
}

impl crate::store::Catalog for FailingSync {
    fn create(&self, def: &crate::store::IndexDef, params: IndexParams<'_>) -> Result<Arc<dyn IndexStore>, StoreError> {
        self.inner.create(def, params)
    }
    fn open(&self, name: &str) -> Result<Option<Arc<dyn IndexStore>>, StoreError> {
        self.inner.open(name)
    }
    fn list(&self) -> Result<Vec<crate::store::IndexDef>, StoreError> {
        self.inner.list()
    }
    fn sync(&self) -> Result<(), StoreError> {
        match self.fail.load(Ordering::Relaxed) {
            true => Err(StoreError::Io(std::io::Error::other("fsync: input/output error"))),
            false => self.inner.sync(),
        }
    }
}

/// Loss window 5, its second half: after a failed sync of the store nothing more is taken
/// (a retried fsync could succeed without the pages the failed one dropped), and the log that
/// holds what was acknowledged is kept for the next start.
#[test]
fn a_failed_store_sync_stops_writes_and_keeps_the_log() {
    let dir = tempfile::tempdir().unwrap();
    let catalog = Arc::new(FailingSync { inner: crate::store::MemoryCatalog::new(), fail: false.into() });
    let (e, _) = Engine::open_with(catalog.clone(), &dir.path().join("wal"), 4, small_log()).unwrap();
    e.create(IndexSpec { name: "a".into(), hash_bits: 4, tables: 3, ..Default::default() }).unwrap();
    let index = e.index("a").unwrap();
    let items = spread(100, 4);
    for chunk in items[..60].chunks(20) {
        index.ingest(chunk.to_vec()).unwrap();
    }
    catalog.fail.store(true, Ordering::Relaxed);
    assert!(e.apply_now().is_err());
    catalog.fail.store(false, Ordering::Relaxed);
    assert!(index.ingest(items[60..].to_vec()).is_err(), "a write after the failed sync was taken");
    assert!(e.apply_now().is_err(), "nothing is applied, nor the log cut, until a restart");
    assert!(log_segments(dir.path()) > 0);
    drop(index);
    e.abandon();
    let (e, recovery) = Engine::open_with(catalog, &dir.path().join("wal"), 4, small_log()).unwrap();
    assert_eq!(recovery.replayed, 0, "the store's copy held them all");
    assert_eq!(e.index("a").unwrap().info().unwrap().items, 60, "every acknowledged item");
}
