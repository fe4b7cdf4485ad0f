//! Files with holes kept as files with holes. The embedding and sketch files give the space of
//! removed items back by punching holes; a copy that writes those holes out as zeros makes a
//! backup of a churned index several times its size on disk.

use std::fs::File;
use std::io;
use std::os::unix::fs::FileExt;
use std::path::Path;

/// Bytes copied per read.
const CHUNK: usize = 1 << 20;
/// Zeros are left unwritten in pieces of at most this size, aligned to it (the file-system
/// block of ext4, XFS and btrfs).
const BLOCK: u64 = 4096;

/// Copies `from` into the new file `to` with its holes kept (the data ranges found with
/// SEEK_DATA and SEEK_HOLE; where the file system cannot say, zero blocks are skipped), then
/// fsyncs `to`. Returns the bytes of data copied.
pub fn copy_sparse(from: &Path, to: &Path) -> io::Result<u64> {
    let source = File::open(from)?;
    let len = source.metadata()?.len();
    let mut out = SparseWriter::new(std::fs::OpenOptions::new().write(true).create_new(true).open(to)?);
    let mut buf = vec![0u8; CHUNK];
    let mut copied = 0;
    for (start, end) in data_ranges(&source, len)? {
        out.skip_to(start);
        let mut at = start;
        while at < end {
            let n = (end - at).min(CHUNK as u64) as usize;
            source.read_exact_at(&mut buf[..n], at)?;
            out.write(&buf[..n])?;
            at += n as u64;
            copied += n as u64;
        }
    }
    out.skip_to(len);
    out.finish()?;
    Ok(copied)
}

/// The ranges of `file` (of length `len`) that hold data, as the file system reports them; the
/// whole file where it cannot.
fn data_ranges(file: &File, len: u64) -> io::Result<Vec<(u64, u64)>> {
    use rustix::fs::{SeekFrom, seek};
    let mut ranges = Vec::new();
    let mut at = 0;
    while at < len {
        let start = match seek(file, SeekFrom::Data(at)) {
            Ok(start) => start,
            // No data past `at`: the rest is a hole.
            Err(rustix::io::Errno::NXIO) => break,
            Err(rustix::io::Errno::INVAL | rustix::io::Errno::OPNOTSUPP) if ranges.is_empty() => {
                return Ok(vec![(0, len)]);
            }
            Err(e) => return Err(e.into()),
        };
        let end = seek(file, SeekFrom::Hole(start)).map_err(io::Error::from)?.min(len);
        if end <= start {
            break;
        }
        ranges.push((start, end));
        at = end;
    }
    Ok(ranges)
}

/// Writes a file front to back, leaving unwritten (a hole, read back as zeros) every aligned
/// block of zeros it is given.
pub struct SparseWriter {
    file: File,
    len: u64,
}

impl SparseWriter {
    pub fn new(file: File) -> Self {
        Self { file, len: 0 }
    }

    /// Bytes written or skipped so far.
    pub fn len(&self) -> u64 {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Moves on to `offset` (at or past the end) without writing: a hole.
    pub fn skip_to(&mut self, offset: u64) {
        self.len = self.len.max(offset);
    }

    pub fn write(&mut self, data: &[u8]) -> io::Result<()> {
        let mut done = 0;
        while done < data.len() {
            let at = self.len + done as u64;
            let n = ((BLOCK - at % BLOCK) as usize).min(data.len() - done);
            let piece = &data[done..done + n];
            if piece.iter().any(|&b| b != 0) {
                self.file.write_all_at(piece, at)?;
            }
            done += n;
        }
        self.len += data.len() as u64;
        Ok(())
    }

    /// Sets the file's length (a trailing hole) and fsyncs it.
    pub fn finish(self) -> io::Result<File> {
        self.file.set_len(self.len)?;
        self.file.sync_all()?;
        Ok(self.file)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use std::os::unix::fs::MetadataExt;

    fn allocated(path: &Path) -> u64 {
        std::fs::metadata(path).unwrap().blocks() * 512
    }

    #[test]
    fn a_copy_keeps_the_holes_of_its_source() {
        let dir = tempfile::tempdir().unwrap();
        let (from, to) = (dir.path().join("from"), dir.path().join("to"));
        // 4 MiB apparent, 2 blocks of data at each end of a hole.
        let file = File::create(&from).unwrap();
        file.write_all_at(&[7u8; 8192], 0).unwrap();
        file.write_all_at(&[9u8; 8192], (4 << 20) - 8192).unwrap();
        drop(file);
        let copied = copy_sparse(&from, &to).unwrap();
        assert_eq!(std::fs::read(&from).unwrap(), std::fs::read(&to).unwrap());
        assert!(copied <= 1 << 20, "{copied} bytes of data copied");
        assert!(allocated(&to) < 1 << 20, "{} bytes allocated for 16 KiB of data", allocated(&to));
    }

    proptest! {
        /// Whatever the pieces it is given, the file reads back as their concatenation.
        #[test]
        fn written_pieces_read_back_whole(pieces in prop::collection::vec((0usize..9000, any::<bool>()), 0..12)) {
            let dir = tempfile::tempdir().unwrap();
            let path = dir.path().join("f");
            let mut writer = SparseWriter::new(File::create(&path).unwrap());
            let mut expected = Vec::new();
            for (i, (len, zeros)) in pieces.iter().enumerate() {
                let piece: Vec<u8> = (0..*len).map(|j| if *zeros { 0 } else { (i + j) as u8 | 1 }).collect();
                writer.write(&piece).unwrap();
                expected.extend_from_slice(&piece);
            }
            writer.finish().unwrap();
            prop_assert_eq!(std::fs::read(&path).unwrap(), expected);
        }
    }
}
