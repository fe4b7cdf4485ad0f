//! `imagelsh backup` (from a running server, or offline from a data directory) and
//! `imagelsh restore` (a backup back into a data directory, checked by opening it).

use std::path::{Path, PathBuf};
use std::sync::Arc;

use anyhow::Context;
use clap::Args;
use imagelsh::client::{self, BackupManifest, ConnectOptions, MANIFEST};
use imagelsh::config::DEFAULT_MODEL_DIM;
use imagelsh::index::{Engine, EngineOptions};
use imagelsh::store::{SledCatalog, SledOptions};

#[derive(Debug, Args)]
#[command(group(clap::ArgGroup::new("from").required(true).args(["server", "data_dir"])))]
pub struct BackupArgs {
    /// A running server to back up (admin token): it copies its data beside itself, pausing
    /// writes meanwhile, and streams the copy.
    #[arg(long)]
    pub server: Option<String>,
    /// Or a data directory, offline (no server may hold it).
    #[arg(long)]
    pub data_dir: Option<PathBuf>,
    #[arg(long, env = "IMAGELSH_TOKEN", hide_env_values = true)]
    pub token: Option<String>,
    /// PEM file of the CA that signed the server's certificate (https).
    #[arg(long, env = "IMAGELSH_TLS_CA")]
    pub tls_ca: Option<PathBuf>,
    /// Where the backup goes: a new or empty directory.
    #[arg(long)]
    pub to: PathBuf,
}

#[derive(Debug, Args)]
pub struct RestoreArgs {
    /// A complete backup (it holds imagelsh-backup.json).
    #[arg(long)]
    pub from: PathBuf,
    /// The data directory to create from it: new or empty (stop any server first).
    #[arg(long)]
    pub data_dir: PathBuf,
}

pub async fn backup(args: BackupArgs) -> anyhow::Result<()> {
    let started = std::time::Instant::now();
    let manifest = match (&args.server, &args.data_dir) {
        (Some(server), _) => {
            let options =
                ConnectOptions { token: args.token.clone(), tls_ca: args.tls_ca.clone(), ..ConnectOptions::to(server) };
            let mut client = client::connect(&options)?;
            client::backup_server(&mut client, server, &args.to).await?
        }
        (None, Some(dir)) => {
            let (dir, to) = (dir.clone(), args.to.clone());
            tokio::task::spawn_blocking(move || backup_offline(&dir, &to)).await??
        }
        (None, None) => anyhow::bail!("give --server or --data-dir"),
    };
    println!(
        "backup of {} written to {}: {} files, {} MB, {} items, in {:.1} s",
        manifest.source,
        args.to.display(),
        manifest.files,
        manifest.bytes >> 20,
        manifest.items,
        started.elapsed().as_secs_f64()
    );
    Ok(())
}

fn backup_offline(dir: &Path, to: &Path) -> anyhow::Result<BackupManifest> {
    anyhow::ensure!(dir.join("sled").exists(), "{} holds no imagelsh database", dir.display());
    let catalog = SledCatalog::open(dir, &SledOptions::default())?;
    let (engine, _) =
        Engine::open_with(Arc::new(catalog), &dir.join("wal"), DEFAULT_MODEL_DIM, EngineOptions::default())?;
    let report = engine.backup(to)?;
    engine.close()?;
    let manifest = BackupManifest::new(report.files, report.bytes, report.items, dir.display().to_string());
    manifest.write(to)?;
    Ok(manifest)
}

pub fn restore(args: &RestoreArgs) -> anyhow::Result<()> {
    let manifest = BackupManifest::read(&args.from)
        .with_context(|| format!("{} is not a complete backup (no {MANIFEST})", args.from.display()))?;
    let target = &args.data_dir;
    if target.exists() && std::fs::read_dir(target)?.next().is_some() {
        anyhow::bail!("{} is not empty: restore into a new directory (and point the server at it)", target.display());
    }
    let mut files = 0u32;
    for file in imagelsh::index::backup_files(&args.from)? {
        let relative = file.strip_prefix(&args.from)?;
        if relative == Path::new(MANIFEST) {
            continue;
        }
        let dest = target.join(relative);
        if let Some(parent) = dest.parent() {
            std::fs::create_dir_all(parent)?;
        }
        std::fs::copy(&file, &dest).with_context(|| format!("copying {}", file.display()))?;
        std::fs::File::open(&dest)?.sync_all()?;
        files += 1;
    }
    anyhow::ensure!(files == manifest.files, "the backup holds {files} files, its manifest says {}", manifest.files);
    // Opened once: the log is replayed into the store and every index is counted.
    let catalog = SledCatalog::open(target, &SledOptions::default())?;
    let (engine, recovery) =
        Engine::open_with(Arc::new(catalog), &target.join("wal"), DEFAULT_MODEL_DIM, EngineOptions::default())?;
    let infos = engine.list()?;
    let items: u64 = infos.iter().map(|i| i.items).sum();
    engine.close()?;
    println!(
        "restored {} into {}: {} indexes, {items} items ({} logged batches replayed)",
        args.from.display(),
        target.display(),
        infos.len(),
        recovery.replayed
    );
    for info in infos {
        println!("  {}: {} items", info.def.name, info.items);
    }
    Ok(())
}
