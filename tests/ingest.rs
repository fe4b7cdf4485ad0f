//! `imagelsh ingest` as a user runs it: the real binary against a real server with the model,
//! over real images (Fashion-MNIST as class folders and as IDX files). Interrupted with SIGINT
//! and run again; riding out a server that is killed and restarted mid-job.

mod common;

use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use common::*;
use imagelsh::proto;

/// The first `n` Fashion-MNIST test images as an IDX image/label pair; returns the image file.
fn idx_pair(dir: &Path, n: usize) -> PathBuf {
    let gunzip = |name: &str| {
        let mut out = Vec::new();
        flate2::read::GzDecoder::new(read_data(Path::new(FASHION_MNIST).join(name)).as_slice())
            .read_to_end(&mut out)
            .unwrap();
        out
    };
    let (images, labels) = (gunzip("t10k-images-idx3-ubyte.gz"), gunzip("t10k-labels-idx1-ubyte.gz"));
    let count = (n as u32).to_be_bytes();
    let mut head = images[..16].to_vec();
    head[4..8].copy_from_slice(&count);
    head.extend_from_slice(&images[16..16 + n * 784]);
    let mut label_file = labels[..8].to_vec();
    label_file[4..8].copy_from_slice(&count);
    label_file.extend_from_slice(&labels[8..8 + n]);
    std::fs::write(dir.join("part-labels-idx1-ubyte"), label_file).unwrap();
    let path = dir.join("part-images-idx3-ubyte");
    std::fs::write(&path, head).unwrap();
    path
}

fn start_ingest(server: &str, index: &str, refused: &Path, extra: &[&str], sources: &[&Path]) -> Child {
    Command::new(env!("CARGO_BIN_EXE_imagelsh"))
        .args(["ingest", "--server", &format!("http://{server}"), "--index", index, "--json", "--refused-file"])
        .arg(refused)
        .args(extra)
        .args(sources)
        .env("RUST_LOG", "warn")
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .expect("start imagelsh ingest")
}

