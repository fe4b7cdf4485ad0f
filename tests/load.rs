//! Load on loopback, bounded in time and count: 32 concurrent ingest streams (24 of
//! embeddings, 8 of images through the real model) and queries alongside, against a real
//! server. No errors but designed refusals (RESOURCE_EXHAUSTED), resident memory under the
//! bound the README states, and the figures printed: items/s, and query p50/p99 under load
//! against idle.
//!
//! CI runs it for 15 s; the long form is
//! `IMAGELSH_LOAD_SECS=60 cargo test --release --test load -- --nocapture`.

mod common;

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use common::{TestServer, batch, clustered, fashion_mnist_pngs, image_item, query_vector, vector_item};
use imagelsh::proto::image_index_client::ImageIndexClient;
use imagelsh::proto::{self, IngestRequest};
use tokio_stream::wrappers::ReceiverStream;
use tonic::Code;
use tonic::transport::Channel;

const DIM: usize = 1280;
const VECTOR_STREAMS: usize = 24;
const IMAGE_STREAMS: usize = 8;
/// Resident memory the server must stay under (README, "Limits"): what this load measured
/// (peak VmHWM) with room for the noise of a shared machine.
const RSS_BOUND_MB: u64 = 2048;

#[derive(Default)]
struct Counts {
    vectors: AtomicU64,
    images: AtomicU64,
    refused: AtomicU64,
}

fn env_u64(name: &str, default: u64) -> u64 {
    std::env::var(name).ok().and_then(|v| v.parse().ok()).unwrap_or(default)
}

fn vm_kb(pid: u32, field: &str) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    status
        .lines()
        .find(|l| l.starts_with(field))
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|v| v.parse().ok())
        .unwrap_or(0)
}

fn percentile(sorted: &[Duration], p: f64) -> Duration {
    sorted[((sorted.len() - 1) as f64 * p).round() as usize]
}

async fn query_latencies(
    client: &mut ImageIndexClient<Channel>,
    pool: &[Vec<f32>],
    until: Instant,
    max: usize,
) -> Vec<Duration> {
    let mut out = Vec::new();
    let mut i = 0;
    while Instant::now() < until && out.len() < max {
        let started = Instant::now();
        let hits = client.query(query_vector("load", &pool[i % pool.len()], 10)).await.expect("query under load");
        assert!(hits.into_inner().hits.iter().all(|h| h.similarity.is_finite()));
        out.push(started.elapsed());
        i += 7;
    }
    out.sort();
    out
}

