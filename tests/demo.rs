//! `imagelsh demo` end to end on a small subset (its own server, and a running one), and the
//! contact sheet of `imagelsh query --sheet`.

mod common;

use std::path::Path;
use std::process::{Command, Output};

use common::*;

fn imagelsh(args: &[&str]) -> Output {
    let output = Command::new(env!("CARGO_BIN_EXE_imagelsh"))
        .args(args)
        .current_dir(env!("CARGO_MANIFEST_DIR"))
        .env("RUST_LOG", "warn")
        .output()
        .expect("run imagelsh");
    assert!(
        output.status.success(),
        "imagelsh {args:?}: {}\n{}",
        output.status,
        String::from_utf8_lossy(&output.stderr)
    );
    output
}

/// The last stdout line, as JSON.
fn last_json(output: &Output) -> serde_json::Value {
    let stdout = String::from_utf8_lossy(&output.stdout);
    let line = stdout.lines().last().unwrap_or_default();
    serde_json::from_str(line).unwrap_or_else(|e| panic!("{e}: {stdout}"))
}

/// A decoded PNG's size; the sheet has `columns` tiles a row.
fn sheet_size(path: &Path) -> (u32, u32) {
    let bytes = std::fs::read(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    let sheet = image::load_from_memory_with_format(&bytes, image::ImageFormat::Png).unwrap();
    (sheet.width(), sheet.height())
}

#[test]
fn the_demo_indexes_80_percent_queries_the_rest_and_draws_the_sheets() {
    let dir = tempfile::tempdir().unwrap();
    let sheets = dir.path().join("sheets");
    let data = dir.path().join("data");
    let output = imagelsh(&[
        "demo",
        "--images",
        "200",
        "--top-k",
        "5",
        "--json",
        "--sheets",
        sheets.to_str().unwrap(),
        "--data-dir",
        data.to_str().unwrap(),
    ]);
    let report = last_json(&output);
    assert_eq!(report["indexed"], 160 + 6, "80 % of 200 and the six photos: {report}");
    assert_eq!((report["queries"].as_u64(), report["refused"].as_u64()), (Some(40), Some(0)));
    let precision = report["precision"].as_f64().unwrap();
    assert!(precision >= 0.5, "precision@5 {precision} over 40 held-out queries (chance 0.1)");
    assert_eq!(report["photos_found"], 6, "each mirrored photo finds its original first");
    let by_class = report["by_class"].as_array().unwrap();
    let counted: u64 = by_class.iter().map(|c| c["queries"].as_u64().unwrap()).sum();
    assert_eq!(counted, 40);
    let text = String::from_utf8_lossy(&output.stdout);
    assert!(text.contains("precision@5 by class") && text.contains("Ankle boot"), "{text}");

    let (fashion_w, fashion_h) = sheet_size(&sheets.join("fashion-mnist.png"));
    let (photos_w, photos_h) = sheet_size(&sheets.join("photos.png"));
    assert_eq!(fashion_w, photos_w, "query and five matches a row, on both sheets");
    assert!(fashion_h > photos_h, "a row per class ({}) against six photos", by_class.len());
    // The server it started kept what it indexed: its data directory opens and checks clean.
    let check = imagelsh(&["check", "--data-dir", data.to_str().unwrap()]);
    assert!(String::from_utf8_lossy(&check.stdout).contains("166 items"));
}

#[tokio::test(flavor = "multi_thread")]
async fn query_sheet_shows_the_matches_from_thumbnails_of_a_running_server() {
    let dir = tempfile::tempdir().unwrap();
    let server = TestServer::start_with_model(&dir.path().join("data"), &[]);
    let url = format!("http://{}", server.addr);
    let sheets = dir.path().join("sheets");
    imagelsh(&["demo", "--server", &url, "--images", "50", "--top-k", "4", "--sheets", sheets.to_str().unwrap()]);
    assert!(sheets.join("fashion-mnist.png").exists());

    // By a stored item: its thumbnail is the query's picture, the hits' thumbnails theirs.
    let by_id = dir.path().join("by-id.png");
    let output = imagelsh(&[
        "query",
        "--server",
        &url,
        "--index",
        "demo",
        "--id",
        "skimage/chelsea.png",
        "--top-k",
        "3",
        "--json",
        "--sheet",
        by_id.to_str().unwrap(),
    ]);
    let hits = last_json(&output)["hits"].as_array().unwrap().len();
    assert_eq!(hits, 3);
    let (width, _) = sheet_size(&by_id);

    // By a file that is not in the index, with a label for the frames.
    let file = dir.path().join("cat.jpg");
    let cat = image::load_from_memory(&read_data(Path::new(SKIMAGE_DATA).join("chelsea.png"))).unwrap();
    cat.crop_imm(50, 0, 300, 300).save(&file).unwrap();
    let by_file = dir.path().join("by-file.png");
    let output = imagelsh(&[
        "query",
        "--server",
        &url,
        "--index",
        "demo",
        file.to_str().unwrap(),
        "--top-k",
        "3",
        "--label",
        "photo",
        "--sheet",
        by_file.to_str().unwrap(),
    ]);
    let text = String::from_utf8_lossy(&output.stdout);
    assert!(text.contains("skimage/chelsea.png"), "the cropped cat finds the cat: {text}");
    assert_eq!(sheet_size(&by_file).0, width, "a query and three matches");
    // Right of the query's column (the first 150 pixels), the first match is the cat drawn from
    // its thumbnail (warm colours), not a grey "no image" square.
    let sheet = image::open(&by_file).unwrap().into_rgb8();
    let warm = sheet
        .enumerate_pixels()
        .filter(|(x, _, p)| *x > 150 && p[0] > 120 && u16::from(p[0]) > u16::from(p[2]) + 40)
        .count();
    assert!(warm > 2000, "{warm} warm pixels");
}
