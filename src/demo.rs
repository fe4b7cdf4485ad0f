//! `imagelsh demo`: the notebook's story against a server. Real labelled images found on the
//! machine (Fashion-MNIST from Debian's `dataset-fashion-mnist`, photos from `python3-skimage`)
//! are split 80/20 as in the notebook; the 80 % are ingested, the held-out 20 % are queried by
//! image, and the answers are shown as precision@k by class and as contact sheets (the
//! notebook's figure). Also a worked example of the API: it uses only the public wire contract.

use std::collections::BTreeMap;
use std::io::{Cursor, Read};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use futures::StreamExt;

use crate::client::sheet::{self, SheetRow, Tile};
use crate::client::{Client, ClientError, Progress, match_tiles};
use crate::proto::{CreateIndexRequest, IngestRequest, Item, QueryRequest, item::Content, query_request::Query};

pub const FASHION_MNIST: &str = "/usr/share/datasets/fashion-mnist";
pub const SKIMAGE_DATA: &str = "/usr/lib/python3/dist-packages/skimage/data";
pub const CLASSES: [&str; 10] =
    ["T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot"];
const PHOTOS: [&str; 6] =
    ["chelsea.png", "coffee.png", "astronaut.png", "rocket.jpg", "motorcycle_left.png", "horse.png"];
/// The label of the colour photos.
const PHOTO: &str = "photo";
/// Images per ingest batch, streams, and queries in flight (so that the server's batcher
/// fills batches across them, as it does for many clients).
const BATCH: usize = 32;
const STREAMS: usize = 4;
const QUERIES_IN_FLIGHT: usize = 8;

