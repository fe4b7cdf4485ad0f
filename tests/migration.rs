//! On-disk layout upgrades with a real data directory written by an older imagelsh.

mod common;

use std::path::Path;
use std::process::Command;

use common::*;
use imagelsh::proto;

/// Unpacks `tests/fixtures/layout-v1.tar.gz` (see tests/fixtures/README.md) into `dir`.
fn unpack_v1(dir: &Path) {
    let status = Command::new("tar")
        .args(["xzf", concat!(env!("CARGO_MANIFEST_DIR"), "/tests/fixtures/layout-v1.tar.gz"), "-C"])
        .arg(dir)
        .status()
        .unwrap();
    assert!(status.success());
}

async fn check_legacy_index(server: &TestServer) {
    let mut client = server.client().await;
    let info = client.get_index(proto::GetIndexRequest { name: "legacy".into() }).await.unwrap().into_inner();
    assert_eq!((info.items, info.dim, info.hash_bits, info.tables, info.centered), (200, 32, 10, 6, false));
    let vectors = clustered(200, 32, 4, 0.05, 11);
    for i in [0usize, 57, 199] {
        let hits = client.query(query_vector("legacy", &vectors[i], 200)).await.unwrap().into_inner().hits;
        let own = hits.iter().find(|h| h.id == format!("v{i}")).expect("an item finds itself");
        assert_eq!(own.votes, 6, "same codes as when it was written");
        assert_eq!(hits[0].votes, 6);
    }
    let by_id = client.query(query_id("legacy", "v5", 5)).await.unwrap().into_inner().hits;
    assert!(by_id.iter().all(|h| h.label == "c1"), "{by_id:?}");
}

#[tokio::test(flavor = "multi_thread")]
async fn migrate_upgrades_a_version_1_directory() {
    let dir = tempfile::tempdir().unwrap();
    unpack_v1(dir.path());
    let out =
        Command::new(env!("CARGO_BIN_EXE_imagelsh")).args(["migrate", "--data-dir"]).arg(dir.path()).output().unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(stdout.contains("applied layout version 2"), "{stdout}");
    assert!(stdout.contains("applied layout version 3"), "{stdout}");
    // A second run has nothing to do.
    let out =
        Command::new(env!("CARGO_BIN_EXE_imagelsh")).args(["migrate", "--data-dir"]).arg(dir.path()).output().unwrap();
    assert!(String::from_utf8_lossy(&out.stdout).contains("nothing to do"));
    check_legacy_index(&TestServer::start(dir.path())).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn serve_upgrades_a_version_1_directory_at_open() {
    let dir = tempfile::tempdir().unwrap();
    unpack_v1(dir.path());
    let server = TestServer::start(dir.path());
    check_legacy_index(&server).await;
    // New writes land next to the old ones.
    let mut client = server.client().await;
    let responses =
        ingest(&mut client, vec![batch("legacy", 2, vec![vector_item("new", "c9", &[0.5; 32])])]).await.unwrap();
    assert_eq!(responses[0].indexed, 1);
}

#[test]
fn a_newer_layout_is_refused_with_a_clear_message() {
    let dir = tempfile::tempdir().unwrap();
    {
        let db = sled::open(dir.path().join("sled")).unwrap();
        imagelsh::store::migrate::force_version(&db, imagelsh::store::migrate::CURRENT_VERSION + 1).unwrap();
    }
    let out = Command::new(env!("CARGO_BIN_EXE_imagelsh"))
        .args(["serve", "--no-model", "--listen", "127.0.0.1:0", "--http-listen", "off", "--data-dir"])
        .arg(dir.path())
        .env("RUST_BACKTRACE", "0")
        .output()
        .unwrap();
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("newer than version"), "{stderr}");
}
