//! Restart is bounded by the log lag, not by history: writers fill the log up to
//! `--max-log-lag-items` while the applier is held back, the server is killed there (the worst
//! moment for a restart: the most batches to replay), and a new server must answer within
//! bounds, holding exactly what was acknowledged. The lag limit holds even though a group of
//! batches may overshoot it by what is in flight at once.
//!
//!     cargo test --test restart                                               # 20,000 items (CI)
//!     IMAGELSH_RESTART_LAG=262144 cargo test --release --test restart -- --nocapture   # the default lag

mod common;

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use common::{Rng, TestServer, batch, create, ingest, items_in, query_vector, vector_item};

const INDEX: &str = "lag";
const DIM: usize = 64;
const STREAMS: usize = 4;
const BATCH: usize = 256;

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_kill_at_the_lag_limit_restarts_within_bounds() {
    let lag: u64 = std::env::var("IMAGELSH_RESTART_LAG").ok().and_then(|v| v.parse().ok()).unwrap_or(20_000);
    let lag_arg = lag.to_string();
    let dir = tempfile::tempdir().unwrap();
    // The applier waits for more than the lag allows and for an hour: it never runs.
    let held = [
        "--no-model",
        "--max-log-lag-items",
        &lag_arg,
        "--apply-after-items",
        "100000000",
        "--apply-delay-ms",
        "3600000",
    ];
    let server = TestServer::start_with(dir.path(), &held);
    let mut client = server.client().await;
    create(&mut client, INDEX, DIM as u32, 12, 16).await;
    let stop = Arc::new(AtomicBool::new(false));
    let acked = Arc::new(AtomicU64::new(0));
    let streams: Vec<_> = (0..STREAMS)
        .map(|stream| {
            let (addr, stop, acked) = (server.addr.clone(), stop.clone(), acked.clone());
            tokio::spawn(async move {
                let mut client = common::lazy_client(&addr);
                let mut rng = Rng::new(stream as u64 + 1);
                for n in 0u64.. {
                    if stop.load(Ordering::Relaxed) {
                        return;
                    }
                    let items = (0..BATCH)
                        .map(|i| {
                            let vector: Vec<f32> = (0..DIM).map(|_| rng.unit()).collect();
                            vector_item(format!("s{stream}-{n}-{i}"), "x", &vector)
                        })
                        .collect();
                    match ingest(&mut client, vec![batch(INDEX, n, items)]).await {
                        Ok(_) => acked.fetch_add(BATCH as u64, Ordering::Relaxed),
                        Err(_) => return,
                    };
                }
            })
        })
        .collect();
    // Until the writers stall at the limit (nothing acknowledged for a second).
    let started = Instant::now();
    let mut last = (0, Instant::now());
    loop {
        tokio::time::sleep(Duration::from_millis(100)).await;
        let now = acked.load(Ordering::Relaxed);
        if now != last.0 {
            last = (now, Instant::now());
        } else if now > 0 && last.1.elapsed() > Duration::from_secs(1) {
            break;
        }
        assert!(started.elapsed() < Duration::from_secs(600), "the writers never stalled ({now} acknowledged)");
    }
    let pending = items_in(&mut client, INDEX).await;
    let overshoot = (STREAMS * BATCH) as u64;
    assert_eq!(pending, acked.load(Ordering::Relaxed), "every acknowledged item is in the index");
    assert!(pending >= lag, "the writers stalled at {pending}, below the limit {lag}");
    assert!(pending < lag + overshoot, "{pending} items pending: the limit {lag} plus one group at most");
    let segments = std::fs::read_dir(dir.path().join("wal")).unwrap().count();
    server.kill();
    stop.store(true, Ordering::Relaxed);
    for stream in streams {
        stream.await.unwrap();
    }

    let restarted = Instant::now();
    let server = TestServer::start_with(dir.path(), &["--no-model"]);
    let mut client = server.client().await;
    let probe: Vec<f32> = (0..DIM).map(|i| i as f32).collect();
    client.query(query_vector(INDEX, &probe, 10)).await.expect("the first query");
    let first_answer = restarted.elapsed();
    assert_eq!(items_in(&mut client, INDEX).await, pending, "the whole tail replayed");
    println!(
        "killed at the lag limit ({pending} items pending of a limit of {lag}, {segments} log segments): \
         start -> first answer {} ms",
        first_answer.as_millis()
    );
    assert!(first_answer < Duration::from_secs(60), "a restart took {first_answer:?}");
}
