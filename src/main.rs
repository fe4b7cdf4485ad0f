//! The `imagelsh` command line.

use std::io::Write;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use clap::{CommandFactory, FromArgMatches, Parser, Subcommand};
use imagelsh::api::{self, GuardLimits, Limits, ServeOptions, TlsFiles, TokenSource};
use imagelsh::config::{ClusterConfig, DEFAULT_MODEL_DIM, ModelConfig, PipelineConfig, ServeConfig, StorageConfig};
use imagelsh::config_file;
use imagelsh::embed::{Embedder, ModelCard, OnnxEmbedder, OrtOptions};
use imagelsh::index::SharedEngine;
use imagelsh::index::{Engine, EngineOptions};
use imagelsh::pipeline::ImagePipeline;
use imagelsh::store::cluster::{AckLevel, AckPolicy, ClusterStore};
use imagelsh::store::{SledCatalog, SledOptions, migrate};
use imagelsh::usecase::Indexes;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use tracing_subscriber::EnvFilter;

mod cli;

#[derive(Parser)]
#[command(name = "imagelsh", version, about = "Image embedding and similarity search over a persistent LSH index")]
struct Cli {
    /// Logs (on stderr) as text or as one JSON object per line.
    #[arg(long, global = true, value_enum, env = "IMAGELSH_LOG_FORMAT", default_value_t = LogFormat::Text)]
    log_format: LogFormat,
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Clone, Copy, clap::ValueEnum)]
enum LogFormat {
    Text,
    Json,
}

#[derive(Subcommand)]
enum Command {
    /// Run the gRPC service.
    Serve(Box<ServeConfig>),
    /// Bring a data directory's on-disk layout up to this version (also done at every start).
    Migrate(StorageConfig),
    /// Verify a data directory offline (stop the server first): every item in all L tables, no
    /// bucket entry without an item, counts, ids and embedding checksums; the log is applied
    /// first. Exits with status 2 when something is wrong (and not repaired).
    /// With --store, checks the indexes on the cluster store instead (servers may run): records
    /// no id names, stale bucket entries, ids without records, missing entries, counts.
    Check {
        #[command(flatten)]
        storage: StorageConfig,
        #[command(flatten)]
        cluster: ClusterConfig,
        /// Fix what is found: bucket entries, counts and ids are rewritten; items whose embedding
        /// is lost are deleted.
        #[arg(long)]
        repair: bool,
        /// On the cluster store, how long a record or bucket entry found unnamed must stay so
        /// before repair removes it (an ingest in flight names its items within milliseconds).
        #[arg(long, default_value_t = 10)]
        orphan_grace_secs: u64,
    },
    /// Give back the space of replaced and deleted items and rewrite the database, offline
    /// (the server does both by itself while it runs; see --compact-removed-share).
    Compact(StorageConfig),
    /// The model alone on this machine: images/s per batch size as the server runs it (or as
    /// one plain session, --plain), each shape's first run, the runs of a sequence of sizes, and
    /// embeddings of real images to compare providers.
    BenchModel(Box<cli::bench_model::BenchModelArgs>),
    /// Compute a model's center (the mean embedding of a set of images) for its card.
    Center {
        #[command(flatten)]
        model: ModelConfig,
        /// Where to write the center (dim × f32 little-endian).
        #[arg(long)]
        out: std::path::PathBuf,
        /// The calibration images.
        images: Vec<std::path::PathBuf>,
    },
    /// Ingest folders, manifests or IDX files into an index of a running server: several
    /// streams, retries, and a rerun resumes where an interrupted job stopped.
    Ingest(Box<cli::ingest::IngestArgs>),
    /// The best matches of an image file or a stored item, from a running server.
    Query(Box<cli::query::QueryArgs>),
    /// A running server's indexes and their sizes.
    Stats(cli::stats::StatsArgs),
    /// A consistent copy of every index while the server runs and ingests (--server), or of a
    /// data directory offline (--data-dir).
    Backup(Box<cli::backup::BackupArgs>),
    /// A backup back into a new data directory, opened once to check it.
    Restore(cli::backup::RestoreArgs),
    /// The notebook's story: real labelled images found on this machine, 80 % indexed and 20 %
    /// queried, precision@k by class and contact sheets (PNG); against --server, or a server of
    /// its own.
    Demo(Box<cli::demo::DemoArgs>),
}

