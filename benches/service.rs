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
use support::dir_bytes;

use std::io::{BufRead, BufReader};
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use imagelsh::proto::image_index_client::ImageIndexClient;
use imagelsh::proto::{
    CreateIndexRequest, Embedding, IngestRequest, Item, QueryRequest, SearchPlan, item::Content, query_request,
};
use tonic::transport::Channel;

#[path = "support/floor.rs"]
mod floor;

const DIM: usize = 1280;
const BATCH: usize = 256;
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
    let argv: Vec<String> = std::env::args().collect();
    let mut i = 1;
    while i < argv.len() {
        let value = argv.get(i + 1).cloned().unwrap_or_default();
        match argv[i].as_str() {
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
            _ => {
                i += 1;
                continue;
            }
        }
        i += 2;
    }
    a
}

/// SplitMix64: deterministic data without an RNG dependency.
struct Rng(u64);
impl Rng {
    fn unit(&mut self) -> f32 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        ((z ^ (z >> 31)) >> 40) as f32 / (1u64 << 23) as f32 - 1.0
    }
}

/// `n` vectors around 1,000 centres (drawn from `centres_seed`), noise from `noise_seed`,
/// flattened row-major. Queries share the data's centres, with noise of their own.
fn clustered(n: usize, centres_seed: u64, noise_seed: u64) -> Vec<f32> {
    let mut rng = Rng(centres_seed);
    let centres: Vec<f32> = (0..1000 * DIM).map(|_| rng.unit()).collect();
    let mut rng = Rng(noise_seed.wrapping_mul(0x2545_F491_4F6C_DD1D));
    let mut out = Vec::with_capacity(n * DIM);
    for i in 0..n {
        let c = &centres[(i % 1000) * DIM..][..DIM];
        out.extend(c.iter().map(|x| x + 0.3 * rng.unit()));
    }
    out
}

/// Queries whose exact top 10 is computed (by brute force, on two threads).
const TRUTH_QUERIES: usize = 50;

/// Row numbers of the exact 10 nearest data rows by cosine, per query.
fn exact_top10(data: &[f32], queries: &[f32]) -> Vec<Vec<usize>> {
    let queries: Vec<&[f32]> = queries.chunks(DIM).collect();
    let half = queries.len().div_ceil(2).max(1);
    std::thread::scope(|scope| {
        let parts: Vec<_> = queries
            .chunks(half)
            .map(|part| {
                scope.spawn(move || {
                    part.iter()
                        .map(|q| {
                            let mut scored: Vec<(f32, usize)> = data
                                .chunks(DIM)
                                .enumerate()
                                .map(|(row, v)| (imagelsh::lsh::cosine(q, v), row))
                                .collect();
                            scored.select_nth_unstable_by(9, |a, b| b.0.total_cmp(&a.0));
                            scored[..10].iter().map(|&(_, row)| row).collect()
                        })
                        .collect::<Vec<Vec<usize>>>()
                })
            })
            .collect();
        parts.into_iter().flat_map(|p| p.join().unwrap()).collect()
    })
}

struct Server(Child, String);

impl Server {
    fn pid(&self) -> u32 {
        self.0.id()
    }

    /// SIGKILL, and waits for the process to be gone.
    fn kill(mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }

    fn start(dir: &Path) -> Self {
        let mut child = Command::new(env!("CARGO_BIN_EXE_imagelsh"))
            .args(["serve", "--no-model", "--listen", "127.0.0.1:0", "--http-listen", "off", "--data-dir"])
            .arg(dir)
            // BENCH_SERVER_LOG=info shows where a start spends its time.
            .env("RUST_LOG", std::env::var("BENCH_SERVER_LOG").unwrap_or_else(|_| "warn".into()))
            .stderr(Stdio::inherit())
            .stdout(Stdio::piped())
            .spawn()
            .expect("start server");
        let mut line = String::new();
        BufReader::new(child.stdout.take().unwrap()).read_line(&mut line).unwrap();
        let addr = line.trim().rsplit(' ').next().unwrap().to_string();
        Server(child, addr)
    }
    /// SIGTERM, and waits for the process to exit.
    fn terminate(mut self) {
        let pid = self.0.id().to_string();
        assert!(Command::new("kill").args(["-TERM", &pid]).status().expect("kill -TERM").success());
        assert!(self.0.wait().expect("wait").success(), "clean exit");
    }

