//! Key encoding inside an index's sled tree. Every key starts with a one-byte tag so that the
//! kinds of record sort apart; numbers are big-endian so that keys sort numerically.
//!
//! | key                                        | value                                  |
//! |--------------------------------------------|----------------------------------------|
//! | `P`                                        | hyperplane matrix, f32 LE, row-major   |
//! | `M`                                        | center (layout ≥ 2, optional), f32 LE  |
//! | `S`                                        | sketch hyperplanes (layout ≥ 3, optional), f32 LE |
//! | `N`                                        | next item number, u32 BE               |
//! | `C`                                        | live item count, u64 BE                |
//! | `A`                                        | last write-ahead log position applied, u64 BE (layout ≥ 4) |
//! | `B` table u16 ‖ code u64 ‖ chunk u32       | sealed chunk: item numbers, u32 LE each |
//! | `B` table u16 ‖ code u64 ‖ `OPEN_CHUNK`    | sealed-chunk count u32 LE ‖ item numbers |
//! | `I` item u32                               | `ItemRecord` (protobuf; layout ≤ 3, migrated to `R`) |
//! | `R` item / `RECORDS_PER_CHUNK` u32         | the chunk's records (`encode_record_chunk`), layout ≥ 4 |
//! | `K` external id bytes                      | item number, u32 BE                    |
//! | `T` item u32                               | the item's JPEG thumbnail (indexes that keep them) |

pub const HYPERPLANES: &[u8] = b"P";
pub const CENTER: &[u8] = b"M";
pub const SKETCH_PLANES: &[u8] = b"S";
pub const NEXT_ITEM: &[u8] = b"N";
pub const ITEM_COUNT: &[u8] = b"C";
pub const APPLIED: &[u8] = b"A";
const BUCKET: u8 = b'B';
/// Chunk number of a bucket's open chunk, the one appends go to; it sorts after sealed chunks.
pub const OPEN_CHUNK: u32 = u32::MAX;
const ITEM: u8 = b'I';
const RECORD_CHUNK: u8 = b'R';
/// Item records per sled entry: writing one key per item record was half of what applying a
/// group cost (1M items, groups of 131k: 22k items/s applied with a key per record, 41k with
/// none), and consecutive items are written together.
pub const RECORDS_PER_CHUNK: u32 = 64;
const ID: u8 = b'K';
const THUMBNAIL: u8 = b'T';

/// `T ‖ item`: an item's thumbnail, apart from the records queries read.
pub fn thumbnail(item: u32) -> [u8; 5] {
    let mut key = [0u8; 5];
    key[0] = THUMBNAIL;
    key[1..].copy_from_slice(&item.to_be_bytes());
    key
}

/// `B ‖ table`: the prefix shared by all buckets of one table.
pub fn table_prefix(table: u16) -> [u8; 3] {
    let [hi, lo] = table.to_be_bytes();
    [BUCKET, hi, lo]
}

/// `B ‖ table ‖ code`: the prefix shared by all chunks of one bucket.
pub fn bucket_prefix(table: u16, code: u64) -> [u8; 11] {
    let mut key = [0u8; 11];
    key[0] = BUCKET;
    key[1..3].copy_from_slice(&table.to_be_bytes());
    key[3..11].copy_from_slice(&code.to_be_bytes());
    key
}

pub fn bucket_chunk(table: u16, code: u64, chunk: u32) -> [u8; 15] {
    let mut key = [0u8; 15];
    key[..11].copy_from_slice(&bucket_prefix(table, code));
    key[11..].copy_from_slice(&chunk.to_be_bytes());
    key
}

/// `(table, code, chunk)` of a bucket-chunk key; `None` for any other key.
pub fn parse_bucket_chunk(key: &[u8]) -> Option<(u16, u64, u32)> {
    if key.len() != 15 || key[0] != BUCKET {
        return None;
    }
    let table = u16::from_be_bytes(key[1..3].try_into().ok()?);
    let code = u64::from_be_bytes(key[3..11].try_into().ok()?);
    let chunk = u32::from_be_bytes(key[11..15].try_into().ok()?);
    Some((table, code, chunk))
}

/// A layout-3 item record key (what the migration to layout 4 reads).
#[cfg(test)]
pub fn item(item: u32) -> [u8; 5] {
    let mut key = [0u8; 5];
    key[0] = ITEM;
    key[1..].copy_from_slice(&item.to_be_bytes());
    key
}

/// `I`: the prefix of layout-3 item records.
pub const ITEM_PREFIX: &[u8] = &[ITEM];

/// The item number of a layout-3 item record key.
pub fn parse_item(key: &[u8]) -> Option<u32> {
    match key {
        [ITEM, rest @ ..] => decode_u32(rest),
        _ => None,
    }
}

/// `R ‖ chunk`: the records of items `chunk × RECORDS_PER_CHUNK ..` (+ `RECORDS_PER_CHUNK`).
pub fn record_chunk(chunk: u32) -> [u8; 5] {
    let mut key = [0u8; 5];
    key[0] = RECORD_CHUNK;
    key[1..].copy_from_slice(&chunk.to_be_bytes());
    key
}

/// A record chunk: for each record, in ascending item order, item number u32 LE ‖ length u32
/// LE ‖ the encoded `ItemRecord`.
pub fn encode_record_chunk<'a>(records: impl Iterator<Item = (u32, &'a [u8])>) -> Vec<u8> {
    let mut value = Vec::new();
    for (number, record) in records {
        value.extend_from_slice(&number.to_le_bytes());
        value.extend_from_slice(&(record.len() as u32).to_le_bytes());
        value.extend_from_slice(record);
    }
    value
}

