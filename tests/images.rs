//! Images through the whole server with the real model (EfficientNet-Lite0 on ONNX Runtime's
//! CPU provider) and real photos.

mod common;

use std::path::Path;
use std::time::Duration;

use common::*;
use imagelsh::embed::ModelCard;
use imagelsh::pipeline::{DecodeLimits, Preprocessor};
use imagelsh::proto::{self, EmbedRequest, query_request::Query};
use tonic::Code;

const MODEL: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/models/efficientnet_lite0.onnx");
const FIXTURES: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/fixtures");

fn python() -> String {
    std::env::var("IMAGELSH_TEST_PYTHON")
        .unwrap_or_else(|_| concat!(env!("CARGO_MANIFEST_DIR"), "/.venv/bin/python").into())
}

fn rel_l2(a: &[f32], b: &[f32]) -> f32 {
    let diff: f32 = a.iter().zip(b).map(|(x, y)| (x - y) * (x - y)).sum::<f32>().sqrt();
    diff / b.iter().map(|y| y * y).sum::<f32>().sqrt()
}

fn argmax(v: &[f32]) -> usize {
    v.iter().enumerate().max_by(|a, b| a.1.total_cmp(b.1)).map(|(i, _)| i).unwrap()
}

async fn embed(
    client: &mut proto::image_index_client::ImageIndexClient<tonic::transport::Channel>,
    images: Vec<Vec<u8>>,
) -> proto::EmbedResponse {
    let request = EmbedRequest { batch_id: 1, images };
    let mut responses = client.embed(tokio_stream::iter([request])).await.unwrap().into_inner();
    responses.message().await.unwrap().unwrap()
}

#[tokio::test(flavor = "multi_thread")]
async fn photo_embedding_through_the_server_matches_python_onnxruntime() {
    let photo = Path::new(SKIMAGE_DATA).join("chelsea.png");
    let bytes = read_data(&photo);
    let dir = tempfile::tempdir().unwrap();
    let server = TestServer::start_with_model(dir.path(), &[]);
    let mut client = server.client().await;
    let response = embed(&mut client, vec![bytes.clone()]).await;
    assert!(response.errors.is_empty(), "{:?}", response.errors);
    let ours = &response.embeddings[0].values;
    assert_eq!(ours.len(), 1280);

    // Python onnxruntime on the very tensor imagelsh's preprocessing makes.
    let card = ModelCard::load(&ModelCard::path_for(Path::new(MODEL))).unwrap();
    let tensor = Preprocessor::new(card, DecodeLimits::default()).preprocess(&bytes).unwrap();
    let tensor_path = dir.path().join("tensor.f32");
    let out_path = dir.path().join("reference.f32");
    std::fs::write(&tensor_path, tensor.iter().flat_map(|x| x.to_le_bytes()).collect::<Vec<u8>>()).unwrap();
    let status = std::process::Command::new(python())
        .arg(concat!(env!("CARGO_MANIFEST_DIR"), "/tests/reference/onnx_reference.py"))
        .args([Path::new(MODEL), &photo, &tensor_path, &out_path])
        .status()
        .expect("run the Python reference (scripts/setup-ort makes .venv)");
    assert!(status.success());
    let reference: Vec<f32> =
        std::fs::read(&out_path).unwrap().chunks_exact(4).map(|c| f32::from_le_bytes(c.try_into().unwrap())).collect();
    let (embedding, rest) = reference.split_at(1280);
    let (logits, rest) = rest.split_at(1000);
    let (embedding_pil, tensor_pil) = rest.split_at(1280);

    let error = rel_l2(ours, embedding);
    assert!(error < 1e-4, "relative L2 error {error} against Python onnxruntime");
    assert_cat(logits);

    // Our resizing against Pillow's: close pixels, nearly the same embedding.
    let pixel_diff = tensor.iter().zip(tensor_pil).map(|(a, b)| (a - b).abs()).sum::<f32>() / tensor.len() as f32;
    assert!(pixel_diff < 0.02, "mean |pixel difference| against Pillow {pixel_diff}");
    let cosine = imagelsh::lsh::cosine(ours, embedding_pil);
    assert!(cosine > 0.98, "cosine with Pillow-preprocessed embedding {cosine}");
}

