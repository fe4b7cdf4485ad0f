//! The crash harness: concurrent streams ingest, replace and delete while the server is killed
//! at random moments (SIGKILL after a random time, or an abort at a named crash point: during a
//! group apply, between the store's write and its sync, right after the log is cut, while sled
//! is closed for a checkpoint, right after replaced and deleted items' space is freed, during a rewrite of sled's files, …); some
//! trials also leave a torn tail (a partial log record, garbage, a half-written embedding
//! record). After each kill the server restarts on the same directory, which must open without
//! repair, and every acknowledged write must be there in full: each live item found by its own
//! embedding in all L tables with its label and metadata, by both plans; each deleted item gone.
//! The directory carries over from trial to trial, so later trials crash a longer history.
//!
//!     cargo test --test crash                                   # 14 trials (CI)
//!     IMAGELSH_CRASH_TRIALS=50 cargo test --release --test crash -- --nocapture

mod common;

use std::collections::HashMap;
use std::io::Write;
use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use common::{Rng, TestServer, batch, create, ingest, query_vector, vector_item};
use imagelsh::proto::{self, SearchPlan};

const INDEX: &str = "crash";
const DIM: usize = 16;
const HASH_BITS: u32 = 6;
const TABLES: u32 = 4;
const STREAMS: usize = 4;
const IDS_PER_STREAM: u64 = 250;
/// Small groups, segments and lag, so that applies, segment rolls and log cuts happen all the time.
const SERVER_ARGS: &[&str] = &[
    "--no-model",
    "--apply-after-items",
    "200",
    "--apply-delay-ms",
    "5",
    "--max-apply-items",
    "500",
    "--log-segment-kb",
    "32",
    "--max-log-lag-items",
    "3000",
    "--checkpoint-kb",
    "256",
    "--compact-min-removed",
    "1000",
];
/// Where an armed server aborts (see `imagelsh::failpoint`).
const CRASH_POINTS: &[&str] = &[
    "vectors-written",
    "vectors-synced",
    "log-written",
    "group-applied",
    "store-synced",
    "log-dropped",
    "checkpoint-closed",
    "space-reclaimed",
    "compaction-copied",
    "compaction-swapped",
];

/// What an id holds: the version written (its label is `v{version}`), or deleted.
#[derive(Debug, Clone, PartialEq)]
enum Fate {
    Written { version: u64, vector: Vec<f32> },
    Deleted,
}

/// What one stream knows: each id's last acknowledged fate, and the write in flight when the
/// server died (it may or may not have become durable).
#[derive(Debug, Default)]
struct StreamModel {
    acked: HashMap<String, Fate>,
    in_flight: HashMap<String, Fate>,
}

fn vector_of(rng: &mut Rng) -> Vec<f32> {
    (0..DIM).map(|_| rng.unit()).collect()
}

fn item(id: &str, version: u64, vector: &[f32]) -> proto::Item {
    let mut item = vector_item(id, format!("v{version}"), vector);
    item.metadata.insert("version".into(), version.to_string());
    item
}

/// Writes until the server stops answering (or `stop` is set): batches of upserts (new ids and
/// replacements) and deletes, one at a time, each recorded once acknowledged.
async fn writer(addr: String, stream: usize, seed: u64, mut model: StreamModel, stop: Arc<AtomicBool>) -> StreamModel {
    let mut rng = Rng::new(seed);
    let Ok(channel) = tonic::transport::Channel::from_shared(format!("http://{addr}")).unwrap().connect().await else {
        return model;
    };
    let mut client = proto::image_index_client::ImageIndexClient::new(channel);
    while !stop.load(Ordering::Relaxed) {
        let op = rng.next_u64() % 10;
        let count = 1 + (rng.next_u64() % 30) as usize;
        let ids: Vec<String> = (0..count).map(|_| format!("s{stream}-{}", rng.next_u64() % IDS_PER_STREAM)).collect();
        if op < 8 {
            let mut fates = HashMap::new();
            let items: Vec<proto::Item> = ids
                .iter()
                .map(|id| {
                    let version = rng.next_u64() >> 1;
                    let vector = vector_of(&mut rng);
                    // Of a repeated id the last one wins, on the server as here.
                    fates.insert(id.clone(), Fate::Written { version, vector: vector.clone() });
                    item(id, version, &vector)
                })
                .collect();
            model.in_flight = fates;
            match ingest(&mut client, vec![batch(INDEX, 0, items)]).await {
                Ok(acks) if acks.len() == 1 && acks[0].errors.is_empty() => {
                    model.acked.extend(model.in_flight.drain());
                }
                Ok(acks) => panic!("refused items: {acks:?}"),
                Err(_) => return model,
            }
        } else {
            model.in_flight = ids.iter().map(|id| (id.clone(), Fate::Deleted)).collect();
            match client.delete(proto::DeleteRequest { index: INDEX.into(), ids }).await {
                Ok(_) => model.acked.extend(model.in_flight.drain()),
                Err(_) => return model,
            }
        }
    }
    model.in_flight.clear();
    model
}