/// The records of a chunk as (item number, encoded record); `None` if it is malformed.
pub fn decode_record_chunk(mut bytes: &[u8]) -> Option<Vec<(u32, &[u8])>> {
    let mut out = Vec::new();
    while !bytes.is_empty() {
        let (number, rest) = bytes.split_first_chunk::<4>()?;
        let (len, rest) = rest.split_first_chunk::<4>()?;
        let len = u32::from_le_bytes(*len) as usize;
        let record = rest.get(..len)?;
        out.push((u32::from_le_bytes(*number), record));
        bytes = &rest[len..];
    }
    Some(out)
}

pub fn id(id: &str) -> Vec<u8> {
    let mut key = Vec::with_capacity(1 + id.len());
    key.push(ID);
    key.extend_from_slice(id.as_bytes());
    key
}

pub fn encode_items(items: &[u32]) -> Vec<u8> {
    items.iter().flat_map(|i| i.to_le_bytes()).collect()
}

/// Item numbers of a bucket chunk; a trailing partial number (never written) is ignored.
pub fn decode_items(bytes: &[u8], out: &mut Vec<u32>) {
    out.extend(bytes.chunks_exact(4).map(|c| u32::from_le_bytes([c[0], c[1], c[2], c[3]])));
}

pub fn encode_open_chunk(sealed_count: u32, items: &[u32]) -> Vec<u8> {
    let mut value = Vec::with_capacity(4 + 4 * items.len());
    value.extend_from_slice(&sealed_count.to_le_bytes());
    value.extend(items.iter().flat_map(|i| i.to_le_bytes()));
    value
}

/// Appends the open chunk's items to `out` and returns its sealed-chunk count.
pub fn decode_open_chunk(bytes: &[u8], out: &mut Vec<u32>) -> Option<u32> {
    let (count, items) = bytes.split_first_chunk::<4>()?;
    decode_items(items, out);
    Some(u32::from_le_bytes(*count))
}

pub fn encode_f32s(values: &[f32]) -> Vec<u8> {
    values.iter().flat_map(|x| x.to_le_bytes()).collect()
}

pub fn decode_f32s(bytes: &[u8]) -> Vec<f32> {
    bytes.chunks_exact(4).map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]])).collect()
}

pub fn decode_u32(bytes: &[u8]) -> Option<u32> {
    Some(u32::from_be_bytes(bytes.try_into().ok()?))
}

pub fn decode_u64(bytes: &[u8]) -> Option<u64> {
    Some(u64::from_be_bytes(bytes.try_into().ok()?))
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    proptest! {
        #[test]
        fn bucket_keys_round_trip(table in any::<u16>(), code in any::<u64>(), chunk in any::<u32>()) {
            let key = bucket_chunk(table, code, chunk);
            prop_assert_eq!(parse_bucket_chunk(&key), Some((table, code, chunk)));
            prop_assert!(key.starts_with(&bucket_prefix(table, code)));
            prop_assert!(key.starts_with(&table_prefix(table)));
        }

        #[test]
        fn bucket_keys_sort_by_table_code_chunk(a in any::<(u16, u64, u32)>(), b in any::<(u16, u64, u32)>()) {
            prop_assert_eq!(bucket_chunk(a.0, a.1, a.2).cmp(&bucket_chunk(b.0, b.1, b.2)), a.cmp(&b));
        }

        #[test]
        fn item_lists_round_trip(items in prop::collection::vec(any::<u32>(), 0..100)) {
            let mut out = Vec::new();
            decode_items(&encode_items(&items), &mut out);
            prop_assert_eq!(out, items);
        }

        #[test]
        fn open_chunks_round_trip(count in any::<u32>(), items in prop::collection::vec(any::<u32>(), 0..100)) {
            let mut out = Vec::new();
            prop_assert_eq!(decode_open_chunk(&encode_open_chunk(count, &items), &mut out), Some(count));
            prop_assert_eq!(out, items);
        }

        #[test]
        fn item_keys_sort_numerically(a in any::<u32>(), b in any::<u32>()) {
            prop_assert_eq!(item(a).cmp(&item(b)), a.cmp(&b));
            prop_assert_eq!(parse_item(&item(a)), Some(a));
        }

        #[test]
        fn record_chunks_round_trip(records in prop::collection::btree_map(any::<u32>(), prop::collection::vec(any::<u8>(), 0..50), 0..20)) {
            let encoded = encode_record_chunk(records.iter().map(|(n, r)| (*n, r.as_slice())));
            let decoded = decode_record_chunk(&encoded).unwrap();
            prop_assert_eq!(decoded, records.iter().map(|(n, r)| (*n, r.as_slice())).collect::<Vec<_>>());
        }

        #[test]
        fn arbitrary_record_chunks_never_panic(bytes in prop::collection::vec(any::<u8>(), 0..100)) {
            let _ = decode_record_chunk(&bytes);
        }
    }

    #[test]
    fn other_keys_are_not_bucket_chunks() {
        assert_eq!(parse_bucket_chunk(&item(3)), None);
        assert_eq!(parse_bucket_chunk(&id("abcdefghijklmn")), None);
        assert_eq!(parse_bucket_chunk(HYPERPLANES), None);
    }

    #[test]
    fn counters_decode() {
        assert_eq!(decode_u32(&7u32.to_be_bytes()), Some(7));
        assert_eq!(decode_u64(&9u64.to_be_bytes()), Some(9));
        assert_eq!(decode_u32(&[1, 2]), None);
    }
}