/// The command line, with `serve --config FILE`'s values as the defaults of their flags; and
/// what `--print-config` prints, when asked for.
fn parse_command_line() -> anyhow::Result<(Cli, Option<String>)> {
    let argv: Vec<std::ffi::OsString> = std::env::args_os().collect();
    let mut command = Cli::command();
    let mut file_ids = Vec::new();
    if let Some(path) = config_file::config_path(&argv, "serve") {
        let serve = command.find_subcommand("serve").context("the serve subcommand")?;
        let settings = config_file::read_settings(&path, serve)?;
        file_ids = settings.iter().map(|s| s.id.clone()).collect();
        command = command.mut_subcommand("serve", |serve| config_file::with_settings(serve, &settings));
    }
    let matches = command.clone().get_matches_from(argv);
    let cli = Cli::from_arg_matches(&matches)?;
    let printed = match (&cli.command, matches.subcommand()) {
        (Command::Serve(config), Some(("serve", serve_matches))) if config.print_config => {
            let serve = command.find_subcommand("serve").context("the serve subcommand")?;
            Some(config_file::render_effective(serve, serve_matches, &file_ids))
        }
        _ => None,
    };
    Ok((cli, printed))
}

fn main() -> anyhow::Result<()> {
    let (cli, printed_config) = parse_command_line()?;
    if let Some(text) = printed_config {
        print!("{text}");
        return Ok(());
    }
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info,sled=warn,ort=warn"));
    let logs = tracing_subscriber::fmt().with_env_filter(filter).with_writer(std::io::stderr);
    match cli.log_format {
        LogFormat::Text => logs.init(),
        // Every event carries its spans, outermost first: the call (its method), then the
        // batch (its id and size) or the model's inference batch.
        LogFormat::Json => logs.json().with_current_span(true).with_span_list(true).init(),
    }
    match cli.command {
        Command::Serve(config) => {
            tokio::runtime::Builder::new_multi_thread().enable_all().build()?.block_on(serve(*config))
        }
        Command::Migrate(storage) => migrate_data_dir(&storage),
        Command::Check { cluster: ClusterConfig { store: Some(url), .. }, repair, orphan_grace_secs, .. } => {
            let grace = Duration::from_secs(orphan_grace_secs);
            client_runtime()?.block_on(check_cluster(&url, repair, grace))
        }
        Command::Check { storage, repair, .. } => check_data_dir(&storage, repair),
        Command::Compact(storage) => compact_data_dir(&storage),
        Command::BenchModel(args) => cli::bench_model::run(*args),
        Command::Center { model, out, images } => write_center(&model, &out, &images),
        Command::Ingest(args) => {
            let code = client_runtime()?.block_on(cli::ingest::run(*args))?;
            std::process::exit(code)
        }
        Command::Query(args) => client_runtime()?.block_on(cli::query::run(*args)),
        Command::Stats(args) => client_runtime()?.block_on(cli::stats::run(args)),
        Command::Backup(args) => client_runtime()?.block_on(cli::backup::backup(*args)),
        Command::Restore(args) => cli::backup::restore(&args),
        Command::Demo(args) => client_runtime()?.block_on(cli::demo::run(*args)),
    }
}

fn client_runtime() -> std::io::Result<tokio::runtime::Runtime> {
    tokio::runtime::Builder::new_multi_thread().enable_all().build()
}

