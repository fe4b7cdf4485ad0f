//! `imagelsh ingest`: a bulk job against a running server.

use std::io::Write;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use clap::Args;
use imagelsh::client::{self, Backoff, ConnectOptions, IngestJob, IngestSummary, Progress};

#[derive(Debug, Args)]
pub struct IngestArgs {
    #[command(flatten)]
    pub connect: ConnectOptions,
    /// The index to fill; created with the server's defaults if missing (see --no-create).
    #[arg(long)]
    pub index: String,
    /// Folders (the label is the first sub-folder's name), CSV or JSONL manifests (columns or
    /// keys path, id, label; CSV: other columns are metadata; JSONL: a metadata object), or
    /// IDX image files (*-idx3-ubyte[.gz], labels from the *-labels-idx1-ubyte beside them).
    #[arg(required = true)]
    pub sources: Vec<PathBuf>,
    /// Ingest streams at once.
    #[arg(long, default_value_t = 4)]
    pub streams: usize,
    /// Images per batch (at most the server's --max-batch-items).
    #[arg(long, default_value_t = 64)]
    pub batch_items: usize,
    /// Image bytes per batch, MiB (well under the server's --max-message-bytes).
    #[arg(long, default_value_t = 4)]
    pub batch_mb: u64,
    /// Unacknowledged batches per stream.
    #[arg(long, default_value_t = 4)]
    pub in_flight: usize,
    /// Batches read from disk (and IDX images encoded) at once.
    #[arg(long, default_value_t = 2)]
    pub readers: usize,
    /// Retries in a row, with exponential backoff and jitter, on UNAVAILABLE and
    /// RESOURCE_EXHAUSTED (a server's retry-after is honoured).
    #[arg(long, default_value_t = Backoff::default().retries)]
    pub max_retries: u32,
    /// Files larger than this are refused without being sent, MiB.
    #[arg(long, default_value_t = 32)]
    pub max_item_mb: u64,
    /// Send every item, also those whose ids the index already holds (they are replaced).
    #[arg(long)]
    pub no_resume: bool,
    /// Fail when the index does not exist instead of creating it.
    #[arg(long)]
    pub no_create: bool,
    /// Create a missing index without thumbnails (by default it keeps one of at most 4 KB per
    /// image, shown by `query --sheet` and the web page).
    #[arg(long)]
    pub no_thumbnails: bool,
    /// Where the refused items go (JSON lines: id, source, reason); written when any are.
    #[arg(long, default_value = "imagelsh-refused.jsonl")]
    pub refused_file: PathBuf,
    /// Names of IDX classes 0, 1, … as labels, comma-separated (default: the numbers).
    #[arg(long, value_delimiter = ',')]
    pub class_names: Vec<String>,
    /// Print the summary as JSON on stdout.
    #[arg(long)]
    pub json: bool,
}

/// Runs the job; the process's exit status is 130 when it was interrupted.
pub async fn run(args: IngestArgs) -> anyhow::Result<i32> {
    let clients = client::connect_all(&args.connect)?;
    let (sources, names) = (args.sources.clone(), args.class_names.clone());
    let (items, duplicates) = tokio::task::spawn_blocking(move || client::plan_sources(&sources, &names))
        .await?
        .context("reading the sources")?;
    let total = (items.len() + duplicates.len()) as u64;
    eprintln!(
        "{total} items in {} source(s); ingesting into {:?} at {}",
        args.sources.len(),
        args.index,
        args.connect.server
    );
    let job = IngestJob {
        index: args.index.clone(),
        streams: args.streams.max(1),
        batch_items: args.batch_items.max(1),
        batch_bytes: args.batch_mb.max(1) << 20,
        in_flight: args.in_flight.max(1),
        readers: args.readers.max(1),
        backoff: Backoff { retries: args.max_retries, ..Backoff::default() },
        resume: !args.no_resume,
        create_missing: !args.no_create,
        thumbnails: !args.no_thumbnails,
        max_item_bytes: args.max_item_mb.max(1) << 20,
    };
    let progress = Arc::new(Progress::on_stderr(total, "ingest", Duration::from_secs(5)));
    let stop = super::stop_on_signal("ingest");
    let outcome = client::run_ingest(clients, &job, items, duplicates, &progress, stop).await;
    if let Some(progress) = Arc::into_inner(progress) {
        drop(progress);
    }
    let summary = outcome?;
    if !summary.refused.is_empty() {
        write_refused(&args.refused_file, &summary)?;
    }
    print_summary(&args, &summary)?;
    Ok(if summary.interrupted { 130 } else { 0 })
}

fn write_refused(path: &PathBuf, summary: &IngestSummary) -> anyhow::Result<()> {
    let file = std::fs::File::create(path).with_context(|| format!("writing {}", path.display()))?;
    let mut out = std::io::BufWriter::new(file);
    for refusal in &summary.refused {
        serde_json::to_writer(&mut out, refusal)?;
        out.write_all(b"\n")?;
    }
    out.flush()?;
    Ok(())
}

fn print_summary(args: &IngestArgs, s: &IngestSummary) -> anyhow::Result<()> {
    let seconds = s.elapsed.as_secs_f64();
    let rate = s.indexed as f64 / seconds.max(1e-3);
    if args.json {
        let summary = serde_json::json!({
            "index": args.index,
            "planned": s.planned,
            "indexed": s.indexed,
            "skipped": s.skipped,
            "refused": s.refused.len(),
            "remaining": s.remaining(),
            "retries": s.retries,
            "seconds": seconds,
            "items_per_second": rate,
            "interrupted": s.interrupted,
            "refused_file": (!s.refused.is_empty()).then(|| args.refused_file.display().to_string()),
        });
        println!("{summary}");
        return Ok(());
    }
    println!(
        "{}: {} indexed, {} already there, {} refused, {} not sent, of {} items in {seconds:.1} s ({rate:.0} items/s, {} retries)",
        if s.interrupted { "interrupted" } else { "done" },
        s.indexed,
        s.skipped,
        s.refused.len(),
        s.remaining(),
        s.planned,
        s.retries
    );
    if !s.refused.is_empty() {
        let mut reasons: std::collections::BTreeMap<&str, usize> = Default::default();
        for refusal in &s.refused {
            *reasons.entry(refusal.reason.as_str()).or_default() += 1;
        }
        for (reason, count) in reasons.iter().take(10) {
            println!("  {count} × {reason}");
        }
        println!("refused items: {}", args.refused_file.display());
    }
    if s.interrupted {
        println!("run the same command again to send the rest");
    }
    Ok(())
}
