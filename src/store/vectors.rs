//! The vector file of an index: embeddings kept out of sled (5 KB values bloat it and slow
//! its open), one fixed-size record per item number so that a record's offset is
//! `item × record_len`. Record: item u32 LE ‖ values f32 LE × dim ‖ crc32 of both, LE.
//!
//! The sled tree is the source of truth: a batch's records are written and synced before its
//! sled batch, and at open the file is cut back to the items sled has committed.

use std::fs::{File, OpenOptions};
use std::os::unix::fs::FileExt;
use std::path::Path;

use super::StoreError;

#[derive(Debug)]
pub struct VectorFile {
    file: File,
    dim: usize,
}

impl VectorFile {
    /// Opens (creating if needed) and truncates to `committed` records. Fewer records than
    /// `committed` means vectors of acknowledged items are gone: corruption, not recoverable here.
    pub fn open(path: &Path, dim: usize, committed: u32) -> Result<Self, StoreError> {
        let file = OpenOptions::new().read(true).write(true).create(true).truncate(false).open(path)?;
        let this = Self { file, dim };
        let want = this.offset(committed);
        let len = this.file.metadata()?.len();
        if len < want {
            return Err(StoreError::Corrupt(format!(
                "{} holds {} bytes, {committed} committed items need {want}",
                path.display(),
                len
            )));
        }
        if len > want {
            // Records of a batch that never committed in sled.
            this.file.set_len(want)?;
            this.file.sync_all()?;
        }
        Ok(this)
    }

    fn record_len(&self) -> u64 {
        (4 + 4 * self.dim + 4) as u64
    }

    fn offset(&self, item: u32) -> u64 {
        u64::from(item) * self.record_len()
    }

    /// Writes the records of items `first, first+1, …` and syncs them to disk.
    pub fn write_batch<'a>(
        &self,
        first: u32,
        vectors: impl ExactSizeIterator<Item = &'a [f32]>,
    ) -> Result<(), StoreError> {
        let mut buf = Vec::with_capacity(vectors.len() * self.record_len() as usize);
        for (i, v) in vectors.enumerate() {
            debug_assert_eq!(v.len(), self.dim);
            let start = buf.len();
            buf.extend_from_slice(&(first + i as u32).to_le_bytes());
            for x in v {
                buf.extend_from_slice(&x.to_le_bytes());
            }
            let crc = crc32fast::hash(&buf[start..]);
            buf.extend_from_slice(&crc.to_le_bytes());
        }
        self.file.write_all_at(&buf, self.offset(first))?;
        self.file.sync_data()?;
        Ok(())
    }

    /// The stored vector of `item`, checked against its checksum.
    pub fn read(&self, item: u32) -> Result<Vec<f32>, StoreError> {
        let mut buf = vec![0u8; self.record_len() as usize];
        self.file.read_exact_at(&mut buf, self.offset(item))?;
        let (body, crc) = buf.split_at(buf.len() - 4);
        let stored = u32::from_le_bytes([crc[0], crc[1], crc[2], crc[3]]);
        let found_item = u32::from_le_bytes([body[0], body[1], body[2], body[3]]);
        if crc32fast::hash(body) != stored || found_item != item {
            return Err(StoreError::Corrupt(format!("vector record of item {item} fails its checksum")));
        }
        Ok(body[4..].chunks_exact(4).map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]])).collect())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn records_round_trip_and_uncommitted_tail_is_cut() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("v.f32");
        let vf = VectorFile::open(&path, 3, 0).unwrap();
        let a = [1.0f32, 2.0, 3.0];
        let b = [-1.0f32, 0.5, f32::MIN_POSITIVE];
        vf.write_batch(0, [&a[..], &b[..]].into_iter()).unwrap();
        assert_eq!(vf.read(1).unwrap(), b);
        drop(vf);
        // Only the first item committed: the second record goes.
        let vf = VectorFile::open(&path, 3, 1).unwrap();
        assert_eq!(vf.read(0).unwrap(), a);
        assert!(vf.read(1).is_err());
        assert_eq!(std::fs::metadata(&path).unwrap().len(), 4 + 12 + 4);
    }

    #[test]
    fn missing_committed_records_are_corruption() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("v.f32");
        VectorFile::open(&path, 3, 0).unwrap();
        assert!(matches!(VectorFile::open(&path, 3, 2), Err(StoreError::Corrupt(_))));
    }

    #[test]
    fn flipped_byte_is_detected() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("v.f32");
        let vf = VectorFile::open(&path, 2, 0).unwrap();
        vf.write_batch(0, [&[1.0f32, 2.0][..]].into_iter()).unwrap();
        vf.file.write_all_at(&[0xff], 6).unwrap();
        assert!(matches!(vf.read(0), Err(StoreError::Corrupt(_))));
    }
}
