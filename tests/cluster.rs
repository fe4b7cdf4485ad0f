//! The cluster store (`serve --store redis://…`) against a real 3+3 Valkey/Redis Cluster on
//! loopback: the same service contract as the embedded store (one suite, run on both), two
//! replicas sharing one index, a primary and a replica killed mid-ingest, a create and an ingest
//! killed halfway, and `check`.

mod common;

use std::collections::HashSet;
use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use common::cluster::TestCluster;
use common::*;
use imagelsh::proto::image_index_client::ImageIndexClient;
use imagelsh::proto::{self, GetItemsRequest};
use tonic::Code;
use tonic::transport::Channel;

const DIM: usize = 32;

fn cluster_server(dir: &Path, cluster: &TestCluster, extra: &[&str]) -> TestServer {
    let mut args = vec!["--no-model", "--store", cluster.url.as_str()];
    args.extend_from_slice(extra);
    TestServer::start_with(dir, &args)
}

async fn found(client: &mut ImageIndexClient<Channel>, index: &str, ids: &[String]) -> proto::GetItemsResponse {
    client
        .get_items(GetItemsRequest { index: index.into(), ids: ids.to_vec(), ..Default::default() })
        .await
        .expect("get items")
        .into_inner()
}

/// The service's contract as one scenario, writes through `a` and reads through `b` (the
/// same server for the embedded store): create, ingest, queries by vector and id, replace,
/// delete, refusals, list, drop.
async fn contract(a: &TestServer, b: &TestServer) {
    let (mut a, mut b) = (a.client().await, b.client().await);
    create(&mut a, "c", DIM as u32, 8, 8).await;
    let err = a
        .create_index(proto::CreateIndexRequest { name: "c".into(), dim: DIM as u32, ..Default::default() })
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::AlreadyExists);
    let vectors = clustered(300, DIM, 10, 0.05, 11);
    let items: Vec<_> = vectors.iter().enumerate().map(|(i, v)| vector_item(format!("i{i}"), "old", v)).collect();
    let batches: Vec<_> = items.chunks(64).enumerate().map(|(n, chunk)| batch("c", n as u64, chunk.to_vec())).collect();
    let acks = ingest(&mut a, batches).await.expect("ingest");
    assert_eq!(acks.iter().map(|r| r.indexed).sum::<u32>(), 300);

    let info = b.get_index(proto::GetIndexRequest { name: "c".into() }).await.expect("get index").into_inner();
    assert_eq!(info.items, 300);
    // Every item is its own nearest neighbour, read through the other server.
    for (i, v) in vectors.iter().enumerate().step_by(7) {
        let hits = b.query(query_vector("c", v, 5)).await.expect("query").into_inner().hits;
        assert_eq!(hits[0].id, format!("i{i}"), "query {i}");
        assert!(hits[0].similarity > 0.999, "{}", hits[0].similarity);
        assert!(hits[0].votes >= 1);
    }
    // By id: the item itself is left out, its cluster-mates come first.
    let hits = b.query(query_id("c", "i0", 5)).await.expect("query by id").into_inner().hits;
    assert!(!hits.iter().any(|h| h.id == "i0"));
    assert_eq!(hits.len(), 5);

    // Replace (the later of two items with one id in a batch wins) and delete through `b`.
    let fresh = clustered(1, DIM, 1, 0.0, 99).remove(0);
    let replace = vec![vector_item("i1", "stale", &vectors[2]), vector_item("i1", "new", &fresh)];
    let acks = ingest(&mut b, vec![batch("c", 100, replace)]).await.expect("replace");
    assert_eq!(acks[0].indexed, 2);
    let deleted = b
        .delete(proto::DeleteRequest { index: "c".into(), ids: vec!["i3".into(), "i3".into(), "nope".into()] })
        .await
        .expect("delete")
        .into_inner()
        .deleted;
    assert_eq!(deleted, 1);
    // Seen through `a`.
    let got = found(&mut a, "c", &["i1".into(), "i3".into(), "i4".into()]).await;
    assert_eq!(got.missing, ["i3"]);
    let labels: Vec<(&str, &str)> = got.items.iter().map(|i| (i.id.as_str(), i.label.as_str())).collect();
    assert_eq!(labels, [("i1", "new"), ("i4", "old")]);
    let hits = a.query(query_vector("c", &fresh, 3)).await.expect("query").into_inner().hits;
    assert_eq!((hits[0].id.as_str(), hits[0].label.as_str()), ("i1", "new"));
    let hits = a.query(query_vector("c", &vectors[1], 10)).await.expect("query").into_inner().hits;
    assert!(!hits.iter().any(|h| h.id == "i1" && h.label == "old"), "the replaced item is gone");
    let hits = a.query(query_vector("c", &vectors[3], 10)).await.expect("query").into_inner().hits;
    assert!(!hits.iter().any(|h| h.id == "i3"), "the deleted item is gone");
    let info = a.get_index(proto::GetIndexRequest { name: "c".into() }).await.expect("get index").into_inner();
    assert_eq!(info.items, 299);

    // A bad item is refused alone.
    let bad = vec![vector_item("short", "", &[1.0; 3]), vector_item("ok", "", &vectors[5])];
    let acks = ingest(&mut a, vec![batch("c", 101, bad)]).await.expect("ingest");
    assert_eq!((acks[0].indexed, acks[0].errors.len()), (1, 1));
    let unknown = b.query(query_vector("nope", &vectors[0], 3)).await.unwrap_err();
    assert_eq!(unknown.code(), Code::NotFound);

    let names: Vec<String> = b
        .list_indexes(proto::ListIndexesRequest {})
        .await
        .expect("list")
        .into_inner()
        .indexes
        .into_iter()
        .map(|i| i.name)
        .collect();
    assert_eq!(names, ["c"]);
    b.drop_index(proto::DropIndexRequest { name: "c".into() }).await.expect("drop");
    let gone = a.query(query_vector("c", &vectors[0], 3)).await.unwrap_err();
    assert_eq!(gone.code(), Code::NotFound);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_embedded_store_keeps_the_contract() {
    let dir = tempfile::tempdir().unwrap();
    let server = TestServer::start(dir.path());
    contract(&server, &server).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_replicas_on_the_cluster_store_keep_the_contract_and_a_restart_serves_at_once() {
    let dir = tempfile::tempdir().unwrap();
    let cluster = TestCluster::start(&dir.path().join("cluster"), "everysec");
    let a = cluster_server(&dir.path().join("a"), &cluster, &[]);
    let mut b = cluster_server(&dir.path().join("b"), &cluster, &[]);
    contract(&a, &b).await;

    // A replica holds nothing another needs: a new one answers its first call from the cluster.
    let mut client = a.client().await;
    create(&mut client, "r", DIM as u32, 8, 8).await;
    let vectors = clustered(50, DIM, 5, 0.05, 3);
    let items = vectors.iter().enumerate().map(|(i, v)| vector_item(format!("r{i}"), "", v)).collect();
    ingest(&mut client, vec![batch("r", 1, items)]).await.expect("ingest");
    b.terminate();
    b.wait_exit(Duration::from_secs(30));
    let started = Instant::now();
    let b = cluster_server(&dir.path().join("b"), &cluster, &[]);
    let hits = b.client().await.query(query_vector("r", &vectors[7], 1)).await.expect("query").into_inner().hits;
    assert_eq!(hits[0].id, "r7");
    eprintln!("restarted replica: start to first answer {} ms", started.elapsed().as_millis());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_7_0_keeps_the_contract_at_the_replica_level_and_refuses_replica_fsync() {
    let dir = tempfile::tempdir().unwrap();
    let cluster = TestCluster::start_redis(&dir.path().join("cluster"), "everysec");
    // Redis 7.0 has WAIT but no WAITAOF: a server asked for replica-fsync refuses to start.
    let out = Command::new(env!("CARGO_BIN_EXE_imagelsh"))
        .args(["serve", "--no-model", "--listen", "127.0.0.1:0", "--http-listen", "off", "--ack", "replica-fsync"])
        .args(["--store", &cluster.url])
        .output()
        .expect("run imagelsh serve");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success() && stderr.contains("WAITAOF"), "{stderr}");
    let server = cluster_server(&dir.path().join("a"), &cluster, &["--ack", "replica"]);
    contract(&server, &server).await;
}

/// Ingests `n` items in batches of `per_batch` over one stream per batch, retrying a batch
/// while the server answers UNAVAILABLE; returns the ids acknowledged.
async fn ingest_with_retries(
    client: &mut ImageIndexClient<Channel>,
    index: &str,
    vectors: &[Vec<f32>],
    per_batch: usize,
    during: &mut dyn FnMut(usize),
) -> Vec<String> {
    let mut acked = Vec::new();
    for (n, chunk) in vectors.chunks(per_batch).enumerate() {
        during(n);
        let items: Vec<_> =
            chunk.iter().enumerate().map(|(i, v)| vector_item(format!("k{}", n * per_batch + i), "", v)).collect();
        let started = Instant::now();
        loop {
            match ingest(client, vec![batch(index, n as u64, items.clone())]).await {
                Ok(acks) => {
                    assert_eq!(acks[0].indexed as usize, items.len());
                    acked.extend(items.iter().map(|i| i.id.clone()));
                    break;
                }
                Err(status) if status.code() == Code::Unavailable => {
                    assert!(started.elapsed() < Duration::from_secs(60), "batch {n} refused for a minute: {status}");
                    tokio::time::sleep(Duration::from_millis(200)).await;
                }
                Err(status) => panic!("batch {n}: {status}"),
            }
        }
    }
    acked
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn writes_acknowledged_at_replica_fsync_survive_a_primary_killed_mid_ingest() {
    let dir = tempfile::tempdir().unwrap();
    // `always`: WAITAOF answers at once (with everysec it waits for the replica's next fsync).
    let cluster = TestCluster::start(&dir.path().join("cluster"), "always");
    let server = cluster_server(&dir.path().join("a"), &cluster, &["--ack", "replica-fsync"]);
    let mut client = server.client().await;
    create(&mut client, "f", DIM as u32, 8, 8).await;
    let vectors = clustered(1200, DIM, 40, 0.05, 5);
    let primary = cluster.base;
    let (mut killed_at, mut restart) = (None, None);
    let acked = ingest_with_retries(&mut client, "f", &vectors, 40, &mut |n| {
        if n == 10 {
            cluster.kill(primary);
            killed_at = Some(Instant::now());
            // Its replica is promoted (node timeout 2 s) but has no replica of its own, so
            // `min-replicas-to-write 1` refuses writes there (UNAVAILABLE, retried) until the
            // killed node is back, as its replica.
            restart = Some(cluster.restart_after(primary, Duration::from_secs(5)));
        }
    })
    .await;
    assert_eq!(acked.len(), 1200);
    eprintln!("ingest finished {} ms after the primary was killed", killed_at.map_or(0, |t| t.elapsed().as_millis()));
    assert!(restart.expect("the primary was killed").join().expect("restart thread"), "the killed node restarted");
    cluster.wait_healthy();
    let got = found(&mut client, "f", &acked).await;
    assert!(
        got.missing.is_empty(),
        "{} acknowledged ids lost: {:?}",
        got.missing.len(),
        &got.missing[..got.missing.len().min(5)]
    );
    let info = client.get_index(proto::GetIndexRequest { name: "f".into() }).await.expect("get index").into_inner();
    assert_eq!(info.items, 1200);
    for (i, v) in vectors.iter().enumerate().step_by(37) {
        let hits = client.query(query_vector("f", v, 1)).await.expect("query").into_inner().hits;
        assert_eq!(hits[0].id, format!("k{i}"));
    }
    // Nothing half-visible: the check finds no damage (orphans of retried batches are invisible).
    let out = check(&cluster, false);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stdout));
}

