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
#[path = "crash_model/mod.rs"]
mod crash_model;

use std::io::Write;
use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use common::{Rng, TestServer, create};
use crash_model::{StreamModel, Target, verify, writer};

const DIM: usize = 16;
const TARGET: Target = Target { index: "crash", dim: DIM, hash_bits: 6, tables: 4, ids_per_stream: 250 };
const STREAMS: usize = 4;
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
        // A point on the way to an ack is passed a few times first: each trial kills after acks.
        let spec = crash_point.map(|p| match reached_rarely(p) {
            true => format!("{p}:{}", 1 + rng.next_u64() % 2),
            // Per submission or per group: past the first groups of every stream.
            false => format!("{p}:{}", 3 * STREAMS as u64 + rng.next_u64() % 12),
        });
        let env: Vec<(&str, &str)> = spec.iter().map(|s| ("IMAGELSH_CRASH_AT", s.as_str())).collect();
        let mut server = TestServer::start_with_env(dir.path(), SERVER_ARGS, &env);
        if trial == 0 {
            create(&mut server.client().await, TARGET.index, DIM as u32, TARGET.hash_bits, TARGET.tables).await;
        }
        let stop = Arc::new(AtomicBool::new(false));
        let tasks: Vec<_> = std::mem::take(&mut models)
            .into_iter()
            .enumerate()
            .map(|(s, model)| {
                let seed = rng.next_u64();
                tokio::spawn(writer(TARGET, server.addr.clone(), s, seed, model, stop.clone()))
            })
            .collect();
        let how = match &spec {
            Some(spec) => {
                // The armed point aborts the server: a point not reached in time fails the trial
                // (a plain SIGKILL would test something else than the trial names).
                let reached = tokio::task::block_in_place(|| server.wait_exit(Duration::from_secs(20))).is_some();
                assert!(reached, "trial {trial}: crash point {spec} not reached in 20 s");
                format!("abort at {spec}")
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
        let acks: u64 = models.iter().map(|m| m.acks).sum();
        assert!(acks > 0, "trial {trial} ({how}): nothing was acknowledged before the kill");
        let torn = spec.is_none() && trial % 8 == 4;
        if torn {
            tear(dir.path(), &mut rng);
        }
        let segments = std::fs::read_dir(dir.path().join("wal")).unwrap().count();
        let server = TestServer::start_with(dir.path(), SERVER_ARGS);
        let n = verify(TARGET, &server, &mut models).await;
        let acked: usize = models.iter().map(StreamModel::live).sum();
        let deleted: usize = models.iter().map(StreamModel::deleted).sum();
        let torn = if torn { ", torn tail" } else { "" };
        println!(
            "trial {trial}: {how}{torn}; {acks} acknowledged; {segments} log segments left; {n} ids checked, \
             {acked} live, {deleted} deleted (queried by their last embedding)"
        );
        checked += n;
        writes += acked;
        drop(server);
    }
    println!("{trials} trials, {checked} id checks ({writes} of them of live items)");
    assert!(checked > 0);
}
