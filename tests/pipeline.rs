//! The image pipeline with the real model (ONNX Runtime, CPU provider) under load.

mod common;

use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use common::*;
use imagelsh::embed::{Device, ModelCard, OnnxEmbedder, OrtOptions};
use imagelsh::pipeline::{BatcherConfig, DecodeLimits, ImagePipeline};

const MODEL: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/models/efficientnet_lite0.onnx");

fn pipeline(queue_capacity: usize, max_batch: usize) -> ImagePipeline {
    let library = std::env::var_os("ORT_DYLIB_PATH")
        .map(Into::into)
        .or_else(|| imagelsh::config::venv_ort_library(Path::new(env!("CARGO_MANIFEST_DIR"))))
        .expect("ONNX Runtime library: set ORT_DYLIB_PATH or run scripts/setup-ort");
    let card = ModelCard::load(&ModelCard::path_for(Path::new(MODEL))).unwrap();
    let options = OrtOptions {
        intra_threads: Some(2),
        max_batch: Some(max_batch),
        instances: Some(1),
        ..OrtOptions::new(library, Device::Cpu)
    };
    let embedder = OnnxEmbedder::load(Path::new(MODEL), card, &options).unwrap();
    let batcher = BatcherConfig {
        max_delay: Duration::from_millis(2),
        queue_capacity,
        queue_timeout: Duration::from_secs(300),
    };
    ImagePipeline::start(Arc::new(embedder), DecodeLimits::default(), 2, batcher)
}

#[tokio::test(flavor = "multi_thread")]
async fn a_flood_of_images_is_held_back_before_decoding() {
    // Small photos decode far faster than the model runs, so without a bound every image sent
    // would sit decoded (600 KB each) waiting for the model.
    let photo = image::open(Path::new(SKIMAGE_DATA).join("astronaut.png"))
        .unwrap()
        .resize_to_fill(80, 60, image::imageops::FilterType::Triangle)
        .to_rgb8();
    let mut jpeg = Vec::new();
    image::codecs::jpeg::JpegEncoder::new_with_quality(&mut jpeg, 90).encode_image(&photo).unwrap();

    let (queue, max_batch) = (8, 4);
    let pipeline = Arc::new(pipeline(queue, max_batch));
    let tasks: Vec<_> = (0..16)
        .map(|_| {
            let pipeline = pipeline.clone();
            let images = vec![jpeg.clone(); 24];
            tokio::spawn(async move { pipeline.embed_all(images, false).await })
        })
        .collect();
    for task in tasks {
        assert!(task.await.unwrap().iter().all(|r| r.as_ref().is_ok_and(|e| e.vector.len() == 1280)));
    }
    // Queued, and (instances + 2) batches: being collected, on the one instance, answered but
    // not yet picked up by their callers.
    let bound = queue + 3 * max_batch;
    let peak = pipeline.decoded().peak();
    assert!(peak <= bound, "{peak} decoded images alive at once; the bound is {bound}");
    assert!(peak >= max_batch, "the flood never filled a batch ({peak})");
    assert_eq!(pipeline.decoded().live(), 0);
    let stats = pipeline.batcher_stats();
    assert_eq!(stats.items.load(std::sync::atomic::Ordering::Relaxed), 16 * 24);
}
