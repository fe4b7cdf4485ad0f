//! Power cuts: the server's data directory lives on a file system that forgets every write not
//! fsynced, and every new name or rename whose directory was not fsynced (`power_cut/fs.rs`,
//! FUSE), streams ingest, replace and delete, and at a random moment
//! the server is killed and the power cut; the server restarts on what is left, must open
//! without repair, and must hold every acknowledged write and delete (the crash harness's
//! check, `crash_model`). A SIGKILL alone keeps the page cache, so only this test can see a
//! missing fsync. The index has the default shape (1280-d, 16 tables of 12 bits): its
//! hyperplanes and sketch planes are large enough for sled to keep them in blob files.
//!
//!     cargo test --test power_cut                                   # 4 trials (CI)
//!     IMAGELSH_POWER_CUT_TRIALS=25 cargo test --release --test power_cut -- --nocapture
//!
//! Where FUSE cannot be mounted (no /dev/fuse, no privilege) the test says so and passes.

mod common;
#[path = "crash_model/mod.rs"]
mod crash_model;
#[path = "power_cut/fs.rs"]
mod fs;

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use common::{Rng, TestServer, create};
use crash_model::{StreamModel, Target, verify, writer};

const TARGET: Target = Target { index: "power", dim: 1280, hash_bits: 12, tables: 16, ids_per_stream: 120 };
const STREAMS: usize = 3;
/// Small segments and groups: log rolls, applies and log cuts happen within a trial.
const SERVER_ARGS: &[&str] = &[
    "--no-model",
    "--apply-after-items",
    "100",
    "--apply-delay-ms",
    "5",
    "--max-apply-items",
    "300",
    "--log-segment-kb",
    "256",
    "--checkpoint-kb",
    "1024",
    "--compact-min-removed",
    "200",
];

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn acknowledged_writes_survive_power_cuts() {
    let trials: usize = std::env::var("IMAGELSH_POWER_CUT_TRIALS").ok().and_then(|v| v.parse().ok()).unwrap_or(4);
    let dir = tempfile::tempdir().unwrap();
    let (backing, mountpoint) = (dir.path().join("backing"), dir.path().join("mnt"));
    std::fs::create_dir_all(&backing).unwrap();
    std::fs::create_dir_all(&mountpoint).unwrap();
    let (session, power) = match fs::mount(&backing, &mountpoint) {
        Ok(mounted) => mounted,
        Err(e) => {
            eprintln!("SKIPPED: power-cut trials need FUSE (/dev/fuse and the right to mount): {e}");
            return;
        }
    };
    let data_dir = mountpoint.join("data");
    let mut rng = Rng::new(0xB1AC_0007);
    let mut models: Vec<StreamModel> = (0..STREAMS).map(|_| StreamModel::default()).collect();
    let (mut checked, mut deletes) = (0, 0);
    for trial in 0..trials {
        let server = TestServer::start_with(&data_dir, SERVER_ARGS);
        if trial == 0 {
            create(&mut server.client().await, TARGET.index, TARGET.dim as u32, TARGET.hash_bits, TARGET.tables).await;
        }
        let stop = Arc::new(AtomicBool::new(false));
        let tasks: Vec<_> = std::mem::take(&mut models)
            .into_iter()
            .enumerate()
            .map(|(s, model)| tokio::spawn(writer(TARGET, server.addr.clone(), s, rng.next_u64(), model, stop.clone())))
            .collect();
        let after = 400 + rng.next_u64() % 1600;
        tokio::time::sleep(Duration::from_millis(after)).await;
        server.kill();
        let (lost, undone) = power.cut_power();
        stop.store(true, Ordering::Relaxed);
        for task in tasks {
            models.push(task.await.unwrap());
        }
        let acks: u64 = models.iter().map(|m| m.acks).sum();
        assert!(acks > 0, "trial {trial}: nothing was acknowledged before the power cut");
        let server = TestServer::start_with(&data_dir, SERVER_ARGS);
        let n = verify(TARGET, &server, &mut models).await;
        let live: usize = models.iter().map(StreamModel::live).sum();
        let deleted: usize = models.iter().map(StreamModel::deleted).sum();
        println!(
            "trial {trial}: power cut after {after} ms ({acks} acknowledged; {lost} files lost unsynced data, {undone} unsynced names undone); \
             {n} ids checked, {live} live, {deleted} deleted"
        );
        checked += n;
        deletes += deleted;
        drop(server);
    }
    println!("{trials} power cuts, {checked} id checks, {deletes} of deleted ids, {} fsyncs", power.fsyncs());
    assert!(checked > 0 && deletes > 0, "the trials checked writes and deletes");
    drop(session);
}
