//! The web page in a real headless browser: Debian's chromium, driven through chromedriver's
//! WebDriver API, against a real server with the real model. The test types a token, reads the
//! index list, uploads an image and reads the grid of matches.

mod common;

use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use common::*;
use imagelsh::proto;
use serde_json::{Value, json};
use tonic::metadata::MetadataValue;

const READ: &str = "web-read-token-0123456789";
const ADMIN: &str = "web-admin-token-0123456789";
const CHROMIUM: &str = "/usr/bin/chromium";
const CHROMEDRIVER: &str = "/usr/bin/chromedriver";

fn authed<T>(message: T) -> tonic::Request<T> {
    let mut request = tonic::Request::new(message);
    let value: MetadataValue<_> = format!("Bearer {ADMIN}").parse().unwrap();
    request.metadata_mut().insert("authorization", value);
    request
}

/// chromedriver on a free loopback port, and one browser session in it.
struct Browser {
    driver: Child,
    base: String,
    session: String,
}

impl Browser {
    fn start(profile: &Path) -> Self {
        assert!(Path::new(CHROMIUM).exists(), "apt-get install chromium chromium-driver (.ci/run does)");
        let port = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
        let driver = Command::new(CHROMEDRIVER)
            .arg(format!("--port={port}"))
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("start chromedriver");
        let base = format!("http://127.0.0.1:{port}");
        let started = Instant::now();
        while ureq::get(&format!("{base}/status")).call().is_err() {
            assert!(started.elapsed() < Duration::from_secs(30), "chromedriver did not start");
            std::thread::sleep(Duration::from_millis(100));
        }
        let args = [
            "--headless=new".to_string(),
            "--no-sandbox".into(),
            "--disable-gpu".into(),
            "--disable-dev-shm-usage".into(),
            "--disable-background-networking".into(),
            "--no-first-run".into(),
            format!("--user-data-dir={}", profile.display()),
        ];
        let capabilities = json!({ "capabilities": { "alwaysMatch": {
            "browserName": "chrome",
            "goog:chromeOptions": { "binary": CHROMIUM, "args": args },
        }}});
        let mut this = Self { driver, base, session: String::new() };
        let created = this.post("/session", capabilities);
        this.session = created["sessionId"].as_str().expect("a session id").to_string();
        this
    }

    fn post(&self, path: &str, body: Value) -> Value {
        let path = if path == "/session" { path.to_string() } else { format!("/session/{}{path}", self.session) };
        let mut response =
            ureq::post(&format!("{}{path}", self.base)).send_json(&body).unwrap_or_else(|e| panic!("{path}: {e}"));
        response.body_mut().read_json::<Value>().unwrap()["value"].take()
    }

    fn go(&self, url: &str) {
        self.post("/url", json!({ "url": url }));
    }

    fn element(&self, css: &str) -> String {
        let found = self.post("/element", json!({ "using": "css selector", "value": css }));
        found.as_object().and_then(|o| o.values().next()).and_then(Value::as_str).expect("an element").to_string()
    }

    fn type_into(&self, css: &str, text: &str) {
        let element = self.element(css);
        self.post(&format!("/element/{element}/value"), json!({ "text": text }));
    }

    fn script(&self, script: &str) -> Value {
        self.post("/execute/sync", json!({ "script": script, "args": [] }))
    }

    /// Runs `script` until it returns something truthy, for at most `limit`.
    fn wait_for(&self, script: &str, limit: Duration) -> Value {
        let started = Instant::now();
        loop {
            let value = self.script(script);
            if !(value.is_null() || value == json!(false) || value == json!("") || value == json!([])) {
                return value;
            }
            assert!(started.elapsed() < limit, "waited {limit:?} for {script}");
            std::thread::sleep(Duration::from_millis(100));
        }
    }
}

