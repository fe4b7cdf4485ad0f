//! Fixed-size record files beside sled: an index's embeddings (5 KB values bloat sled and slow
//! its open) and its sketches. One record per item number, so that a record's offset is
//! `item × record_len`. Record: item u32 LE ‖ payload ‖ crc32 of both, LE.
//!
//! Records are written and synced before what commits them (the log entry for embeddings, the
//! sled batch for sketches), and at open a file is cut back to the committed items. Reads go through
//! a memory map (re-ranking reads hundreds of records per query; a `pread` each costs a
//! system call), remapped after every write.

use std::fs::{File, OpenOptions};
use std::ops::Range;
use std::os::unix::fs::FileExt;
use std::path::Path;
use std::sync::RwLock;

use memmap2::Mmap;

use super::StoreError;

/// How a record file is read after it is opened.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Access {
    /// Record by record, at random (`read`): kept memory-mapped, remapped after each write.
    Mapped,
    /// Only whole, once (`read_all`, at open): no map to keep up to date on every write.
    Whole,
}

#[derive(Debug)]
pub struct RecordFile {
    file: File,
    payload_len: usize,
    access: Access,
    /// The file's committed records when `Access::Mapped`; `None` while the file is empty (an
    /// empty map is an error) or when not mapped.
    map: RwLock<Option<Mmap>>,
}

impl RecordFile {
    /// Opens (creating if needed); `cut_to` then drops records past what is committed.
    pub fn open(path: &Path, payload_len: usize, access: Access) -> Result<Self, StoreError> {
        let file = OpenOptions::new().read(true).write(true).create(true).truncate(false).open(path)?;
        let this = Self { file, payload_len, access, map: RwLock::new(None) };
        this.remap()?;
        Ok(this)
    }

    /// Truncates to `committed` records: later ones belong to writes that never committed.
    /// Fewer records than `committed` means records of acknowledged items are gone: corruption,
    /// not recoverable here.
    pub fn cut_to(&self, committed: u32) -> Result<(), StoreError> {
        let want = self.offset(committed);
        let len = self.file.metadata()?.len();
        if len < want {
            return Err(StoreError::Corrupt(format!(
                "a record file holds {len} bytes, {committed} committed items need {want}"
            )));
        }
        if len > want {
            // Drop the map first: it must never cover bytes past the file's end.
            *self.map.write().unwrap_or_else(|e| e.into_inner()) = None;
            self.file.set_len(want)?;
            self.file.sync_all()?;
            self.remap()?;
        }
        Ok(())
    }

    fn record_len(&self) -> u64 {
        (4 + self.payload_len + 4) as u64
    }

    fn offset(&self, item: u32) -> u64 {
        u64::from(item) * self.record_len()
    }

    fn remap(&self) -> Result<(), StoreError> {
        if self.access != Access::Mapped {
            return Ok(());
        }
        let len = self.file.metadata()?.len();
        let map = if len == 0 {
            None
        } else {
            // SAFETY: the file belongs to this process (sled's lock keeps a second process off the
            // data directory) and is only ever extended while mapped; the map is replaced after
            // every extension, and the one truncation (in `open`) happens before any map exists.
            Some(unsafe { Mmap::map(&self.file)? })
        };
        *self.map.write().unwrap_or_else(|e| e.into_inner()) = map;
        Ok(())
    }

    /// Writes the records of items `first, first + 1, …` (`count` of them; `payload(i, buf)`
    /// appends the payload of the i-th); `sync` makes them durable.
    pub fn write_batch(
        &self,
        first: u32,
        count: usize,
        mut payload: impl FnMut(usize, &mut Vec<u8>),
    ) -> Result<(), StoreError> {
        let mut buf = Vec::with_capacity(count * self.record_len() as usize);
        for i in 0..count {
            let start = buf.len();
            buf.extend_from_slice(&(first + i as u32).to_le_bytes());
            payload(i, &mut buf);
            debug_assert_eq!(buf.len() - start, 4 + self.payload_len);
            let crc = crc32fast::hash(&buf[start..]);
            buf.extend_from_slice(&crc.to_le_bytes());
        }
        self.file.write_all_at(&buf, self.offset(first))?;
        self.remap()
    }

    pub fn sync(&self) -> Result<(), StoreError> {
        Ok(self.file.sync_data()?)
    }

