//! The write-ahead log in front of the index store: acknowledged writes are durable here first
//! and reach the store later, in large groups (the ordering Qdrant uses: the store records the
//! last log position it holds, and the log is dropped only behind what the store has synced).
//!
//! Segment files `wal/<first position, 20 digits>.log`, each a run of records:
//! `payload length u32 LE ‖ crc32 u32 LE ‖ position u64 LE ‖ payload`, the checksum over position
//! and payload. Positions count records from 1 without gaps. A record is acknowledged only after
//! the fsync that follows its write, so a record that fails its checksum, is cut short, or breaks
//! the sequence was never acknowledged, and neither was anything after it: at open the log is
//! cut back to the last good record (a torn tail or appended garbage is dropped, never fatal).

use std::fs::{File, OpenOptions};
use std::io::{Read, Write};
use std::path::{Path, PathBuf};

use super::StoreError;
use super::durable::{create_dir_durably, sync_dir};

const HEADER_BYTES: usize = 16;
/// A record larger than this is garbage, not a record (the largest batch is far smaller).
const MAX_RECORD_BYTES: u32 = 1 << 30;

/// Log positions start at 1; 0 means "nothing".
pub type Position = u64;

#[derive(Debug)]
struct Segment {
    first: Position,
    path: PathBuf,
}

/// An open log, appended to by one writer.
#[derive(Debug)]
pub struct Wal {
    dir: PathBuf,
    /// Closed segments, oldest first, then the active one (last).
    segments: Vec<Segment>,
    active: File,
    active_bytes: u64,
    segment_bytes: u64,
    /// The next record's position.
    next: Position,
}

/// A record read back at open.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LogRecord {
    pub position: Position,
    pub payload: Vec<u8>,
}

impl Wal {
    /// The log's directory.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// Opens the log in `dir` (creating it), cuts a torn tail of its last segment, and returns it
    /// with every record it holds, oldest first. Starts a new segment once one passes
    /// `segment_bytes`. Damage anywhere but in the last segment is an error
    /// (`StoreError::LogDamaged`): the records after it were acknowledged.
    pub fn open(dir: &Path, segment_bytes: u64) -> Result<(Self, Vec<LogRecord>), StoreError> {
        Self::open_with(dir, segment_bytes, false)
    }

    /// `open`, and with `repair` a damaged segment that is not the last is cut back like a torn
    /// tail, its later segments deleted (`imagelsh check --repair`: their records are lost).
    pub fn open_with(dir: &Path, segment_bytes: u64, repair: bool) -> Result<(Self, Vec<LogRecord>), StoreError> {
        let mut records = Vec::new();
        let wal = Self::open_streaming(dir, segment_bytes, repair, &mut |record| {
            records.push(record);
            Ok(())
        })?;
        Ok((wal, records))
    }

    /// `open_with`, handing each good record to `visit` as its segment is read rather than
    /// returning them all: one segment is in memory at a time, whatever the log retains.
    pub fn open_streaming(
        dir: &Path,
        segment_bytes: u64,
        repair: bool,
        visit: &mut dyn FnMut(LogRecord) -> Result<(), StoreError>,
    ) -> Result<Self, StoreError> {
        create_dir_durably(dir)?;
        let mut segments = list_segments(dir)?;
        let mut last: Option<Position> = None;
        let mut expected: Option<Position> = None;
        let mut torn_at: Option<(usize, u64)> = None;
        let mut gap = false;
        for (i, segment) in segments.iter().enumerate() {
            if expected.is_some_and(|e| e != segment.first) {
                // A segment that does not continue the sequence: the one before it lost records.
                (torn_at, gap) = (Some((i, 0)), true);
                break;
            }
            let (good_bytes, whole, segment_last) = read_segment(&segment.path, segment.first, visit)?;
            last = segment_last.or(last);
            expected = Some(last.map_or(segment.first, |position| position + 1));
            if !whole {
                torn_at = Some((i, good_bytes));
                break;
            }
        }
        if let Some((i, good_bytes)) = torn_at {
            // A segment is synced before the next is made, so only the last can have an
            // unacknowledged tail; a gap or damage before it lost acknowledged records.
            let later = segments.len() - i - 1;
            if (later > 0 || gap) && !repair {
                return Err(StoreError::LogDamaged { segment: segments[i].path.clone(), offset: good_bytes, later });
            }
            tracing::warn!(
                segment = %segments[i].path.display(),
                offset = good_bytes,
                later_segments = later,
                "write-ahead log: dropping a torn or unacknowledged tail"
            );
            let file = OpenOptions::new().write(true).open(&segments[i].path)?;
            file.set_len(good_bytes)?;
            file.sync_all()?;
            for later in segments.drain(i + 1..) {
                std::fs::remove_file(&later.path)?;
            }
            sync_dir(dir)?;
        }
        let next = last.map_or_else(|| segments.last().map_or(1, |s| s.first), |position| position + 1);
        let next = next.max(1);
        // Appends go to the last segment, or to a new one when there is none.
        if segments.is_empty() {
            segments.push(Segment { first: next, path: segment_path(dir, next) });
        }
        let active_path = &segments[segments.len() - 1].path;
        let active = OpenOptions::new().create(true).append(true).open(active_path)?;
        let active_bytes = active.metadata()?.len();
        sync_dir(dir)?;
        Ok(Self { dir: dir.to_path_buf(), segments, active, active_bytes, segment_bytes, next })
    }

