//! `imagelsh check` and `imagelsh compact` on a real data directory: a clean directory checks
//! ok, a damaged embedding is found and repaired, compaction keeps every item, and a directory
//! a server holds is refused with a message saying so.

mod common;

use std::process::{Command, Output};
use std::time::Duration;

use common::*;
use imagelsh::proto;

const DIM: usize = 32;

fn imagelsh(args: &[&str], dir: &std::path::Path) -> Output {
    Command::new(env!("CARGO_BIN_EXE_imagelsh"))
        .args(args)
        .arg("--data-dir")
        .arg(dir)
        .env("RUST_LOG", "warn")
        .output()
        .expect("run imagelsh")
}

fn text(out: &Output) -> String {
    format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr))
}

async fn items(server: &TestServer) -> u64 {
    let mut client = server.client().await;
    client.get_index(proto::GetIndexRequest { name: "m".into() }).await.unwrap().into_inner().items
}

#[tokio::test(flavor = "multi_thread")]
async fn check_finds_and_repairs_a_damaged_embedding_and_compact_keeps_every_item() {
    let dir = tempfile::tempdir().unwrap();
    let server = TestServer::start(dir.path());
    let mut client = server.client().await;
    create(&mut client, "m", DIM as u32, 8, 4).await;
    let vectors = clustered(300, DIM, 5, 0.1, 3);
    let load = |range: std::ops::Range<usize>, label: &str| {
        range.map(|n| vector_item(format!("i{n}"), label, &vectors[n])).collect::<Vec<_>>()
    };
    ingest(&mut client, vec![batch("m", 0, load(0..300, "a")), batch("m", 1, load(0..50, "b"))]).await.unwrap();
    let ids: Vec<String> = (250..300).map(|n| format!("i{n}")).collect();
    client.delete(proto::DeleteRequest { index: "m".into(), ids }).await.unwrap();
    server.terminate();
    assert!(server.wait(Duration::from_secs(30)).success());

    let out = imagelsh(&["check"], dir.path());
    assert!(out.status.success(), "{}", text(&out));
    assert!(text(&out).contains("250 items") && text(&out).contains("0 problems"), "{}", text(&out));

    let out = imagelsh(&["compact"], dir.path());
    assert!(out.status.success(), "{}", text(&out));
    assert!(text(&out).contains("database rewritten"), "{}", text(&out));
    let out = imagelsh(&["check"], dir.path());
    assert!(out.status.success(), "after compact: {}", text(&out));

    // Item 320 is "i20" as loaded the second time (items 300..350 replaced i0..i49).
    let vector_file = std::fs::read_dir(dir.path().join("vectors"))
        .unwrap()
        .flatten()
        .map(|e| e.path())
        .find(|p| p.extension().is_some_and(|e| e == "f32"))
        .unwrap();
    let record = 4 + 4 * DIM + 4;
    let mut bytes = std::fs::read(&vector_file).unwrap();
    bytes[320 * record + 10] ^= 0xff;
    std::fs::write(&vector_file, bytes).unwrap();

    let out = imagelsh(&["check"], dir.path());
    assert_eq!(out.status.code(), Some(2), "{}", text(&out));
    assert!(text(&out).contains("embedding of item 320 (\"i20\") fails its checksum"), "{}", text(&out));
    let out = imagelsh(&["check", "--repair"], dir.path());
    assert!(out.status.success(), "{}", text(&out));
    assert!(text(&out).contains("repaired"), "{}", text(&out));
    let out = imagelsh(&["check"], dir.path());
    assert!(out.status.success(), "after repair: {}", text(&out));
    assert!(text(&out).contains("249 items"), "{}", text(&out));

    let server = TestServer::start(dir.path());
    assert_eq!(items(&server).await, 249);
    let mut client = server.client().await;
    let hits = client.query(query_vector("m", &vectors[21], 1)).await.unwrap().into_inner().hits;
    assert_eq!((hits[0].id.as_str(), hits[0].label.as_str()), ("i21", "b"));
    // The server holds the directory: an offline command says so instead of waiting forever.
    let out = imagelsh(&["check"], dir.path());
    assert!(!out.status.success());
    assert!(text(&out).contains("in use by another process"), "{}", text(&out));
    server.terminate();
    assert!(server.wait(Duration::from_secs(30)).success());
}
