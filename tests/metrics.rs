//! The HTTP port of a real server: probes, and Prometheus metrics scraped and parsed after real
//! ingests and queries, the counters matching what was sent; and the JSON log's spans.

mod common;

use std::collections::HashMap;
use std::io::{Read, Write};
use std::time::Duration;

use common::*;
use imagelsh::proto::{self, Item};

/// A GET over HTTP/1.1 on a plain socket: status code and body.
fn get(addr: &str, path: &str, token: Option<&str>) -> (u16, String) {
    let mut socket = std::net::TcpStream::connect(addr).unwrap();
    socket.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
    let auth = token.map_or(String::new(), |t| format!("authorization: Bearer {t}\r\n"));
    write!(socket, "GET {path} HTTP/1.1\r\nhost: {addr}\r\n{auth}connection: close\r\n\r\n").unwrap();
    let mut response = String::new();
    socket.read_to_string(&mut response).unwrap();
    let (head, body) = response.split_once("\r\n\r\n").unwrap_or((&response, ""));
    let code = head.split_whitespace().nth(1).and_then(|c| c.parse().ok()).unwrap_or(0);
    (code, body.to_string())
}

/// Samples of the Prometheus text format: `name{labels}` → value.
fn samples(text: &str) -> HashMap<String, f64> {
    text.lines()
        .filter(|l| !l.starts_with('#') && !l.trim().is_empty())
        .filter_map(|l| {
            let (key, value) = l.rsplit_once(' ')?;
            Some((key.to_string(), value.parse().ok()?))
        })
        .collect()
}

fn sample(samples: &HashMap<String, f64>, key: &str) -> f64 {
    *samples.get(key).unwrap_or_else(|| {
        let mut near: Vec<&String> = samples.keys().filter(|k| k.starts_with(key.split('{').next().unwrap())).collect();
        near.sort();
        panic!("no sample {key}; {near:?}")
    })
}

