//! `imagelsh demo`: against `--server`, or against a server of its own (this executable's
//! `serve`, on a loopback port over a fresh data directory) that it stops when done.

use std::io::{BufRead, BufReader};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use anyhow::Context;
use clap::Args;
use imagelsh::client::{self, ConnectOptions};
use imagelsh::demo::{DemoOptions, DemoReport};

#[derive(Debug, Args)]
pub struct DemoArgs {
    /// A running server (http://host:port or https://); without it the demo starts its own.
    #[arg(long, visible_alias = "addr", env = "IMAGELSH_DEMO_ADDR")]
    pub server: Option<String>,
    /// Bearer token for --server.
    #[arg(long, env = "IMAGELSH_TOKEN", hide_env_values = true)]
    pub token: Option<String>,
    /// PEM file of the CA that signed --server's certificate (https).
    #[arg(long, env = "IMAGELSH_TLS_CA")]
    pub tls_ca: Option<PathBuf>,
    /// The data directory of the demo's own server (default: a temporary one, removed after).
    #[arg(long)]
    pub data_dir: Option<PathBuf>,
    #[arg(long, default_value = "demo")]
    pub index: String,
    /// Fashion-MNIST test images to use: 80 % are indexed, 20 % held out as queries.
    #[arg(long, default_value_t = 2000)]
    pub images: usize,
    /// Matches per query, for precision@k and the sheets.
    #[arg(long, default_value_t = 8)]
    pub top_k: u32,
    /// Where the contact sheets (PNG) are written.
    #[arg(long, default_value = "demo-sheets")]
    pub sheets: PathBuf,
    /// Also print the report as JSON (the last line of stdout).
    #[arg(long)]
    pub json: bool,
}

pub async fn run(args: DemoArgs) -> anyhow::Result<()> {
    let options = DemoOptions {
        index: args.index.clone(),
        images: args.images,
        top_k: args.top_k.max(1),
        sheets: args.sheets.clone(),
        progress: true,
    };
    let report = match &args.server {
        Some(server) => {
            let connect = ConnectOptions {
                token: args.token.clone(),
                tls_ca: args.tls_ca.clone(),
                ..ConnectOptions::to(server.clone())
            };
            let mut client = client::connect(&connect)?;
            wait_until_serving(&mut client).await?;
            imagelsh::demo::run(&mut client, &options).await?
        }
        None => {
            let temporary = match &args.data_dir {
                Some(_) => None,
                None => Some(tempfile::Builder::new().prefix("imagelsh-demo-").tempdir()?),
            };
            let data_dir = args.data_dir.clone().or_else(|| temporary.as_ref().map(|t| t.path().to_path_buf()));
            let data_dir = data_dir.context("a data directory for the demo's server")?;
            let mut server = OwnServer::start(&data_dir)?;
            println!("started a server on {} (data in {})", server.addr, data_dir.display());
            let mut client = client::connect(&ConnectOptions::to(format!("http://{}", server.addr)))?;
            wait_until_serving(&mut client).await?;
            let report = imagelsh::demo::run(&mut client, &options).await;
            server.stop();
            report?
        }
    };
    if args.json {
        println!("{}", json(&report));
    }
    Ok(())
}

/// The server may still be starting (scripts/serve starts both at once).
async fn wait_until_serving(client: &mut client::Client) -> anyhow::Result<()> {
    let started = std::time::Instant::now();
    loop {
        match client.list_indexes(imagelsh::proto::ListIndexesRequest {}).await {
            Ok(_) => return Ok(()),
            Err(status) if status.code() == tonic::Code::Unavailable && started.elapsed() < Duration::from_secs(60) => {
                tokio::time::sleep(Duration::from_millis(250)).await
            }
            Err(status) => return Err(status).context("reaching the server"),
        }
    }
}

fn json(report: &DemoReport) -> serde_json::Value {
    serde_json::json!({
        "indexed": report.indexed,
        "refused": report.refused,
        "ingest_secs": report.ingest.as_secs_f64(),
        "queries": report.queries,
        "query_secs": report.query_time.as_secs_f64(),
        "top_k": report.top_k,
        "precision": report.precision,
        "by_class": report.by_class.iter().map(|c| serde_json::json!({
            "class": c.class, "queries": c.queries, "precision": c.precision,
        })).collect::<Vec<_>>(),
        "photos_found": report.photos_found.0,
        "photos": report.photos_found.1,
        "sheets": report.sheets,
    })
}

/// This executable's `serve` on an ephemeral loopback port.
struct OwnServer {
    child: Child,
    addr: String,
}

impl OwnServer {
    fn start(data_dir: &std::path::Path) -> anyhow::Result<Self> {
        let exe = std::env::current_exe().context("finding this executable")?;
        let mut child = Command::new(exe)
            .args(["serve", "--listen", "127.0.0.1:0", "--http-listen", "off", "--data-dir"])
            .arg(data_dir)
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .context("starting the demo's server")?;
        let stdout = child.stdout.take().context("the server's stdout")?;
        let mut stdout = BufReader::new(stdout);
        let mut line = String::new();
        stdout.read_line(&mut line).context("reading the server's address")?;
        // What else it prints is drained, so that the server never writes into a closed pipe.
        std::thread::spawn(move || std::io::copy(&mut stdout, &mut std::io::sink()));
        match line.trim().strip_prefix("imagelsh listening on ") {
            Some(addr) => Ok(Self { addr: addr.to_string(), child }),
            None => {
                let status = child.wait()?;
                anyhow::bail!("the demo's server did not start ({status}); its log is above")
            }
        }
    }

    /// SIGTERM, then a wait for the clean exit (the data is flushed).
    fn stop(&mut self) {
        #[cfg(target_os = "linux")]
        let asked = rustix::process::Pid::from_raw(self.child.id() as i32)
            .is_some_and(|pid| rustix::process::kill_process(pid, rustix::process::Signal::TERM).is_ok());
        #[cfg(not(target_os = "linux"))]
        let asked = false;
        if !asked {
            let _ = self.child.kill();
        }
        let _ = self.child.wait();
    }
}

impl Drop for OwnServer {
    fn drop(&mut self) {
        if matches!(self.child.try_wait(), Ok(None)) {
            self.stop();
        }
    }
}
