//! A real Valkey/Redis Cluster on loopback for the cluster store's tests: 3 primaries and 3
//! replicas started by `scripts/cluster` (port BASE+i is primary i, BASE+3+i its replica), the
//! server binary from `VALKEY_SERVER` (set by `scripts/test`) or `scripts/setup-valkey`.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

pub struct TestCluster {
    dir: PathBuf,
    pub base: u16,
    /// `redis://127.0.0.1:BASE,…` for `--store`.
    pub url: String,
}

fn script() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("scripts/cluster")
}

impl TestCluster {
    /// Starts a Valkey cluster under `dir` on six free ports; `appendfsync` as given.
    pub fn start(dir: &Path, appendfsync: &str) -> Self {
        Self::start_with(dir, appendfsync, None)
    }

    /// As `start`, with Debian's Redis 7.0 (`REDIS_SERVER`, set by `scripts/test`).
    pub fn start_redis(dir: &Path, appendfsync: &str) -> Self {
        let server = std::env::var("REDIS_SERVER").unwrap_or_else(|_| "/usr/bin/redis-server".into());
        Self::start_with(dir, appendfsync, Some(&server))
    }

    fn start_with(dir: &Path, appendfsync: &str, server: Option<&str>) -> Self {
        for _ in 0..20 {
            let base = free_port_run();
            let out = Command::new(script())
                .args(["start"])
                .arg(dir)
                .arg(base.to_string())
                .env("CLUSTER_APPENDFSYNC", appendfsync)
                .envs(server.map(|s| ("VALKEY_SERVER", s)))
                .output()
                .expect("run scripts/cluster");
            if out.status.success() {
                let url = String::from_utf8_lossy(&out.stdout).trim().to_string();
                return Self { dir: dir.to_path_buf(), base, url };
            }
            // Another test may have taken a port between the probe and the start.
            eprintln!("cluster start on {base} failed: {}", String::from_utf8_lossy(&out.stderr));
            let _ = Command::new(script()).args(["stop"]).arg(dir).arg("--clean").status();
        }
        panic!("no cluster could be started (is scripts/setup-valkey or VALKEY_SERVER usable?)");
    }

    /// (port, pid) of each node started, the latest last.
    pub fn pids(&self) -> Vec<(u16, u32)> {
        let pids = std::fs::read_to_string(self.dir.join("pids")).expect("the cluster's pid file");
        pids.lines()
            .filter_map(|line| line.split_once(' '))
            .filter_map(|(port, pid)| Some((port.parse().ok()?, pid.trim().parse().ok()?)))
            .collect()
    }

    /// The pid of the node on `port`.
    fn pid(&self, port: u16) -> u32 {
        let pids = self.pids();
        pids.iter()
            .filter(|(p, _)| *p == port)
            .map(|&(_, pid)| pid)
            .next_back()
            .unwrap_or_else(|| panic!("no pid for port {port}"))
    }

    /// SIGKILLs the node on `port` (primary i is on `base + i`).
    pub fn kill(&self, port: u16) {
        let pid = self.pid(port);
        let status = Command::new("kill").args(["-9", &pid.to_string()]).status().expect("kill");
        assert!(status.success(), "kill -9 {pid}");
    }

    /// Restarts the node on `port` after `delay`, on a thread of its own (as an orchestrator
    /// restarts a killed pod while clients retry).
    pub fn restart_after(&self, port: u16, delay: Duration) -> std::thread::JoinHandle<bool> {
        let dir = self.dir.clone();
        std::thread::spawn(move || {
            std::thread::sleep(delay);
            Command::new(script()).args(["restart"]).arg(&dir).arg(port.to_string()).status().is_ok_and(|s| s.success())
        })
    }

    /// Waits until every node is up, the cluster is ok and replicas are linked.
    pub fn wait_healthy(&self) {
        let status = Command::new(script()).args(["wait"]).arg(&self.dir).status().expect("wait");
        assert!(status.success(), "cluster did not become healthy");
    }
}

impl Drop for TestCluster {
    fn drop(&mut self) {
        let _ = Command::new(script()).args(["stop"]).arg(&self.dir).arg("--clean").status();
    }
}

/// A base port with six free ports above it and their cluster-bus ports (+10000) free too.
fn free_port_run() -> u16 {
    loop {
        let probe = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
        let base = probe.local_addr().expect("addr").port();
        drop(probe);
        if !(1024..55000 - 10).contains(&base) {
            continue;
        }
        let free = (0..6).all(|i| {
            [base + i, base + i + 10000].iter().all(|&p| std::net::TcpListener::bind(("127.0.0.1", p)).is_ok())
        });
        if free {
            return base;
        }
        std::thread::sleep(Duration::from_millis(10));
    }
}
