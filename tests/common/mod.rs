//! A real `imagelsh serve` process on an ephemeral loopback port over a real data directory.
#![allow(dead_code)]

use std::io::Read as _;
use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

pub mod cluster;

use imagelsh::proto::image_index_client::ImageIndexClient;
use imagelsh::proto::{self, Embedding, IngestRequest, Item, item::Content};
use tonic::transport::Channel;

pub struct TestServer {
    child: Option<Child>,
    pub addr: String,
    /// The HTTP port (metrics, probes).
    pub http_addr: String,
    pub data_dir: PathBuf,
}

impl TestServer {
    /// A server without a model (embeddings only): starts fast and needs no ONNX Runtime.
    pub fn start(data_dir: &Path) -> Self {
        Self::start_with(data_dir, &["--no-model"])
    }

    /// A server with the default model; the ONNX Runtime library comes from ORT_DYLIB_PATH or
    /// the project's .venv (scripts/setup-ort), as for `imagelsh serve`.
    pub fn start_with_model(data_dir: &Path, extra_args: &[&str]) -> Self {
        Self::start_with(data_dir, extra_args)
    }

    pub fn start_with(data_dir: &Path, extra_args: &[&str]) -> Self {
        Self::start_with_env(data_dir, extra_args, &[])
    }

    /// As `start_with`, with more environment variables for the server.
    pub fn start_with_env(data_dir: &Path, extra_args: &[&str], env: &[(&str, &str)]) -> Self {
        Self::start_on("127.0.0.1:0", data_dir, extra_args, env)
    }

    /// As `start_with_env`, listening on `listen` (a restart on the port a client uses).
    pub fn start_on(listen: &str, data_dir: &Path, extra_args: &[&str], env: &[(&str, &str)]) -> Self {
        Self::spawn(listen, data_dir, extra_args, env, Stdio::inherit())
    }

    /// As `start_with_env`, the server's log (stderr) written to `log`.
    pub fn start_logging_to(log: &Path, data_dir: &Path, extra_args: &[&str], env: &[(&str, &str)]) -> Self {
        let file = std::fs::File::create(log).expect("create the log file");
        Self::spawn("127.0.0.1:0", data_dir, extra_args, env, Stdio::from(file))
    }

    fn spawn(listen: &str, data_dir: &Path, extra_args: &[&str], env: &[(&str, &str)], stderr: Stdio) -> Self {
        let mut child = Command::new(env!("CARGO_BIN_EXE_imagelsh"))
            .args(["serve", "--listen", listen, "--http-listen", "127.0.0.1:0", "--data-dir"])
            .arg(data_dir)
            .args(extra_args)
            .current_dir(env!("CARGO_MANIFEST_DIR"))
            .env("RUST_LOG", std::env::var("RUST_LOG").unwrap_or_else(|_| "warn".into()))
            .envs(env.iter().copied())
            .stdout(Stdio::piped())
            .stderr(stderr)
            .spawn()
            .expect("start imagelsh serve");
        let mut stdout = BufReader::new(child.stdout.take().expect("stdout"));
        let mut read = |prefix: &str| {
            let mut line = String::new();
            stdout.read_line(&mut line).expect("read the listening lines");
            line.trim().strip_prefix(prefix).unwrap_or_else(|| panic!("{line:?} where {prefix:?} was due")).to_string()
        };
        let addr = read("imagelsh listening on ");
        let http_addr = read("imagelsh http on ");
        Self { child: Some(child), addr, http_addr, data_dir: data_dir.to_path_buf() }
    }

    pub async fn client(&self) -> ImageIndexClient<Channel> {
        let channel = Channel::from_shared(format!("http://{}", self.addr)).unwrap().connect().await.expect("connect");
        ImageIndexClient::new(channel).max_decoding_message_size(256 << 20).max_encoding_message_size(256 << 20)
    }

    pub async fn channel(&self) -> Channel {
        Channel::from_shared(format!("http://{}", self.addr)).unwrap().connect().await.expect("connect")
    }

    pub fn pid(&self) -> u32 {
        self.child.as_ref().expect("running").id()
    }

    /// SIGKILL: no chance to flush anything.
    pub fn kill(mut self) {
        let mut child = self.child.take().expect("running");
        child.kill().expect("SIGKILL");
        child.wait().expect("reap");
    }

