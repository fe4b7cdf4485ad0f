//! The embedded store (sled) against the cluster store (a 3+3 Valkey cluster on loopback),
//! on the same data, in one run:
//!
//!     VALKEY_SERVER=$(scripts/setup-valkey) cargo bench --bench cluster -- --items 100000 --streams 4
//!
//! Prints, for sled, the cluster store through one replica, and through two (streams and
//! queries split between them): durable ingest vectors/s, query p50/p99 and recall@10 (the
//! TABLES plan, the only one the cluster store runs; sled's AUTO beside it), and for the cluster
//! the commands its primaries processed per item and per query and their memory per item,
//! from which BENCHMARKS.md estimates what N machines sustain.

mod support;
use support::{
    DIM, PlanRun, Server, TRUTH_QUERIES, clustered, create_bench_index, exact_top10, ingest_all, percentile, row_of,
    run_queries,
};

use imagelsh::proto::SearchPlan;

// The tests' loopback cluster: six free ports, stopped and removed on drop.
#[allow(dead_code)]
#[path = "../tests/common/cluster.rs"]
mod cluster;
use cluster::TestCluster;

struct Args {
    items: usize,
    queries: usize,
    streams: usize,
    ack: String,
    appendfsync: String,
}

fn args() -> Args {
    let mut a =
        Args { items: 100_000, queries: 500, streams: 4, ack: "replica".into(), appendfsync: "everysec".into() };
    for (flag, value) in support::flag_values() {
        match flag.as_str() {
            "--items" => a.items = value.parse().expect("--items N"),
            "--queries" => a.queries = value.parse().expect("--queries N"),
            "--streams" => a.streams = value.parse().expect("--streams N"),
            "--ack" => a.ack = value,
            "--appendfsync" => a.appendfsync = value,
            _ => {}
        }
    }
    a
}

/// A field of INFO summed over the cluster's three primaries.
fn primaries_sum(cluster: &TestCluster, section: &str, field: &str) -> u64 {
    (0..3)
        .map(|i| {
            let client = redis::Client::open(format!("redis://127.0.0.1:{}", cluster.base + i)).unwrap();
            let mut c = client.get_connection().unwrap();
            let info: String = redis::cmd("INFO").arg(section).query(&mut c).unwrap();
            info.lines()
                .find_map(|l| l.strip_prefix(&format!("{field}:")))
                .and_then(|v| v.trim().parse::<u64>().ok())
                .unwrap_or(0)
        })
        .sum()
}

/// CPU seconds (user + system) a process has used, from /proc (0 when gone).
fn cpu_seconds(pid: u32) -> f64 {
    let Ok(stat) = std::fs::read_to_string(format!("/proc/{pid}/stat")) else { return 0.0 };
    // Fields after the command name (which is in parentheses and may hold spaces).
    let fields: Vec<&str> = stat.rsplit_once(')').map_or(vec![], |(_, rest)| rest.split_whitespace().collect());
    let ticks = |i: usize| fields.get(i).and_then(|f| f.parse::<f64>().ok()).unwrap_or(0.0);
    // utime and stime are fields 14 and 15 of the line, 12 and 13 after the name.
    (ticks(11) + ticks(12)) / 100.0
}

struct Row {
    name: String,
    rate: f64,
    tables: PlanRun,
    auto: Option<PlanRun>,
    cluster: Option<(f64, f64, f64)>,
    /// CPU seconds of the imagelsh servers and of the cluster's processes during the ingest,
    /// and its wall time.
    ingest_cpu: (f64, f64, f64),
}