fn migrate_data_dir(storage: &StorageConfig) -> anyhow::Result<()> {
    let (before, applied) =
        SledCatalog::migrate(&storage.data_dir).with_context(|| format!("migrating {}", storage.data_dir.display()))?;
    if applied.is_empty() {
        println!("layout version {before} is current; nothing to do");
    }
    for step in applied {
        println!("applied layout version {} ({})", step.version, step.name);
    }
    println!("layout version now {}", migrate::CURRENT_VERSION);
    Ok(())
}

/// The engine over a data directory, for commands that work on it offline; `repair_log` cuts a
/// damaged log back and continues one that fell behind the store (`check --repair`).
fn open_offline(storage: &StorageConfig, repair_log: bool) -> anyhow::Result<Engine> {
    let dir = &storage.data_dir;
    anyhow::ensure!(dir.join("sled").exists(), "{} holds no imagelsh database", dir.display());
    let catalog = SledCatalog::open(dir, &SledOptions::default()).with_context(|| open_hint(dir))?;
    let (engine, recovery) = Engine::open_with(
        Arc::new(catalog),
        &dir.join("wal"),
        DEFAULT_MODEL_DIM,
        EngineOptions { repair_log, ..Default::default() },
    )
    .with_context(|| open_hint(dir))?;
    println!("{}: opened; {} logged batches taken back from the log", dir.display(), recovery.replayed);
    Ok(engine)
}

/// What to say when a data directory does not open.
fn open_hint(dir: &std::path::Path) -> String {
    format!(
        "opening data directory {dir} (if it is damaged: `imagelsh check --data-dir {dir} --repair`, or restore a \
         backup)",
        dir = dir.display()
    )
}

fn check_data_dir(storage: &StorageConfig, repair: bool) -> anyhow::Result<()> {
    let engine = open_offline(storage, repair)?;
    let reports = engine.check(repair)?;
    engine.close()?;
    let mut unrepaired = 0;
    for report in &reports {
        println!(
            "index {:?}: {} items, {} bucket entries, {} problems{}",
            report.index,
            report.items,
            report.entries,
            report.problems.len(),
            if report.repaired { ", repaired" } else { "" }
        );
        for problem in report.problems.iter().take(20) {
            println!("  {problem}");
        }
        if report.problems.len() > 20 {
            println!("  … and {} more", report.problems.len() - 20);
        }
        if !report.repaired {
            unrepaired += report.problems.len();
        }
    }
    if unrepaired > 0 {
        println!("{unrepaired} problems found; `--repair` fixes them");
        std::process::exit(2);
    }
    println!("ok");
    Ok(())
}

/// `imagelsh check --store redis://…`: every index on the cluster store.
async fn check_cluster(url: &str, repair: bool, grace: Duration) -> anyhow::Result<()> {
    // The repair's writes wait for nothing beyond the primaries: the check reports, and a
    // second pass confirms.
    let policy = AckPolicy { level: AckLevel::Local, timeout: Duration::from_secs(2) };
    let store = ClusterStore::connect(url, policy).await.with_context(|| format!("connecting to {url}"))?;
    let mut unrepaired = 0u64;
    for index in store.list().await? {
        let report = store.check(&index, repair, grace).await?;
        let p = &report.problems;
        println!(
            "index {:?}: {} items, {} bucket entries; {} orphan records, {} stale entries, {} ids without records, \
             {} missing entries{}{}",
            report.index,
            report.items,
            report.bucket_entries,
            p.orphan_records,
            p.stale_entries,
            p.dangling_ids,
            p.missing_entries,
            p.count.map_or(String::new(), |(counted, stored)| format!(", count {stored} stored for {counted}")),
            if report.repaired { "; repaired" } else { "" }
        );
        if !report.repaired {
            // Orphans and stale entries are invisible to queries: what an interrupted write
            // leaves, not damage.
            unrepaired += p.dangling_ids + p.missing_entries + u64::from(p.count.is_some());
        }
    }
    // Keys no catalog entry leads to (a create that stopped, writes racing a drop): invisible
    // too, memory only.
    let leftovers = store.check_uncatalogued(repair, grace).await?;
    if leftovers.found.is_empty() {
        println!("keys without a catalog entry: none");
    } else {
        let uids: Vec<String> = leftovers.found.iter().map(|l| format!("{} under uid {}", l.keys, l.uid)).collect();
        let removed = if repair { format!("; {} removed", leftovers.removed) } else { String::new() };
        println!("keys without a catalog entry: {}{removed}", uids.join(", "));
    }
    if unrepaired > 0 {
        println!("{unrepaired} problems found; `--repair` fixes what can be fixed");
        std::process::exit(2);
    }
    println!("ok");
    Ok(())
}

