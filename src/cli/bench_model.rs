//! `imagelsh bench-model`: the model alone on this machine, as the server runs it (fixed batch
//! shapes, its input buffers, every instance at once) and, with `--plain`, as one plain session
//! run on host memory at any shape. It prints images/s per batch size, each shape's first run,
//! and the time of every run of a `--sequence` of sizes (does a shape seen before cost again?).
//! `--embeddings-out` writes the embeddings of real images, to compare providers.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Context;
use clap::Args;
use imagelsh::config::ModelConfig;
use imagelsh::embed::{Embedder, ModelCard, OnnxEmbedder, PlainSession};
use imagelsh::pipeline::Preprocessor;
use serde_json::json;

#[derive(Debug, Args)]
pub struct BenchModelArgs {
    #[command(flatten)]
    pub model: ModelConfig,
    /// Measure one plain session (Session::run on host memory, any shape, every core), the
    /// path imagelsh took before fixed shapes; --sizes and --sequence then choose the shapes.
    #[arg(long)]
    pub plain: bool,
    /// Batch sizes to measure throughput at (default: the server's batch sizes).
    #[arg(long, value_delimiter = ',')]
    pub sizes: Vec<usize>,
    /// Seconds of runs per size.
    #[arg(long, default_value_t = 3.0)]
    pub seconds: f64,
    /// Sizes to run one after another, each run timed: `64x5,32,64,32` (SIZE or SIZExCOUNT).
    #[arg(long)]
    pub sequence: Option<String>,
    /// Real images (files or folders) for --embeddings-out; at most 256 are used.
    #[arg(long, num_args = 1..)]
    pub images: Vec<PathBuf>,
    /// Write the embeddings of --images here (rows × dim f32, little-endian; names in FILE.txt).
    #[arg(long)]
    pub embeddings_out: Option<PathBuf>,
    /// Write ONNX Runtime's profile of each session (JSON) under this path prefix.
    #[arg(long)]
    pub profile: Option<PathBuf>,
    /// One JSON object per measurement on stdout.
    #[arg(long)]
    pub json: bool,
}

/// How the model is run: the server's embedder, or one plain session.
enum Runner {
    Serving(Arc<OnnxEmbedder>),
    Plain(Box<PlainSession>),
}

impl Runner {
    fn provider(&self) -> &str {
        match self {
            Runner::Serving(e) => e.provider(),
            Runner::Plain(p) => p.provider(),
        }
    }
}

pub fn run(args: BenchModelArgs) -> anyhow::Result<()> {
    let card = ModelCard::load(&ModelCard::path_for(&args.model.model))?;
    let mut options = args.model.ort_options().map_err(anyhow::Error::msg)?;
    options.profile = args.profile.clone();
    let report = Report { json: args.json };
    let started = Instant::now();
    let runner = if args.plain {
        Runner::Plain(Box::new(PlainSession::load(&args.model.model, card.clone(), &options)?))
    } else {
        Runner::Serving(Arc::new(OnnxEmbedder::load(&args.model.model, card.clone(), &options)?))
    };
    let load = started.elapsed();
    match &runner {
        Runner::Serving(embedder) => {
            report.line(
                json!({"kind": "load", "path": "serving", "provider": embedder.provider(), "seconds": load.as_secs_f64(),
                    "batch_sizes": embedder.batch_sizes().to_string(), "instances": embedder.instances(),
                    "threads_per_instance": embedder.threads(), "pinned": embedder.pinned()}),
                format!(
                    "{} provider: loaded in {:.2} s; batch sizes {}, {} instance(s) × {} thread(s){}",
                    embedder.provider(),
                    load.as_secs_f64(),
                    embedder.batch_sizes(),
                    embedder.instances(),
                    embedder.threads(),
                    if embedder.pinned() { ", pinned input" } else { "" }
                ),
            );
            for warm in embedder.warmup() {
                report.line(
                    json!({"kind": "warmup", "size": warm.size, "ms": warm.first_run.as_secs_f64() * 1e3}),
                    format!("  first run of batch {:>4}: {:8.1} ms", warm.size, warm.first_run.as_secs_f64() * 1e3),
                );
            }
        }
        Runner::Plain(plain) => report.line(
            json!({"kind": "load", "path": "plain", "provider": plain.provider(), "seconds": load.as_secs_f64()}),
            format!("{} provider, one plain session: loaded in {:.2} s", plain.provider(), load.as_secs_f64()),
        ),
    }
    let inputs = sample_inputs(&card, &args.images)?;
    if let Some(sequence) = &args.sequence {
        run_sequence(&runner, &card, &inputs.tensors, &parse_sequence(sequence)?, &report)?;
    }
    let sizes: Vec<usize> = match (&runner, args.sizes.is_empty()) {
        (_, false) => args.sizes.clone(),
        (Runner::Serving(embedder), true) => embedder.batch_sizes().iter().collect(),
        (Runner::Plain(_), true) => vec![1, 8, 64],
    };
    for size in sizes {
        throughput(&runner, &card, &inputs.tensors, size, Duration::from_secs_f64(args.seconds), &report)?;
    }
    if let Some(out) = &args.embeddings_out {
        write_embeddings(&runner, &card, &inputs, out, &report)?;
    }
    if let Runner::Serving(embedder) = &runner
        && args.profile.is_some()
    {
        for file in embedder.end_profiling() {
            report.line(json!({"kind": "profile", "file": file}), format!("profile written: {file}"));
        }
    }
    Ok(())
}