/// Checks every id of the models against the restarted server, and settles each write that was
/// in flight by what the server holds; returns how many ids were checked.
async fn verify(server: &TestServer, models: &mut [StreamModel]) -> usize {
    let mut client = server.client().await;
    let mut checked = 0;
    let (mut least, mut most) = (0u64, 0u64);
    for model in models.iter_mut() {
        let ids: std::collections::BTreeSet<String> =
            model.acked.keys().chain(model.in_flight.keys()).cloned().collect();
        for id in ids {
            let acked = model.acked.get(&id).cloned().unwrap_or(Fate::Deleted);
            let in_flight = model.in_flight.get(&id).cloned();
            let allowed: Vec<Fate> = std::iter::once(acked.clone()).chain(in_flight.clone()).collect();
            let present = allowed.iter().filter(|f| matches!(f, Fate::Written { .. })).count();
            least += u64::from(present == allowed.len());
            most += u64::from(present > 0);
            let mut held = None;
            for fate in &allowed {
                if let Fate::Written { version, vector } = fate
                    && find(&mut client, &id, *version, vector, checked % 5 == 0).await
                {
                    assert!(held.is_none(), "{id}: two versions found");
                    held = Some(fate.clone());
                }
            }
            let held = match held {
                Some(fate) => fate,
                None if present < allowed.len() => {
                    // Deleted (or never written): none of its vectors finds it.
                    for fate in &allowed {
                        if let Fate::Written { vector, .. } = fate {
                            assert!(!find(&mut client, &id, u64::MAX, vector, false).await, "{id} deleted but found");
                        }
                    }
                    Fate::Deleted
                }
                None => panic!("{id}: acknowledged {acked:?}, in flight {in_flight:?}, not found"),
            };
            model.acked.insert(id, held);
            checked += 1;
        }
        model.in_flight.clear();
    }
    let info = client.get_index(proto::GetIndexRequest { name: INDEX.into() }).await.unwrap().into_inner();
    assert!((least..=most).contains(&info.items), "{} items, expected {least}..={most}", info.items);
    checked
}

/// Whether the item `id` is there with this version: first hit for its own embedding, in
/// every table, with its label and metadata (with `scan`, by the full-scan plan too). With
/// `version` u64::MAX: whether any item `id` shows up at all.
async fn find(
    client: &mut proto::image_index_client::ImageIndexClient<tonic::transport::Channel>,
    id: &str,
    version: u64,
    vector: &[f32],
    scan: bool,
) -> bool {
    let plans: &[SearchPlan] = if scan { &[SearchPlan::Tables, SearchPlan::Scan] } else { &[SearchPlan::Tables] };
    let mut found = Vec::new();
    for &plan in plans {
        let request = proto::QueryRequest {
            probes: Some(0),
            rerank_depth: 1000,
            plan: plan.into(),
            ..query_vector(INDEX, vector, 5)
        };
        let hits = client.query(request).await.unwrap().into_inner().hits;
        if version == u64::MAX {
            found.push(hits.iter().any(|h| h.id == id));
            continue;
        }
        let this = hits.first().filter(|h| h.id == id && h.label == format!("v{version}"));
        if let Some(hit) = this {
            assert_eq!(hit.votes, TABLES, "{id} is in {} of {TABLES} tables", hit.votes);
            assert!(hit.similarity > 0.9999, "{id}: stored embedding differs ({})", hit.similarity);
            assert_eq!(hit.metadata.get("version"), Some(&version.to_string()), "{id}: metadata");
        }
        found.push(this.is_some());
    }
    assert!(found.iter().all(|&f| f == found[0]), "{id}: the plans disagree ({found:?})");
    found[0]
}