/// One stream sending `make(n)` batches until `until`, reading acks as they come.
async fn stream(
    mut client: ImageIndexClient<Channel>,
    until: Instant,
    make: impl Fn(u64) -> IngestRequest + Send + 'static,
    counted: impl Fn(&Counts, u64) + Send + 'static,
    counts: Arc<Counts>,
) {
    let (tx, rx) = tokio::sync::mpsc::channel(2);
    tokio::spawn(async move {
        let mut n = 0;
        while Instant::now() < until {
            if tx.send(make(n)).await.is_err() {
                break;
            }
            n += 1;
        }
    });
    match client.ingest(ReceiverStream::new(rx)).await {
        Err(status) if status.code() == Code::ResourceExhausted => {
            counts.refused.fetch_add(1, Ordering::Relaxed);
        }
        Err(status) => panic!("opening a stream: {status:?}"),
        Ok(response) => {
            let mut inbound = response.into_inner();
            loop {
                // At the deadline the client goes away mid-stream (what a killed job does):
                // batches still queued on the connection are abandoned, not waited for.
                let Ok(next) = tokio::time::timeout_at(until.into(), inbound.message()).await else { break };
                match next {
                    Ok(Some(ack)) => {
                        assert!(ack.errors.is_empty(), "{:?}", ack.errors);
                        counted(&counts, u64::from(ack.indexed));
                    }
                    Ok(None) => break,
                    // The model's queue full past its timeout: a designed refusal.
                    Err(status) if status.code() == Code::ResourceExhausted => {
                        counts.refused.fetch_add(1, Ordering::Relaxed);
                        break;
                    }
                    Err(status) => panic!("ingest under load: {status:?}"),
                }
            }
        }
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn thirty_two_streams_and_queries_stay_within_bounds() {
    let seconds = env_u64("IMAGELSH_LOAD_SECS", 15);

    let dir = tempfile::tempdir().unwrap();
    let server = TestServer::start_with_model(dir.path(), &[]);
    let mut client = server.client().await;
    client
        .create_index(proto::CreateIndexRequest { name: "load".into(), seed: 3, ..Default::default() })
        .await
        .expect("create");
    let pool = Arc::new(clustered(2048, DIM, 64, 0.2, 11));
    let images = Arc::new(fashion_mnist_pngs(64));
    // Something to find before the load starts.
    let warm: Vec<_> = pool.iter().enumerate().map(|(i, v)| vector_item(format!("warm{i}"), "w", v)).collect();
    common::ingest(
        &mut client,
        warm.chunks(256).enumerate().map(|(b, c)| batch("load", b as u64, c.to_vec())).collect(),
    )
    .await
    .expect("warm-up ingest");
    let idle = query_latencies(&mut client, &pool, Instant::now() + Duration::from_secs(10), 300).await;

    let counts = Arc::new(Counts::default());
    let started = Instant::now();
    let until = started + Duration::from_secs(seconds);
    let mut tasks = Vec::new();
    for s in 0..VECTOR_STREAMS {
        let pool = pool.clone();
        let make = move |n: u64| {
            let items = (0..64)
                .map(|i| {
                    let k = (n as usize * 64 + i) % pool.len();
                    vector_item(format!("v{s}-{n}-{i}"), "v", &pool[k])
                })
                .collect();
            batch("load", n, items)
        };
        let count = |c: &Counts, n| {
            c.vectors.fetch_add(n, Ordering::Relaxed);
        };
        tasks.push(tokio::spawn(stream(server.client().await, until, make, count, counts.clone())));
    }
    for s in 0..IMAGE_STREAMS {
        let images = images.clone();
        let make = move |n: u64| {
            let items = (0..8)
                .map(|i| {
                    let k = (n as usize * 8 + i) % images.len();
                    image_item(format!("i{s}-{n}-{i}"), "img", images[k].0.clone())
                })
                .collect();
            batch("load", n, items)
        };
        let count = |c: &Counts, n| {
            c.images.fetch_add(n, Ordering::Relaxed);
        };
        tasks.push(tokio::spawn(stream(server.client().await, until, make, count, counts.clone())));
    }
    let pid = server.pid();
    let sampler = tokio::spawn(async move {
        let mut peak = 0;
        while Instant::now() < until + Duration::from_secs(2) {
            peak = peak.max(vm_kb(pid, "VmRSS:"));
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
        peak
    });
    let mut query_client = server.client().await;
    let loaded = query_latencies(&mut query_client, &pool, until, usize::MAX).await;
    for task in tasks {
        task.await.expect("a stream task");
    }

    let elapsed = seconds as f64;
    let sampled_peak_mb = sampler.await.unwrap() / 1024;
    let hwm_mb = vm_kb(pid, "VmHWM:") / 1024;
    let vectors = counts.vectors.load(Ordering::Relaxed);
    let image_items = counts.images.load(Ordering::Relaxed);
    println!(
        "load {seconds} s: {VECTOR_STREAMS} embedding + {IMAGE_STREAMS} image streams; {:.0} embeddings/s, {:.1} images/s, \
         {} refusals (RESOURCE_EXHAUSTED); queries: idle p50 {:.2} ms p99 {:.2} ms ({} queries), under load p50 {:.2} ms \
         p99 {:.2} ms ({} queries); server RSS peak {hwm_mb} MB (sampled {sampled_peak_mb} MB), bound {RSS_BOUND_MB} MB",
        vectors as f64 / elapsed,
        image_items as f64 / elapsed,
        counts.refused.load(Ordering::Relaxed),
        percentile(&idle, 0.5).as_secs_f64() * 1e3,
        percentile(&idle, 0.99).as_secs_f64() * 1e3,
        idle.len(),
        percentile(&loaded, 0.5).as_secs_f64() * 1e3,
        percentile(&loaded, 0.99).as_secs_f64() * 1e3,
        loaded.len(),
    );
    assert!(vectors > 0 && image_items > 0, "both kinds of stream made progress");
    assert!(!loaded.is_empty(), "queries were answered under load");
    assert!(hwm_mb < RSS_BOUND_MB, "server peak RSS {hwm_mb} MB over the bound of {RSS_BOUND_MB} MB");
    client.list_indexes(proto::ListIndexesRequest {}).await.expect("the server is up after the load");
}