    /// Calls `f(i, payload)` for the record of each of `items` in turn, each checked. While one is
    /// checked the next is requested from memory: re-ranking reads hundreds of records scattered
    /// over the file, and each would otherwise wait for memory on its first touch.
    pub fn read_many(&self, items: &[u32], mut f: impl FnMut(usize, &[u8])) -> Result<(), StoreError> {
        let map = self.map.read().unwrap_or_else(|e| e.into_inner());
        let record_len = self.record_len() as usize;
        let record = |item: u32| {
            let start = self.offset(item) as usize;
            map.as_deref().and_then(|m| m.get(start..start + record_len))
        };
        for (i, &item) in items.iter().enumerate() {
            if let Some(next) = items.get(i + 1).and_then(|&n| record(n)) {
                prefetch(next);
            }
            let bytes = record(item).ok_or_else(|| StoreError::Corrupt(format!("no record of item {item}")))?;
            f(i, check(bytes, item)?);
        }
        Ok(())
    }

    /// Calls `f(item, payload)` for each of the first `count` records, in order: the records of
    /// items `is_live` accepts checked, the others (their space may be reclaimed) given as zeros.
    /// One read of the whole file.
    pub fn read_all(
        &self,
        count: u32,
        is_live: impl Fn(u32) -> bool,
        mut f: impl FnMut(u32, &[u8]),
    ) -> Result<(), StoreError> {
        let mut buf = vec![0u8; self.offset(count) as usize];
        self.file.read_exact_at(&mut buf, 0).map_err(|e| match e.kind() {
            std::io::ErrorKind::UnexpectedEof => StoreError::Corrupt(format!("fewer than {count} records")),
            _ => e.into(),
        })?;
        let zeros = vec![0u8; self.payload_len];
        for (item, record) in (0..count).zip(buf.chunks_exact(self.record_len() as usize)) {
            match is_live(item) {
                true => f(item, check(record, item)?),
                false => f(item, &zeros),
            }
        }
        Ok(())
    }

    /// Gives the disk space of the records of items in `dead` back to the file system (a hole
    /// punched in the file; its length stays, so offsets do not move). Only whole file-system
    /// blocks inside a range are freed, so pass maximal runs of dead items. The records must
    /// never be read again. Returns the bytes freed.
    pub fn reclaim(&self, dead: &[Range<u32>]) -> Result<u64, StoreError> {
        let end = self.file.metadata()?.len();
        let mut freed = 0;
        for run in dead {
            let start = self.offset(run.start).div_ceil(RECLAIM_BLOCK) * RECLAIM_BLOCK;
            let stop = (self.offset(run.end).min(end) / RECLAIM_BLOCK) * RECLAIM_BLOCK;
            if stop > start {
                punch_hole(&self.file, start, stop - start)?;
                freed += stop - start;
            }
        }
        Ok(freed)
    }

    /// Bytes of disk the file takes (blocks allocated, holes not counted).
    #[cfg(test)]
    pub fn allocated_bytes(&self) -> Result<u64, StoreError> {
        use std::os::unix::fs::MetadataExt;
        Ok(self.file.metadata()?.blocks() * 512)
    }
}

/// Holes are punched in units of this many bytes (the block size of ext4, XFS and btrfs as
/// configured almost everywhere; a larger block only frees less).
const RECLAIM_BLOCK: u64 = 4096;

#[cfg(target_os = "linux")]
fn punch_hole(file: &File, offset: u64, len: u64) -> Result<(), StoreError> {
    use rustix::fs::{FallocateFlags, fallocate};
    match fallocate(file, FallocateFlags::PUNCH_HOLE | FallocateFlags::KEEP_SIZE, offset, len) {
        Ok(()) => Ok(()),
        // A file system without holes keeps the bytes: nothing is lost but space.
        Err(rustix::io::Errno::OPNOTSUPP) => Ok(()),
        Err(e) => Err(StoreError::Io(e.into())),
    }
}

#[cfg(not(target_os = "linux"))]
fn punch_hole(_file: &File, _offset: u64, _len: u64) -> Result<(), StoreError> {
    Ok(())
}

/// Asks the CPU to start loading `bytes` into its caches (a hint: no effect on what is read).
fn prefetch(bytes: &[u8]) {
    #[cfg(target_arch = "x86_64")]
    for line in bytes.chunks(64) {
        // SAFETY: SSE (in the x86-64 baseline) has PREFETCHT0; a prefetch never faults, and the
        // address is inside a live slice anyway.
        unsafe { std::arch::x86_64::_mm_prefetch::<{ std::arch::x86_64::_MM_HINT_T0 }>(line.as_ptr().cast()) };
    }
    #[cfg(not(target_arch = "x86_64"))]
    let _ = bytes;
}