#[tokio::test(flavor = "multi_thread")]
async fn metrics_count_what_was_ingested_and_queried() {
    let dir = tempfile::tempdir().unwrap();
    let server = TestServer::start_with_model(dir.path(), &[]);
    assert_eq!(get(&server.http_addr, "/healthz", None), (200, "ok\n".into()));
    assert_eq!(get(&server.http_addr, "/readyz", None), (200, "ready\n".into()));
    let mut client = server.client().await;
    client.create_index(proto::CreateIndexRequest { name: "m".into(), ..Default::default() }).await.unwrap();

    // 3 batches: 40 good images, 2 undecodable ones, and one item with no content.
    let pngs = fashion_mnist_pngs(40);
    let mut batches = Vec::new();
    for (b, chunk) in pngs.chunks(20).enumerate() {
        let items =
            chunk.iter().enumerate().map(|(i, (png, _))| image_item(format!("{b}-{i}"), "x", png.clone())).collect();
        batches.push(batch("m", b as u64, items));
    }
    let mut bad = vec![image_item("junk-1", "x", b"junk".to_vec()), image_item("junk-2", "x", vec![0xff, 0xd8])];
    bad.push(Item { id: "empty".into(), ..Default::default() });
    batches.push(batch("m", 9, bad));
    let acks = ingest(&mut client, batches).await.unwrap();
    assert_eq!(acks.iter().map(|a| a.indexed).sum::<u32>(), 40);
    for i in 0..5 {
        client.query(query_id("m", &format!("0-{i}"), 5)).await.unwrap();
    }
    let missing = client.query(query_id("nope", "a", 5)).await.unwrap_err();
    assert_eq!(missing.code(), tonic::Code::NotFound);

    let (code, text) = get(&server.http_addr, "/metrics", None);
    assert_eq!(code, 200, "{text}");
    let m = samples(&text);
    assert_eq!(sample(&m, r#"imagelsh_items_ingested_total{index="m"}"#), 40.0);
    assert_eq!(sample(&m, r#"imagelsh_items_refused_total{reason="image"}"#), 2.0);
    assert_eq!(sample(&m, r#"imagelsh_items_refused_total{reason="no_content"}"#), 1.0);
    assert_eq!(sample(&m, "imagelsh_ingest_batches_total"), 3.0);
    assert_eq!(sample(&m, "imagelsh_ingest_batch_items_count"), 3.0);
    assert_eq!(sample(&m, "imagelsh_ingest_batch_items_sum"), 43.0);
    assert_eq!(sample(&m, r#"imagelsh_ingest_batch_items_bucket{le="16"}"#), 1.0, "real buckets, not a summary");
    assert_eq!(sample(&m, r#"imagelsh_ingest_batch_items_bucket{le="64"}"#), 3.0);
    assert_eq!(sample(&m, r#"imagelsh_index_items{index="m"}"#), 40.0);
    assert_eq!(sample(&m, r#"imagelsh_calls_total{method="Ingest",code="OK"}"#), 1.0);
    assert_eq!(sample(&m, r#"imagelsh_calls_total{method="Query",code="OK"}"#), 5.0);
    assert_eq!(sample(&m, r#"imagelsh_calls_total{method="Query",code="NOT_FOUND"}"#), 1.0);
    assert_eq!(sample(&m, r#"imagelsh_calls_total{method="CreateIndex",code="OK"}"#), 1.0);
    assert_eq!(sample(&m, r#"imagelsh_open_streams{kind="ingest"}"#), 0.0, "the stream ended");
    // Each scan query counted in its plan's histogram, with buckets; candidates too.
    assert_eq!(sample(&m, r#"imagelsh_query_seconds_count{plan="scan"}"#), 5.0);
    assert_eq!(sample(&m, r#"imagelsh_query_seconds_bucket{plan="scan",le="+Inf"}"#), 5.0);
    assert_eq!(sample(&m, "imagelsh_query_candidates_count"), 5.0);
    assert_eq!(sample(&m, "imagelsh_query_candidates_sum"), 5.0 * 39.0, "all others scanned");
    // The model: 42 images went to it (the 2 undecodable ones never did), in batches.
    assert_eq!(sample(&m, "imagelsh_inference_batch_images_sum"), 40.0);
    assert!(sample(&m, "imagelsh_inference_seconds_count") >= 1.0);
    assert_eq!(sample(&m, "imagelsh_batcher_wait_seconds_count"), 40.0);
    assert!(m.contains_key("imagelsh_batcher_queue_depth"));
    assert!(m.contains_key(r#"imagelsh_log_lag_items{index="m"}"#));
    assert!(text.contains("# HELP imagelsh_items_ingested_total"), "described");
}

#[tokio::test(flavor = "multi_thread")]
async fn metrics_take_the_grpc_tokens_and_probes_stay_open() {
    let dir = tempfile::tempdir().unwrap();
    let server = TestServer::start_with_env(
        dir.path(),
        &["--no-model"],
        &[("IMAGELSH_TOKENS", "read:read-token-0123456789,write:write-token-0123456789")],
    );
    assert_eq!(get(&server.http_addr, "/healthz", None).0, 200);
    assert_eq!(get(&server.http_addr, "/readyz", None).0, 200);
    assert_eq!(get(&server.http_addr, "/metrics", None).0, 401);
    assert_eq!(get(&server.http_addr, "/metrics", Some("wrong")).0, 401);
    let refused = server.client().await.list_indexes(proto::ListIndexesRequest {}).await.unwrap_err();
    assert_eq!(refused.code(), tonic::Code::Unauthenticated);
    let (code, text) = get(&server.http_addr, "/metrics", Some("read-token-0123456789"));
    assert_eq!(code, 200);
    let m = samples(&text);
    assert_eq!(sample(&m, r#"imagelsh_calls_total{method="ListIndexes",code="UNAUTHENTICATED"}"#), 1.0);
    assert_eq!(get(&server.http_addr, "/nothing-here", Some("read-token-0123456789")).0, 404);
}

/// `--log-format json`: each event in its spans, a stream's batch (id and size) under its call
/// (the method), the model's batches in an `inference` span.
#[tokio::test(flavor = "multi_thread")]
async fn json_logs_carry_each_batch_inside_its_call() {
    let dir = tempfile::tempdir().unwrap();
    let log = dir.path().join("server.log");
    let server = TestServer::start_logging_to(
        &log,
        &dir.path().join("data"),
        &["--log-format", "json"],
        &[("RUST_LOG", "warn,imagelsh::api=debug,imagelsh::pipeline=trace")],
    );
    let mut client = server.client().await;
    client.create_index(proto::CreateIndexRequest { name: "t".into(), ..Default::default() }).await.unwrap();
    let pngs = fashion_mnist_pngs(12);
    let batches = pngs
        .chunks(6)
        .enumerate()
        .map(|(b, chunk)| {
            let items = chunk
                .iter()
                .enumerate()
                .map(|(i, (png, _))| image_item(format!("{b}-{i}"), "x", png.clone()))
                .collect();
            batch("t", 100 + b as u64, items)
        })
        .collect();
    ingest(&mut client, batches).await.unwrap();
    server.terminate();
    assert!(server.wait(Duration::from_secs(30)).success());

    let lines: Vec<serde_json::Value> = std::fs::read_to_string(&log)
        .unwrap()
        .lines()
        .map(|line| serde_json::from_str(line).unwrap_or_else(|e| panic!("not JSON ({e}): {line}")))
        .collect();
    let acknowledged: Vec<&serde_json::Value> =
        lines.iter().filter(|l| l["fields"]["message"] == "batch acknowledged").collect();
    assert_eq!(acknowledged.len(), 2, "one event per batch");
    for (event, batch_id) in acknowledged.iter().zip([100, 101]) {
        assert_eq!(event["span"]["name"], "batch", "{event}");
        assert_eq!((event["span"]["batch_id"].as_u64(), event["span"]["items"].as_u64()), (Some(batch_id), Some(6)));
        assert_eq!(event["fields"]["indexed"], 6, "{event}");
        let spans = event["spans"].as_array().expect("the span list");
        assert_eq!(spans.len(), 2, "{event}");
        assert_eq!((&spans[0]["name"], &spans[0]["method"]), (&"call".into(), &"Ingest".into()), "{event}");
    }
    let inference: Vec<&serde_json::Value> = lines.iter().filter(|l| l["span"]["name"] == "inference").collect();
    assert!(!inference.is_empty(), "the model's batches are traced");
    let rows: u64 = inference
        .iter()
        .filter(|l| l["fields"]["message"] == "batch ran")
        .map(|l| l["span"]["rows"].as_u64().expect("rows"))
        .sum();
    assert_eq!(rows, 12, "every image through the model once");
}