    /// Starts the log afresh at `position`, past every record it holds, which must all be
    /// applied (repair of a log that fell behind the store's positions).
    pub fn restart_at(&mut self, position: Position) -> Result<(), StoreError> {
        if position < self.next {
            return Err(StoreError::Corrupt(format!(
                "the log cannot restart at {position}, before its next position {}",
                self.next
            )));
        }
        self.active.sync_data()?;
        let path = segment_path(&self.dir, position);
        self.active = OpenOptions::new().create(true).append(true).open(&path)?;
        for old in self.segments.drain(..) {
            if old.path != path {
                std::fs::remove_file(&old.path)?;
            }
        }
        sync_dir(&self.dir)?;
        self.segments.push(Segment { first: position, path });
        self.active_bytes = 0;
        self.next = position;
        Ok(())
    }

    /// The position the next record will get.
    pub fn next_position(&self) -> Position {
        self.next
    }

    /// Appends the records (not yet durable: `sync` makes them so) and returns the first's position.
    pub fn append(&mut self, payloads: &[Vec<u8>]) -> Result<Position, StoreError> {
        if self.active_bytes >= self.segment_bytes {
            self.roll()?;
        }
        let first = self.next;
        let total: usize = payloads.iter().map(|p| HEADER_BYTES + p.len()).sum();
        let mut buf = Vec::with_capacity(total);
        for (position, payload) in (first..).zip(payloads) {
            let len = u32::try_from(payload.len())
                .ok()
                .filter(|&l| l <= MAX_RECORD_BYTES)
                .ok_or_else(|| StoreError::Corrupt(format!("log record of {} bytes", payload.len())))?;
            let mut crc = crc32fast::Hasher::new();
            crc.update(&position.to_le_bytes());
            crc.update(payload);
            buf.extend_from_slice(&len.to_le_bytes());
            buf.extend_from_slice(&crc.finalize().to_le_bytes());
            buf.extend_from_slice(&position.to_le_bytes());
            buf.extend_from_slice(payload);
        }
        self.active.write_all(&buf)?;
        self.active_bytes += buf.len() as u64;
        self.next += payloads.len() as u64;
        Ok(first)
    }

    /// Makes every appended record durable.
    pub fn sync(&self) -> Result<(), StoreError> {
        Ok(self.active.sync_data()?)
    }

    /// Deletes the segments whose records all come before `position` (never the active one).
    pub fn remove_before(&mut self, position: Position) -> Result<usize, StoreError> {
        let mut removed = 0;
        while self.segments.len() > 1 && self.segments[1].first <= position {
            let segment = self.segments.remove(0);
            std::fs::remove_file(&segment.path)?;
            removed += 1;
        }
        if removed > 0 {
            sync_dir(&self.dir)?;
        }
        Ok(removed)
    }

    fn roll(&mut self) -> Result<(), StoreError> {
        self.active.sync_data()?;
        let path = segment_path(&self.dir, self.next);
        self.active = OpenOptions::new().create(true).append(true).open(&path)?;
        sync_dir(&self.dir)?;
        self.segments.push(Segment { first: self.next, path });
        self.active_bytes = 0;
        Ok(())
    }
}

fn segment_path(dir: &Path, first: Position) -> PathBuf {
    dir.join(format!("{first:020}.log"))
}

fn list_segments(dir: &Path) -> Result<Vec<Segment>, StoreError> {
    let mut segments = Vec::new();
    for entry in std::fs::read_dir(dir)? {
        let path = entry?.path();
        let first = path
            .extension()
            .filter(|x| *x == "log")
            .and_then(|_| path.file_stem())
            .and_then(|s| s.to_str())
            .and_then(|s| s.parse::<Position>().ok());
        if let Some(first) = first {
            segments.push(Segment { first, path });
        }
    }
    segments.sort_by_key(|s| s.first);
    Ok(segments)
}

