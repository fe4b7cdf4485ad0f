//! Arbitrary bytes as an embedding or sketch record file: reads give checked payloads or
//! errors, and cutting to the committed records works or reports corruption.
#![no_main]

use imagelsh::store::fuzzing::read_record_file;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Some((&[len, committed, a, b, c], bytes)) = data.split_first_chunk::<5>().map(|(h, r)| (h, r)) else { return };
    let dir = tempfile::tempdir().expect("temp dir");
    let path = dir.path().join("records");
    std::fs::write(&path, bytes).expect("write");
    let payload_len = usize::from(len % 64) + 1;
    let _ = read_record_file(&path, payload_len, u32::from(committed), &[a.into(), b.into(), c.into()]);
});
