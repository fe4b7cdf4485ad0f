//! A consistent copy of a data directory while it serves: the log, then the store.
//!
//! Every write acknowledged before the backup began is durable in the log or applied in the
//! store. While the backup holds `applying`, nothing moves from the log to the store and no
//! segment or record is dropped: the log is copied first (what is appended meanwhile is newer
//! than the backup and cut or replayed at restore like any tail), then the store at its applied
//! position, which the copied log continues. Item embeddings are durable before their batch is
//! logged, so the store's record files, copied last, hold those of every copied log record.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use super::{Engine, IndexError};
use crate::store::{StoreError, sync_dir};

/// What a backup copied.
#[derive(Debug, Clone)]
pub struct BackupReport {
    pub dir: PathBuf,
    pub files: u32,
    pub bytes: u64,
    /// Live items over all indexes when the copy was taken (logged ones included).
    pub items: u64,
    /// How long writes waited (the store's copy).
    pub paused: Duration,
    pub took: Duration,
}

impl Engine {
    /// Writes a backup into `to`, which must not exist or be empty. Reads go on; writes are
    /// acknowledged meanwhile until the log's bound on what is not yet applied holds them back.
    pub fn backup(&self, to: &Path) -> Result<BackupReport, IndexError> {
        let started = Instant::now();
        if to.exists() && std::fs::read_dir(to).map_err(StoreError::from)?.next().is_some() {
            return Err(IndexError::InvalidArgument(format!("backup directory {} is not empty", to.display())));
        }
        std::fs::create_dir_all(to).map_err(StoreError::from)?;
        let _applying = self.log.applying.lock().unwrap_or_else(|e| e.into_inner());
        let items = self.sizes().iter().map(|s| s.items).sum();
        let log_to = to.join("wal");
        std::fs::create_dir_all(&log_to).map_err(StoreError::from)?;
        let mut segments: Vec<_> = std::fs::read_dir(self.log.log_dir())
            .map_err(StoreError::from)?
            .collect::<Result<Vec<_>, _>>()
            .map_err(StoreError::from)?;
        segments.sort_by_key(|e| e.file_name());
        for segment in segments {
            if segment.file_type().map_err(StoreError::from)?.is_file() {
                copy_synced(&segment.path(), &log_to.join(segment.file_name()))?;
            }
        }
        sync_dir(&log_to)?;
        let paused_from = Instant::now();
        self.catalog.backup(to)?;
        let paused = paused_from.elapsed();
        let (files, bytes) = tree_size(to)?;
        Ok(BackupReport { dir: to.to_path_buf(), files, bytes, items, paused, took: started.elapsed() })
    }
}

fn copy_synced(from: &Path, to: &Path) -> Result<(), StoreError> {
    std::fs::copy(from, to)?;
    std::fs::File::open(to)?.sync_all()?;
    Ok(())
}

/// Files and bytes under `dir`.
fn tree_size(dir: &Path) -> Result<(u32, u64), StoreError> {
    let (mut files, mut bytes) = (0, 0);
    for entry in walk(dir)? {
        files += 1;
        bytes += std::fs::metadata(&entry)?.len();
    }
    Ok((files, bytes))
}

/// Every file under `dir`, sorted, as paths.
pub fn walk(dir: &Path) -> Result<Vec<PathBuf>, StoreError> {
    let mut out = Vec::new();
    let mut pending = vec![dir.to_path_buf()];
    while let Some(next) = pending.pop() {
        for entry in std::fs::read_dir(&next)? {
            let entry = entry?;
            match entry.file_type()?.is_dir() {
                true => pending.push(entry.path()),
                false => out.push(entry.path()),
            }
        }
    }
    out.sort();
    Ok(out)
}
