//! Image throughput, side by side in one run:
//!   (a) raw ONNX Runtime inference of the default model at several batch sizes,
//!   (b) end-to-end Ingest of real images through the gRPC server with 1, 4 and 16 streams,
//!   (c) decode + resize per image for 28×28 PNGs and ~500×375 JPEG photos.
//!
//!     scripts/setup-ort && cargo bench --bench images
//!     cargo bench --bench images -- --images 1280 --max-batch 4
//!
//! (b) runs the server in this process (real gRPC over loopback) so that it can read the
//! batcher's counters: the share of wall time the model was busy is the pipeline's efficiency,
//! a figure that the noise of a shared machine moves far less than raw rates.

use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::Ordering::Relaxed;
use std::time::{Duration, Instant};

use imagelsh::api::{self, ServeOptions};
use imagelsh::embed::{Device, Embedder, ModelCard, OnnxEmbedder, OrtOptions};
use imagelsh::index::Engine;
use imagelsh::pipeline::{BatcherConfig, DecodeLimits, ImagePipeline, Preprocessor};
use imagelsh::proto::image_index_client::ImageIndexClient;
use imagelsh::proto::{CreateIndexRequest, IngestRequest, Item, item::Content};
use imagelsh::store::{SledCatalog, SledOptions};
use tokio_util::sync::CancellationToken;
use tonic::transport::Channel;

const ROOT: &str = env!("CARGO_MANIFEST_DIR");
const SKIMAGE: &str = "/usr/lib/python3/dist-packages/skimage/data";

fn arg(name: &str) -> Option<String> {
    let argv: Vec<String> = std::env::args().collect();
    argv.iter().position(|a| a == name).and_then(|i| argv.get(i + 1).cloned())
}

/// The first `n` (≤ 10,000) Fashion-MNIST test images as PNG files.
fn fashion_pngs(n: usize) -> Vec<Vec<u8>> {
    imagelsh::demo::fashion_mnist_pngs(0..n)
        .expect("apt-get install dataset-fashion-mnist")
        .into_iter()
        .map(|f| f.png)
        .collect()
}

/// ~500×375 JPEGs (quality 90) cut from Debian's sample photos.
fn photo_jpegs() -> Vec<Vec<u8>> {
    ["astronaut.png", "coffee.png", "chelsea.png", "motorcycle_left.png", "rocket.jpg"]
        .iter()
        .map(|name| {
            let photo = image::open(Path::new(SKIMAGE).join(name)).expect("apt-get install python3-skimage");
            let photo = photo.resize_to_fill(500, 375, image::imageops::FilterType::Triangle).to_rgb8();
            let mut out = Vec::new();
            image::codecs::jpeg::JpegEncoder::new_with_quality(&mut out, 90).encode_image(&photo).unwrap();
            out
        })
        .collect()
}

fn median(mut v: Vec<Duration>) -> Duration {
    v.sort();
    v[v.len() / 2]
}

/// Images/s acknowledged for `images` sent over `streams` concurrent streams in batches of 32.
async fn ingest_rate(addr: &str, index: &str, images: &[Vec<u8>], streams: usize) -> f64 {
    let start = Instant::now();
    let mut tasks = Vec::new();
    for s in 0..streams {
        let mine: Vec<Vec<u8>> = images.iter().skip(s).step_by(streams).cloned().collect();
        let batches: Vec<IngestRequest> = mine
            .chunks(32)
            .enumerate()
            .map(|(b, chunk)| IngestRequest {
                index: index.into(),
                batch_id: b as u64,
                items: chunk
                    .iter()
                    .enumerate()
                    .map(|(i, bytes)| Item {
                        id: format!("{s}-{b}-{i}"),
                        content: Some(Content::Image(bytes.clone())),
                        ..Default::default()
                    })
                    .collect(),
            })
            .collect();
        let mut client =
            ImageIndexClient::new(Channel::from_shared(format!("http://{addr}")).unwrap().connect().await.unwrap());
        tasks.push(tokio::spawn(async move {
            let mut acks = client.ingest(tokio_stream::iter(batches)).await.unwrap().into_inner();
            let mut n = 0;
            while let Some(r) = acks.message().await.unwrap() {
                assert!(r.errors.is_empty(), "{:?}", r.errors);
                n += r.indexed as usize;
            }
            n
        }));
    }
    let mut n = 0;
    for t in tasks {
        n += t.await.unwrap();
    }
    n as f64 / start.elapsed().as_secs_f64()
}

