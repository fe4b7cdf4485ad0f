//! The library path of the search-quality benchmark (driven by `benches/quality.py`, which
//! prepares the data and the exact ground truth): builds an index in-process over sled for each
//! configuration and prints one JSON line of measurements per configuration.
//!
//!     cargo bench --bench quality -- DATA_DIR K:L:PROBES:CENTER:RANKING[:SKETCH_BITS[:MIN_VOTES]] ...
//!
//! RANKING: `votes` (the notebook's), `all` (exact cosine of every candidate), `sketchN`
//! (candidates ranked by sketch Hamming distance, the 4N nearest re-scored by the asymmetric
//! estimate, the best N re-ranked exactly), `estimate` (an index that stores no embeddings:
//! ranked by the sketch's estimated cosine), all with the tables plan; and `scanN` (the
//! full-scan plan: every sketch, then as `sketchN`; PROBES then only decide the votes
//! reported). SKETCH_BITS defaults to 512.
//! Configurations that share an index (K, L, CENTER, SKETCH_BITS, embeddings kept) reuse it.
//!
//! DATA_DIR holds `base.f32` (n × dim), `base_labels.u8`, `queries.f32`, `query_labels.u8`,
//! `truth.u32` (queries × 10 nearest base rows by cosine), `dim.txt`, and `data_center.f32`.
//! CENTER is `none`, `model` (the model card's) or `data` (the mean of the base vectors).

mod support;
use support::dir_bytes;

use std::collections::HashMap;
use std::path::Path;
use std::sync::Arc;
use std::time::Instant;

use imagelsh::embed::ModelCard;
use imagelsh::index::{Engine, IndexSpec, QueryBy, QueryOptions, SearchPlan, VectorItem};
use imagelsh::store::{SledCatalog, SledOptions};

fn f32s(path: &Path) -> Vec<f32> {
    std::fs::read(path).unwrap().chunks_exact(4).map(|c| f32::from_le_bytes(c.try_into().unwrap())).collect()
}

