//! Ingest and query through the real gRPC server (the release binary on loopback).
//!
//!     cargo bench --bench service                 # 100k vectors; K=8 L=10 and K=12 L=16
//!     cargo bench --bench service -- --items 1000000 --shapes 12:16 --streams 4
//!     cargo bench --bench service -- --items 100000 --shapes 12:16 --streams 4 --replace-rounds 5
//!
//! Prints, in one run:
//! - vectors/s acknowledged (durable), and the machine's floor beside it: the same vectors over
//!   the same streams to a server in this process that only appends them to a file with one
//!   fdatasync per group of batches (as imagelsh's log writer does), without hashing or indexing;
//! - the server's peak anonymous resident memory (RssAnon) during the ingest;
//! - bytes on disk per item, and the shares of sled and of the write-ahead log;
//! - the time from process start to the first answered query after a SIGKILL right after the
//!   ingest (what the log still held is replayed), then after a clean stop (SIGTERM, which
//!   applies the log and checkpoints sled; how long that stop took);
//! - query latency percentiles of the default query (2 probes, sketch pre-ranking, exact
//!   re-ranking of the default depth) with each search plan (TABLES, SCAN) right after that
//!   restart, their recall@10 (exact top 10 by brute force for the first 50 queries; queries
//!   lie around the data's cluster centres), and which plan the server picks by itself.

mod support;
use support::{
    BATCH, DIM, PlanRun, Server, TRUTH_QUERIES, clustered, create_bench_index, dir_bytes, exact_top10, ingest_all,
    percentile, query, row_of, run_queries,
};

use std::path::Path;
use std::time::{Duration, Instant};

use imagelsh::proto::SearchPlan;

#[path = "support/floor.rs"]
mod floor;

struct Args {
    items: usize,
    queries: usize,
    streams: usize,
    /// (K, L) pairs.
    shapes: Vec<(u32, u32)>,
    /// Loads of the same ids for the replace-heavy run (0: none).
    replace_rounds: usize,
}

fn args() -> Args {
    let mut a = Args { items: 100_000, queries: 1_000, streams: 1, shapes: vec![(8, 10), (12, 16)], replace_rounds: 0 };
    for (flag, value) in support::flag_values() {
        match flag.as_str() {
            "--items" => a.items = value.parse().expect("--items N"),
            "--queries" => a.queries = value.parse().expect("--queries N"),
            "--streams" => a.streams = value.parse().expect("--streams N"),
            "--replace-rounds" => a.replace_rounds = value.parse().expect("--replace-rounds N"),
            "--shapes" => {
                a.shapes = value
                    .split(',')
                    .map(|s| {
                        let (k, l) = s.split_once(':').expect("--shapes K:L,K:L");
                        (k.parse().expect("K"), l.parse().expect("L"))
                    })
                    .collect()
            }
            _ => {}
        }
    }
    a
}

/// Starts a server on `dir` and answers one query: the time a restart takes to be useful.
async fn start_and_query(dir: &Path, vector: &[f32]) -> (Server, Duration) {
    let t = Instant::now();
    let server = Server::start(dir);
    server.client().await.query(query(vector)).await.unwrap();
    let elapsed = t.elapsed();
    (server, elapsed)
}

async fn run((bits, tables_count): (u32, u32), a: &Args, data: &[f32], queries: &[f32], truth: &[Vec<usize>]) {
    let dir = tempfile::tempdir().unwrap();
    let server = Server::start(dir.path());
    create_bench_index(&server, bits, tables_count).await;

    let rows: Vec<&[f32]> = data.chunks(DIM).collect();
    let per_stream = rows.len().div_ceil(a.streams);
    let memory = RssSampler::start(server.pid());
    let (indexed, ingest) = ingest_all(&[&server.1], &rows, per_stream).await;
    let peak_rss = memory.stop();
    assert_eq!(indexed, rows.len());
    let bytes = dir_bytes(dir.path());
    let sled_bytes = dir_bytes(&dir.path().join("sled"));
    let log_bytes = dir_bytes(&dir.path().join("wal"));

    // A crash right after the ingest: what the log holds is replayed at the next start.
    server.kill();
    let (server, after_crash) = start_and_query(dir.path(), &queries[..DIM]).await;
    let mut client = server.client().await;
    let tables = run_queries(&mut client, queries, SearchPlan::Tables).await;
    let scan = run_queries(&mut client, queries, SearchPlan::Scan).await;
    let auto = run_queries(&mut client, &queries[..queries.len().min(DIM * 10)], SearchPlan::Auto).await;
    let recall = |run: &PlanRun| {
        let found: usize = truth
            .iter()
            .zip(&run.hits)
            .map(|(exact, hits)| hits.iter().filter(|id| exact.contains(&row_of(id, per_stream))).count())
            .sum();
        found as f64 / (10 * truth.len()).max(1) as f64
    };
    drop(client);

    // A clean stop (SIGTERM: drain, apply the log, checkpoint sled), then a start.
    let t = Instant::now();
    server.terminate();
    let stop = t.elapsed();
    let (server, after_stop) = start_and_query(dir.path(), &queries[..DIM]).await;
    drop(server);

    // The floor: the same vectors over the same streams, appended to a file and fsynced.
    let floor_dir = tempfile::tempdir().unwrap();
    let floor_addr = floor::start(floor_dir.path().join("floor.bin")).await;
    let (floor_indexed, floor_time) = ingest_all(&[&floor_addr], &rows, per_stream).await;
    assert_eq!(floor_indexed, rows.len());

    let ms = |run: &PlanRun, p| percentile(&run.latencies, p).as_secs_f64() * 1e3;
    let rate = indexed as f64 / ingest.as_secs_f64();
    let floor_rate = floor_indexed as f64 / floor_time.as_secs_f64();
    let per_item = |b: u64| b as f64 / indexed as f64;
    println!(
        "| K={bits:<2} L={tables_count:<2} | {indexed:>7} | {:>2} | {rate:>6.0} | {floor_rate:>6.0} | {:>4.2} | {:>5.0} | {:>6.0} | {:>5.0} | {:>4.0} | {:>5} | {:>6.2} | {:>6.2} | {:>8.0} | {:>5.3} | {:>6.2} | {:>6.2} | {:>5.3} | {:>6} | {:>6} | {:>5} |",
        a.streams,
        rate / floor_rate,
        peak_rss as f64 / (1 << 20) as f64,
        per_item(bytes),
        per_item(sled_bytes),
        per_item(log_bytes),
        after_crash.as_millis(),
        ms(&tables, 0.5),
        ms(&tables, 0.99),
        tables.candidates,
        recall(&tables),
        ms(&scan, 0.5),
        ms(&scan, 0.99),
        recall(&scan),
        auto.plans.iter().copied().collect::<Vec<_>>().join("+"),
        stop.as_millis(),
        after_stop.as_millis(),
    );
}