    /// Stops the server (SIGSTOP): it holds every answer, so a job in flight cannot finish
    /// while a test interrupts it or kills the server (a point the test controls, whatever
    /// the machine's speed).
    pub fn pause(&self) {
        let status = Command::new("kill").args(["-STOP", &self.pid().to_string()]).status().expect("kill -STOP");
        assert!(status.success(), "SIGSTOP");
    }

    /// Lets a paused server go on (SIGCONT).
    pub fn resume(&self) {
        let status = Command::new("kill").args(["-CONT", &self.pid().to_string()]).status().expect("kill -CONT");
        assert!(status.success(), "SIGCONT");
    }

    /// Sends SIGTERM without waiting.
    pub fn terminate(&self) {
        let status = Command::new("kill").args(["-TERM", &self.pid().to_string()]).status().expect("kill -TERM");
        assert!(status.success());
    }

    /// Waits up to `limit` for the process to exit by itself; `None` if it is still running.
    pub fn wait_exit(&mut self, limit: Duration) -> Option<ExitStatus> {
        let child = self.child.as_mut().expect("running");
        let start = Instant::now();
        loop {
            if let Some(status) = child.try_wait().expect("try_wait") {
                return Some(status);
            }
            if start.elapsed() > limit {
                return None;
            }
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    /// Waits for the process to exit by itself.
    pub fn wait(mut self, limit: Duration) -> ExitStatus {
        let mut child = self.child.take().expect("running");
        let start = Instant::now();
        loop {
            if let Some(status) = child.try_wait().expect("try_wait") {
                return status;
            }
            if start.elapsed() > limit {
                let _ = child.kill();
                panic!("server did not exit within {limit:?}");
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

impl Drop for TestServer {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

/// A deterministic generator (SplitMix64) so that tests need no RNG crate and never vary.
pub struct Rng(u64);

impl Rng {
    pub fn new(seed: u64) -> Self {
        Self(seed)
    }
    pub fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }
    /// Uniform in [-1, 1).
    pub fn unit(&mut self) -> f32 {
        (self.next_u64() >> 40) as f32 / (1u64 << 23) as f32 - 1.0
    }
}

/// `n` vectors around `clusters` random centres; vector i belongs to cluster i % clusters.
pub fn clustered(n: usize, dim: usize, clusters: usize, spread: f32, seed: u64) -> Vec<Vec<f32>> {
    let mut rng = Rng::new(seed);
    let centres: Vec<Vec<f32>> = (0..clusters).map(|_| (0..dim).map(|_| rng.unit()).collect()).collect();
    (0..n).map(|i| centres[i % clusters].iter().map(|c| c + spread * rng.unit()).collect()).collect()
}

pub fn vector_item(id: impl Into<String>, label: impl Into<String>, v: &[f32]) -> Item {
    Item {
        id: id.into(),
        label: label.into(),
        metadata: Default::default(),
        content: Some(Content::Embedding(Embedding { values: v.to_vec() })),
    }
}

pub fn batch(index: &str, batch_id: u64, items: Vec<Item>) -> IngestRequest {
    IngestRequest { index: index.into(), batch_id, items }
}

/// Sends the batches over one stream and returns the responses in order.
pub async fn ingest(
    client: &mut ImageIndexClient<Channel>,
    batches: Vec<IngestRequest>,
) -> Result<Vec<proto::IngestResponse>, tonic::Status> {
    let stream = client.ingest(tokio_stream::iter(batches)).await?;
    let mut inbound = stream.into_inner();
    let mut responses = Vec::new();
    while let Some(r) = inbound.message().await? {
        responses.push(r);
    }
    Ok(responses)
}

pub async fn create(
    client: &mut ImageIndexClient<Channel>,
    name: &str,
    dim: u32,
    hash_bits: u32,
    tables: u32,
) -> proto::IndexInfo {
    client
        .create_index(proto::CreateIndexRequest {
            name: name.into(),
            dim,
            hash_bits,
            tables,
            seed: 7,
            ..Default::default()
        })
        .await
        .expect("create index")
        .into_inner()
}

pub fn query_id(index: &str, id: &str, top_k: u32) -> proto::QueryRequest {
    proto::QueryRequest {
        index: index.into(),
        query: Some(proto::query_request::Query::Id(id.into())),
        top_k,
        ..Default::default()
    }
}

pub fn query_vector(index: &str, v: &[f32], top_k: u32) -> proto::QueryRequest {
    proto::QueryRequest {
        index: index.into(),
        query: Some(proto::query_request::Query::Embedding(Embedding { values: v.to_vec() })),
        top_k,
        ..Default::default()
    }
}

#[allow(unused_imports)]
pub use imagelsh::demo::{FASHION_MNIST, SKIMAGE_DATA};

pub fn read_data(path: impl AsRef<Path>) -> Vec<u8> {
    let path = path.as_ref();
    std::fs::read(path).unwrap_or_else(|e| panic!("{}: {e} (scripts/test installs the test data)", path.display()))
}

/// The first `n` Fashion-MNIST test images as PNG files, with their class.
pub fn fashion_mnist_pngs(n: usize) -> Vec<(Vec<u8>, u8)> {
    let images = imagelsh::demo::fashion_mnist_pngs(0..n).expect("scripts/test installs the test data");
    assert_eq!(images.len(), n);
    images.into_iter().map(|f| (f.png, f.class)).collect()
}

pub fn image_item(id: impl Into<String>, label: impl Into<String>, bytes: Vec<u8>) -> Item {
    Item { id: id.into(), label: label.into(), metadata: Default::default(), content: Some(Content::Image(bytes)) }
}

/// `n` Fashion-MNIST images as PNG files under `class<c>/` folders, and one file that is not an
/// image; returns the folder.
pub fn class_folders(dir: &Path, n: usize) -> PathBuf {
    let root = dir.join("photos");
    for (i, (png, class)) in fashion_mnist_pngs(n).into_iter().enumerate() {
        let folder = root.join(format!("class{class}"));
        std::fs::create_dir_all(&folder).unwrap();
        std::fs::write(folder.join(format!("{i:05}.png")), png).unwrap();
    }
    std::fs::write(root.join("class0").join("broken.jpg"), b"not a jpeg at all").unwrap();
    root
}

/// A loopback address no one listens on now (a server restarted on the port a client uses).
/// Waits for the job to end; its exit code and its JSON summary.
pub fn finish(mut job: Child, limit: Duration) -> (i32, serde_json::Value) {
    let started = Instant::now();
    let status = loop {
        if let Some(status) = job.try_wait().unwrap() {
            break status;
        }
        if started.elapsed() > limit {
            let _ = job.kill();
            panic!("ingest did not end within {limit:?}");
        }
        std::thread::sleep(Duration::from_millis(50));
    };
    let mut out = String::new();
    job.stdout.take().unwrap().read_to_string(&mut out).unwrap();
    let summary = serde_json::from_str(out.lines().last().unwrap_or("")).unwrap_or_else(|e| panic!("{e}: {out:?}"));
    (status.code().unwrap_or(-1), summary)
}

pub fn number(summary: &serde_json::Value, key: &str) -> u64 {
    summary[key].as_u64().unwrap_or_else(|| panic!("{key} in {summary}"))
}

pub fn free_loopback_addr() -> String {
    let probe = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    probe.local_addr().unwrap().to_string()
}

/// A client that connects when first used (the server may be away, or restarting).
pub fn lazy_client(addr: &str) -> ImageIndexClient<Channel> {
    ImageIndexClient::new(Channel::from_shared(format!("http://{addr}")).unwrap().connect_lazy())
}

/// Items in `index`, 0 while it does not exist (a job creates it) or the server is away.
pub async fn items_in(client: &mut ImageIndexClient<Channel>, index: &str) -> u64 {
    client.get_index(proto::GetIndexRequest { name: index.into() }).await.map_or(0, |r| r.into_inner().items)
}

/// Waits (at most 3 minutes) until a running job has put `at_least` items into `index`.
pub async fn wait_for_items(client: &mut ImageIndexClient<Channel>, index: &str, at_least: u64) {
    let started = Instant::now();
    while items_in(client, index).await < at_least {
        assert!(started.elapsed() < Duration::from_secs(180), "the job indexed too little in 3 minutes");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}
