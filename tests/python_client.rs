//! The Python client (clients/python, installed into .venv by scripts/setup-python-client)
//! against a real server with the model: its unit tests, its checks of every call, a folder it
//! ingested resumed by the Rust client (the same ids), a job of its own riding out a server
//! killed and restarted mid-job, and one interrupted with SIGINT and rerun.

mod common;

use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::time::Duration;

use common::*;

const ADMIN_TOKEN: &str = "python-admin-token-0123456789";
const READ_TOKEN: &str = "python-read-token-0123456789";

/// The project's Python with the client installed; a clear failure where it is not.
fn python() -> PathBuf {
    let python = Path::new(env!("CARGO_MANIFEST_DIR")).join(".venv/bin/python");
    let found = Command::new(&python).args(["-c", "import imagelsh.v1.imagelsh_pb2_grpc"]).output();
    match found {
        Ok(output) if output.status.success() => python,
        _ => panic!("the Python client is not installed in .venv: run scripts/setup-python-client (scripts/test does)"),
    }
}

fn script(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("clients/python/tests").join(name)
}

/// Runs a Python script from a neutral folder (so that the installed package is the one
/// imported, not the source tree), its output shown on failure.
fn run_python(args: &[&std::ffi::OsStr], env: &[(&str, &str)], cwd: &Path) -> Output {
    let output = Command::new(python())
        .args(args)
        .envs(env.iter().copied())
        .current_dir(cwd)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .output()
        .expect("run python");
    let text = |bytes: &[u8]| String::from_utf8_lossy(bytes).into_owned();
    assert!(output.status.success(), "{:?}: {}\n{}", args, text(&output.stdout), text(&output.stderr));
    output
}

#[test]
fn the_clients_own_unit_tests_pass() {
    let dir = tempfile::tempdir().unwrap();
    run_python(&[script("test_units.py").as_os_str()], &[], dir.path());
}

#[tokio::test(flavor = "multi_thread")]
async fn every_call_works_against_the_real_server_and_the_rust_client_resumes_its_folder() {
    const IMAGES: usize = 48;
    let dir = tempfile::tempdir().unwrap();
    let tokens = format!("admin:{ADMIN_TOKEN},read:{READ_TOKEN}");
    let server = TestServer::start_with_env(&dir.path().join("data"), &[], &[("IMAGELSH_TOKENS", &tokens)]);
    let folder = class_folders(dir.path(), IMAGES);
    let url = format!("http://{}", server.addr);
    let env = [
        ("IMAGELSH_TEST_SERVER", url.as_str()),
        ("IMAGELSH_TEST_TOKEN", ADMIN_TOKEN),
        ("IMAGELSH_TEST_READ_TOKEN", READ_TOKEN),
        ("IMAGELSH_TEST_FOLDER", folder.to_str().unwrap()),
        ("IMAGELSH_TEST_IMAGES", &IMAGES.to_string()),
    ];
    run_python(&[script("server_checks.py").as_os_str()], &env, dir.path());

    let output = Command::new(env!("CARGO_BIN_EXE_imagelsh"))
        .args(["ingest", "--server", &url, "--token", ADMIN_TOKEN, "--index", "python", "--json", "--refused-file"])
        .arg(dir.path().join("refused.jsonl"))
        .arg(&folder)
        .env("RUST_LOG", "warn")
        .output()
        .expect("run imagelsh ingest");
    let summary: serde_json::Value = serde_json::from_slice(&output.stdout).expect("the summary");
    assert_eq!(summary["skipped"], IMAGES as u64, "the Rust client finds every image the Python one sent: {summary}");
    assert_eq!((summary["indexed"].as_u64(), summary["refused"].as_u64()), (Some(0), Some(1)), "{summary}");
}

#[tokio::test(flavor = "multi_thread")]
async fn a_python_job_rides_out_a_server_killed_and_restarted_mid_job() {
    const IMAGES: u64 = 240;
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    let addr = free_loopback_addr();
    let server = TestServer::start_on(&addr, &data, &[], &[]);
    let folder = class_folders(dir.path(), IMAGES as usize);
    let job = Command::new(python())
        .arg(script("ingest_job.py"))
        .args([&format!("http://{addr}"), "restarted"])
        .arg(&folder)
        .arg("30")
        .current_dir(dir.path())
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .expect("start the Python job");
    let mut client = lazy_client(&addr);
    wait_for_items(&mut client, "restarted", IMAGES / 4).await;
    // Paused first: the job cannot finish before the kill, however fast the machine.
    server.pause();
    server.kill();
    tokio::time::sleep(Duration::from_millis(500)).await;
    let server = TestServer::start_on(&addr, &data, &[], &[]);
    let output = job.wait_with_output().expect("the job ends");
    assert!(output.status.success(), "the job failed: {}", String::from_utf8_lossy(&output.stdout));
    let summary: serde_json::Value = serde_json::from_slice(&output.stdout).expect("the summary");
    assert!(summary["retries"].as_u64() >= Some(1), "the job saw the server go: {summary}");
    assert_eq!(summary["indexed"], IMAGES, "each batch acknowledged once: {summary}");
    assert_eq!((summary["refused"].as_u64(), summary["remaining"].as_u64()), (Some(1), Some(0)), "{summary}");
    let mut client = server.client().await;
    assert_eq!(items_in(&mut client, "restarted").await, IMAGES);
}