fn compact_data_dir(storage: &StorageConfig) -> anyhow::Result<()> {
    let engine = open_offline(storage, false)?;
    let report = engine.compact()?;
    engine.close()?;
    println!("removed items' records: {} MB given back", report.reclaimed >> 20);
    if let Some(store) = report.store {
        println!(
            "database rewritten: {} MB → {} MB in {:.1} s",
            store.before >> 20,
            store.after >> 20,
            (store.copied + store.paused).as_secs_f64()
        );
    }
    Ok(())
}

/// The embedded store: the data directory's sled database and write-ahead log.
async fn open_data_dir(config: &ServeConfig, default_dim: u32) -> anyhow::Result<Engine> {
    let options = SledOptions {
        cache_capacity: config.cache_mb << 20,
        fsync: config.fsync,
        checkpoint_bytes: config.write.checkpoint_kb.saturating_mul(1024),
    };
    let data_dir = config.storage.data_dir.clone();
    let started = std::time::Instant::now();
    let catalog = tokio::task::spawn_blocking(move || SledCatalog::open(&data_dir, &options))
        .await?
        .with_context(|| open_hint(&config.storage.data_dir))?;
    tracing::info!(ms = started.elapsed().as_millis() as u64, "database open");
    let options = EngineOptions {
        full_scan_threshold: config.full_scan_threshold_kb.saturating_mul(1024),
        write: config.write.options(config.fsync),
        repair_log: false,
    };
    let log_dir = config.storage.data_dir.join("wal");
    let started = std::time::Instant::now();
    let (engine, recovery) =
        tokio::task::spawn_blocking(move || Engine::open_with(Arc::new(catalog), &log_dir, default_dim, options))
            .await?
            .with_context(|| format!("opening the indexes in {}", config.storage.data_dir.display()))?;
    tracing::info!(
        replayed = recovery.replayed,
        ms = started.elapsed().as_millis() as u64,
        "indexes open; logged batches not yet applied taken back from the log"
    );
    Ok(engine)
}