/// Leaves what a write torn by a power cut would: part of a log record after the last one,
/// garbage, and half an embedding record past the vector file's end.
fn tear(dir: &Path, rng: &mut Rng) {
    let wal = dir.join("wal");
    let mut segments: Vec<_> = std::fs::read_dir(&wal).unwrap().map(|e| e.unwrap().path()).collect();
    segments.sort();
    let last = segments.last().expect("a log segment");
    let mut file = std::fs::OpenOptions::new().append(true).open(last).unwrap();
    let garbage: Vec<u8> = (0..1 + rng.next_u64() % 200).map(|_| rng.next_u64() as u8).collect();
    // A plausible header (a length and a checksum) cut short, then noise.
    file.write_all(&(garbage.len() as u32 * 4).to_le_bytes()).unwrap();
    file.write_all(&garbage).unwrap();
    for entry in std::fs::read_dir(dir.join("vectors")).unwrap() {
        let path = entry.unwrap().path();
        if path.extension().is_some_and(|x| x == "f32") {
            let mut file = std::fs::OpenOptions::new().append(true).open(&path).unwrap();
            file.write_all(&[0xAB; 4 + 4 * DIM / 2]).unwrap();
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn acknowledged_writes_survive_kills_at_random_moments() {
    let trials: usize = std::env::var("IMAGELSH_CRASH_TRIALS").ok().and_then(|v| v.parse().ok()).unwrap_or(14);
    let dir = tempfile::tempdir().unwrap();
    let mut rng = Rng::new(0xC0FFEE);
    let mut models: Vec<StreamModel> = (0..STREAMS).map(|_| StreamModel::default()).collect();
    let (mut checked, mut writes) = (0, 0);
    for trial in 0..trials {
        // One trial in four is a SIGKILL at a random moment; the others abort at the crash
        // points in turn (fourteen trials reach each point once).
        let crash_point = (trial % 4 != 0).then(|| CRASH_POINTS[(trial - trial / 4 - 1) % CRASH_POINTS.len()]);
        // Checkpoints and rewrites come a few times a trial, the other points many times.
        let reached_rarely = |p: &str| p.starts_with("checkpoint") || p.starts_with("compaction");
        let spec = crash_point.map(|p| format!("{p}:{}", 1 + rng.next_u64() % if reached_rarely(p) { 2 } else { 15 }));
        let env: Vec<(&str, &str)> = spec.iter().map(|s| ("IMAGELSH_CRASH_AT", s.as_str())).collect();
        let mut server = TestServer::start_with_env(dir.path(), SERVER_ARGS, &env);
        if trial == 0 {
            create(&mut server.client().await, INDEX, DIM as u32, HASH_BITS, TABLES).await;
        }
        let stop = Arc::new(AtomicBool::new(false));
        let tasks: Vec<_> = std::mem::take(&mut models)
            .into_iter()
            .enumerate()
            .map(|(s, model)| {
                let seed = rng.next_u64();
                tokio::spawn(writer(server.addr.clone(), s, seed, model, stop.clone()))
            })
            .collect();
        let how = match &spec {
            Some(spec) => {
                // The armed point aborts the server; a point not reached in time gets a SIGKILL.
                let reached = tokio::task::block_in_place(|| server.wait_exit(Duration::from_secs(10))).is_some();
                format!("abort at {spec}{}", if reached { "" } else { " (not reached: SIGKILL)" })
            }
            None => {
                let after = 200 + rng.next_u64() % 1300;
                tokio::time::sleep(Duration::from_millis(after)).await;
                format!("SIGKILL after {after} ms")
            }
        };
        drop(server);
        stop.store(true, Ordering::Relaxed);
        for task in tasks {
            models.push(task.await.unwrap());
        }
        let torn = spec.is_none() && trial % 8 == 4;
        if torn {
            tear(dir.path(), &mut rng);
        }
        let segments = std::fs::read_dir(dir.path().join("wal")).unwrap().count();
        let server = TestServer::start_with(dir.path(), SERVER_ARGS);
        let n = verify(&server, &mut models).await;
        let acked: usize =
            models.iter().map(|m| m.acked.values().filter(|f| matches!(f, Fate::Written { .. })).count()).sum();
        let torn = if torn { ", torn tail" } else { "" };
        println!("trial {trial}: {how}{torn}; {segments} log segments left; {n} ids checked, {acked} live");
        checked += n;
        writes += acked;
        drop(server);
    }
    println!("{trials} trials, {checked} id checks ({writes} of them of live items)");
    assert!(checked > 0);
}