/// Hands the segment's good records to `visit`; returns the bytes they span, whether the whole
/// file was good, and the last good record's position.
fn read_segment(
    path: &Path,
    first: Position,
    visit: &mut dyn FnMut(LogRecord) -> Result<(), StoreError>,
) -> Result<(u64, bool, Option<Position>), StoreError> {
    let mut bytes = Vec::new();
    File::open(path)?.read_to_end(&mut bytes)?;
    let (mut offset, mut expected) = (0usize, first);
    let last = |expected: Position| (expected > first).then(|| expected - 1);
    while offset < bytes.len() {
        let Some(record) = parse_record(&bytes[offset..], expected) else {
            return Ok((offset as u64, false, last(expected)));
        };
        offset += HEADER_BYTES + record.payload.len();
        expected += 1;
        visit(record)?;
    }
    Ok((offset as u64, true, last(expected)))
}

/// The record at the start of `bytes`, if it is whole, checks out and has position `expected`.
fn parse_record(bytes: &[u8], expected: Position) -> Option<LogRecord> {
    let header = bytes.get(..HEADER_BYTES)?;
    let len = u32::from_le_bytes(header[0..4].try_into().ok()?);
    let crc = u32::from_le_bytes(header[4..8].try_into().ok()?);
    let position = u64::from_le_bytes(header[8..16].try_into().ok()?);
    if len > MAX_RECORD_BYTES || position != expected {
        return None;
    }
    let payload = bytes.get(HEADER_BYTES..HEADER_BYTES + len as usize)?;
    let mut hasher = crc32fast::Hasher::new();
    hasher.update(&position.to_le_bytes());
    hasher.update(payload);
    (hasher.finalize() == crc).then(|| LogRecord { position, payload: payload.to_vec() })
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn payloads(n: usize, seed: u8) -> Vec<Vec<u8>> {
        (0..n).map(|i| vec![seed.wrapping_add(i as u8); i % 7 + 1]).collect()
    }

    #[test]
    fn records_survive_reopen_across_segments_and_old_segments_go() {
        let dir = tempfile::tempdir().unwrap();
        let written = payloads(30, 1);
        {
            let (mut wal, old) = Wal::open(dir.path(), 64).unwrap();
            assert!(old.is_empty());
            for chunk in written.chunks(4) {
                wal.append(chunk).unwrap();
                wal.sync().unwrap();
            }
            assert_eq!(wal.next_position(), 31);
        }
        let (mut wal, read) = Wal::open(dir.path(), 64).unwrap();
        assert_eq!(read.iter().map(|r| r.payload.clone()).collect::<Vec<_>>(), written);
        assert_eq!(read.iter().map(|r| r.position).collect::<Vec<_>>(), (1..=30).collect::<Vec<_>>());
        assert!(list_segments(dir.path()).unwrap().len() > 2);
        wal.remove_before(21).unwrap();
        let left = list_segments(dir.path()).unwrap();
        assert!(left[0].first <= 21 && left.get(1).is_none_or(|s| s.first > 21), "{left:?}");
        assert_eq!(wal.append(&[b"x".to_vec()]).unwrap(), 31);
        wal.sync().unwrap();
        drop(wal);
        let (wal, read) = Wal::open(dir.path(), 64).unwrap();
        assert_eq!(read.last().unwrap(), &LogRecord { position: 31, payload: b"x".to_vec() });
        assert!(read.iter().all(|r| r.position >= left[0].first));
        assert_eq!(wal.next_position(), 32);
    }

    #[test]
    fn an_emptied_log_continues_its_positions() {
        let dir = tempfile::tempdir().unwrap();
        {
            let (mut wal, _) = Wal::open(dir.path(), 16).unwrap();
            wal.append(&payloads(5, 0)).unwrap();
            wal.append(&payloads(1, 0)).unwrap();
            wal.sync().unwrap();
            wal.remove_before(7).unwrap();
        }
        let (wal, read) = Wal::open(dir.path(), 16).unwrap();
        assert!(read.iter().all(|r| r.position >= 6));
        assert_eq!(wal.next_position(), 7);
    }

    /// Nine segments of one record each (positions 1–9), written and synced.
    fn nine_segments(dir: &Path) -> Vec<Segment> {
        let (mut wal, _) = Wal::open(dir, 1).unwrap();
        for i in 0..9 {
            wal.append(&payloads(1, i)).unwrap();
            wal.sync().unwrap();
        }
        list_segments(dir).unwrap()
    }

    #[test]
    fn a_damaged_segment_before_the_last_refuses_to_open_and_repair_cuts_it() {
        let dir = tempfile::tempdir().unwrap();
        let segments = nine_segments(dir.path());
        assert!(segments.len() >= 3, "{segments:?}");
        // A flipped byte inside the first segment's first record.
        let mut bytes = std::fs::read(&segments[0].path).unwrap();
        bytes[HEADER_BYTES] ^= 0xff;
        std::fs::write(&segments[0].path, &bytes).unwrap();
        match Wal::open(dir.path(), 1) {
            Err(StoreError::LogDamaged { segment, offset: 0, later }) => {
                assert_eq!((segment, later), (segments[0].path.clone(), segments.len() - 1));
            }
            other => panic!("expected LogDamaged, got {other:?}"),
        }
        assert_eq!(list_segments(dir.path()).unwrap().len(), segments.len(), "nothing deleted without repair");
        let (wal, read) = Wal::open_with(dir.path(), 1, true).unwrap();
        assert!(read.is_empty());
        assert_eq!(wal.next_position(), 1);
    }

    #[test]
    fn a_missing_segment_refuses_to_open() {
        for missing in [1, 7] {
            let dir = tempfile::tempdir().unwrap();
            let segments = nine_segments(dir.path());
            std::fs::remove_file(&segments[missing].path).unwrap();
            let opened = Wal::open(dir.path(), 1);
            assert!(matches!(opened, Err(StoreError::LogDamaged { .. })), "segment {missing} missing: {opened:?}");
        }
    }

    #[test]
    fn a_log_restarted_past_its_records_keeps_the_new_positions() {
        let dir = tempfile::tempdir().unwrap();
        {
            let (mut wal, _) = Wal::open(dir.path(), 1 << 20).unwrap();
            wal.append(&payloads(3, 0)).unwrap();
            wal.sync().unwrap();
            assert!(wal.restart_at(2).is_err(), "never back over its records");
            wal.restart_at(100).unwrap();
            assert_eq!(wal.append(&payloads(1, 0)).unwrap(), 100);
            wal.sync().unwrap();
        }
        let (wal, read) = Wal::open(dir.path(), 1 << 20).unwrap();
        assert_eq!(read.iter().map(|r| r.position).collect::<Vec<_>>(), vec![100]);
        assert_eq!(wal.next_position(), 101);
    }

    proptest! {
        /// Cutting the last segment anywhere, or appending garbage, loses only records after
        /// the cut, and the log opens and appends again.
        #[test]
        fn torn_tails_are_cut_at_the_last_whole_record(
            n in 1usize..20, cut in any::<prop::sample::Index>(), garbage in prop::collection::vec(any::<u8>(), 0..40)
        ) {
            let dir = tempfile::tempdir().unwrap();
            let written = payloads(n, 3);
            let mut ends = Vec::new();
            {
                let (mut wal, _) = Wal::open(dir.path(), u64::MAX).unwrap();
                for p in &written {
                    wal.append(std::slice::from_ref(p)).unwrap();
                    ends.push(wal.active_bytes);
                }
                wal.sync().unwrap();
            }
            let path = segment_path(dir.path(), 1);
            let original = std::fs::read(&path).unwrap();
            let len = original.len() as u64;
            let keep = cut.index(len as usize + 1) as u64;
            let file = OpenOptions::new().write(true).open(&path).unwrap();
            file.set_len(keep).unwrap();
            drop(file);
            OpenOptions::new().append(true).open(&path).unwrap().write_all(&garbage).unwrap();
            // Records intact in the file as it is now: garbage that happens to equal the bytes
            // cut off (a 1-byte payload's last byte, say) makes its record whole again.
            let now = std::fs::read(&path).unwrap();
            let intact = original.iter().zip(&now).take_while(|(a, b)| a == b).count() as u64;
            let whole = ends.iter().filter(|&&e| e <= intact).count();
            let (mut wal, read) = Wal::open(dir.path(), u64::MAX).unwrap();
            // Garbage can at most look like nothing: it never passes as a record.
            prop_assert_eq!(read.len(), whole);
            for (r, p) in read.iter().zip(&written) {
                prop_assert_eq!(&r.payload, p);
            }
            prop_assert_eq!(wal.append(&[b"again".to_vec()]).unwrap(), whole as u64 + 1);
            wal.sync().unwrap();
            drop(wal);
            let (_, read) = Wal::open(dir.path(), u64::MAX).unwrap();
            prop_assert_eq!(read.len(), whole + 1);
        }

        /// Arbitrary bytes as a segment are an empty or partial log, never a panic.
        #[test]
        fn arbitrary_segment_bytes_never_panic(bytes in prop::collection::vec(any::<u8>(), 0..200)) {
            let dir = tempfile::tempdir().unwrap();
            std::fs::write(segment_path(dir.path(), 1), &bytes).unwrap();
            let (wal, read) = Wal::open(dir.path(), 1 << 20).unwrap();
            prop_assert_eq!(wal.next_position(), read.len() as u64 + 1);
        }
    }
}