/// Samples a process's RssAnon (from /proc) every 100 ms until stopped; returns the peak, bytes.
struct RssSampler {
    stop: std::sync::Arc<std::sync::atomic::AtomicBool>,
    thread: std::thread::JoinHandle<u64>,
}

impl RssSampler {
    fn start(pid: u32) -> Self {
        let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        let flag = stop.clone();
        let thread = std::thread::spawn(move || {
            let mut peak = 0;
            while !flag.load(std::sync::atomic::Ordering::Relaxed) {
                let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
                let kb = status
                    .lines()
                    .find_map(|l| l.strip_prefix("RssAnon:"))
                    .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
                    .unwrap_or(0);
                peak = peak.max(kb * 1024);
                std::thread::sleep(Duration::from_millis(100));
            }
            peak
        });
        Self { stop, thread }
    }

    fn stop(self) -> u64 {
        self.stop.store(true, std::sync::atomic::Ordering::Relaxed);
        self.thread.join().unwrap()
    }
}

/// Loads the same ids `rounds` times (each load replaces the last) and prints the disk after the
/// first load and after the last, each measured after a clean stop (everything applied).
async fn replace_heavy((bits, tables_count): (u32, u32), a: &Args, data: &[f32]) {
    let dir = tempfile::tempdir().unwrap();
    let rows: Vec<&[f32]> = data.chunks(DIM).collect();
    let per_stream = rows.len().div_ceil(a.streams);
    let mut after_first = 0;
    let t = Instant::now();
    for round in 0..a.replace_rounds {
        let server = Server::start(dir.path());
        if round == 0 {
            create_bench_index(&server, bits, tables_count).await;
        }
        let (indexed, _) = ingest_all(&[&server.1], &rows, per_stream).await;
        assert_eq!(indexed, rows.len());
        server.terminate();
        if round == 0 {
            after_first = dir_bytes(dir.path());
        }
    }
    let after_all = dir_bytes(dir.path());
    for part in ["sled", "vectors", "wal"] {
        let path = dir.path().join(part);
        println!("  {part}: {} MB on disk, {} MB of file length", dir_bytes(&path) >> 20, dir_length(&path) >> 20);
    }
    let items = rows.len() as f64;
    println!(
        "replace-heavy, K={bits} L={tables_count}: {} ids loaded {} times in {:.0} s; disk after one load {:.0} B/item ({} MB), after {} loads {:.0} B/item ({} MB): {:.2}×",
        rows.len(),
        a.replace_rounds,
        t.elapsed().as_secs_f64(),
        after_first as f64 / items,
        after_first >> 20,
        a.replace_rounds,
        after_all as f64 / items,
        after_all >> 20,
        after_all as f64 / after_first as f64
    );
}

fn main() {
    let a = args();
    let data = clustered(a.items, 1, 1);
    let queries = clustered(a.queries, 1, 2);
    let truth = exact_top10(&data, &queries[..queries.len().min(TRUTH_QUERIES * DIM)]);
    println!(
        "ingest: {} clustered {DIM}-d vectors in batches of {BATCH} over {} stream(s), durable acks; {} queries top_k=10",
        a.items, a.streams, a.queries
    );
    println!(
        "| index | items | streams | vec/s | floor vec/s | ratio | peak RssAnon MB | B/item | sled B/item | log B/item | SIGKILL, start→1st query ms | TABLES p50 ms | TABLES p99 ms | cand/query | TABLES recall@10 | SCAN p50 ms | SCAN p99 ms | SCAN recall@10 | default plan | clean stop ms | then start→1st query ms |"
    );
    println!("|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|");
    let rt = tokio::runtime::Runtime::new().unwrap();
    if a.replace_rounds > 0 {
        for &shape in &a.shapes {
            rt.block_on(replace_heavy(shape, &a, &data));
        }
        return;
    }
    for &shape in &a.shapes {
        rt.block_on(run(shape, &a, &data, &queries, &truth));
    }
}

/// Length of all files below `path` (holes included: what a copy that writes holes out takes).
fn dir_length(path: &Path) -> u64 {
    std::fs::read_dir(path)
        .map(|rd| {
            rd.flatten()
                .map(|e| match e.metadata() {
                    Ok(m) if m.is_dir() => dir_length(&e.path()),
                    Ok(m) => m.len(),
                    Err(_) => 0,
                })
                .sum()
        })
        .unwrap_or(0)
}