fn check(cluster: &TestCluster, repair: bool) -> std::process::Output {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_imagelsh"));
    cmd.args(["check", "--store", &cluster.url, "--orphan-grace-secs", "0"]);
    if repair {
        cmd.arg("--repair");
    }
    let out = cmd.output().expect("run imagelsh check");
    eprintln!("{}", String::from_utf8_lossy(&out.stdout));
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_ingest_killed_before_its_commit_leaves_nothing_visible_and_check_repair_removes_it() {
    let dir = tempfile::tempdir().unwrap();
    let cluster = TestCluster::start(&dir.path().join("cluster"), "everysec");
    let vectors = clustered(100, DIM, 5, 0.05, 8);
    {
        let server = cluster_server(&dir.path().join("a"), &cluster, &[]);
        let mut client = server.client().await;
        create(&mut client, "o", DIM as u32, 8, 8).await;
        let items = vectors[..50].iter().enumerate().map(|(i, v)| vector_item(format!("o{i}"), "", v)).collect();
        ingest(&mut client, vec![batch("o", 1, items)]).await.expect("ingest");
    }
    // The second batch's buckets and records are written, then the server dies before its
    // ids name them.
    let mut server = TestServer::start_with_env(
        &dir.path().join("b"),
        &["--no-model", "--store", &cluster.url],
        &[("IMAGELSH_CRASH_AT", "cluster-records-written:1")],
    );
    let mut client = server.client().await;
    let items = vectors[50..].iter().enumerate().map(|(i, v)| vector_item(format!("o{}", 50 + i), "", v)).collect();
    assert!(ingest(&mut client, vec![batch("o", 2, items)]).await.is_err(), "the crash answers no ack");
    server.wait_exit(Duration::from_secs(10)).expect("the server crashed");

    let server = cluster_server(&dir.path().join("c"), &cluster, &[]);
    let mut client = server.client().await;
    for v in &vectors[50..] {
        let hits = client.query(query_vector("o", v, 10)).await.expect("query").into_inner().hits;
        let ids: HashSet<String> = hits.into_iter().map(|h| h.id).collect();
        assert!(
            ids.iter().all(|id| id[1..].parse::<usize>().is_ok_and(|n| n < 50)),
            "an unacknowledged item is visible: {ids:?}"
        );
    }
    let before = check(&cluster, false);
    let text = String::from_utf8_lossy(&before.stdout).to_string();
    assert!(
        text.contains("50 items") && text.contains("50 orphan records") && text.contains("400 stale entries"),
        "{text}"
    );
    // Orphans are no damage: the check passes, and repair removes them.
    assert!(before.status.success());
    let repaired = check(&cluster, true);
    assert!(String::from_utf8_lossy(&repaired.stdout).contains("repaired"));
    let after = String::from_utf8_lossy(&check(&cluster, false).stdout).to_string();
    assert!(after.contains("0 orphan records, 0 stale entries, 0 ids without records, 0 missing entries"), "{after}");
    let info = client.get_index(proto::GetIndexRequest { name: "o".into() }).await.expect("get index").into_inner();
    assert_eq!(info.items, 50);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_commit_sent_again_after_a_delete_does_not_bring_the_id_back() {
    use imagelsh::store::cluster::{commit_command, keys};
    let dir = tempfile::tempdir().unwrap();
    let cluster = TestCluster::start(&dir.path().join("cluster"), "everysec");
    let server = cluster_server(&dir.path().join("a"), &cluster, &[]);
    let mut client = server.client().await;
    create(&mut client, "t", DIM as u32, 8, 8).await;
    let vectors = clustered(10, DIM, 2, 0.05, 3);
    let items: Vec<_> = vectors.iter().enumerate().map(|(i, v)| vector_item(format!("d{i}"), "", v)).collect();
    ingest(&mut client, vec![batch("t", 1, items.clone())]).await.expect("ingest");

    let seeds: Vec<String> =
        cluster.url.trim_start_matches("redis://").split(',').map(|node| format!("redis://{node}")).collect();
    let mut redis = redis::cluster::ClusterClient::new(seeds).unwrap().get_async_connection().await.unwrap();
    // The first index of a new cluster has uid 1.
    let key = keys::id(1, "d0");
    let get = |redis: &mut redis::cluster_async::ClusterConnection| {
        let key = key.clone();
        let mut redis = redis.clone();
        async move { redis::cmd("GET").arg(&key).query_async::<Option<String>>(&mut redis).await.unwrap() }
    };
    let number: u32 = get(&mut redis).await.expect("d0 is named").parse().unwrap();

    let deleted = client
        .delete(proto::DeleteRequest { index: "t".into(), ids: vec!["d0".into()] })
        .await
        .expect("delete")
        .into_inner();
    assert_eq!(deleted.deleted, 1);
    assert_eq!(get(&mut redis).await, Some(format!("-{number}")), "a tombstone");
    let ttl: i64 = redis::cmd("TTL").arg(&key).query_async(&mut redis).await.unwrap();
    assert!(ttl > 0 && ttl <= keys::TOMBSTONE_SECS as i64, "{ttl}");

    // The acknowledged batch's commit of d0 arrives again (a reply lost, a pipeline re-sent).
    let (held, set): (i64, i64) = commit_command(&key, number).query_async(&mut redis).await.unwrap();
    assert_eq!((held, set), (-i64::from(number), 0), "the tombstone refuses it");
    assert!(found(&mut client, "t", &["d0".into()]).await.items.is_empty(), "d0 stays deleted");
    let hits = client.query(query_vector("t", &vectors[0], 10)).await.expect("query").into_inner().hits;
    assert!(hits.iter().all(|h| h.id != "d0"), "{hits:?}");
    let info = client.get_index(proto::GetIndexRequest { name: "t".into() }).await.expect("get index").into_inner();
    assert_eq!(info.items, 9);

    // Ingested again, the id is taken by its new item, and the key keeps no expiry.
    ingest(&mut client, vec![batch("t", 2, items[..1].to_vec())]).await.expect("ingest again");
    assert_eq!(found(&mut client, "t", &["d0".into()]).await.items.len(), 1);
    let again: u32 = get(&mut redis).await.expect("d0 is named").parse().unwrap();
    assert!(again > number);
    let ttl: i64 = redis::cmd("TTL").arg(&key).query_async(&mut redis).await.unwrap();
    assert_eq!(ttl, -1);
    let info = client.get_index(proto::GetIndexRequest { name: "t".into() }).await.expect("get index").into_inner();
    assert_eq!(info.items, 10);

    // Damage: d0's records lost (as a failover losing them would). `check` reports an id
    // without records; `--repair` leaves a tombstone in its place, and the count follows.
    let mut unlink = redis::cmd("UNLINK");
    for part in keys::Part::ALL {
        unlink.arg(keys::item(1, again, part));
    }
    let _: i64 = unlink.query_async(&mut redis).await.unwrap();
    let damaged = check(&cluster, false);
    let text = String::from_utf8_lossy(&damaged.stdout).to_string();
    assert!(!damaged.status.success() && text.contains("1 ids without records"), "{text}");
    assert!(check(&cluster, true).status.success());
    assert_eq!(get(&mut redis).await, Some(format!("-{again}")), "a tombstone");
    let after = String::from_utf8_lossy(&check(&cluster, false).stdout).to_string();
    assert!(after.contains("9 items") && after.contains("0 ids without records"), "{after}");
    let info = client.get_index(proto::GetIndexRequest { name: "t".into() }).await.expect("get index").into_inner();
    assert_eq!(info.items, 9);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_create_killed_before_its_catalog_entry_leaves_keys_that_check_repair_removes() {
    let dir = tempfile::tempdir().unwrap();
    let cluster = TestCluster::start(&dir.path().join("cluster"), "everysec");
    let server = cluster_server(&dir.path().join("a"), &cluster, &[]);
    let mut client = server.client().await;
    create(&mut client, "kept", DIM as u32, 8, 8).await;
    let vectors = clustered(40, DIM, 4, 0.05, 9);
    let items = vectors.iter().enumerate().map(|(i, v)| vector_item(format!("k{i}"), "", v)).collect();
    ingest(&mut client, vec![batch("kept", 1, items)]).await.expect("ingest");

    // Another replica dies after writing an index's matrices, before its catalog entry.
    let mut crashing = TestServer::start_with_env(
        &dir.path().join("b"),
        &["--no-model", "--store", &cluster.url],
        &[("IMAGELSH_CRASH_AT", "cluster-create-matrices-written:1")],
    );
    let created = crashing
        .client()
        .await
        .create_index(proto::CreateIndexRequest { name: "lost".into(), dim: DIM as u32, ..Default::default() })
        .await;
    assert!(created.is_err(), "the crash answers no create");
    crashing.wait_exit(Duration::from_secs(10)).expect("the server crashed");
    let err = client.get_index(proto::GetIndexRequest { name: "lost".into() }).await.unwrap_err();
    assert_eq!(err.code(), Code::NotFound);

    // Found by the pass over every key (no catalog entry leads to them), no damage.
    let before = check(&cluster, false);
    let text = String::from_utf8_lossy(&before.stdout).to_string();
    assert!(before.status.success(), "{text}");
    assert!(text.contains("keys without a catalog entry: ") && text.contains(" under uid "), "{text}");
    let repaired = String::from_utf8_lossy(&check(&cluster, true).stdout).to_string();
    assert!(repaired.contains("removed") && !repaired.contains("; 0 removed"), "{repaired}");
    let after = String::from_utf8_lossy(&check(&cluster, false).stdout).to_string();
    assert!(after.contains("keys without a catalog entry: none"), "{after}");
    // The catalogued index kept every key.
    assert!(after.contains("\"kept\": 40 items") && after.contains("0 orphan records, 0 stale entries"), "{after}");
    let hits = client.query(query_vector("kept", &vectors[3], 5)).await.expect("query").into_inner().hits;
    assert_eq!(hits[0].id, "k3");
    // The name was never taken: it can be created.
    create(&mut client, "lost", DIM as u32, 8, 8).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_bulk_job_over_two_replicas_finishes_through_one_when_the_other_is_killed() {
    const IMAGES: u64 = 240;
    let dir = tempfile::tempdir().unwrap();
    let cluster = TestCluster::start(&dir.path().join("cluster"), "everysec");
    let store = ["--store", cluster.url.as_str()];
    let a = TestServer::start_with_model(&dir.path().join("a"), &store);
    let b = TestServer::start_with_model(&dir.path().join("b"), &store);
    let photos = class_folders(dir.path(), IMAGES as usize);
    let servers = format!("http://{},http://{}", a.addr, b.addr);
    let job = Command::new(env!("CARGO_BIN_EXE_imagelsh"))
        .args(["ingest", "--server", &servers, "--index", "two", "--json", "--streams", "4", "--batch-items", "8"])
        .args(["--max-retries", "30", "--refused-file"])
        .arg(dir.path().join("refused.jsonl"))
        .arg(&photos)
        .env("RUST_LOG", "warn")
        .stdout(std::process::Stdio::piped())
        .spawn()
        .expect("start imagelsh ingest");
    let mut client = a.client().await;
    wait_for_items(&mut client, "two", IMAGES / 4).await;
    // Paused first: the job cannot finish before the kill, however fast the machine.
    b.pause();
    b.kill();
    let (code, summary) = finish(job, Duration::from_secs(300));
    assert_eq!(code, 0, "{summary}");
    assert!(number(&summary, "retries") >= 1, "the job saw a replica go: {summary}");
    // Every image but the file that is not one.
    assert_eq!(number(&summary, "indexed"), IMAGES, "{summary}");
    assert_eq!(items_in(&mut client, "two").await, IMAGES);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_replicas_writing_the_same_ids_at_once_leave_each_id_naming_one_whole_item() {
    let dir = tempfile::tempdir().unwrap();
    let cluster = TestCluster::start(&dir.path().join("cluster"), "everysec");
    let a = cluster_server(&dir.path().join("a"), &cluster, &[]);
    let b = cluster_server(&dir.path().join("b"), &cluster, &[]);
    let mut client = a.client().await;
    create(&mut client, "same", DIM as u32, 8, 8).await;
    let vectors = clustered(64, DIM, 8, 0.05, 21);
    // Each replica writes every id 10 times over, with its own label, at the same time.
    let write = |server: &TestServer, label: &'static str| {
        let addr = server.addr.clone();
        let vectors = vectors.clone();
        tokio::spawn(async move {
            let mut client = lazy_client(&addr);
            for round in 0..10u64 {
                let items = vectors.iter().enumerate().map(|(i, v)| vector_item(format!("s{i}"), label, v)).collect();
                ingest(&mut client, vec![batch("same", round, items)]).await.expect("ingest");
            }
        })
    };
    let (from_a, from_b) = (write(&a, "a"), write(&b, "b"));
    from_a.await.unwrap();
    from_b.await.unwrap();
    let ids: Vec<String> = (0..64).map(|i| format!("s{i}")).collect();
    let got = found(&mut client, "same", &ids).await;
    assert!(got.missing.is_empty(), "ids lost: {:?}", got.missing);
    let info = client.get_index(proto::GetIndexRequest { name: "same".into() }).await.expect("get index").into_inner();
    assert_eq!(info.items, 64, "the count");
    for (i, v) in vectors.iter().enumerate() {
        let hits = client.query(query_vector("same", v, 3)).await.expect("query").into_inner().hits;
        assert_eq!(hits[0].id, format!("s{i}"));
        assert_eq!(hits.iter().filter(|h| h.id == hits[0].id).count(), 1, "one item per id: {hits:?}");
    }
    // No id names an item without records, nothing is missing from a bucket.
    let out = check(&cluster, false);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stdout));
}
