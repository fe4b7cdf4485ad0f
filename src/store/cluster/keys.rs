//! The cluster store's keys and values (../shared/SCALEOUT.md, section 4). Pure functions.
//!
//! Every key of an index starts with `lsh:<uid>:`, so a drop or a check finds them by one
//! pattern. A hash tag (`{…}`) puts an item's records in one slot (one command removes them
//! all, and they travel in one primary's pipeline); buckets and id keys carry no tag and spread
//! over the slots.

/// name → `IndexRecord` (protobuf), the catalog of every replica.
pub const CATALOG: &str = "lsh:cat";
/// `INCR`ed for each new index: uids are never reused, also across a drop and a create.
pub const UIDS: &str = "lsh:uids";

/// The parts of an item that live in its slot.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Part {
    /// Codes ‖ sketch: what a query reads for every candidate.
    Codes,
    /// id, label, metadata (`ItemRecord`): read for the hits.
    Record,
    /// The embedding, f32 little-endian: read for the exact re-rank.
    Vector,
    /// A JPEG thumbnail.
    Thumbnail,
}

impl Part {
    pub const ALL: [Part; 4] = [Part::Codes, Part::Record, Part::Vector, Part::Thumbnail];

    fn suffix(self) -> &'static str {
        match self {
            Part::Codes => "q",
            Part::Record => "r",
            Part::Vector => "v",
            Part::Thumbnail => "t",
        }
    }
}

pub fn prefix(uid: u64) -> String {
    format!("lsh:{uid}:")
}

pub fn hyperplanes(uid: u64) -> String {
    format!("lsh:{uid}:planes")
}

pub fn center(uid: u64) -> String {
    format!("lsh:{uid}:center")
}

pub fn sketch_planes(uid: u64) -> String {
    format!("lsh:{uid}:splanes")
}

/// `INCRBY n` hands out the item numbers of a batch of n.
pub fn sequence(uid: u64) -> String {
    format!("lsh:{uid}:seq")
}

/// Live items (counted when an id is first written, and when it is deleted).
pub fn count(uid: u64) -> String {
    format!("lsh:{uid}:count")
}

/// Bucket `code` of `table`: packed u32 little-endian item numbers, appended to.
pub fn bucket(uid: u64, table: u16, code: u64) -> String {
    format!("lsh:{uid}:b:{table}:{code:x}")
}

/// One part of item `number`; the tag `{uid.number}` puts all its parts in one slot.
pub fn item(uid: u64, number: u32, part: Part) -> String {
    format!("lsh:{uid}:{{{uid}.{number}}}:{}", part.suffix())
}

/// The item number an id names (decimal). The empty tag `{}` makes the whole key the hash
/// input, so that braces in a client's id cannot pick the slot.
pub fn id(uid: u64, id: &str) -> String {
    format!("lsh:{uid}:k:{{}}{id}")
}

/// What an id key holds: the number of the item the id names, or, for a while after a delete,
/// a tombstone (the deleted item's number, negated) that keeps a commit of that item or an
/// older one, sent again after its reply was lost, from bringing the id back.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum IdValue {
    Names(u32),
    Deleted(u32),
}

/// How long a delete's tombstone stays: far longer than any re-send of a commit (within one
/// call: the crate's and the store's retries), short enough that deleted ids cost no memory
/// for long.
pub const TOMBSTONE_SECS: u64 = 3600;

/// An id key's value (`None`: not one).
pub fn parse_id_value(bytes: &[u8]) -> Option<IdValue> {
    let text = std::str::from_utf8(bytes).ok()?;
    match text.strip_prefix('-') {
        Some(deleted) => Some(IdValue::Deleted(deleted.parse().ok().filter(|&n| n > 0)?)),
        None => Some(IdValue::Names(text.parse().ok().filter(|&n| n > 0)?)),
    }
}

/// The uid of an index's key (`lsh:<uid>:…`); `None` for the store's own keys (catalog, uid
/// counter) and anything else.
pub fn uid_of(key: &[u8]) -> Option<u64> {
    let rest = key.strip_prefix(b"lsh:")?;
    let digits = &rest[..rest.iter().position(|&b| b == b':')?];
    if digits.is_empty() || !digits.iter().all(u8::is_ascii_digit) {
        return None;
    }
    std::str::from_utf8(digits).ok()?.parse().ok()
}

/// Every key of the store (a scan's pattern).
pub const ALL_KEYS: &str = "lsh:*";

/// What a key of an index is, read back from a scan.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum KeyKind {
    Bucket {
        table: u16,
        code: u64,
    },
    Item {
        number: u32,
        part: Part,
    },
    Id(String),
    /// Planes, center, sequence, count.
    Other,
}

