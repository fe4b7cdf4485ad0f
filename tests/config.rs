//! `imagelsh serve --config FILE`: flags > IMAGELSH_* variables > the file > defaults, as
//! `--print-config` shows and as a real server started from a file behaves.

use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};

fn print_config(args: &[&str], env: &[(&str, &str)]) -> (bool, String, String) {
    let output = Command::new(env!("CARGO_BIN_EXE_imagelsh"))
        .arg("serve")
        .args(args)
        .arg("--print-config")
        .env_remove("IMAGELSH_CACHE_MB")
        .env_remove("IMAGELSH_LISTEN")
        .envs(env.iter().copied())
        .output()
        .unwrap();
    let text = |b: &[u8]| String::from_utf8_lossy(b).into_owned();
    (output.status.success(), text(&output.stdout), text(&output.stderr))
}

#[test]
fn flags_beat_variables_beat_the_file_beats_the_defaults() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("imagelsh.toml");
    std::fs::write(
        &file,
        "listen = \"127.0.0.1:6001\"\ncache-mb = 64\n[limits]\nmax_calls = 77\n[storage]\ndata-dir = \"/srv/imagelsh\"\n",
    )
    .unwrap();
    let config = file.to_str().unwrap();
    let (ok, out, err) =
        print_config(&["--config", config, "--listen", "127.0.0.1:7"], &[("IMAGELSH_CACHE_MB", "128")]);
    assert!(ok, "{err}");
    for line in [
        "listen = \"127.0.0.1:7\"  # flag",
        "cache-mb = 128  # env IMAGELSH_CACHE_MB",
        "max-calls = 77  # file",
        "data-dir = \"/srv/imagelsh\"  # file",
        "max-streams = 256  # default",
    ] {
        assert!(out.lines().any(|l| l == line), "{line:?} missing from:\n{out}");
    }
    // The printed configuration is itself a configuration file that gives the same result.
    let again = dir.path().join("again.toml");
    let body: String = out.lines().filter(|l| !l.starts_with('#')).map(|l| format!("{l}\n")).collect();
    std::fs::write(&again, body).unwrap();
    let (ok, out_again, err) = print_config(&["--config", again.to_str().unwrap()], &[]);
    assert!(ok, "{err}");
    assert!(out_again.contains("listen = \"127.0.0.1:7\"  # file") && out_again.contains("cache-mb = 128  # file"));

    // IMAGELSH_CONFIG names the file too; a typo in it is an error that names the key.
    let (ok, out, _) = print_config(&[], &[("IMAGELSH_CONFIG", config)]);
    assert!(ok && out.contains("max-calls = 77  # file"), "{out}");
    std::fs::write(&file, "max-cals = 1\n").unwrap();
    let (ok, _, err) = print_config(&["--config", config], &[]);
    assert!(!ok && err.contains("\"max-cals\" is not a setting"), "{err}");
}

#[test]
fn the_shipped_example_is_a_valid_file() {
    let example = concat!(env!("CARGO_MANIFEST_DIR"), "/deploy/imagelsh.toml");
    let (ok, out, err) = print_config(&["--config", example], &[]);
    assert!(ok, "{err}");
    assert!(out.contains("tokens-file = \"/etc/imagelsh/tokens\"  # file"), "{out}");
}

#[test]
fn a_server_runs_from_a_file() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("from-file");
    let file = dir.path().join("imagelsh.toml");
    std::fs::write(
        &file,
        format!(
            "listen = \"127.0.0.1:0\"\nhttp-listen = \"off\"\nno-model = true\n[storage]\ndata-dir = {:?}\n",
            data.display().to_string()
        ),
    )
    .unwrap();
    let mut server = Command::new(env!("CARGO_BIN_EXE_imagelsh"))
        .args(["serve", "--config"])
        .arg(&file)
        .env_remove("IMAGELSH_LISTEN")
        .env_remove("IMAGELSH_DATA_DIR")
        .env("RUST_LOG", "warn")
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let mut line = String::new();
    BufReader::new(server.stdout.take().unwrap()).read_line(&mut line).unwrap();
    assert!(line.starts_with("imagelsh listening on 127.0.0.1:"), "{line}");
    assert!(data.join("sled").exists(), "the data directory is the file's");
    server.kill().unwrap();
    server.wait().unwrap();
}