#[tokio::test(flavor = "multi_thread")]
async fn real_images_stream_in_and_queries_find_their_class() {
    let dir = tempfile::tempdir().unwrap();
    let server = TestServer::start_with_model(dir.path(), &[]);
    let mut client = server.client().await;
    let info = client
        .create_index(proto::CreateIndexRequest {
            name: "fashion".into(),
            hash_bits: 12,
            tables: 16,
            seed: 1,
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!((info.dim, info.model.as_str()), (1280, "efficientnet_lite0"));

    let images = fashion_mnist_pngs(460);
    let (indexed, queries) = images.split_at(400);
    // Four concurrent streams of 25-image batches.
    let mut tasks = Vec::new();
    for s in 0..4 {
        let mut client = server.client().await;
        let batches: Vec<_> = indexed
            .iter()
            .enumerate()
            .filter(|(i, _)| i % 4 == s)
            .collect::<Vec<_>>()
            .chunks(25)
            .enumerate()
            .map(|(b, chunk)| {
                batch(
                    "fashion",
                    b as u64,
                    chunk
                        .iter()
                        .map(|(i, (png, class))| image_item(format!("fm{i}"), class.to_string(), png.clone()))
                        .collect(),
                )
            })
            .collect();
        tasks.push(tokio::spawn(async move { ingest(&mut client, batches).await.unwrap() }));
    }
    for task in tasks {
        assert!(task.await.unwrap().iter().all(|r| r.errors.is_empty() && r.indexed == 25));
    }

    // Colour photos join the index; a re-encoded photo finds its original.
    let photos = ["chelsea.png", "coffee.png", "astronaut.png", "rocket.jpg", "motorcycle_left.png"];
    let items = photos.iter().map(|p| image_item(*p, "photo", read_data(Path::new(SKIMAGE_DATA).join(p)))).collect();
    assert_eq!(ingest(&mut client, vec![batch("fashion", 99, items)]).await.unwrap()[0].indexed, 5);
    let webp = read_data(Path::new(FIXTURES).join("chelsea.webp"));
    let hits = client
        .query(proto::QueryRequest {
            index: "fashion".into(),
            query: Some(Query::Image(webp)),
            top_k: 3,
            rerank: Some(false),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner()
        .hits;
    assert_eq!(hits.first().map(|h| h.id.as_str()), Some("chelsea.png"), "{hits:?}");

    // Held-out Fashion-MNIST queries, re-ranked by exact cosine: most of the top 5 share the
    // query's class (the model card measured 0.77 with exact search).
    let (mut same, mut total) = (0, 0);
    for (png, class) in queries {
        let hits = client
            .query(proto::QueryRequest {
                index: "fashion".into(),
                query: Some(Query::Image(png.clone())),
                top_k: 5,
                rerank: Some(true),
                ..Default::default()
            })
            .await
            .unwrap()
            .into_inner()
            .hits;
        same += hits.iter().filter(|h| h.label == class.to_string()).count();
        total += 5;
    }
    let precision = same as f32 / total as f32;
    assert!(precision >= 0.6, "precision@5 by class {precision} (chance 0.1)");
}

#[tokio::test(flavor = "multi_thread")]
async fn every_bad_image_fails_alone_and_every_pixel_kind_is_indexed() {
    let dir = tempfile::tempdir().unwrap();
    let server = TestServer::start_with_model(dir.path(), &["--max-image-bytes", "1000000"]);
    let mut client = server.client().await;
    client.create_index(proto::CreateIndexRequest { name: "mixed".into(), ..Default::default() }).await.unwrap();

    let png = |image: image::DynamicImage| {
        let mut out = std::io::Cursor::new(Vec::new());
        image.write_to(&mut out, image::ImageFormat::Png).unwrap();
        out.into_inner()
    };
    let photo = image::load_from_memory(&read_data(Path::new(SKIMAGE_DATA).join("coffee.png"))).unwrap().resize(
        120,
        80,
        image::imageops::FilterType::Triangle,
    );
    // Cut uploads: the decoders would pad them (zune-jpeg fills the missing rows); the
    // container check refuses them.
    let cut = |name: &str, keep: f64| {
        let mut bytes = read_data(Path::new(FIXTURES).join(name));
        bytes.truncate((bytes.len() as f64 * keep) as usize);
        bytes
    };
    let mislabelled = [b"\xff\xd8\xff\xe0".as_slice(), &png(image::DynamicImage::ImageRgb8(photo.to_rgb8()))].concat();
    let mut truncated_png = read_data(Path::new(SKIMAGE_DATA).join("coffee.png"));
    truncated_png.truncate(truncated_png.len() / 3);
    let mut giant_header = b"\x89PNG\r\n\x1a\n\x00\x00\x00\x0dIHDR".to_vec();
    let ihdr = [100_000u32.to_be_bytes(), 100_000u32.to_be_bytes()].concat();
    let body = [b"IHDR".as_slice(), &ihdr, &[8, 2, 0, 0, 0]].concat();
    giant_header.extend_from_slice(&body[4..]);
    giant_header.extend_from_slice(&crc32(&body).to_be_bytes());

    // A WebP whose extended header (VP8X) declares a 100000×100000 canvas.
    let mut giant_webp = b"RIFF\x16\x00\x00\x00WEBPVP8X\x0a\x00\x00\x00\x00\x00\x00\x00".to_vec();
    giant_webp.extend_from_slice(&99_999u32.to_le_bytes()[..3]);
    giant_webp.extend_from_slice(&99_999u32.to_le_bytes()[..3]);

    let good: Vec<(&str, Vec<u8>)> = vec![
        ("grey", png(image::DynamicImage::ImageLuma8(photo.to_luma8()))),
        ("grey-alpha", png(image::DynamicImage::ImageLumaA8(photo.to_luma_alpha8()))),
        ("rgba", png(image::DynamicImage::ImageRgba8(photo.to_rgba8()))),
        ("rgb16", png(image::DynamicImage::ImageRgb16(photo.to_rgb16()))),
        ("cmyk", read_data(Path::new(FIXTURES).join("chelsea_cmyk.jpg"))),
        ("webp", read_data(Path::new(FIXTURES).join("chelsea.webp"))),
        ("exif-rotated", read_data(Path::new(FIXTURES).join("chelsea_exif_rotated.jpg"))),
        (
            "one-pixel",
            png(image::DynamicImage::ImageRgb8(image::RgbImage::from_pixel(1, 1, image::Rgb([200, 10, 10])))),
        ),
    ];
    let bad: Vec<(&str, Vec<u8>)> = vec![
        ("empty", Vec::new()),
        ("noise", (0..5000u32).map(|i| (i.wrapping_mul(2_654_435_761) >> 13) as u8).collect()),
        ("truncated-png", truncated_png),
        ("giant-header", giant_header),
        ("too-many-bytes", vec![0u8; 1_200_000]),
        ("gif", b"GIF89a\x01\x00\x01\x00\x00\x00\x00;".to_vec()),
        ("truncated-jpeg", cut("chelsea_cmyk.jpg", 1.0 / 3.0)),
        ("truncated-webp", cut("chelsea.webp", 0.5)),
        ("jpeg-missing-its-end", cut("chelsea_exif_rotated.jpg", 0.999)),
        ("mislabelled", mislabelled),
        ("giant-webp-header", giant_webp),
        ("20000x20", png(image::DynamicImage::ImageLuma8(image::GrayImage::from_pixel(20_000, 20, image::Luma([9]))))),
    ];
    // Interleave bad and good items in one batch.
    let mut items = Vec::new();
    let mut bad_positions = Vec::new();
    for i in 0..good.len().max(bad.len()) {
        if let Some((id, bytes)) = good.get(i) {
            items.push(image_item(*id, "good", bytes.clone()));
        }
        if let Some((id, bytes)) = bad.get(i) {
            bad_positions.push(items.len() as u32);
            items.push(image_item(*id, "bad", bytes.clone()));
        }
    }
    let response = &ingest(&mut client, vec![batch("mixed", 1, items)]).await.unwrap()[0];
    assert_eq!(response.indexed as usize, good.len(), "{:?}", response.errors);
    assert_eq!(response.errors.iter().map(|e| e.position).collect::<Vec<_>>(), bad_positions);
    for e in &response.errors {
        assert!(!e.message.is_empty(), "{e:?}");
        if e.id.starts_with("truncated") || e.id == "jpeg-missing-its-end" {
            assert!(e.message.contains("truncated"), "{e:?}");
        }
    }

    // The server is up; the CMYK, WebP and rotated copies of one photo find each other.
    let hits = client.query(query_id("mixed", "webp", 2)).await.unwrap().into_inner().hits;
    let ids: Vec<&str> = hits.iter().map(|h| h.id.as_str()).collect();
    assert!(ids.contains(&"cmyk") || ids.contains(&"exif-rotated"), "{ids:?}");

    // A bad query image is INVALID_ARGUMENT, not a crash.
    let status = client
        .query(proto::QueryRequest {
            index: "mixed".into(),
            query: Some(Query::Image(b"junk".to_vec())),
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::InvalidArgument);

    // Embed: one embedding per image, empty where the image is bad.
    let response = embed(&mut client, vec![good[0].1.clone(), Vec::new(), good[4].1.clone()]).await;
    assert_eq!(response.embeddings.iter().map(|e| e.values.len()).collect::<Vec<_>>(), [1280, 0, 1280]);
    assert_eq!(response.errors.iter().map(|e| e.position).collect::<Vec<_>>(), [1]);
}

#[tokio::test(flavor = "multi_thread")]
async fn an_index_of_another_dimension_refuses_images() {
    let dir = tempfile::tempdir().unwrap();
    let server = TestServer::start_with_model(dir.path(), &[]);
    let mut client = server.client().await;
    let info = create(&mut client, "small", 32, 8, 4).await;
    assert_eq!(info.model, "", "a 32-d index does not hold the model's embeddings");
    let photo = read_data(Path::new(FIXTURES).join("chelsea.webp"));
    let response = &ingest(
        &mut client,
        vec![batch("small", 1, vec![image_item("cat", "", photo.clone()), vector_item("v", "", &[0.1; 32])])],
    )
    .await
    .unwrap()[0];
    assert_eq!(response.indexed, 1);
    assert_eq!(response.errors.len(), 1);
    assert!(response.errors[0].message.contains("dimension"), "{:?}", response.errors[0]);
    let status = client
        .query(proto::QueryRequest { index: "small".into(), query: Some(Query::Image(photo)), ..Default::default() })
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::InvalidArgument);
}

#[test]
fn the_model_classifies_the_cat_as_a_tabby_through_the_library() {
    use imagelsh::embed::{Device, OnnxEmbedder, OrtOptions};
    let library = std::env::var_os("ORT_DYLIB_PATH")
        .map(Into::into)
        .or_else(|| imagelsh::config::venv_ort_library(Path::new(env!("CARGO_MANIFEST_DIR"))))
        .expect("ONNX Runtime library: set ORT_DYLIB_PATH or run scripts/setup-ort");
    let card = ModelCard::load(&ModelCard::path_for(Path::new(MODEL))).unwrap();
    let preprocessor = Preprocessor::new(card.clone(), DecodeLimits::default());
    let embedder = OnnxEmbedder::load(
        Path::new(MODEL),
        card,
        &OrtOptions { intra_threads: Some(2), ..OrtOptions::new(library, Device::Cpu) },
    )
    .unwrap();
    let cat = preprocessor.preprocess(&read_data(Path::new(SKIMAGE_DATA).join("chelsea.png"))).unwrap();
    let coffee = preprocessor.preprocess(&read_data(Path::new(SKIMAGE_DATA).join("coffee.png"))).unwrap();
    let (embeddings, logits) = embedder.embed_with_logits(&[cat, coffee].concat(), 2).unwrap();
    let logits = logits.unwrap();
    assert_cat(logits.row(0).as_slice().unwrap());
    assert_eq!(argmax(logits.row(1).as_slice().unwrap()), 967, "espresso");
    assert!(embeddings.iter().all(|x| *x >= 0.0), "post-ReLU features");
}

/// The photo is a tabby. With the model card's preprocessing (ours or Pillow's) the model
/// ranks tiger cat (282) and Egyptian cat (285) a hair above tabby (281): all domestic cats,
/// within 0.9 of each other. Top-1 must be a domestic cat and tabby in the top 3.
fn assert_cat(logits: &[f32]) {
    let mut order: Vec<usize> = (0..logits.len()).collect();
    order.sort_by(|&a, &b| logits[b].total_cmp(&logits[a]));
    assert!((281..=285).contains(&order[0]), "top-1 class {} is not a domestic cat", order[0]);
    assert!(order[..3].contains(&281), "tabby (281) not in the top 3: {:?}", &order[..3]);
}

fn crc32(bytes: &[u8]) -> u32 {
    let mut crc = !0u32;
    for &b in bytes {
        crc ^= u32::from(b);
        for _ in 0..8 {
            crc = if crc & 1 == 1 { (crc >> 1) ^ 0xEDB8_8320 } else { crc >> 1 };
        }
    }
    !crc
}

#[tokio::test(flavor = "multi_thread")]
async fn an_index_with_thumbnails_keeps_a_small_jpeg_of_each_image_across_a_restart() {
    let dir = tempfile::tempdir().unwrap();
    let server = TestServer::start_with_model(dir.path(), &[]);
    let mut client = server.client().await;
    let info = client
        .create_index(proto::CreateIndexRequest { name: "thumbs".into(), thumbnails: true, ..Default::default() })
        .await
        .unwrap()
        .into_inner();
    assert!(info.thumbnails);
    let photos = ["chelsea.png", "astronaut.png", "rocket.jpg"];
    let mut items: Vec<_> =
        photos.iter().map(|p| image_item(*p, "photo", read_data(Path::new(SKIMAGE_DATA).join(p)))).collect();
    let (png, class) = fashion_mnist_pngs(1).remove(0);
    items.push(image_item("fm0", class.to_string(), png));
    items.push(vector_item("vector", "v", &[0.5; 1280]));
    let acks = ingest(&mut client, vec![batch("thumbs", 1, items)]).await.unwrap();
    assert_eq!(acks[0].indexed, 5, "{:?}", acks[0].errors);

    let ask = proto::GetItemsRequest {
        index: "thumbs".into(),
        ids: ["chelsea.png", "astronaut.png", "rocket.jpg", "fm0", "vector"].map(String::from).to_vec(),
        with_thumbnails: true,
        ..Default::default()
    };
    let check = |got: &proto::GetItemsResponse| {
        for (item, side) in got.items.iter().zip([(96, 64), (96, 96), (96, 64), (28, 28)]) {
            assert!(
                !item.thumbnail.is_empty() && item.thumbnail.len() <= 4096,
                "{}: {} bytes",
                item.id,
                item.thumbnail.len()
            );
            let thumb = image::load_from_memory_with_format(&item.thumbnail, image::ImageFormat::Jpeg).unwrap();
            assert_eq!((thumb.width(), thumb.height()), side, "{}", item.id);
        }
        assert!(got.items[4].thumbnail.is_empty(), "an item sent as an embedding has no thumbnail");
    };
    let got = client.get_items(ask.clone()).await.unwrap().into_inner();
    check(&got);
    // The thumbnail looks like its image: the cat's is mostly warm, the rocket's sky blue.
    let mean = |jpeg: &[u8]| {
        let rgb = image::load_from_memory(jpeg).unwrap().into_rgb8();
        let n = f64::from(rgb.width() * rgb.height());
        let sum = rgb
            .pixels()
            .fold([0f64; 3], |s, p| [s[0] + f64::from(p[0]), s[1] + f64::from(p[1]), s[2] + f64::from(p[2])]);
        sum.map(|c| c / n)
    };
    let (cat, rocket) = (mean(&got.items[0].thumbnail), mean(&got.items[2].thumbnail));
    assert!(cat[0] > cat[2] && rocket[2] > rocket[0], "cat {cat:?}, rocket {rocket:?}");
    let bare =
        client.get_items(proto::GetItemsRequest { with_thumbnails: false, ..ask.clone() }).await.unwrap().into_inner();
    assert!(bare.items.iter().all(|i| i.thumbnail.is_empty()), "thumbnails only when asked for");

    // Applied, restarted: the same thumbnails; a replaced item gets its new image's.
    drop(client);
    server.terminate();
    server.wait(Duration::from_secs(30));
    let server = TestServer::start_with_model(dir.path(), &[]);
    let mut client = server.client().await;
    assert_eq!(client.get_items(ask.clone()).await.unwrap().into_inner(), got);
    let coffee = image_item("chelsea.png", "photo", read_data(Path::new(SKIMAGE_DATA).join("coffee.png")));
    ingest(&mut client, vec![batch("thumbs", 2, vec![coffee])]).await.unwrap();
    let replaced = client.get_items(ask).await.unwrap().into_inner();
    assert_ne!(replaced.items[0].thumbnail, got.items[0].thumbnail);
    assert_eq!(replaced.items[1..], got.items[1..]);
}
