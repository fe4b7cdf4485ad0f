//! `imagelsh backup --server`: the Backup stream written into a directory, file by file, with
//! a manifest written last (a directory without one is not a complete backup).

use std::io::Write;
use std::path::{Component, Path, PathBuf};

use super::{Client, ClientError};
use crate::proto;
use crate::sparse::SparseWriter;

/// The manifest of a complete backup.
pub const MANIFEST: &str = "imagelsh-backup.json";

/// What a backup holds, as its manifest says.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct BackupManifest {
    pub files: u32,
    pub bytes: u64,
    pub items: u64,
    /// Unix seconds when it completed.
    pub created_at: u64,
    /// The server, or the data directory, it came from.
    pub source: String,
    /// The imagelsh that wrote it.
    pub version: String,
}

impl BackupManifest {
    pub fn new(files: u32, bytes: u64, items: u64, source: String) -> Self {
        let created_at = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_secs());
        Self { files, bytes, items, created_at, source, version: env!("CARGO_PKG_VERSION").to_string() }
    }

    /// Writes the manifest into `dir`, synced: the mark of a complete backup.
    pub fn write(&self, dir: &Path) -> Result<(), ClientError> {
        let path = dir.join(MANIFEST);
        let io = |source| ClientError::Io { path: path.display().to_string(), source };
        let mut file = std::fs::File::create(&path).map_err(io)?;
        file.write_all(serde_json::to_string_pretty(self).unwrap_or_default().as_bytes()).map_err(io)?;
        file.sync_all().map_err(io)?;
        std::fs::File::open(dir).and_then(|d| d.sync_all()).map_err(io)
    }

    pub fn read(dir: &Path) -> Result<Self, ClientError> {
        let path = dir.join(MANIFEST);
        let text = std::fs::read_to_string(&path)
            .map_err(|source| ClientError::Io { path: path.display().to_string(), source })?;
        serde_json::from_str(&text).map_err(|e| ClientError::Io {
            path: path.display().to_string(),
            source: std::io::Error::new(std::io::ErrorKind::InvalidData, e),
        })
    }
}

/// Streams a backup of the server into `to` (which must not exist or be empty).
pub async fn backup_server(client: &mut Client, source: &str, to: &Path) -> Result<BackupManifest, ClientError> {
    let io = |path: &Path| {
        let path = path.display().to_string();
        move |source| ClientError::Io { path, source }
    };
    if to.exists() && std::fs::read_dir(to).map_err(io(to))?.next().is_some() {
        return Err(ClientError::Io {
            path: to.display().to_string(),
            source: std::io::Error::new(std::io::ErrorKind::AlreadyExists, "the backup directory is not empty"),
        });
    }
    std::fs::create_dir_all(to).map_err(io(to))?;
    let mut stream = client
        .backup(proto::BackupRequest {})
        .await
        .map_err(|status| ClientError::Rpc { context: "backup".into(), status })?
        .into_inner();
    // Files are written sparse: the holes of removed items' records stay holes on this side.
    let mut current: Option<(PathBuf, SparseWriter)> = None;
    let mut dirs = std::collections::BTreeSet::new();
    loop {
        let chunk = stream.message().await.map_err(|status| ClientError::Rpc { context: "backup".into(), status })?;
        let Some(chunk) = chunk else {
            return Err(ClientError::Rpc {
                context: "backup".into(),
                status: tonic::Status::unavailable("the stream ended before the backup was complete"),
            });
        };
        if let Some(done) = chunk.done {
            if let Some((path, file)) = current.take() {
                file.finish().map_err(io(&path))?;
            }
            for dir in dirs.iter().chain([&to.to_path_buf()]) {
                std::fs::File::open(dir).and_then(|d| d.sync_all()).map_err(io(dir))?;
            }
            let manifest = BackupManifest::new(done.files, done.bytes, done.items, source.to_string());
            manifest.write(to)?;
            return Ok(manifest);
        }
        let path = to.join(safe_relative(&chunk.path)?);
        let same = current.as_ref().is_some_and(|(p, _)| *p == path);
        if !same {
            if let Some((old, file)) = current.take() {
                file.finish().map_err(io(&old))?;
            }
            if chunk.offset != 0 {
                return Err(bad_stream(format!("{} starts at offset {}", chunk.path, chunk.offset)));
            }
            if let Some(parent) = path.parent() {
                std::fs::create_dir_all(parent).map_err(io(parent))?;
                dirs.insert(parent.to_path_buf());
            }
            let file = std::fs::OpenOptions::new().write(true).create_new(true).open(&path).map_err(io(&path))?;
            current = Some((path.clone(), SparseWriter::new(file)));
        }
        let Some((path, file)) = current.as_mut() else { continue };
        if chunk.offset != file.len() {
            return Err(bad_stream(format!("{} jumps from {} to {}", chunk.path, file.len(), chunk.offset)));
        }
        file.write(&chunk.data).map_err(io(path))?;
    }
}

fn bad_stream(message: String) -> ClientError {
    ClientError::Rpc { context: "backup".into(), status: tonic::Status::data_loss(message) }
}

/// A path the server names, kept inside the backup directory: relative, no `..`.
fn safe_relative(path: &str) -> Result<PathBuf, ClientError> {
    let relative = Path::new(path);
    let normal = !path.is_empty() && relative.components().all(|c| matches!(c, Component::Normal(_)));
    match normal {
        true => Ok(relative.to_path_buf()),
        false => Err(bad_stream(format!("the server named the file {path:?}, outside the backup"))),
    }
}

#[cfg(test)]
mod tests {
    use super::safe_relative;

    #[test]
    fn only_paths_inside_the_backup_are_written() {
        assert!(safe_relative("wal/00000000000000000001.log").is_ok());
        for bad in ["", "/etc/passwd", "../x", "wal/../../x", "./x"] {
            assert!(safe_relative(bad).is_err(), "{bad}");
        }
    }
}