struct Report {
    json: bool,
}

impl Report {
    fn line(&self, value: serde_json::Value, text: String) {
        if self.json {
            println!("{value}");
        } else {
            println!("{text}");
        }
    }
}

/// Preprocessed inputs: the images given (up to 256), else synthetic noise in the input range.
struct Inputs {
    tensors: Vec<Vec<f32>>,
    names: Vec<String>,
}

fn sample_inputs(card: &ModelCard, images: &[PathBuf]) -> anyhow::Result<Inputs> {
    let preprocessor = Preprocessor::new(card.clone(), Default::default());
    let mut files: Vec<PathBuf> = Vec::new();
    for path in images {
        if path.is_dir() {
            let walk = walkdir::WalkDir::new(path).sort_by_file_name();
            files.extend(walk.into_iter().flatten().filter(|e| e.file_type().is_file()).map(|e| e.into_path()));
        } else {
            files.push(path.clone());
        }
    }
    let mut tensors = Vec::new();
    let mut names = Vec::new();
    for file in files {
        if tensors.len() == 256 {
            break;
        }
        let bytes = std::fs::read(&file).with_context(|| file.display().to_string())?;
        if let Ok(tensor) = preprocessor.preprocess(&bytes) {
            tensors.push(tensor);
            names.push(file.display().to_string());
        }
    }
    if tensors.is_empty() {
        // A fixed pattern in [0, 1): the shapes and the work are those of real images.
        tensors = (0..64)
            .map(|i| (0..card.input_len()).map(|j| ((i * 7919 + j * 104_729) % 1000) as f32 / 1000.0).collect())
            .collect();
    }
    Ok(Inputs { tensors, names })
}

fn parse_sequence(text: &str) -> anyhow::Result<Vec<usize>> {
    let mut sizes = Vec::new();
    for part in text.split(',').map(str::trim).filter(|p| !p.is_empty()) {
        let (size, count) = part.split_once('x').unwrap_or((part, "1"));
        let size: usize = size.parse().with_context(|| format!("--sequence: {part:?}"))?;
        let count: usize = count.parse().with_context(|| format!("--sequence: {part:?}"))?;
        anyhow::ensure!((1..=imagelsh::embed::MAX_BATCH_SIZE).contains(&size), "--sequence: batch size {size}");
        anyhow::ensure!(count <= 10_000, "--sequence: {count} runs of {size}");
        sizes.extend(std::iter::repeat_n(size, count));
    }
    Ok(sizes)
}

/// One batch of `size` rows from `inputs`, run the way `runner` runs.
fn run_once(runner: &Runner, card: &ModelCard, inputs: &[Vec<f32>], size: usize) -> anyhow::Result<()> {
    match runner {
        Runner::Serving(embedder) => {
            let rows = size.min(embedder.batch_sizes().largest());
            let mut batch = embedder.input_batch(embedder.batch_sizes().fitting(rows))?;
            for (row, input) in inputs.iter().cycle().take(rows).enumerate() {
                batch.row_mut(row).copy_from_slice(input);
            }
            embedder.run(&batch, rows)?;
        }
        Runner::Plain(plain) => {
            // As the old batcher did: the images concatenated, then run.
            let flat: Vec<f32> = inputs.iter().cycle().take(size).flatten().copied().collect();
            debug_assert_eq!(flat.len(), size * card.input_len());
            plain.embed(&flat, size)?;
        }
    }
    Ok(())
}