fn main() {
    let args: Vec<String> = std::env::args().skip(1).filter(|a| a != "--bench").collect();
    let data = Path::new(&args[0]);
    let dim: usize = std::fs::read_to_string(data.join("dim.txt")).unwrap().trim().parse().unwrap();
    let base = f32s(&data.join("base.f32"));
    let base_labels = std::fs::read(data.join("base_labels.u8")).unwrap();
    let queries = f32s(&data.join("queries.f32"));
    let query_labels = std::fs::read(data.join("query_labels.u8")).unwrap();
    let truth: Vec<u32> = std::fs::read(data.join("truth.u32"))
        .unwrap()
        .chunks_exact(4)
        .map(|c| u32::from_le_bytes(c.try_into().unwrap()))
        .collect();
    let model = Path::new(env!("CARGO_MANIFEST_DIR")).join("models/efficientnet_lite0.onnx");
    let model_center = ModelCard::load(&ModelCard::path_for(&model)).unwrap().center;
    let data_center = f32s(&data.join("data_center.f32"));

    let mut built: HashMap<String, (tempfile::TempDir, Engine, f64)> = HashMap::new();
    for config in &args[1..] {
        let parts: Vec<&str> = config.split(':').collect();
        let (k, l, probes): (u32, u32, u32) =
            (parts[0].parse().unwrap(), parts[1].parse().unwrap(), parts[2].parse().unwrap());
        let ranking = parts[4];
        let sketch_bits: u32 = parts.get(5).map_or(512, |b| b.parse().unwrap());
        let min_votes: u32 = parts.get(6).map_or(0, |m| m.parse().unwrap());
        let (rerank, rerank_depth, plan) = match ranking {
            "votes" => (false, 0, SearchPlan::Tables),
            "all" | "estimate" => (true, imagelsh::index::MAX_RERANK_DEPTH, SearchPlan::Tables),
            scan if scan.starts_with("scan") => (true, scan["scan".len()..].parse().unwrap(), SearchPlan::Scan),
            depth => (true, depth.strip_prefix("sketch").expect("ranking").parse().unwrap(), SearchPlan::Tables),
        };
        let store_vectors = ranking != "estimate";
        let key = format!("{k}:{l}:{}:{sketch_bits}:{store_vectors}", parts[3]);
        if !built.contains_key(&key) {
            let center = match parts[3] {
                "none" => None,
                "model" => model_center.clone(),
                "data" => Some(data_center.clone()),
                other => panic!("center {other}"),
            };
            let dir = tempfile::tempdir().unwrap();
            let catalog = SledCatalog::open(dir.path(), &SledOptions::default()).unwrap();
            let engine = Engine::open(Arc::new(catalog), &dir.path().join("wal"), dim as u32).unwrap();
            let spec = IndexSpec {
                name: "q".into(),
                dim: dim as u32,
                hash_bits: k,
                tables: l,
                seed: 1,
                center,
                sketch_bits,
                store_vectors: Some(store_vectors),
                ..Default::default()
            };
            engine.create(spec).unwrap();
            let index = engine.index("q").unwrap();
            let started = Instant::now();
            for (b, chunk) in base.chunks(256 * dim).enumerate() {
                let items = chunk
                    .chunks(dim)
                    .enumerate()
                    .map(|(i, v)| {
                        let row = b * 256 + i;
                        (
                            i as u32,
                            VectorItem {
                                id: row.to_string(),
                                label: base_labels[row].to_string(),
                                vector: v.to_vec(),
                                ..Default::default()
                            },
                        )
                    })
                    .collect();
                index.ingest(items).unwrap();
            }
            let ingest_rate = (base.len() / dim) as f64 / started.elapsed().as_secs_f64();
            built.insert(key.clone(), (dir, engine, ingest_rate));
        }
        let (dir, engine, ingest_rate) = &built[&key];
        let index = engine.index("q").unwrap();
        let n = base.len() / dim;

        let options =
            QueryOptions { top_k: 10, min_votes, probes: Some(probes), rerank: Some(rerank), rerank_depth, plan };
        let (mut found, mut same_class, mut candidates) = (0usize, 0usize, 0u64);
        let nq = queries.len() / dim;
        // Profiling aid: QUALITY_PROFILE_REPEAT=n runs the queries n more times, unmeasured, first.
        let repeat: usize = std::env::var("QUALITY_PROFILE_REPEAT").ok().and_then(|r| r.parse().ok()).unwrap_or(0);
        for v in queries.chunks(dim).cycle().take(repeat * nq) {
            index.query(QueryBy::Vector(v.to_vec()), &options).unwrap();
        }
        let started = Instant::now();
        for (q, v) in queries.chunks(dim).enumerate() {
            let result = index.query(QueryBy::Vector(v.to_vec()), &options).unwrap();
            candidates += u64::from(result.candidates);
            let expected = &truth[q * 10..][..10];
            found += result.hits.iter().filter(|h| expected.contains(&h.id.parse::<u32>().unwrap())).count();
            same_class += result.hits.iter().take(5).filter(|h| h.label == query_labels[q].to_string()).count();
        }
        let qps = nq as f64 / started.elapsed().as_secs_f64();
        println!(
            "{{\"system\": \"imagelsh (library)\", \"config\": \"K={k} L={l} probes={probes} center={} {ranking} sketch={sketch_bits} min_votes={min_votes}\", \"recall10\": {:.4}, \"precision5\": {:.4}, \"qps\": {:.1}, \"build_per_s\": {:.0}, \"bytes_per_vector\": {:.0}, \"candidates\": {:.0}}}",
            parts[3],
            found as f64 / (nq * 10) as f64,
            same_class as f64 / (nq * 5) as f64,
            qps,
            ingest_rate,
            dir_bytes(dir.path()) as f64 / n as f64,
            candidates as f64 / nq as f64,
        );
    }
}