/// The kind of a key of index `uid` (`None`: not one of its keys).
pub fn parse(uid: u64, key: &[u8]) -> Option<KeyKind> {
    let key = std::str::from_utf8(key).ok()?;
    let rest = key.strip_prefix(&prefix(uid))?;
    if let Some(rest) = rest.strip_prefix("b:") {
        let (table, code) = rest.split_once(':')?;
        return Some(KeyKind::Bucket { table: table.parse().ok()?, code: u64::from_str_radix(code, 16).ok()? });
    }
    if let Some(id) = rest.strip_prefix("k:{}") {
        return Some(KeyKind::Id(id.to_string()));
    }
    if let Some(rest) = rest.strip_prefix('{') {
        let (tag, suffix) = rest.split_once("}:")?;
        let (tag_uid, number) = tag.split_once('.')?;
        if tag_uid.parse::<u64>().ok()? != uid {
            return None;
        }
        let part = Part::ALL.into_iter().find(|p| p.suffix() == suffix)?;
        return Some(KeyKind::Item { number: number.parse().ok()?, part });
    }
    Some(KeyKind::Other)
}

/// An item's codes and sketch as stored (`Part::Codes`).
pub fn encode_codes(codes: &[u64], sketch: &[u64]) -> Vec<u8> {
    codes.iter().chain(sketch).flat_map(|w| w.to_le_bytes()).collect()
}

/// `(codes, sketch)` of a `Part::Codes` value of an index of `tables` tables and `words`
/// sketch words; `None` when its length is not that.
pub fn decode_codes(bytes: &[u8], tables: usize, words: usize) -> Option<(Vec<u64>, Vec<u64>)> {
    if bytes.len() != 8 * (tables + words) {
        return None;
    }
    let mut all: Vec<u64> =
        bytes.chunks_exact(8).map(|c| u64::from_le_bytes(c.try_into().unwrap_or_default())).collect();
    let sketch = all.split_off(tables);
    Some((all, sketch))
}

pub fn encode_numbers(numbers: &[u32]) -> Vec<u8> {
    numbers.iter().flat_map(|n| n.to_le_bytes()).collect()
}

/// A bucket's item numbers (a torn trailing fragment, which `APPEND` never leaves, is ignored).
pub fn decode_numbers(bytes: &[u8]) -> impl Iterator<Item = u32> + '_ {
    bytes.chunks_exact(4).map(|c| u32::from_le_bytes([c[0], c[1], c[2], c[3]]))
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn every_key_of_an_index_parses_back() {
        assert_eq!(parse(7, bucket(7, 3, 0xabc).as_bytes()), Some(KeyKind::Bucket { table: 3, code: 0xabc }));
        for part in Part::ALL {
            assert_eq!(parse(7, item(7, 42, part).as_bytes()), Some(KeyKind::Item { number: 42, part }));
        }
        assert_eq!(parse(7, id(7, "a:{b}").as_bytes()), Some(KeyKind::Id("a:{b}".into())));
        assert_eq!(parse(7, sequence(7).as_bytes()), Some(KeyKind::Other));
        // Another index's keys, even one whose uid starts the same.
        assert_eq!(parse(7, bucket(71, 0, 1).as_bytes()), None);
        assert_eq!(parse(7, item(71, 1, Part::Codes).as_bytes()), None);
    }

    #[test]
    fn id_values_are_numbers_or_tombstones() {
        assert_eq!(parse_id_value(b"42"), Some(IdValue::Names(42)));
        assert_eq!(parse_id_value(b"-42"), Some(IdValue::Deleted(42)));
        for bad in [&b""[..], b"-", b"0", b"-0", b"x", b"4294967296", b"--1", b"1-"] {
            assert_eq!(parse_id_value(bad), None, "{:?}", String::from_utf8_lossy(bad));
        }
    }

    #[test]
    fn every_index_key_names_its_uid_and_the_stores_own_keys_none() {
        for key in [bucket(12, 3, 0xabc), item(12, 1, Part::Vector), id(12, "7:x"), hyperplanes(12), count(12)] {
            assert_eq!(uid_of(key.as_bytes()), Some(12), "{key}");
        }
        for key in [CATALOG, UIDS, "lsh::x", "lsh:+1:x", "lsh:1", "other:1:x"] {
            assert_eq!(uid_of(key.as_bytes()), None, "{key}");
        }
    }

    #[test]
    fn an_items_parts_share_one_hash_tag_and_ids_cannot_choose_theirs() {
        let tags: Vec<String> = Part::ALL
            .iter()
            .map(|&p| {
                let key = item(9, 5, p);
                let open = key.find('{').unwrap_or_default();
                let close = key[open..].find('}').unwrap_or_default() + open;
                key[open..=close].to_string()
            })
            .collect();
        assert!(tags.iter().all(|t| t == "{9.5}"), "{tags:?}");
        // The first `{` of an id key is followed by `}`: the whole key is hashed.
        assert!(id(9, "{x}").contains(":k:{}{x}"));
    }

    proptest! {
        #[test]
        fn codes_and_numbers_round_trip(
            codes in proptest::collection::vec(any::<u64>(), 1..20),
            sketch in proptest::collection::vec(any::<u64>(), 0..9),
            numbers in proptest::collection::vec(any::<u32>(), 0..50),
        ) {
            let bytes = encode_codes(&codes, &sketch);
            prop_assert_eq!(decode_codes(&bytes, codes.len(), sketch.len()), Some((codes.clone(), sketch.clone())));
            prop_assert_eq!(decode_codes(&bytes, codes.len() + 1, sketch.len()), None);
            prop_assert_eq!(decode_numbers(&encode_numbers(&numbers)).collect::<Vec<_>>(), numbers);
        }
    }
}
