//! Arbitrary bytes as the write-ahead log's only segment: the log opens (a partial or empty
//! log), appends and reopens with what it appended; never a panic.
#![no_main]

use imagelsh::store::Wal;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let dir = tempfile::tempdir().expect("temp dir");
    std::fs::write(dir.path().join(format!("{:020}.log", 1)), data).expect("write segment");
    let Ok((mut wal, read)) = Wal::open(dir.path(), 1 << 20) else { return };
    assert_eq!(wal.next_position(), read.len() as u64 + 1);
    let position = wal.append(&[b"after".to_vec()]).expect("append");
    wal.sync().expect("sync");
    drop(wal);
    let (_, again) = Wal::open(dir.path(), 1 << 20).expect("reopen");
    assert_eq!(again.len(), read.len() + 1);
    assert_eq!(again.last().map(|r| r.position), Some(position));
});