/// `payload` as f32s without a copy where it can be (little-endian, 4-byte aligned: records of
/// f32 payloads in a mapped file are), else decoded into `scratch`.
pub fn f32s_of<'a>(payload: &'a [u8], scratch: &'a mut Vec<f32>) -> &'a [f32] {
    // SAFETY: every bit pattern is a valid f32, and `align_to` returns only an aligned middle.
    let (head, floats, tail) = unsafe { payload.align_to::<f32>() };
    if cfg!(target_endian = "little") && head.is_empty() && tail.is_empty() {
        return floats;
    }
    get_f32s(payload, scratch);
    scratch
}

/// The payload of a record, if its checksum and item number hold.
fn check(record: &[u8], item: u32) -> Result<&[u8], StoreError> {
    let (body, crc) = record.split_at(record.len() - 4);
    let stored = u32::from_le_bytes([crc[0], crc[1], crc[2], crc[3]]);
    let found_item = u32::from_le_bytes([body[0], body[1], body[2], body[3]]);
    if crc32fast::hash(body) != stored || found_item != item {
        return Err(StoreError::Corrupt(format!("record of item {item} fails its checksum")));
    }
    Ok(&body[4..])
}

/// Little-endian f32 payloads (embeddings).
pub fn put_f32s(values: &[f32], buf: &mut Vec<u8>) {
    values.iter().for_each(|x| buf.extend_from_slice(&x.to_le_bytes()));
}

pub fn get_f32s(payload: &[u8], out: &mut Vec<f32>) {
    out.clear();
    out.extend(payload.chunks_exact(4).map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]])));
}

/// Little-endian u64 payloads (sketch words).
pub fn put_u64s(values: &[u64], buf: &mut Vec<u8>) {
    values.iter().for_each(|x| buf.extend_from_slice(&x.to_le_bytes()));
}

