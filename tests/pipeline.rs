//! The image pipeline with the real model (ONNX Runtime, CPU provider) under load.

mod common;

use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use common::*;
use imagelsh::embed::{BatchSizes, Device, EmbedError, Embedder, ModelCard, OnnxEmbedder, OrtOptions};
use imagelsh::pipeline::{BatcherConfig, DecodeLimits, ImagePipeline, Preprocessor};

const MODEL: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/models/efficientnet_lite0.onnx");

fn ort_library() -> std::path::PathBuf {
    std::env::var_os("ORT_DYLIB_PATH")
        .map(Into::into)
        .or_else(|| imagelsh::config::venv_ort_library(Path::new(env!("CARGO_MANIFEST_DIR"))))
        .expect("ONNX Runtime library: set ORT_DYLIB_PATH or run scripts/setup-ort")
}

fn card() -> ModelCard {
    ModelCard::load(&ModelCard::path_for(Path::new(MODEL))).unwrap()
}

/// Model inputs of real photos (python3-skimage's colour samples), `n` of them, repeating.
fn photo_inputs(n: usize) -> Vec<Vec<f32>> {
    let preprocessor = Preprocessor::new(card(), DecodeLimits::default());
    let photos: Vec<Vec<f32>> = ["chelsea.png", "coffee.png", "astronaut.png", "rocket.jpg", "motorcycle_left.png"]
        .iter()
        .map(|name| preprocessor.preprocess(&read_data(Path::new(SKIMAGE_DATA).join(name))).unwrap())
        .collect();
    photos.iter().cycle().take(n).cloned().collect()
}

fn assert_close(a: &[f32], b: &[f32], what: &str) {
    let worst = a.iter().zip(b).map(|(x, y)| (x - y).abs()).fold(0f32, f32::max);
    let scale = a.iter().map(|x| x.abs()).fold(0f32, f32::max);
    assert!(worst <= 1e-4 * scale.max(1.0), "{what}: embeddings differ by {worst} (largest value {scale})");
}