impl Drop for Browser {
    fn drop(&mut self) {
        let _ = ureq::delete(&format!("{}/session/{}", self.base, self.session)).call();
        let _ = self.driver.kill();
        let _ = self.driver.wait();
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn the_page_lists_the_indexes_and_shows_the_matches_of_an_uploaded_image() {
    let dir = tempfile::tempdir().unwrap();
    let tokens = dir.path().join("tokens");
    std::fs::write(&tokens, format!("read {READ}\nadmin {ADMIN}\n")).unwrap();
    let server = TestServer::start_with_model(&dir.path().join("data"), &["--tokens-file", tokens.to_str().unwrap()]);
    let mut client = server.client().await;
    let create = proto::CreateIndexRequest { name: "web".into(), thumbnails: true, ..Default::default() };
    client.create_index(authed(create)).await.unwrap();
    let mut items: Vec<_> = fashion_mnist_pngs(40)
        .into_iter()
        .enumerate()
        .map(|(i, (png, class))| image_item(format!("fm{i}"), format!("class {class}"), png))
        .collect();
    for photo in ["chelsea.png", "coffee.png", "astronaut.png"] {
        items.push(image_item(format!("skimage/{photo}"), "photo", read_data(Path::new(SKIMAGE_DATA).join(photo))));
    }
    let stream = tokio_stream::iter(vec![batch("web", 1, items)]);
    let mut acks = client.ingest(authed(stream)).await.unwrap().into_inner();
    assert_eq!(acks.message().await.unwrap().unwrap().indexed, 43);

    // The query: the cat, cropped and saved as JPEG (not an indexed file).
    let query = dir.path().join("cat.jpg");
    let cat = image::load_from_memory(&read_data(Path::new(SKIMAGE_DATA).join("chelsea.png"))).unwrap();
    cat.crop_imm(40, 10, 320, 280).save(&query).unwrap();

    let page = format!("http://{}", server.http_addr);
    let browser = Browser::start(&dir.path().join("profile"));
    // Without a token the page says what is missing instead of showing data.
    browser.go(&format!("{page}/indexes"));
    let refusal =
        browser.wait_for("return document.querySelector('#status.error')?.textContent", Duration::from_secs(20));
    assert!(refusal.as_str().unwrap().contains("token"), "{refusal}");
    // A read token (typed, then Tab) shows the index and its size.
    browser.type_into("#token", &format!("{READ}\u{E004}"));
    let row = browser
        .wait_for("return document.querySelector('#indexes tr[data-index=web]')?.innerText", Duration::from_secs(20));
    let row = row.as_str().unwrap();
    assert!(row.contains("web") && row.contains("43") && row.contains("1280"), "{row:?}");

    // The search page remembers the token (this tab's session); an uploaded image gets a grid.
    browser.go(&format!("{page}/"));
    browser.wait_for("return document.querySelector('#index option[value=web]') !== null", Duration::from_secs(20));
    browser.type_into("#file", query.to_str().unwrap());
    let tiles = browser.wait_for(
        "const hits = [...document.querySelectorAll('#grid .hit')];
         return hits.map(h => ({ id: h.dataset.id, text: h.innerText,
                                 width: h.querySelector('img')?.naturalWidth ?? 0 }));",
        Duration::from_secs(60),
    );
    let tiles = tiles.as_array().unwrap();
    assert_eq!(tiles.len(), 12, "the page asks for 12 matches: {tiles:?}");
    assert_eq!(tiles[0]["id"], "skimage/chelsea.png", "the cropped cat finds the cat first: {tiles:?}");
    let first = tiles[0]["text"].as_str().unwrap();
    assert!(first.contains("photo") && first.contains("votes") && first.contains("similarity 0."), "{first:?}");
    assert!(tiles.iter().all(|t| t["width"].as_u64().unwrap_or(0) > 0), "every match shows its thumbnail: {tiles:?}");
    let status = browser.script("return document.getElementById('status').textContent");
    assert!(status.as_str().unwrap().contains("12 matches"), "{status}");
}