    async fn client(&self) -> ImageIndexClient<Channel> {
        let ch = Channel::from_shared(format!("http://{}", self.1)).unwrap().connect().await.unwrap();
        ImageIndexClient::new(ch).max_encoding_message_size(64 << 20)
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn percentile(sorted: &[Duration], p: f64) -> Duration {
    sorted[((sorted.len() - 1) as f64 * p).round() as usize]
}

fn query(v: &[f32]) -> QueryRequest {
    QueryRequest {
        index: "bench".into(),
        query: Some(query_request::Query::Embedding(Embedding { values: v.to_vec() })),
        top_k: 10,
        ..Default::default()
    }
}

/// The data row of an ingested id `s{stream}-{batch}-{i}`.
fn row_of(id: &str, per_stream: usize) -> usize {
    let parts: Vec<usize> = id.trim_start_matches('s').split('-').map(|p| p.parse().unwrap()).collect();
    parts[0] * per_stream + parts[1] * BATCH + parts[2]
}

/// Latencies (sorted), the hits' ids and candidates per query of every query with `plan`.
struct PlanRun {
    latencies: Vec<Duration>,
    hits: Vec<Vec<String>>,
    candidates: f64,
    plans: std::collections::BTreeSet<&'static str>,
}

async fn run_queries(client: &mut ImageIndexClient<Channel>, queries: &[f32], plan: SearchPlan) -> PlanRun {
    let mut run = PlanRun { latencies: Vec::new(), hits: Vec::new(), candidates: 0.0, plans: Default::default() };
    for q in queries.chunks(DIM) {
        let t = Instant::now();
        let r = client.query(QueryRequest { plan: plan.into(), ..query(q) }).await.unwrap().into_inner();
        run.latencies.push(t.elapsed());
        run.candidates += f64::from(r.candidates);
        run.plans.insert(r.plan().as_str_name().trim_start_matches("SEARCH_PLAN_"));
        run.hits.push(r.hits.into_iter().map(|h| h.id).collect());
    }
    run.latencies.sort();
    run.candidates /= run.hits.len() as f64;
    run
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
    let (indexed, ingest) = ingest_all(&server.1, &rows, per_stream).await;
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
    let (floor_indexed, floor_time) = ingest_all(&floor_addr, &rows, per_stream).await;
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

/// Sends `rows` as batches of `BATCH` over `rows / per_stream` concurrent streams to `addr`;
/// returns the items acknowledged and the time until the last ack.
async fn ingest_all(addr: &str, rows: &[&[f32]], per_stream: usize) -> (usize, Duration) {
    let start = Instant::now();
    let mut tasks = Vec::new();
    for (s, part) in rows.chunks(per_stream).enumerate() {
        let batches: Vec<IngestRequest> = part
            .chunks(BATCH)
            .enumerate()
            .map(|(b, chunk)| IngestRequest {
                index: "bench".into(),
                batch_id: b as u64,
                items: chunk
                    .iter()
                    .enumerate()
                    .map(|(i, v)| Item {
                        id: format!("s{s}-{b}-{i}"),
                        content: Some(Content::Embedding(Embedding { values: v.to_vec() })),
                        ..Default::default()
                    })
                    .collect(),
            })
            .collect();
        let ch = Channel::from_shared(format!("http://{addr}")).unwrap().connect().await.unwrap();
        let mut client = ImageIndexClient::new(ch).max_encoding_message_size(64 << 20);
        tasks.push(tokio::spawn(async move {
            // Encoded as the stream goes, so that encoding overlaps with the server's work, as
            // in a real client.
            let mut acks = client.ingest(tokio_stream::iter(batches)).await.unwrap().into_inner();
            let mut n = 0;
            while let Some(r) = acks.message().await.unwrap() {
                n += r.indexed as usize;
            }
            n
        }));
    }
    let mut indexed = 0;
    for t in tasks {
        indexed += t.await.unwrap();
    }
    (indexed, start.elapsed())
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

/// Creates the index every run ingests into: `DIM`-d, `bits` × `tables`, the default sketches.
async fn create_bench_index(server: &Server, bits: u32, tables: u32) {
    let request = CreateIndexRequest {
        name: "bench".into(),
        dim: DIM as u32,
        hash_bits: bits,
        tables,
        seed: 1,
        ..Default::default()
    };
    server.client().await.create_index(request).await.unwrap();
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
        let (indexed, _) = ingest_all(&server.1, &rows, per_stream).await;
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