fn pipeline(queue_capacity: usize, max_batch: usize) -> ImagePipeline {
    let library = ort_library();
    let card = card();
    let options = OrtOptions {
        intra_threads: Some(2),
        max_batch: Some(max_batch),
        instances: Some(1),
        ..OrtOptions::new(library, Device::Cpu)
    };
    let embedder = OnnxEmbedder::load(Path::new(MODEL), card, &options).unwrap();
    let batcher =
        BatcherConfig { max_delay: Duration::from_millis(2), queue_capacity, queue_timeout: Duration::from_secs(300) };
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

#[test]
fn a_padded_batch_gives_each_image_the_embedding_it_has_alone() {
    let embedder = OnnxEmbedder::load(
        Path::new(MODEL),
        card(),
        &OrtOptions {
            intra_threads: Some(2),
            batch_sizes: Some("1,4,8".parse().unwrap()),
            instances: Some(1),
            ..OrtOptions::new(ort_library(), Device::Cpu)
        },
    )
    .unwrap();
    assert_eq!(embedder.batch_sizes(), &"1,4,8".parse::<BatchSizes>().unwrap());
    let warmed: Vec<usize> = embedder.warmup().iter().map(|w| w.size).collect();
    assert_eq!(warmed, vec![1, 4, 8], "every shape is run once at load");
    let inputs = photo_inputs(7);
    let alone: Vec<Vec<f32>> = inputs.iter().map(|x| embedder.embed(x, 1).unwrap().row(0).to_vec()).collect();
    // 3 rows run as a batch of 4, 7 rows as a batch of 8: the padding never shows.
    for rows in [3usize, 7] {
        let mut batch = embedder.input_batch(embedder.batch_sizes().fitting(rows)).unwrap();
        assert!(batch.size() > rows);
        for (row, input) in inputs.iter().take(rows).enumerate() {
            batch.row_mut(row).copy_from_slice(input);
        }
        let embeddings = embedder.run(&batch, rows).unwrap();
        assert_eq!(embeddings.nrows(), rows, "the padded rows' outputs are dropped");
        for (row, expected) in alone.iter().take(rows).enumerate() {
            assert_close(embeddings.row(row).as_slice().unwrap(), expected, &format!("row {row} of {rows}"));
        }
    }
    // The same buffer again, with other images in its first rows: nothing of the last batch leaks.
    let embeddings = embedder.embed(&inputs[2..4].concat(), 2).unwrap();
    assert_close(embeddings.row(1).as_slice().unwrap(), &alone[3], "a reused shape");
}

#[test]
fn sessions_built_for_one_batch_size_agree_with_a_shared_session() {
    // CUDA builds a session per batch size (its batch dimension fixed to that size); the CPU
    // can build them too, which is how this path is tested without a GPU.
    let options = |per_size| OrtOptions {
        intra_threads: Some(1),
        batch_sizes: Some("1,2,5".parse().unwrap()),
        instances: Some(2),
        session_per_size: Some(per_size),
        ..OrtOptions::new(ort_library(), Device::Cpu)
    };
    let per_size = OnnxEmbedder::load(Path::new(MODEL), card(), &options(true)).unwrap();
    let shared = OnnxEmbedder::load(Path::new(MODEL), card(), &options(false)).unwrap();
    assert_eq!(per_size.warmup().len(), 6, "two instances of each of the three sizes, each warmed once");
    assert_eq!(shared.warmup().len(), 6, "two instances running every size, each warmed at each");
    let inputs = photo_inputs(5).concat();
    let a = per_size.embed(&inputs, 5).unwrap();
    let b = shared.embed(&inputs, 5).unwrap();
    assert_close(a.as_slice().unwrap(), b.as_slice().unwrap(), "per-size against shared sessions");
    // Instances of one size run at once, each on its own session.
    std::thread::scope(|scope| {
        let runs: Vec<_> =
            (0..4).map(|_| scope.spawn(|| per_size.embed(&inputs[..2 * card().input_len()], 2))).collect();
        for run in runs {
            let embeddings = run.join().unwrap().unwrap();
            assert_close(embeddings.row(0).as_slice().unwrap(), a.row(0).as_slice().unwrap(), "concurrent runs");
        }
    });
}

#[test]
fn a_model_with_a_fixed_batch_dimension_runs_only_at_that_size() {
    // The default model with its batch dimension fixed to 1, written by ONNX Runtime itself.
    let dir = tempfile::tempdir().unwrap();
    let fixed = dir.path().join("fixed.onnx");
    let python = Path::new(env!("CARGO_MANIFEST_DIR")).join(".venv/bin/python");
    let script = "import sys, onnxruntime as ort\n\
        so = ort.SessionOptions(); so.add_free_dimension_override_by_name('batch', 1)\n\
        so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_BASIC\n\
        so.optimized_model_filepath = sys.argv[2]\n\
        ort.InferenceSession(sys.argv[1], so, providers=['CPUExecutionProvider'])\n";
    let status = std::process::Command::new(python).args(["-c", script, MODEL]).arg(&fixed).status().unwrap();
    assert!(status.success());
    std::fs::copy(ModelCard::path_for(Path::new(MODEL)), ModelCard::path_for(&fixed)).unwrap();
    let options = |sizes: &str| OrtOptions {
        intra_threads: Some(1),
        batch_sizes: Some(sizes.parse().unwrap()),
        ..OrtOptions::new(ort_library(), Device::Cpu)
    };
    let refused = OnnxEmbedder::load(&fixed, card(), &options("1,4")).err().expect("sizes the model cannot run");
    assert!(matches!(refused, EmbedError::Model(_)));
    assert!(refused.to_string().contains("--batch-sizes 1"), "the error names the flag: {refused}");
    let embedder = OnnxEmbedder::load(&fixed, card(), &options("1")).unwrap();
    let input = photo_inputs(3).concat();
    assert_eq!(embedder.embed(&input, 3).unwrap().nrows(), 3, "three batches of one");
}