pub fn get_u64s(payload: &[u8], out: &mut Vec<u64>) {
    out.extend(payload.chunks_exact(8).map(|c| u64::from_le_bytes(c.try_into().unwrap_or([0; 8]))));
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn read_many_checks_each_record_and_views_f32s_in_place() {
        let dir = tempfile::tempdir().unwrap();
        let file = RecordFile::open(&dir.path().join("v"), 12, Access::Mapped).unwrap();
        write_f32s(&file, 0, &[&[1.0, 2.0, 3.0], &[4.0, 5.0, 6.0], &[7.0, 8.0, 9.0]]);
        let mut seen = Vec::new();
        let mut scratch = Vec::new();
        file.read_many(&[2, 0, 2], |i, payload| seen.push((i, f32s_of(payload, &mut scratch).to_vec()))).unwrap();
        assert_eq!(seen, [(0, vec![7.0, 8.0, 9.0]), (1, vec![1.0, 2.0, 3.0]), (2, vec![7.0, 8.0, 9.0])]);
        assert!(scratch.is_empty(), "mapped f32 records are read in place");
        assert!(matches!(file.read_many(&[0, 3], |_, _| ()), Err(StoreError::Corrupt(_))));
        // A misaligned payload is decoded instead.
        let bytes: Vec<u8> = [0u8].into_iter().chain(1.5f32.to_le_bytes()).collect();
        assert_eq!(f32s_of(&bytes[1..], &mut scratch), [1.5]);
    }

    fn write_f32s(file: &RecordFile, first: u32, rows: &[&[f32]]) {
        file.write_batch(first, rows.len(), |i, buf| put_f32s(rows[i], buf)).unwrap();
    }

    fn read_f32s(file: &RecordFile, item: u32) -> Result<Vec<f32>, StoreError> {
        let mut out = Vec::new();
        file.read_many(&[item], |_, p| get_f32s(p, &mut out))?;
        Ok(out)
    }

    #[test]
    fn records_round_trip_and_uncommitted_tail_is_cut() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("v.f32");
        let vf = RecordFile::open(&path, 12, Access::Mapped).unwrap();
        assert!(read_f32s(&vf, 0).is_err());
        let a = [1.0f32, 2.0, 3.0];
        let b = [-1.0f32, 0.5, f32::MIN_POSITIVE];
        write_f32s(&vf, 0, &[&a, &b]);
        assert_eq!(read_f32s(&vf, 1).unwrap(), b);
        let mut seen = Vec::new();
        vf.read_all(2, |_| true, |item, p| seen.push((item, p.len()))).unwrap();
        assert_eq!(seen, [(0, 12), (1, 12)]);
        drop(vf);
        // Only the first item committed: the second record goes.
        let vf = RecordFile::open(&path, 12, Access::Mapped).unwrap();
        vf.cut_to(1).unwrap();
        assert_eq!(read_f32s(&vf, 0).unwrap(), a);
        assert!(read_f32s(&vf, 1).is_err());
        assert_eq!(std::fs::metadata(&path).unwrap().len(), 4 + 12 + 4);
    }

    #[test]
    fn whole_files_are_read_back_without_a_map() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("s");
        let file = RecordFile::open(&path, 8, Access::Whole).unwrap();
        file.write_batch(0, 3, |i, buf| put_u64s(&[i as u64 * 7], buf)).unwrap();
        assert!(file.map.read().unwrap().is_none());
        let mut words = Vec::new();
        file.read_all(3, |_| true, |_, p| get_u64s(p, &mut words)).unwrap();
        assert_eq!(words, [0, 7, 14]);
        assert!(matches!(file.read_all(4, |_| true, |_, _| ()), Err(StoreError::Corrupt(_))));
    }

    #[test]
    fn reclaimed_records_free_their_blocks_and_leave_the_others_intact() {
        let dir = tempfile::tempdir().unwrap();
        // 5 KB payloads, as embeddings of 1280 f32s.
        let file = RecordFile::open(&dir.path().join("v"), 5120, Access::Mapped).unwrap();
        let rows: Vec<Vec<f32>> = (0..100).map(|i| vec![i as f32; 1280]).collect();
        file.write_batch(0, rows.len(), |i, buf| put_f32s(&rows[i], buf)).unwrap();
        file.sync().unwrap();
        let before = file.allocated_bytes().unwrap();
        let freed = file.reclaim(&[10..60, 99..100]).unwrap();
        let after = file.allocated_bytes().unwrap();
        // 50 records of 5,128 bytes: all but the partial blocks at both ends.
        assert!(freed >= 49 * 5128 - 8192, "freed {freed}");
        assert!(before - after >= freed - 8192, "allocated {before} → {after}, freed {freed}");
        let live = |n: u32| !(10..60).contains(&n) && n != 99;
        let mut seen = Vec::new();
        file.read_all(100, live, |n, p| seen.push((n, p[0..4] == (n as f32).to_le_bytes() || !live(n)))).unwrap();
        assert!(seen.iter().all(|&(_, ok)| ok));
        for n in [9, 60, 98] {
            assert_eq!(read_f32s(&file, n).unwrap(), rows[n as usize]);
        }
        assert_eq!(std::fs::metadata(dir.path().join("v")).unwrap().len(), 100 * 5128, "offsets stay");
    }

    #[test]
    fn missing_committed_records_are_corruption() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("v.f32");
        let vf = RecordFile::open(&path, 12, Access::Mapped).unwrap();
        assert!(matches!(vf.cut_to(2), Err(StoreError::Corrupt(_))));
    }

    #[test]
    fn flipped_byte_is_detected() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("v.f32");
        let vf = RecordFile::open(&path, 8, Access::Mapped).unwrap();
        write_f32s(&vf, 0, &[&[1.0, 2.0]]);
        vf.file.write_all_at(&[0xff], 6).unwrap();
        assert!(matches!(read_f32s(&vf, 0), Err(StoreError::Corrupt(_))));
        assert!(matches!(vf.read_all(1, |_| true, |_, _| ()), Err(StoreError::Corrupt(_))));
    }

    proptest::proptest! {
        /// Arbitrary bytes on disk are records that fail their checks, never a panic: every
        /// read either gives payloads that passed their checksum or an error.
        #[test]
        fn arbitrary_file_bytes_are_errors_not_panics(
            bytes in proptest::collection::vec(proptest::prelude::any::<u8>(), 0..400),
            committed in 0u32..40,
            items in proptest::collection::vec(0u32..40, 0..8),
        ) {
            let dir = tempfile::tempdir().unwrap();
            let path = dir.path().join("v");
            std::fs::write(&path, &bytes).unwrap();
            for access in [Access::Mapped, Access::Whole] {
                let file = RecordFile::open(&path, 8, access).unwrap();
                let _ = file.read_many(&items, |_, payload| assert_eq!(payload.len(), 8));
                let _ = file.read_all(committed, |n| n % 2 == 0, |_, payload| assert_eq!(payload.len(), 8));
            }
            let file = RecordFile::open(&path, 8, Access::Mapped).unwrap();
            let cut = file.cut_to(committed);
            let len = std::fs::metadata(&path).unwrap().len();
            proptest::prop_assert_eq!(cut.is_ok(), bytes.len() as u64 >= u64::from(committed) * 16);
            if cut.is_ok() {
                proptest::prop_assert_eq!(len, u64::from(committed) * 16);
            }
        }
    }
}