fn run_sequence(
    runner: &Runner,
    card: &ModelCard,
    inputs: &[Vec<f32>],
    sizes: &[usize],
    report: &Report,
) -> anyhow::Result<()> {
    report.line(json!({"kind": "sequence_start", "provider": runner.provider()}), "each run of the sequence:".into());
    let mut previous = None;
    for (i, &size) in sizes.iter().enumerate() {
        let started = Instant::now();
        run_once(runner, card, inputs, size)?;
        let ms = started.elapsed().as_secs_f64() * 1e3;
        let note = match previous {
            None => "first",
            Some(p) if p == size => "same shape again",
            Some(_) if sizes[..i].contains(&size) => "a shape seen before, after another",
            Some(_) => "a new shape",
        };
        report.line(
            json!({"kind": "sequence", "run": i, "size": size, "ms": ms, "note": note}),
            format!("  run {i:>3}: batch {size:>4} {ms:9.2} ms  ({note})"),
        );
        previous = Some(size);
    }
    Ok(())
}

/// Images/s at one batch size for `duration`, with as many threads as the runner has instances.
fn throughput(
    runner: &Runner,
    card: &ModelCard,
    inputs: &[Vec<f32>],
    size: usize,
    duration: Duration,
    report: &Report,
) -> anyhow::Result<()> {
    let threads = match runner {
        Runner::Serving(embedder) => embedder.instances(),
        Runner::Plain(_) => 1,
    };
    run_once(runner, card, inputs, size)?;
    let started = Instant::now();
    let per_thread: Vec<anyhow::Result<Vec<f64>>> = std::thread::scope(|scope| {
        let handles: Vec<_> = (0..threads)
            .map(|_| {
                scope.spawn(|| {
                    let mut times = Vec::new();
                    while started.elapsed() < duration || times.len() < 3 {
                        let t = Instant::now();
                        run_once(runner, card, inputs, size)?;
                        times.push(t.elapsed().as_secs_f64() * 1e3);
                    }
                    Ok(times)
                })
            })
            .collect();
        handles.into_iter().map(|h| h.join().unwrap_or_else(|_| Err(anyhow::anyhow!("a run panicked")))).collect()
    });
    let wall = started.elapsed().as_secs_f64();
    let mut times = Vec::new();
    for result in per_thread {
        times.extend(result?);
    }
    times.sort_by(f64::total_cmp);
    let rows = match runner {
        Runner::Serving(embedder) => size.min(embedder.batch_sizes().largest()),
        Runner::Plain(_) => size,
    };
    let rate = (times.len() * rows) as f64 / wall;
    let median = times[times.len() / 2];
    let slowest = times[times.len() - 1];
    report.line(
        json!({"kind": "throughput", "provider": runner.provider(), "size": rows, "threads": threads,
            "images_per_s": rate, "batches": times.len(), "ms_median": median, "ms_max": slowest}),
        format!(
            "  batch {rows:>4} × {threads} thread(s): {rate:9.1} images/s  ({} batches, median {median:.2} ms, slowest {slowest:.2} ms)",
            times.len()
        ),
    );
    Ok(())
}

fn write_embeddings(
    runner: &Runner,
    card: &ModelCard,
    inputs: &Inputs,
    out: &Path,
    report: &Report,
) -> anyhow::Result<()> {
    anyhow::ensure!(!inputs.names.is_empty(), "--embeddings-out needs --images");
    let flat: Vec<f32> = inputs.tensors.iter().flatten().copied().collect();
    let rows = inputs.tensors.len();
    let embeddings = match runner {
        Runner::Serving(embedder) => embedder.embed(&flat, rows)?,
        Runner::Plain(plain) => plain.embed(&flat, rows)?,
    };
    anyhow::ensure!(embeddings.ncols() == card.dim as usize, "embeddings of {} values", embeddings.ncols());
    let bytes: Vec<u8> = embeddings.iter().flat_map(|x| x.to_le_bytes()).collect();
    std::fs::write(out, bytes).with_context(|| out.display().to_string())?;
    let mut names = out.as_os_str().to_owned();
    names.push(".txt");
    std::fs::write(PathBuf::from(&names), inputs.names.join("\n") + "\n")?;
    report.line(
        json!({"kind": "embeddings", "rows": rows, "file": out.display().to_string()}),
        format!("{rows} embeddings written to {}", out.display()),
    );
    Ok(())
}