fn main() {
    let n_images: usize = arg("--images").map_or(640, |v| v.parse().unwrap());
    let max_batch: usize = arg("--max-batch").map_or(8, |v| v.parse().unwrap());
    let model = Path::new(ROOT).join("models/efficientnet_lite0.onnx");
    let card = ModelCard::load(&ModelCard::path_for(&model)).unwrap();
    let library = std::env::var_os("ORT_DYLIB_PATH")
        .map(Into::into)
        .or_else(|| imagelsh::config::venv_ort_library(Path::new(ROOT)))
        .expect("ONNX Runtime: run scripts/setup-ort");
    let threads = std::thread::available_parallelism().map_or(1, |n| n.get());
    let pngs = fashion_pngs(n_images);
    let jpegs = photo_jpegs();
    let preprocessor = Preprocessor::new(card.clone(), DecodeLimits::default());

    println!("(c) decode + resize + normalise, one thread, median per image");
    for (name, set) in [("28×28 PNG (Fashion-MNIST)", &pngs[..50]), ("500×375 JPEG (photos)", &jpegs[..])] {
        let mut times = Vec::new();
        for _ in 0..20 {
            for bytes in set {
                let t = Instant::now();
                std::hint::black_box(preprocessor.preprocess(bytes).unwrap());
                times.push(t.elapsed());
            }
        }
        println!("  {name:<28} {:>7.3} ms", median(times).as_secs_f64() * 1e3);
    }

    println!("(a) raw ONNX Runtime, CPU provider, {threads} intra-op threads");
    let embedder = OnnxEmbedder::load(
        &model,
        card.clone(),
        &OrtOptions {
            intra_threads: Some(threads),
            max_batch: Some(max_batch),
            instances: Some(1),
            ..OrtOptions::new(library, Device::Cpu)
        },
    )
    .unwrap();
    let tensors: Vec<Vec<f32>> = pngs.iter().take(64).map(|b| preprocessor.preprocess(b).unwrap()).collect();
    let mut raw_rates = Vec::new();
    for batch in [1usize, 4, 8, 16, 32].into_iter().filter(|&b| b <= max_batch) {
        let input: Vec<f32> = tensors.iter().cycle().take(batch).flatten().copied().collect();
        embedder.embed(&input, batch).unwrap(); // warm-up
        let runs = (256 / batch).max(4);
        let t = Instant::now();
        for _ in 0..runs {
            std::hint::black_box(embedder.embed(&input, batch).unwrap());
        }
        let rate = (runs * batch) as f64 / t.elapsed().as_secs_f64();
        raw_rates.push((batch, rate));
        println!("  batch {batch:>2}: {rate:>6.1} images/s");
    }

    println!(
        "(b) end-to-end Ingest through the gRPC server on loopback ({n_images} Fashion-MNIST PNGs, batches of 32, \
         durable acks; max_batch {max_batch}, max_delay 2 ms)"
    );
    let rt = tokio::runtime::Runtime::new().unwrap();
    rt.block_on(async {
        let dir = tempfile::tempdir().unwrap();
        let catalog = SledCatalog::open(dir.path(), &SledOptions::default()).unwrap();
        let engine = Arc::new(Engine::open(Arc::new(catalog), &dir.path().join("wal"), card.dim).unwrap());
        let batcher = BatcherConfig {
            max_delay: Duration::from_millis(2),
            queue_capacity: 128,
            queue_timeout: Duration::from_secs(30),
        };
        let pipeline = Arc::new(ImagePipeline::start(Arc::new(embedder), DecodeLimits::default(), threads, batcher));
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap().to_string();
        let shutdown = CancellationToken::new();
        tokio::spawn(api::serve(engine, Some(pipeline.clone()), listener, ServeOptions::default(), shutdown.clone()));
        let mut client = ImageIndexClient::new(Channel::from_shared(format!("http://{addr}")).unwrap().connect().await.unwrap());
        let raw = raw_rates.iter().find(|r| r.0 == max_batch).map_or(f64::NAN, |r| r.1);
        for streams in [1usize, 4, 16] {
            let index = format!("s{streams}");
            client.create_index(CreateIndexRequest { name: index.clone(), ..Default::default() }).await.unwrap();
            let stats = pipeline.batcher_stats();
            let (items0, batches0, busy0) = (stats.items.load(Relaxed), stats.batches.load(Relaxed), stats.busy_nanos.load(Relaxed));
            let started = Instant::now();
            let rate = ingest_rate(&addr, &index, &pngs, streams).await;
            let wall = started.elapsed().as_secs_f64();
            let items = stats.items.load(Relaxed) - items0;
            let batches = stats.batches.load(Relaxed) - batches0;
            let busy = (stats.busy_nanos.load(Relaxed) - busy0) as f64 / 1e9;
            println!(
                "  {streams:>2} stream(s): {rate:>6.1} images/s = {:.2} × raw batch {max_batch}; model busy {:.0}% of the time \
                 (pipeline overhead {:.0}%), mean batch {:.1}, in-server model rate {:.1} images/s",
                rate / raw,
                100.0 * busy / wall,
                100.0 * (1.0 - busy / wall),
                items as f64 / batches as f64,
                items as f64 / busy,
            );
        }
        shutdown.cancel();
    });
}
