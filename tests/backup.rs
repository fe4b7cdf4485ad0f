//! Backup under a concurrent ingest, restore, and every item acknowledged before the backup
//! began is there; the offline form of both.

mod common;

use std::process::Command;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use common::*;
use imagelsh::proto;

const DIM: usize = 16;

fn imagelsh(args: &[&str]) -> String {
    let output = Command::new(env!("CARGO_BIN_EXE_imagelsh")).args(args).env("RUST_LOG", "warn").output().unwrap();
    assert!(output.status.success(), "imagelsh {args:?}: {}", String::from_utf8_lossy(&output.stderr));
    String::from_utf8_lossy(&output.stdout).into_owned()
}

async fn missing(
    client: &mut imagelsh::proto::image_index_client::ImageIndexClient<tonic::transport::Channel>,
    ids: &[String],
) -> Vec<String> {
    let mut missing = Vec::new();
    for chunk in ids.chunks(1000) {
        let request = proto::GetItemsRequest { index: "live".into(), ids: chunk.to_vec(), ..Default::default() };
        missing.extend(client.get_items(request).await.unwrap().into_inner().missing);
    }
    missing
}

#[tokio::test(flavor = "multi_thread")]
async fn a_backup_taken_during_ingest_holds_everything_acknowledged_before_it_began() {
    let dir = tempfile::tempdir().unwrap();
    // Applied in small groups, so that the backup finds items in the store and in the log.
    let server = TestServer::start_with(&dir.path().join("data"), &["--no-model", "--apply-after-items", "300"]);
    let mut client = server.client().await;
    create(&mut client, "live", DIM as u32, 8, 4).await;

    let acked: Arc<Mutex<Vec<String>>> = Arc::default();
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let writer = {
        let (acked, stop, mut client) = (acked.clone(), stop.clone(), server.client().await);
        tokio::spawn(async move {
            let mut rng = Rng::new(7);
            let mut b = 0u64;
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                let items: Vec<_> = (0..100)
                    .map(|i| {
                        let v: Vec<f32> = (0..DIM).map(|_| rng.unit() - 0.5).collect();
                        vector_item(format!("b{b}-{i}"), "l", &v)
                    })
                    .collect();
                let ids: Vec<String> = items.iter().map(|i| i.id.clone()).collect();
                let acks = ingest(&mut client, vec![batch("live", b, items)]).await.unwrap();
                assert_eq!(acks[0].indexed, 100);
                acked.lock().unwrap().extend(ids);
                b += 1;
            }
        })
    };
    while acked.lock().unwrap().len() < 3000 {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let before: Vec<String> = acked.lock().unwrap().clone();
    let backup = dir.path().join("backup");
    let url = format!("http://{}", server.addr);
    let to = backup.to_str().unwrap().to_string();
    let printed =
        tokio::task::spawn_blocking(move || imagelsh(&["backup", "--server", &url, "--to", &to])).await.unwrap();
    assert!(printed.contains("backup of"), "{printed}");
    let during = acked.lock().unwrap().len() - before.len();
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    writer.await.unwrap();
    assert!(during > 0, "the ingest went on while the backup ran");
    assert!(!dir.path().join("data/backup-staging").read_dir().unwrap().any(|_| true), "the server's copy is removed");

    // Restored and served: everything acknowledged before the backup began.
    let restored = dir.path().join("restored");
    let printed = imagelsh(&["restore", "--from", backup.to_str().unwrap(), "--data-dir", restored.to_str().unwrap()]);
    assert!(printed.contains("1 indexes"), "{printed}");
    let again = TestServer::start(&restored);
    let mut client = again.client().await;
    assert_eq!(missing(&mut client, &before).await.len(), 0, "an item acknowledged before the backup is missing");
    let count = client.get_index(proto::GetIndexRequest { name: "live".into() }).await.unwrap().into_inner().items;
    assert!(count as usize >= before.len() && count as usize <= before.len() + during, "{count}");
    // A restored index answers queries and takes writes.
    let hits = client.query(query_id("live", &before[0], 5)).await.unwrap().into_inner().hits;
    assert!(!hits.is_empty());
    ingest(&mut client, vec![batch("live", 1, vec![vector_item("new", "l", &[0.5; DIM])])]).await.unwrap();

    // A restore never overwrites a data directory, and needs a complete backup.
    let refused = Command::new(env!("CARGO_BIN_EXE_imagelsh"))
        .args(["restore", "--from", backup.to_str().unwrap(), "--data-dir", restored.to_str().unwrap()])
        .output()
        .unwrap();
    assert!(!refused.status.success() && String::from_utf8_lossy(&refused.stderr).contains("not empty"));
    std::fs::remove_file(backup.join("imagelsh-backup.json")).unwrap();
    let partial = Command::new(env!("CARGO_BIN_EXE_imagelsh"))
        .args(["restore", "--from", backup.to_str().unwrap(), "--data-dir", dir.path().join("x").to_str().unwrap()])
        .output()
        .unwrap();
    assert!(!partial.status.success() && String::from_utf8_lossy(&partial.stderr).contains("not a complete backup"));
}