#[derive(Debug, thiserror::Error)]
pub enum DemoError {
    #[error(transparent)]
    Client(#[from] ClientError),
    #[error("{context}: {status}")]
    Rpc { context: &'static str, status: tonic::Status },
    #[error("demo data: {0} (apt-get install dataset-fashion-mnist python3-skimage, or scripts/setup-data)")]
    Data(String),
    #[error("writing {path}: {source}")]
    Sheet { path: PathBuf, source: image::ImageError },
}

fn rpc(context: &'static str) -> impl FnOnce(tonic::Status) -> DemoError {
    move |status| DemoError::Rpc { context, status }
}

/// What the demo does.
#[derive(Debug, Clone)]
pub struct DemoOptions {
    pub index: String,
    /// Fashion-MNIST test images used, split 80/20 into indexed and held-out.
    pub images: usize,
    /// Matches per query (precision@k and the sheets' columns).
    pub top_k: u32,
    /// Where the contact sheets go.
    pub sheets: PathBuf,
    /// Show progress on stderr.
    pub progress: bool,
}

/// A labelled image for the demo.
struct Sample {
    id: String,
    label: String,
    image: Vec<u8>,
}

/// One Fashion-MNIST test image, encoded as a PNG as a client would send it.
pub struct FashionImage {
    /// Position in the test set.
    pub index: usize,
    pub png: Vec<u8>,
    /// Class 0–9 (see `CLASSES`).
    pub class: u8,
}

/// Fashion-MNIST test images `range` (those that exist) from Debian's `dataset-fashion-mnist`.
pub fn fashion_mnist_pngs(range: std::ops::Range<usize>) -> Result<Vec<FashionImage>, DemoError> {
    let gunzip = |name: &str| -> Result<Vec<u8>, DemoError> {
        let path = Path::new(FASHION_MNIST).join(name);
        let gz = std::fs::read(&path).map_err(|e| DemoError::Data(format!("{}: {e}", path.display())))?;
        let mut out = Vec::new();
        flate2::read::GzDecoder::new(gz.as_slice())
            .read_to_end(&mut out)
            .map_err(|e| DemoError::Data(e.to_string()))?;
        Ok(out)
    };
    let images = gunzip("t10k-images-idx3-ubyte.gz")?;
    let labels = gunzip("t10k-labels-idx1-ubyte.gz")?;
    let available = labels.len().saturating_sub(8).min(images.len().saturating_sub(16) / 784);
    range
        .filter(|&i| i < available)
        .map(|index| {
            let pixels = images[16 + index * 784..][..784].to_vec();
            let image =
                image::GrayImage::from_raw(28, 28, pixels).ok_or_else(|| DemoError::Data("bad IDX file".into()))?;
            let mut png = Cursor::new(Vec::new());
            image.write_to(&mut png, image::ImageFormat::Png).map_err(|e| DemoError::Data(e.to_string()))?;
            Ok(FashionImage { index, png: png.into_inner(), class: labels[8 + index] })
        })
        .collect()
}

fn class_name(class: u8) -> String {
    CLASSES.get(class as usize).copied().unwrap_or("?").to_string()
}

fn fashion_mnist(range: std::ops::Range<usize>) -> Result<Vec<Sample>, DemoError> {
    Ok(fashion_mnist_pngs(range)?
        .into_iter()
        .map(|f| Sample { id: format!("fashion-mnist/test/{}", f.index), label: class_name(f.class), image: f.png })
        .collect())
}

fn photos() -> Vec<Sample> {
    PHOTOS
        .iter()
        .filter_map(|name| {
            let image = std::fs::read(Path::new(SKIMAGE_DATA).join(name)).ok()?;
            Some(Sample { id: format!("skimage/{name}"), label: PHOTO.into(), image })
        })
        .collect()
}

/// Precision@k of one class's held-out queries.
#[derive(Debug, Clone, PartialEq)]
pub struct ClassPrecision {
    pub class: String,
    pub queries: usize,
    /// Mean share of each query's top k that has the query's class.
    pub precision: f64,
}

/// What a demo run did and measured.
#[derive(Debug, Clone)]
pub struct DemoReport {
    pub indexed: usize,
    pub refused: usize,
    pub ingest: Duration,
    pub queries: usize,
    pub query_time: Duration,
    pub top_k: u32,
    pub by_class: Vec<ClassPrecision>,
    /// Over all held-out queries.
    pub precision: f64,
    /// Photo queries (each photo mirrored) whose first hit is the original.
    pub photos_found: (usize, usize),
    pub sheets: Vec<PathBuf>,
}

/// A held-out query and what it returned.
struct Answer {
    sample: Sample,
    hits: Vec<crate::proto::Hit>,
}

/// Creates (or reuses) the index, ingests the 80 %, queries the 20 % and writes the sheets.
pub async fn run(client: &mut Client, options: &DemoOptions) -> Result<DemoReport, DemoError> {
    let create = CreateIndexRequest {
        name: options.index.clone(),
        hash_bits: 12,
        tables: 16,
        seed: 42,
        thumbnails: true,
        ..Default::default()
    };
    match client.create_index(create).await {
        Ok(info) => {
            let info = info.into_inner();
            println!(
                "created index {:?}: K={} bits, L={} tables, dim {}",
                info.name, info.hash_bits, info.tables, info.dim
            )
        }
        Err(status) if status.code() == tonic::Code::AlreadyExists => {
            println!("index {:?} exists; adding to it", options.index)
        }
        Err(status) => return Err(rpc("creating the index")(status)),
    }

    // The notebook's split: the first 80 % indexed, the rest held out as queries.
    let all = fashion_mnist(0..options.images)?;
    let split = all.len() * 4 / 5;
    let mut all = all.into_iter();
    let mut indexed: Vec<Sample> = all.by_ref().take(split).collect();
    let held_out: Vec<Sample> = all.collect();
    indexed.extend(photos());
    let (count, refused, ingest_time) = ingest(client, &options.index, indexed, options.progress).await?;
    println!(
        "indexed {count} images ({refused} refused) in {:.1} s: {:.0} images/s through the model, durable",
        ingest_time.as_secs_f64(),
        count as f64 / ingest_time.as_secs_f64().max(1e-3)
    );

    let started = Instant::now();
    let answers = query_all(client, &options.index, held_out, options.top_k, options.progress).await?;
    let query_time = started.elapsed();
    let (by_class, precision) = precision_by_class(&answers, options.top_k as usize);
    println!(
        "\n{} held-out queries by image in {:.1} s; precision@{} by class (chance: 0.10):",
        answers.len(),
        query_time.as_secs_f64(),
        options.top_k
    );
    println!("  {:<12} {:>7}  precision@{}", "class", "queries", options.top_k);
    for class in &by_class {
        println!("  {:<12} {:>7}  {:.3}", class.class, class.queries, class.precision);
    }
    println!("  {:<12} {:>7}  {:.3}", "all", answers.len(), precision);

    // Each photo mirrored and re-encoded as JPEG: its original should come first.
    let mirrored = mirrored_photos();
    let photo_answers = query_all(client, &options.index, mirrored, options.top_k, false).await?;
    let found = photo_answers
        .iter()
        .filter(|a| a.hits.first().is_some_and(|h| Some(h.id.as_str()) == a.sample.id.strip_suffix(" mirrored")))
        .count();
    println!("\nmirrored photos whose first match is the original: {found} of {}", photo_answers.len());

    std::fs::create_dir_all(&options.sheets)
        .map_err(|e| DemoError::Data(format!("{}: {e}", options.sheets.display())))?;
    let mut sheets = Vec::new();
    // One held-out query of each class, as the notebook's figure showed.
    let mut per_class: BTreeMap<&str, &Answer> = BTreeMap::new();
    for answer in &answers {
        per_class.entry(answer.sample.label.as_str()).or_insert(answer);
    }
    let mut ordered: Vec<&Answer> = Vec::new();
    for class in CLASSES {
        ordered.extend(per_class.get(class).copied());
    }
    let title = format!(
        "imagelsh demo: held-out Fashion-MNIST queries and their top {} (precision@{} {:.2})",
        options.top_k, options.top_k, precision
    );
    let path = options.sheets.join("fashion-mnist.png");
    sheets.push(write_sheet(client, &options.index, &path, &title, "query (held out)", &ordered).await?);
    let photo_refs: Vec<&Answer> = photo_answers.iter().collect();
    let title = "imagelsh demo: photos mirrored and re-encoded as JPEG, and their matches";
    let path = options.sheets.join("photos.png");
    sheets.push(write_sheet(client, &options.index, &path, title, "query (mirrored)", &photo_refs).await?);
    for path in &sheets {
        println!("contact sheet: {}", path.display());
    }
    Ok(DemoReport {
        indexed: count,
        refused,
        ingest: ingest_time,
        queries: answers.len(),
        query_time,
        top_k: options.top_k,
        by_class,
        precision,
        photos_found: (found, photo_answers.len()),
        sheets,
    })
}

/// Ingests over `STREAMS` streams; returns (indexed, refused, time).
async fn ingest(
    client: &Client,
    index: &str,
    samples: Vec<Sample>,
    progress: bool,
) -> Result<(usize, usize, Duration), DemoError> {
    let started = Instant::now();
    let bar = match progress {
        true => Progress::on_stderr(samples.len() as u64, "demo ingest", Duration::from_secs(5)),
        false => Progress::hidden(samples.len() as u64),
    };
    let bar = std::sync::Arc::new(bar);
    let mut lanes: Vec<Vec<IngestRequest>> = (0..STREAMS).map(|_| Vec::new()).collect();
    for (b, chunk) in samples.chunks(BATCH).enumerate() {
        let items = chunk
            .iter()
            .map(|s| Item {
                id: s.id.clone(),
                label: s.label.clone(),
                metadata: [(crate::client::SOURCE_KEY.to_string(), "imagelsh demo".to_string())].into(),
                content: Some(Content::Image(s.image.clone())),
            })
            .collect();
        lanes[b % STREAMS].push(IngestRequest { index: index.into(), batch_id: b as u64, items });
    }
    let mut streams = Vec::new();
    for batches in lanes {
        let (mut client, bar) = (client.clone(), bar.clone());
        streams.push(tokio::spawn(async move {
            let mut acks = client.ingest(tokio_stream::iter(batches)).await?.into_inner();
            let (mut indexed, mut refused) = (0, 0);
            while let Some(ack) = acks.message().await? {
                indexed += ack.indexed as usize;
                refused += ack.errors.len();
                bar.indexed(u64::from(ack.indexed));
                bar.refused(ack.errors.len() as u64);
                for error in ack.errors {
                    tracing::warn!(id = %error.id, reason = %error.message, "refused");
                }
            }
            Ok::<(usize, usize), tonic::Status>((indexed, refused))
        }));
    }
    let (mut indexed, mut refused) = (0, 0);
    for stream in streams {
        let (i, r) = stream.await.map_err(|e| DemoError::Data(format!("ingest task: {e}")))?.map_err(rpc("ingest"))?;
        indexed += i;
        refused += r;
    }
    if let Ok(mut bar) = std::sync::Arc::try_unwrap(bar) {
        bar.finish();
    }
    Ok((indexed, refused, started.elapsed()))
}

/// Queries each sample by image, `QUERIES_IN_FLIGHT` at once; answers in the samples' order.
async fn query_all(
    client: &Client,
    index: &str,
    samples: Vec<Sample>,
    top_k: u32,
    progress: bool,
) -> Result<Vec<Answer>, DemoError> {
    let bar = match progress {
        true => Progress::steps_on_stderr(samples.len() as u64, "demo queries", Duration::from_secs(5)),
        false => Progress::hidden(samples.len() as u64),
    };
    let answers = futures::stream::iter(samples.into_iter().map(|sample| {
        let mut client = client.clone();
        let request = QueryRequest {
            index: index.into(),
            query: Some(Query::Image(sample.image.clone())),
            top_k,
            // The defaults: 2 probes, re-ranked by cosine.
            ..Default::default()
        };
        let bar = &bar;
        async move {
            let hits = client.query(request).await.map_err(rpc("query"))?.into_inner().hits;
            bar.done(1);
            Ok::<Answer, DemoError>(Answer { sample, hits })
        }
    }))
    .buffered(QUERIES_IN_FLIGHT)
    .collect::<Vec<_>>()
    .await;
    answers.into_iter().collect()
}

/// Per class (in `CLASSES` order) and over all queries: the mean share of the top k with the
/// query's label. A query with fewer than k hits counts the missing ones as wrong.
fn precision_by_class(answers: &[Answer], k: usize) -> (Vec<ClassPrecision>, f64) {
    let share =
        |a: &Answer| a.hits.iter().take(k).filter(|h| h.label == a.sample.label).count() as f64 / k.max(1) as f64;
    let mut sums: BTreeMap<&str, (usize, f64)> = BTreeMap::new();
    for answer in answers {
        let entry = sums.entry(answer.sample.label.as_str()).or_default();
        entry.0 += 1;
        entry.1 += share(answer);
    }
    let by_class = CLASSES
        .iter()
        .filter_map(|class| {
            sums.get(class).map(|&(queries, sum)| ClassPrecision {
                class: class.to_string(),
                queries,
                precision: sum / queries as f64,
            })
        })
        .collect();
    let overall = answers.iter().map(share).sum::<f64>() / answers.len().max(1) as f64;
    (by_class, overall)
}

fn mirrored_photos() -> Vec<Sample> {
    photos()
        .into_iter()
        .filter_map(|photo| {
            let mirrored = image::load_from_memory(&photo.image).ok()?.fliph().into_rgb8();
            let mut jpeg = Cursor::new(Vec::new());
            mirrored.write_to(&mut jpeg, image::ImageFormat::Jpeg).ok()?;
            Some(Sample { id: format!("{} mirrored", photo.id), label: photo.label, image: jpeg.into_inner() })
        })
        .collect()
}

async fn write_sheet(
    client: &mut Client,
    index: &str,
    path: &Path,
    title: &str,
    caption: &str,
    answers: &[&Answer],
) -> Result<PathBuf, DemoError> {
    let mut rows = Vec::with_capacity(answers.len());
    for answer in answers {
        let query = Tile {
            image: crate::client::decode_picture(&answer.sample.image),
            label: answer.sample.label.clone(),
            lines: vec![caption.to_string(), answer.sample.id.clone()],
        };
        rows.push(SheetRow { query, matches: match_tiles(client, index, &answer.hits).await? });
    }
    sheet::write_png(path, title, &rows).map_err(|source| DemoError::Sheet { path: path.to_path_buf(), source })?;
    Ok(path.to_path_buf())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::proto::Hit;

    fn answer(label: &str, hits: &[&str]) -> Answer {
        Answer {
            sample: Sample { id: "q".into(), label: label.into(), image: vec![] },
            hits: hits.iter().map(|l| Hit { label: l.to_string(), ..Default::default() }).collect(),
        }
    }

    #[test]
    fn precision_is_the_mean_share_of_the_top_k_per_class() {
        let answers = [
            answer("Bag", &["Bag", "Bag", "Coat", "Bag"]),
            answer("Bag", &["Coat", "Coat"]),
            answer("Coat", &["Coat", "Coat", "Coat", "Coat", "Bag"]),
        ];
        let (by_class, overall) = precision_by_class(&answers, 4);
        assert_eq!(
            by_class,
            [
                ClassPrecision { class: "Coat".into(), queries: 1, precision: 1.0 },
                ClassPrecision { class: "Bag".into(), queries: 2, precision: (0.75 + 0.0) / 2.0 },
            ]
        );
        assert!((overall - (0.75 + 0.0 + 1.0) / 3.0).abs() < 1e-12);
    }
}