async fn serve(config: ServeConfig) -> anyhow::Result<()> {
    let metrics = imagelsh::telemetry::install()
        .map_err(|error| tracing::warn!(%error, "no metrics recorder: /metrics answers 503"))
        .ok();
    let pipeline = if config.model.no_model {
        tracing::info!("no embedding model: serving embeddings only");
        None
    } else {
        Some(Arc::new(start_pipeline(&config.model, &config.pipeline).await?))
    };
    let default_dim = pipeline.as_ref().map_or(DEFAULT_MODEL_DIM, |p| p.card().dim);
    let (indexes, local): (Indexes, Option<Arc<Engine>>) = match &config.cluster.store {
        Some(url) => {
            let policy = config.cluster.ack_policy();
            let store = ClusterStore::connect(url, policy)
                .await
                .with_context(|| format!("connecting to the cluster store {url} (--store)"))?;
            tracing::info!(store = %url, ack = policy.level.as_str(), ack_timeout_ms = policy.timeout.as_millis() as u64, "indexes on the cluster store");
            (Arc::new(SharedEngine::new(store, default_dim)).into(), None)
        }
        None => {
            let engine = Arc::new(open_data_dir(&config, default_dim).await?);
            (engine.clone().into(), Some(engine))
        }
    };

    let listener =
        TcpListener::bind(&config.listen).await.with_context(|| format!("listening on {}", config.listen))?;
    let addr = listener.local_addr()?;
    // A machine-readable line for supervisors and tests that start us on port 0.
    println!("imagelsh listening on {addr}");
    std::io::stdout().flush()?;
    tracing::info!(%addr, data_dir = %config.storage.data_dir.display(), "serving");

    let shutdown = CancellationToken::new();
    tokio::spawn(cancel_on_signal(shutdown.clone()));
    let tokens = TokenSource::load(config.security.tokens_file.clone(), std::env::var("IMAGELSH_TOKENS").ok())?;
    tokio::spawn(reload_tokens_on_hangup(tokens.clone()));
    let count = tokens.tokens().len();
    if count == 0 && !addr.ip().is_loopback() {
        tracing::warn!(%addr, "no tokens (--tokens-file, IMAGELSH_TOKENS): anyone who can reach this address may read, write and drop every index");
    } else {
        tracing::info!(tokens = count, "bearer tokens loaded");
    }
    let security = &config.security;
    let tls = match (&security.tls_cert, &security.tls_key) {
        (Some(cert), Some(key)) => {
            Some(TlsFiles { cert: cert.clone(), key: key.clone(), client_ca: security.tls_client_ca.clone() })
        }
        _ => None,
    };
    if tls.is_none() && !addr.ip().is_loopback() {
        tracing::warn!(%addr, "no TLS (--tls-cert, --tls-key): calls and tokens cross the network in clear text");
    }
    let options = ServeOptions {
        limits: Limits {
            max_message_bytes: config.max_message_bytes,
            max_concurrent_streams: config.max_concurrent_streams,
        },
        requests: config.limits.request_limits(),
        guard: GuardLimits {
            max_calls: config.limits.max_calls,
            max_streams: config.limits.max_streams,
            max_unary: Duration::from_secs(config.limits.max_call_secs),
        },
        tls,
        tokens,
        reflection: security.reflection,
        stream_idle: Duration::from_secs(config.limits.stream_idle_secs.max(1)),
        backup_staging: config.storage.data_dir.join("backup-staging"),
    };
    if config.http_listen != "off" {
        let http = TcpListener::bind(&config.http_listen)
            .await
            .with_context(|| format!("listening on {} (--http-listen)", config.http_listen))?;
        let http_addr = http.local_addr()?;
        println!("imagelsh http on {http_addr}");
        std::io::stdout().flush()?;
        if !http_addr.ip().is_loopback() && options.tokens.tokens().is_empty() {
            tracing::warn!(%http_addr, "the HTTP port listens beyond loopback without tokens: anyone may read its metrics and query its indexes");
        }
        let state = api::HttpState {
            cases: imagelsh::usecase::UseCases::new(indexes.clone(), pipeline.clone(), options.requests.clone()),
            tokens: options.tokens.clone(),
            max_body_bytes: options.limits.max_message_bytes,
            max_calls: options.guard.max_calls,
            metrics,
            shutdown: shutdown.clone(),
        };
        tokio::spawn(async move {
            if let Err(error) = api::serve_http(http, state).await {
                tracing::error!(%error, "the HTTP port stopped");
            }
        });
        tracing::info!(%http_addr, "HTTP port: the web page (/), /metrics, /healthz, /readyz");
    }
    let mut server = tokio::spawn(api::serve(indexes, pipeline, listener, options, shutdown.clone()));
    let grace = Duration::from_secs(config.shutdown_grace_secs);
    tokio::select! {
        result = &mut server => result??,
        _ = async { shutdown.cancelled().await; tokio::time::sleep(grace).await } => {
            tracing::warn!(?grace, "calls still running after the grace period; stopping them");
            server.abort();
            // Waits for the aborted task to drop its handles on the database.
            let _ = server.await;
        }
    }
    if let Some(engine) = local {
        // Everything logged goes into the store, so that the next start replays nothing.
        tokio::task::spawn_blocking(move || engine.close()).await??;
        if config.checkpoint_on_shutdown {
            let started = std::time::Instant::now();
            let data_dir = config.storage.data_dir.clone();
            match tokio::task::spawn_blocking(move || SledCatalog::checkpoint_closed(&data_dir)).await? {
                Ok(()) => tracing::info!(ms = started.elapsed().as_millis(), "database checkpointed for a fast start"),
                // A call still running past the grace period holds the database: the next start replays the log.
                Err(error) => tracing::warn!(%error, "no checkpoint; the next start replays the log"),
            }
        }
    }
    tracing::info!("stopped");
    Ok(())
}

