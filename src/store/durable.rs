//! What makes files and directory entries durable: an fsync of a new file's directory (its name
//! is data of the directory, not of the file), directories created with their parents synced,
//! and the blob files that sled writes beside its database.

use std::fs::File;
use std::path::Path;
use std::sync::Mutex;

use super::StoreError;

/// Makes a directory's entries (created, renamed or removed files) durable.
pub(crate) fn sync_dir(dir: &Path) -> Result<(), StoreError> {
    File::open(dir)?.sync_all()?;
    Ok(())
}

/// Creates `dir` and any missing parents, each new entry durable in its parent.
pub(crate) fn create_dir_durably(dir: &Path) -> Result<(), StoreError> {
    if dir.is_dir() {
        return Ok(());
    }
    let parent = dir.parent().filter(|p| !p.as_os_str().is_empty());
    if let Some(parent) = parent {
        create_dir_durably(parent)?;
    }
    match std::fs::create_dir(dir) {
        Ok(()) => {}
        // Made meanwhile by another opener; whoever made it syncs it.
        Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => return Ok(()),
        Err(e) => return Err(e.into()),
    }
    sync_dir(dir)?;
    if let Some(parent) = parent {
        sync_dir(parent)?;
    }
    Ok(())
}

/// sled 0.34 writes any page over about an eighth of its segment (128 KiB by default: large
/// hyperplane and sketch-plane values, record chunks with long metadata) to a file of its own,
/// `blobs/<lsn>`, with a plain write and no fsync, and its flush syncs only its main file. A
/// blob's name is the log sequence number of the write that made it, and a blob is never
/// rewritten, so each needs one fsync: those named past the largest synced so far.
#[derive(Debug, Default)]
pub(crate) struct BlobSync {
    /// The largest blob name (log sequence number) fsynced so far.
    synced: Mutex<Option<u64>>,
}

impl BlobSync {
    /// fsyncs the blobs written since the last call, then the blob directory. Run before the
    /// fsync of sled's main file, whose log is what refers to them.
    pub(crate) fn sync_new(&self, sled_dir: &Path) -> Result<usize, StoreError> {
        let mut synced = self.synced.lock().unwrap_or_else(|e| e.into_inner());
        let floor = *synced;
        let (count, largest) = sync_blobs(sled_dir, floor)?;
        if count > 0 {
            *synced = largest.max(floor);
        }
        Ok(count)
    }
}

/// fsyncs the blobs of the sled database in `sled_dir` named past `after` (all when `None`), and
/// the blob directory when any were; returns how many, and the largest name among them.
pub(crate) fn sync_blobs(sled_dir: &Path, after: Option<u64>) -> Result<(usize, Option<u64>), StoreError> {
    let blobs = sled_dir.join("blobs");
    let entries = match std::fs::read_dir(&blobs) {
        Ok(entries) => entries,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok((0, None)),
        Err(e) => return Err(e.into()),
    };
    let (mut count, mut largest) = (0, None);
    for entry in entries {
        let entry = entry?;
        let Some(lsn) = entry.file_name().to_str().and_then(|n| n.parse::<u64>().ok()) else { continue };
        if after.is_some_and(|after| lsn <= after) {
            continue;
        }
        match File::open(entry.path()) {
            Ok(file) => file.sync_all()?,
            // Removed by sled's own collection meanwhile: nothing refers to it any more.
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => continue,
            Err(e) => return Err(e.into()),
        }
        count += 1;
        largest = largest.max(Some(lsn));
    }
    if count > 0 {
        sync_dir(&blobs)?;
    }
    Ok((count, largest))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn new_directories_are_made_with_their_parents() {
        let dir = tempfile::tempdir().unwrap();
        let deep = dir.path().join("a/b/c");
        create_dir_durably(&deep).unwrap();
        assert!(deep.is_dir());
        create_dir_durably(&deep).unwrap();
    }

    #[test]
    fn blobs_are_synced_once_each_in_name_order() {
        let dir = tempfile::tempdir().unwrap();
        let sync = BlobSync::default();
        assert_eq!(sync.sync_new(dir.path()).unwrap(), 0, "no blob directory yet");
        std::fs::create_dir(dir.path().join("blobs")).unwrap();
        for name in ["7", "12", "not-a-blob"] {
            std::fs::write(dir.path().join("blobs").join(name), b"x").unwrap();
        }
        assert_eq!(sync.sync_new(dir.path()).unwrap(), 2);
        assert_eq!(sync.sync_new(dir.path()).unwrap(), 0, "each once");
        std::fs::write(dir.path().join("blobs/30"), b"x").unwrap();
        assert_eq!(sync.sync_new(dir.path()).unwrap(), 1);
        assert_eq!(sync_blobs(dir.path(), None).unwrap(), (3, Some(30)));
    }
}