async fn measure(
    name: &str,
    servers: &[Server],
    data: &[f32],
    queries: &[f32],
    streams: usize,
    cluster: Option<&TestCluster>,
) -> Row {
    create_bench_index(&servers[0], 12, 16).await;
    let rows: Vec<&[f32]> = data.chunks(DIM).collect();
    let per_stream = rows.len().div_ceil(streams);
    let commands = || cluster.map_or(0, |c| primaries_sum(c, "stats", "total_commands_processed"));
    let cpu = || {
        let servers_cpu: f64 = servers.iter().map(|s| cpu_seconds(s.pid())).sum();
        let cluster_cpu: f64 = cluster.map_or(0.0, |c| c.pids().into_iter().map(|(_, pid)| cpu_seconds(pid)).sum());
        (servers_cpu, cluster_cpu)
    };
    let cpu_before = cpu();
    let before = commands();
    let addrs: Vec<&str> = servers.iter().map(|s| s.1.as_str()).collect();
    let (indexed, took) = ingest_all(&addrs, &rows, per_stream).await;
    assert_eq!(indexed, rows.len());
    let after_ingest = commands();
    let cpu_after = cpu();
    let ingest_cpu = (cpu_after.0 - cpu_before.0, cpu_after.1 - cpu_before.1, took.as_secs_f64());
    // Queries split over the servers, alternating by halves.
    let mut tables = PlanRun { latencies: Vec::new(), hits: Vec::new(), candidates: 0.0, plans: Default::default() };
    let per_server = queries.len() / DIM / servers.len();
    for (n, server) in servers.iter().enumerate() {
        let part = &queries[n * per_server * DIM..(n + 1) * per_server * DIM];
        let run = run_queries(&mut server.client().await, part, SearchPlan::Tables).await;
        tables.latencies.extend(run.latencies);
        tables.hits.extend(run.hits);
    }
    tables.latencies.sort();
    let after_queries = commands();
    let auto = match cluster {
        None => Some(run_queries(&mut servers[0].client().await, queries, SearchPlan::Auto).await),
        Some(_) => None,
    };
    let cluster = cluster.map(|c| {
        let items = rows.len() as f64;
        let memory = primaries_sum(c, "memory", "used_memory") as f64 / items;
        let per_item = (after_ingest - before) as f64 / items;
        let per_query = (after_queries - after_ingest) as f64 / (queries.len() / DIM) as f64;
        (per_item, per_query, memory)
    });
    Row { name: name.into(), rate: rows.len() as f64 / took.as_secs_f64(), tables, auto, cluster, ingest_cpu }
}

fn main() {
    let a = args();
    let data = clustered(a.items, 1, 1);
    let queries = clustered(a.queries, 1, 2);
    let truth = exact_top10(&data, &queries[..queries.len().min(TRUTH_QUERIES * DIM)]);
    let per_stream = a.items.div_ceil(a.streams);
    let recall = |run: &PlanRun| {
        let mut found = 0usize;
        for (hits, exact) in run.hits.iter().zip(&truth) {
            found += hits.iter().filter(|id| exact.contains(&row_of(id, per_stream))).count();
        }
        found as f64 / (10 * truth.len()) as f64
    };
    let runtime = tokio::runtime::Builder::new_multi_thread().enable_all().build().unwrap();
    println!(
        "{} clustered {DIM}-d vectors, K=12 L=16 (defaults), batches of 256 over {} streams; {} queries top_k=10; \
         cluster: 3 primaries + 3 replicas on loopback, appendfsync {}, --ack {}",
        a.items, a.streams, a.queries, a.appendfsync, a.ack
    );
    let rows: Vec<Row> = runtime.block_on(async {
        let mut rows = Vec::new();
        let dir = tempfile::tempdir().unwrap();
        {
            let sled = [Server::start(&dir.path().join("sled"))];
            rows.push(measure("sled (embedded)", &sled, &data, &queries, a.streams, None).await);
        }
        for replicas in [1usize, 2] {
            let cluster = TestCluster::start(&dir.path().join(format!("cluster{replicas}")), &a.appendfsync);
            let store = ["--store", cluster.url.as_str(), "--ack", a.ack.as_str()];
            let servers: Vec<Server> = (0..replicas)
                .map(|n| Server::start_with(&dir.path().join(format!("r{replicas}-{n}")), &store))
                .collect();
            let name = format!("cluster store, {replicas} replica(s)");
            rows.push(measure(&name, &servers, &data, &queries, a.streams, Some(&cluster)).await);
        }
        rows
    });
    println!(
        "| store | ingest vectors/s | × sled | ingest CPU s: imagelsh / cluster (wall s) | TABLES p50 ms | p99 ms | recall@10 | AUTO p50 / p99 ms, recall | cluster commands per item / per query | cluster used_memory per item |"
    );
    println!("|---|---|---|---|---|---|---|---|---|---|");
    let sled_rate = rows[0].rate;
    for row in &rows {
        let ms = |run: &PlanRun, p| percentile(&run.latencies, p).as_secs_f64() * 1e3;
        let auto = row
            .auto
            .as_ref()
            .map_or("—".to_string(), |run| format!("{:.2} / {:.2}, {:.3}", ms(run, 0.5), ms(run, 0.99), recall(run)));
        let cluster = row.cluster.map_or(("—".to_string(), "—".to_string()), |(item, query, memory)| {
            (format!("{item:.1} / {query:.1}"), format!("{:.0} B", memory))
        });
        let (server_cpu, cluster_cpu, wall) = row.ingest_cpu;
        println!(
            "| {} | {:.0} | {:.2} | {:.1} / {:.1} ({:.1}) | {:.2} | {:.2} | {:.3} | {} | {} | {} |",
            row.name,
            row.rate,
            row.rate / sled_rate,
            server_cpu,
            cluster_cpu,
            wall,
            ms(&row.tables, 0.5),
            ms(&row.tables, 0.99),
            recall(&row.tables),
            auto,
            cluster.0,
            cluster.1
        );
    }
}