fn write_center(model: &ModelConfig, out: &std::path::Path, images: &[std::path::PathBuf]) -> anyhow::Result<()> {
    let mut card = ModelCard::load(&ModelCard::path_for(&model.model))?;
    card.center = None;
    let preprocessor = imagelsh::pipeline::Preprocessor::new(card.clone(), Default::default());
    let options = OrtOptions { instances: Some(1), ..model.ort_options().map_err(anyhow::Error::msg)? };
    let embedder = OnnxEmbedder::load(&model.model, card.clone(), &options)?;
    let mut sum = vec![0f64; card.dim as usize];
    let mut used = 0usize;
    for path in images {
        let bytes = std::fs::read(path).with_context(|| path.display().to_string())?;
        match preprocessor.preprocess(&bytes) {
            Ok(input) => {
                let embedding = embedder.embed(&input, 1)?;
                sum.iter_mut().zip(embedding.iter()).for_each(|(s, x)| *s += f64::from(*x));
                used += 1;
            }
            Err(e) => eprintln!("skipping {}: {e}", path.display()),
        }
    }
    anyhow::ensure!(used > 0, "no usable images");
    let center: Vec<u8> = sum.iter().flat_map(|s| ((s / used as f64) as f32).to_le_bytes()).collect();
    std::fs::write(out, center)?;
    println!("center of {used} images written to {}", out.display());
    Ok(())
}

async fn start_pipeline(model: &ModelConfig, pipeline: &PipelineConfig) -> anyhow::Result<ImagePipeline> {
    let options = model.ort_options().map_err(anyhow::Error::msg)?;
    let card_path = ModelCard::path_for(&model.model);
    let card = ModelCard::load(&card_path)?;
    let model_path = model.model.clone();
    let embedder = tokio::task::spawn_blocking(move || OnnxEmbedder::load(&model_path, card, &options))
        .await?
        .with_context(|| format!("loading model {}", model.model.display()))?;
    let batcher = pipeline.batcher(&embedder);
    let decoders = pipeline.decoders();
    tracing::info!(
        provider = embedder.provider(),
        batch_sizes = %embedder.batch_sizes(),
        instances = embedder.instances(),
        threads_per_instance = embedder.threads(),
        max_delay = ?batcher.max_delay,
        queue = batcher.queue_capacity,
        decoders,
        "inference settings (defaults follow the provider and the cores)"
    );
    Ok(ImagePipeline::start(Arc::new(embedder), pipeline.limits(), decoders, batcher))
}

/// SIGHUP reloads the tokens; a file that no longer parses leaves the tokens in force.
async fn reload_tokens_on_hangup(tokens: TokenSource) {
    let Ok(mut hangups) = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::hangup()) else {
        tracing::error!("cannot listen for SIGHUP: tokens are not reloaded");
        return;
    };
    while hangups.recv().await.is_some() {
        match tokens.reload() {
            Ok(count) => tracing::info!(tokens = count, "tokens reloaded"),
            Err(error) => tracing::error!(%error, "tokens not reloaded; the previous ones stay in force"),
        }
    }
}

async fn cancel_on_signal(shutdown: CancellationToken) {
    let terminate = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut s) => {
                s.recv().await;
            }
            Err(e) => {
                tracing::error!(error = %e, "cannot listen for SIGTERM");
                std::future::pending::<()>().await
            }
        }
    };
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {}
        _ = terminate => {}
    }
    tracing::info!("shutdown requested: finishing calls in flight");
    shutdown.cancel();
}
