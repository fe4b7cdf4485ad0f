//! Helpers shared by the benchmarks.
#![allow(dead_code)]

use std::io::{BufRead, BufReader};
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use imagelsh::proto::image_index_client::ImageIndexClient;
use imagelsh::proto::{
    CreateIndexRequest, Embedding, IngestRequest, Item, QueryRequest, SearchPlan, item::Content, query_request,
};
use std::time::Instant;
use tonic::transport::Channel;

/// The benchmarks' embedding size (the default model's).
pub const DIM: usize = 1280;

/// The benchmark's `--flag value` pairs (flags without a value, such as cargo's `--bench`,
/// are skipped).
pub fn flag_values() -> Vec<(String, String)> {
    let argv: Vec<String> = std::env::args().skip(1).collect();
    let mut pairs = Vec::new();
    let mut i = 0;
    while i < argv.len() {
        match argv.get(i + 1) {
            Some(value) if argv[i].starts_with("--") && !value.starts_with("--") => {
                pairs.push((argv[i].clone(), value.clone()));
                i += 2;
            }
            _ => i += 1,
        }
    }
    pairs
}

/// Bytes of all files below `path`.
pub fn dir_bytes(path: &Path) -> u64 {
    std::fs::read_dir(path)
        .map(|rd| {
            rd.flatten()
                .map(|e| match e.metadata() {
                    Ok(m) if m.is_dir() => dir_bytes(&e.path()),
                    // Allocated blocks, as `du` counts: holes punched in record files are free.
                    Ok(m) => std::os::unix::fs::MetadataExt::blocks(&m) * 512,
                    Err(_) => 0,
                })
                .sum()
        })
        .unwrap_or(0)
}

/// SplitMix64: deterministic data without an RNG dependency.
pub struct Rng(pub u64);
impl Rng {
    pub fn unit(&mut self) -> f32 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        ((z ^ (z >> 31)) >> 40) as f32 / (1u64 << 23) as f32 - 1.0
    }
}

/// `n` vectors around 1,000 centres (drawn from `centres_seed`), noise from `noise_seed`,
/// flattened row-major. Queries share the data's centres, with noise of their own.
pub fn clustered(n: usize, centres_seed: u64, noise_seed: u64) -> Vec<f32> {
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
pub const TRUTH_QUERIES: usize = 50;

/// Row numbers of the exact 10 nearest data rows by cosine, per query.
pub fn exact_top10(data: &[f32], queries: &[f32]) -> Vec<Vec<usize>> {
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

/// A release `imagelsh serve --no-model` on a loopback port.
pub struct Server(Child, pub String);

impl Server {
    pub fn pid(&self) -> u32 {
        self.0.id()
    }

    /// SIGKILL, and waits for the process to be gone.
    pub fn kill(mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }

    pub fn start(dir: &Path) -> Self {
        Self::start_with(dir, &[])
    }

    /// As `start`, with more flags (`--store …`).
    pub fn start_with(dir: &Path, extra: &[&str]) -> Self {
        let mut child = Command::new(env!("CARGO_BIN_EXE_imagelsh"))
            .args(["serve", "--no-model", "--listen", "127.0.0.1:0", "--http-listen", "off", "--data-dir"])
            .arg(dir)
            .args(extra)
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
    pub fn terminate(mut self) {
        let pid = self.0.id().to_string();
        assert!(Command::new("kill").args(["-TERM", &pid]).status().expect("kill -TERM").success());
        assert!(self.0.wait().expect("wait").success(), "clean exit");
    }

    pub async fn client(&self) -> ImageIndexClient<Channel> {
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

pub fn percentile(sorted: &[Duration], p: f64) -> Duration {
    sorted[((sorted.len() - 1) as f64 * p).round() as usize]
}

/// Items per ingest batch.
pub const BATCH: usize = 256;

/// Latencies (sorted), the hits' ids and candidates per query of every query with `plan`.
pub struct PlanRun {
    pub latencies: Vec<Duration>,
    pub hits: Vec<Vec<String>>,
    pub candidates: f64,
    pub plans: std::collections::BTreeSet<&'static str>,
}

/// Ingests `rows` over streams of `per_stream` rows each, stream `s` to server `addrs[s mod n]`;
/// returns the items acknowledged and the time.
pub async fn ingest_all(addrs: &[&str], rows: &[&[f32]], per_stream: usize) -> (usize, Duration) {
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
        let addr = addrs[s % addrs.len()];
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

/// Creates the index every run ingests into: `DIM`-d, `bits` × `tables`, the default sketches.
pub async fn create_bench_index(server: &Server, bits: u32, tables: u32) {
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

pub fn query(v: &[f32]) -> QueryRequest {
    QueryRequest {
        index: "bench".into(),
        query: Some(query_request::Query::Embedding(Embedding { values: v.to_vec() })),
        top_k: 10,
        ..Default::default()
    }
}

/// The data row of an ingested id `s{stream}-{batch}-{i}`.
pub fn row_of(id: &str, per_stream: usize) -> usize {
    let parts: Vec<usize> = id.trim_start_matches('s').split('-').map(|p| p.parse().unwrap()).collect();
    parts[0] * per_stream + parts[1] * BATCH + parts[2]
}

pub async fn run_queries(client: &mut ImageIndexClient<Channel>, queries: &[f32], plan: SearchPlan) -> PlanRun {
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
