//! `imagelsh demo`: a gRPC client that fills an index with real images found on the machine
//! (Fashion-MNIST from Debian's `dataset-fashion-mnist`, photos from `python3-skimage`) and
//! shows what queries by image return. Also a worked example of using the API.

use std::io::{Cursor, Read};
use std::path::Path;
use std::time::{Duration, Instant};

use tonic::transport::Channel;

use crate::proto::image_index_client::ImageIndexClient;
use crate::proto::{CreateIndexRequest, IngestRequest, Item, QueryRequest, item::Content, query_request::Query};

pub const FASHION_MNIST: &str = "/usr/share/datasets/fashion-mnist";
pub const SKIMAGE_DATA: &str = "/usr/lib/python3/dist-packages/skimage/data";
pub const CLASSES: [&str; 10] =
    ["T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot"];
const PHOTOS: [&str; 6] =
    ["chelsea.png", "coffee.png", "astronaut.png", "rocket.jpg", "motorcycle_left.png", "horse.png"];

#[derive(Debug, thiserror::Error)]
pub enum DemoError {
    #[error("cannot reach the server at {addr}: {source}")]
    Connect { addr: String, source: tonic::transport::Error },
    #[error("{0}")]
    Rpc(#[from] tonic::Status),
    #[error("demo data: {0} (apt-get install dataset-fashion-mnist python3-skimage, or scripts/setup-data)")]
    Data(String),
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

fn fashion_mnist(range: std::ops::Range<usize>) -> Result<Vec<Sample>, DemoError> {
    Ok(fashion_mnist_pngs(range)?
        .into_iter()
        .map(|f| Sample {
            id: format!("fashion-mnist/test/{}", f.index),
            label: CLASSES.get(f.class as usize).copied().unwrap_or("?").to_string(),
            image: f.png,
        })
        .collect())
}

fn photos() -> Vec<Sample> {
    PHOTOS
        .iter()
        .filter_map(|name| {
            let image = std::fs::read(Path::new(SKIMAGE_DATA).join(name)).ok()?;
            Some(Sample { id: format!("skimage/{name}"), label: "photo".into(), image })
        })
        .collect()
}

async fn connect(addr: &str) -> Result<ImageIndexClient<Channel>, DemoError> {
    let endpoint =
        Channel::from_shared(addr.to_string()).map_err(|e| DemoError::Data(format!("address {addr}: {e}")))?;
    // The server may still be starting (scripts/serve starts both at once).
    let started = Instant::now();
    loop {
        match endpoint.connect().await {
            Ok(channel) => return Ok(ImageIndexClient::new(channel)),
            Err(_) if started.elapsed() < Duration::from_secs(60) => {
                tokio::time::sleep(Duration::from_millis(250)).await
            }
            Err(source) => return Err(DemoError::Connect { addr: addr.to_string(), source }),
        }
    }
}

/// Creates (or reuses) `index`, ingests `count` Fashion-MNIST images and the photos over four
/// streams, then queries by image and prints the hits.
pub async fn run(addr: &str, index: &str, count: usize) -> Result<(), DemoError> {
    let mut client = connect(addr).await?;
    let create = CreateIndexRequest { name: index.into(), hash_bits: 12, tables: 16, seed: 42, ..Default::default() };
    match client.create_index(create).await {
        Ok(info) => println!("created index {:?}: {:?}", index, info.into_inner()),
        Err(status) if status.code() == tonic::Code::AlreadyExists => println!("index {index:?} exists; adding to it"),
        Err(status) => return Err(status.into()),
    }

    let mut samples = fashion_mnist(0..count)?;
    samples.extend(photos());
    let total = samples.len();
    let started = Instant::now();
    let mut streams = Vec::new();
    for s in 0..4 {
        let batches: Vec<IngestRequest> = samples
            .iter()
            .skip(s)
            .step_by(4)
            .collect::<Vec<_>>()
            .chunks(32)
            .enumerate()
            .map(|(b, chunk)| IngestRequest {
                index: index.into(),
                batch_id: b as u64,
                items: chunk
                    .iter()
                    .map(|sample| Item {
                        id: sample.id.clone(),
                        label: sample.label.clone(),
                        metadata: [("source".to_string(), "demo".to_string())].into(),
                        content: Some(Content::Image(sample.image.clone())),
                    })
                    .collect(),
            })
            .collect();
        let mut client = client.clone();
        streams.push(tokio::spawn(async move {
            let mut acks = client.ingest(tokio_stream::iter(batches)).await?.into_inner();
            let mut indexed = 0;
            while let Some(ack) = acks.message().await? {
                indexed += ack.indexed as usize;
                for error in ack.errors {
                    eprintln!("refused {}: {}", error.id, error.message);
                }
            }
            Ok::<usize, tonic::Status>(indexed)
        }));
    }
    let mut indexed = 0;
    for stream in streams {
        indexed += stream.await.map_err(|e| DemoError::Data(e.to_string()))??;
    }
    let secs = started.elapsed().as_secs_f64();
    println!("indexed {indexed} of {total} images in {secs:.1} s ({:.0} images/s, durable)", indexed as f64 / secs);

    // Held-out images (not in the index) and one photo, queried by image.
    let mut queries = fashion_mnist(count..count + 4)?;
    if let Ok(chelsea) = std::fs::read(Path::new(SKIMAGE_DATA).join("chelsea.png")) {
        let flipped = image::load_from_memory(&chelsea).map(|i| i.fliph()).ok().and_then(|i| {
            let mut out = Cursor::new(Vec::new());
            i.write_to(&mut out, image::ImageFormat::Jpeg).ok().map(|()| out.into_inner())
        });
        if let Some(image) = flipped {
            queries.push(Sample { id: "chelsea.png mirrored, as JPEG".into(), label: "photo".into(), image });
        }
    }
    for query in queries {
        let request = QueryRequest {
            index: index.into(),
            query: Some(Query::Image(query.image)),
            top_k: 5,
            // The defaults: 2 probes, re-ranked by cosine.
            ..Default::default()
        };
        let response = client.query(request).await?.into_inner();
        println!("\nquery: {} ({}), {} candidates", query.id, query.label, response.candidates);
        for hit in response.hits {
            println!(
                "  {:<28} {:<12} votes {:>2}  score {:.2}  cosine {:.3}",
                hit.id, hit.label, hit.votes, hit.score, hit.similarity
            );
        }
    }
    Ok(())
}