#[tokio::test(flavor = "multi_thread")]
async fn an_interrupted_job_rerun_indexes_everything_once_with_exact_summaries() {
    const IMAGES: u64 = 400;
    let dir = tempfile::tempdir().unwrap();
    let server = TestServer::start_with_model(&dir.path().join("data"), &[]);
    let folder = class_folders(dir.path(), IMAGES as usize);
    let refused = dir.path().join("refused.jsonl");
    let mut client = lazy_client(&server.addr);
    let small = ["--streams", "2", "--batch-items", "8", "--in-flight", "2"];

    let job = start_ingest(&server.addr, "photos", &refused, &small, &[&folder]);
    wait_for_items(&mut client, "photos", IMAGES / 4).await;
    // The server holds its answers while the SIGINT lands: the job cannot finish first.
    server.pause();
    let pid = job.id().to_string();
    assert!(Command::new("kill").args(["-INT", &pid]).status().unwrap().success());
    tokio::time::sleep(Duration::from_millis(300)).await;
    server.resume();
    let (code, first) = finish(job, Duration::from_secs(120));
    assert_eq!(code, 130, "an interrupted job says so: {first}");
    assert_eq!(first["interrupted"], true);
    let indexed = number(&first, "indexed");
    assert_eq!(indexed, items_in(&mut client, "photos").await, "the batches in flight were acknowledged: {first}");
    assert!(indexed < IMAGES, "interrupted half-way: {first}");
    assert_eq!(number(&first, "planned"), IMAGES + 1);
    assert_eq!(
        number(&first, "indexed") + number(&first, "refused") + number(&first, "remaining"),
        IMAGES + 1,
        "{first}"
    );

    let job = start_ingest(&server.addr, "photos", &refused, &small, &[&folder]);
    let (code, second) = finish(job, Duration::from_secs(180));
    assert_eq!(code, 0, "{second}");
    assert_eq!(second["interrupted"], false);
    assert_eq!(number(&second, "skipped"), indexed, "what the first run acknowledged is not sent again: {second}");
    assert_eq!(number(&second, "indexed"), IMAGES - indexed, "{second}");
    assert_eq!((number(&second, "refused"), number(&second, "remaining")), (1, 0), "{second}");
    assert_eq!(items_in(&mut client, "photos").await, IMAGES, "every image indexed once");

    // The refused file names the bad file and why; the items carry their label and source.
    let refusals = std::fs::read_to_string(&refused).unwrap();
    let refusal: serde_json::Value = serde_json::from_str(refusals.trim()).unwrap();
    assert_eq!(refusal["id"], "class0/broken.jpg");
    assert!(refusal["source"].as_str().unwrap().ends_with("photos/class0/broken.jpg"), "{refusal}");
    assert!(!refusal["reason"].as_str().unwrap().is_empty());
    let pngs = fashion_mnist_pngs(3);
    let ids: Vec<String> = pngs.iter().enumerate().map(|(i, (_, class))| format!("class{class}/{i:05}.png")).collect();
    let got = client
        .get_items(proto::GetItemsRequest {
            index: "photos".into(),
            ids: ids.clone(),
            with_embeddings: false,
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    assert!(got.missing.is_empty(), "{:?}", got.missing);
    for ((item, id), (_, class)) in got.items.iter().zip(&ids).zip(&pngs) {
        assert_eq!((&item.id, item.label.as_str()), (id, format!("class{class}").as_str()));
        let source = folder.join(id).display().to_string();
        assert_eq!(item.metadata.get("source"), Some(&source));
    }

    // A third run finds everything there and sends nothing but the refused file again.
    let job = start_ingest(&server.addr, "photos", &refused, &small, &[&folder]);
    let (code, third) = finish(job, Duration::from_secs(60));
    assert_eq!((code, number(&third, "skipped"), number(&third, "indexed")), (0, IMAGES, 0), "{third}");
}

#[tokio::test(flavor = "multi_thread")]
async fn a_job_rides_out_a_server_killed_and_restarted_mid_job() {
    const IMAGES: u64 = 320;
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    let addr = free_loopback_addr();
    let server = TestServer::start_on(&addr, &data, &[], &[]);
    let idx = idx_pair(dir.path(), IMAGES as usize);
    let refused = dir.path().join("refused.jsonl");
    let mut client = lazy_client(&addr);
    let names = "T-shirt,Trouser,Pullover,Dress,Coat,Sandal,Shirt,Sneaker,Bag,Ankle boot";
    let options = ["--streams", "2", "--batch-items", "8", "--max-retries", "30", "--class-names", names];
    let job = start_ingest(&addr, "idx", &refused, &options, &[&idx]);
    wait_for_items(&mut client, "idx", IMAGES / 4).await;
    // Paused first: the job cannot finish before the kill, however fast the machine.
    server.pause();
    server.kill();
    tokio::time::sleep(Duration::from_millis(500)).await;
    let server = TestServer::start_on(&addr, &data, &[], &[]);
    let (code, summary) = finish(job, Duration::from_secs(240));
    assert_eq!(code, 0, "{summary}");
    assert!(number(&summary, "retries") >= 1, "the job saw the server go: {summary}");
    assert_eq!(number(&summary, "indexed"), IMAGES, "each batch acknowledged once: {summary}");
    assert_eq!((number(&summary, "refused"), number(&summary, "remaining")), (0, 0), "{summary}");
    let mut client = lazy_client(&server.addr);
    assert_eq!(items_in(&mut client, "idx").await, IMAGES);
    let got = client
        .get_items(proto::GetItemsRequest {
            index: "idx".into(),
            ids: vec!["part/0".into()],
            with_embeddings: false,
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(got.items[0].label, "Ankle boot", "Fashion-MNIST's test image 0, named by --class-names");
    assert!(!refused.exists(), "no refused file without refusals");
}