#[tokio::test(flavor = "multi_thread")]
async fn an_offline_backup_restores_the_same_items() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    let server = TestServer::start(&data);
    let mut client = server.client().await;
    create(&mut client, "live", DIM as u32, 8, 4).await;
    let vectors = clustered(500, DIM, 5, 0.1, 1);
    let items: Vec<_> = vectors.iter().enumerate().map(|(i, v)| vector_item(format!("v{i}"), "l", v)).collect();
    ingest(&mut client, vec![batch("live", 1, items)]).await.unwrap();
    let answer = client.query(query_id("live", "v3", 10)).await.unwrap().into_inner();
    drop(client);
    server.terminate();
    server.wait(Duration::from_secs(30));

    let backup = dir.path().join("backup");
    imagelsh(&["backup", "--data-dir", data.to_str().unwrap(), "--to", backup.to_str().unwrap()]);
    let restored = dir.path().join("restored");
    imagelsh(&["restore", "--from", backup.to_str().unwrap(), "--data-dir", restored.to_str().unwrap()]);
    let again = TestServer::start(&restored);
    let mut client = again.client().await;
    assert_eq!(client.query(query_id("live", "v3", 10)).await.unwrap().into_inner(), answer, "the same answers");
}

/// Bytes a file takes on disk (allocated blocks) and its length.
fn disk_and_length(path: &std::path::Path) -> (u64, u64) {
    use std::os::unix::fs::MetadataExt;
    let meta = std::fs::metadata(path).unwrap();
    (meta.blocks() * 512, meta.len())
}

/// The embedding file of the one index under `dir`.
fn embedding_file(dir: &std::path::Path) -> std::path::PathBuf {
    let mut files = std::fs::read_dir(dir.join("vectors")).unwrap().map(|e| e.unwrap().path());
    files.find(|p| p.extension().is_some_and(|x| x == "f32")).expect("an embedding file")
}

/// Replaced items' records are holes in the embedding file; a backup, taken offline or
/// streamed from a running server, keeps them holes instead of writing them out as zeros.
#[tokio::test(flavor = "multi_thread")]
async fn backups_of_a_churned_index_keep_its_holes() {
    const WIDE: usize = 1024;
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    let server = TestServer::start(&data);
    let mut client = server.client().await;
    create(&mut client, "churn", WIDE as u32, 8, 4).await;
    let mut rng = Rng::new(11);
    for round in 0..4u64 {
        let items: Vec<_> = (0..300)
            .map(|i| {
                let v: Vec<f32> = (0..WIDE).map(|_| rng.unit() - 0.5).collect();
                vector_item(format!("c{i}"), "l", &v)
            })
            .collect();
        ingest(&mut client, vec![batch("churn", round, items)]).await.unwrap();
    }
    drop(client);
    // A clean stop applies everything and frees the replaced items' records.
    server.terminate();
    server.wait(Duration::from_secs(30));
    let (disk, length) = disk_and_length(&embedding_file(&data));
    assert!(disk * 2 < length, "the source has holes: {disk} bytes on disk of {length}");

    let offline = dir.path().join("offline");
    imagelsh(&["backup", "--data-dir", data.to_str().unwrap(), "--to", offline.to_str().unwrap()]);
    let server = TestServer::start(&data);
    let online = dir.path().join("online");
    let url = format!("http://{}", server.addr);
    let to = online.to_str().unwrap().to_string();
    tokio::task::spawn_blocking(move || imagelsh(&["backup", "--server", &url, "--to", &to])).await.unwrap();
    for backup in [&offline, &online] {
        let (copy_disk, copy_length) = disk_and_length(&embedding_file(backup));
        assert_eq!(copy_length, length, "{}", backup.display());
        assert!(copy_disk <= disk + (64 << 10), "{}: {copy_disk} bytes on disk, the source {disk}", backup.display());
    }
    let restored = dir.path().join("restored");
    imagelsh(&["restore", "--from", online.to_str().unwrap(), "--data-dir", restored.to_str().unwrap()]);
    drop(server);
    let again = TestServer::start(&restored);
    let mut client = again.client().await;
    assert_eq!(
        client.get_index(proto::GetIndexRequest { name: "churn".into() }).await.unwrap().into_inner().items,
        300
    );
    assert_eq!(client.query(query_id("churn", "c7", 3)).await.unwrap().into_inner().hits.len(), 3);
}