#[tokio::test(flavor = "multi_thread")]
async fn a_python_job_interrupted_with_sigint_and_rerun_indexes_everything_once() {
    const IMAGES: u64 = 240;
    let dir = tempfile::tempdir().unwrap();
    let server = TestServer::start_with_model(&dir.path().join("data"), &[]);
    let url = format!("http://{}", server.addr);
    let folder = class_folders(dir.path(), IMAGES as usize);
    let start_job = || {
        Command::new(python())
            .arg(script("ingest_job.py"))
            .args([&url, "interrupted"])
            .arg(&folder)
            .current_dir(dir.path())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .expect("start the Python job")
    };
    let finish = |job: std::process::Child| {
        let output = job.wait_with_output().expect("the job ends");
        let summary: serde_json::Value = serde_json::from_slice(&output.stdout)
            .unwrap_or_else(|e| panic!("no summary ({e}): {}", String::from_utf8_lossy(&output.stdout)));
        (output.status.code(), summary)
    };
    let mut client = server.client().await;

    let job = start_job();
    wait_for_items(&mut client, "interrupted", IMAGES / 4).await;
    // The server holds its answers while the SIGINT lands: the job cannot finish first.
    server.pause();
    assert!(Command::new("kill").args(["-INT", &job.id().to_string()]).status().unwrap().success());
    tokio::time::sleep(Duration::from_millis(300)).await;
    server.resume();
    let (code, first) = finish(job);
    assert_eq!((code, &first["interrupted"]), (Some(130), &true.into()), "{first}");
    let indexed = first["indexed"].as_u64().unwrap();
    assert_eq!(indexed, items_in(&mut client, "interrupted").await, "the batches in flight were acknowledged: {first}");
    assert!(indexed < IMAGES, "interrupted half-way: {first}");
    let accounted = indexed + first["refused"].as_u64().unwrap() + first["remaining"].as_u64().unwrap();
    assert_eq!(accounted, IMAGES + 1, "{first}");

    let (code, second) = finish(start_job());
    assert_eq!((code, &second["interrupted"]), (Some(0), &false.into()), "{second}");
    assert_eq!(second["skipped"], indexed, "what the first run acknowledged is not sent again: {second}");
    assert_eq!(second["indexed"], IMAGES - indexed, "{second}");
    assert_eq!((second["refused"].as_u64(), second["remaining"].as_u64()), (Some(1), Some(0)), "{second}");
    assert_eq!(items_in(&mut client, "interrupted").await, IMAGES, "every image indexed once");
}

#[tokio::test(flavor = "multi_thread")]
async fn a_python_job_over_two_replicas_of_the_cluster_store_finishes_through_one() {
    let dir = tempfile::tempdir().unwrap();
    let cluster = common::cluster::TestCluster::start(&dir.path().join("cluster"), "everysec");
    let store = ["--store", cluster.url.as_str()];
    let a = TestServer::start_with_model(&dir.path().join("a"), &store);
    let mut b = TestServer::start_with_model(&dir.path().join("b"), &store);
    let photos = class_folders(dir.path(), 120);
    let (url_a, url_b, pid_b) = (format!("http://{}", a.addr), format!("http://{}", b.addr), b.pid().to_string());
    // The script kills B itself once a quarter is indexed, and checks every image through A.
    let args = [script("test_replicas.py").into_os_string(), url_a.into(), url_b.into(), photos.into(), pid_b.into()];
    let args: Vec<&std::ffi::OsStr> = args.iter().map(|a| a.as_os_str()).collect();
    let output = run_python(&args, &[], dir.path());
    eprintln!("{}", String::from_utf8_lossy(&output.stdout));
    assert!(b.wait_exit(Duration::from_secs(10)).is_some(), "replica B was killed");
}
