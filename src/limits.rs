//! Bounds on every size a client controls, checked before anything is sized by them, and the
//! one way an error message quotes client input (a short prefix).
//!
//! The use cases enforce these (they are the service's policy, configurable per deployment);
//! the index keeps its own hard maxima (`index::MAX_*`) as invariants, which no configuration
//! can raise past.

/// The longest piece of client input an error message quotes, in characters.
pub const QUOTE_CHARS: usize = 40;

/// The first `QUOTE_CHARS` characters of `input`: what a reply may carry back of a field the
/// client sent (an over-long id in a batch's ack).
pub fn prefix(input: &str) -> &str {
    input.char_indices().nth(QUOTE_CHARS).map_or(input, |(cut, _)| &input[..cut])
}

/// `input` as an error message may show it: at most `QUOTE_CHARS` characters, debug-quoted,
/// with its length in bytes when cut.
pub fn quote(input: &str) -> String {
    match input.char_indices().nth(QUOTE_CHARS) {
        None => format!("{input:?}"),
        Some((cut, _)) => format!("{:?}… ({} bytes)", &input[..cut], input.len()),
    }
}

/// Limits a request must stay within. Defaults: generous for real use (a batch of 256 images,
/// a label of a sentence, metadata of a few paths), small enough that no single request can
/// make the server allocate more than a few hundred MiB.
#[derive(Debug, Clone, PartialEq)]
pub struct RequestLimits {
    /// Items in one ingest batch, images in one embed batch, ids in one delete.
    pub max_batch_items: usize,
    pub max_id_bytes: usize,
    pub max_label_bytes: usize,
    /// Metadata entries per item…
    pub max_metadata_entries: usize,
    /// …and their keys and values together, bytes.
    pub max_metadata_bytes: usize,
    pub max_top_k: u32,
    pub max_rerank_depth: u32,
    pub max_probes: u32,
    /// Embedding dimension of a new index.
    pub max_dim: u32,
    /// Memory a new index's hyperplanes and sketch planes take (f32), checked before drawing.
    pub max_plane_bytes: u64,
}

impl Default for RequestLimits {
    fn default() -> Self {
        Self {
            max_batch_items: 4096,
            max_id_bytes: crate::index::MAX_ID_BYTES,
            max_label_bytes: 1024,
            max_metadata_entries: 64,
            max_metadata_bytes: 16 << 10,
            max_top_k: 1000,
            max_rerank_depth: 10_000,
            max_probes: 64,
            max_dim: 16_384,
            max_plane_bytes: 256 << 20,
        }
    }
}

/// Which limit a value broke, with the value and the limit: the message names the limit.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{what} is {value}, the limit is {limit} ({flag})")]
pub struct OverLimit {
    pub what: &'static str,
    pub value: u64,
    pub limit: u64,
    /// The flag that sets the limit.
    pub flag: &'static str,
}

impl RequestLimits {
    fn check(value: usize, limit: usize, what: &'static str, flag: &'static str) -> Result<(), OverLimit> {
        if value > limit {
            return Err(OverLimit { what, value: value as u64, limit: limit as u64, flag });
        }
        Ok(())
    }

    pub fn check_batch(&self, items: usize) -> Result<(), OverLimit> {
        Self::check(items, self.max_batch_items, "items in the batch", "--max-batch-items")
    }

    /// An item's id, label and metadata.
    pub fn check_item_fields(
        &self,
        id: &str,
        label: &str,
        metadata: &std::collections::HashMap<String, String>,
    ) -> Result<(), OverLimit> {
        Self::check(id.len(), self.max_id_bytes, "the id's length in bytes", "--max-id-bytes")?;
        Self::check(label.len(), self.max_label_bytes, "the label's length in bytes", "--max-label-bytes")?;
        Self::check(metadata.len(), self.max_metadata_entries, "metadata entries", "--max-metadata-entries")?;
        let bytes: usize = metadata.iter().map(|(k, v)| k.len() + v.len()).sum();
        Self::check(bytes, self.max_metadata_bytes, "metadata bytes", "--max-metadata-bytes")
    }

    pub fn check_query(&self, top_k: u32, rerank_depth: u32, probes: Option<u32>) -> Result<(), OverLimit> {
        Self::check(top_k as usize, self.max_top_k as usize, "top_k", "--max-top-k")?;
        Self::check(rerank_depth as usize, self.max_rerank_depth as usize, "rerank_depth", "--max-rerank-depth")?;
        Self::check(probes.unwrap_or(0) as usize, self.max_probes as usize, "probes", "--max-probes")
    }

    pub fn check_dim(&self, dim: u32) -> Result<(), OverLimit> {
        Self::check(dim as usize, self.max_dim as usize, "dim", "--max-dim")
    }

    /// The memory a new index's planes would take, computed before anything is allocated.
    pub fn check_plane_memory(&self, shape: &crate::index::IndexShape) -> Result<(), OverLimit> {
        let bytes = shape.plane_bytes();
        if bytes > self.max_plane_bytes {
            return Err(OverLimit {
                what: "the memory of the index's planes in bytes",
                value: bytes,
                limit: self.max_plane_bytes,
                flag: "--max-plane-mb",
            });
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn long_input_is_quoted_as_a_short_prefix() {
        let long = "x".repeat(100_000);
        let q = quote(&long);
        assert!(q.len() < 80, "{q}");
        assert!(q.contains("100000 bytes"));
        assert_eq!(quote("abc"), "\"abc\"");
    }

    #[test]
    fn shape_over_memory_is_refused_without_overflow() {
        use crate::index::IndexShape;
        let limits = RequestLimits::default();
        let shape = |dim, hash_bits, tables, sketch_bits| IndexShape { dim, hash_bits, tables, sketch_bits };
        assert!(limits.check_dim(2_000_000_000).is_err());
        assert!(limits.check_plane_memory(&shape(u32::MAX, u32::MAX, u32::MAX, u32::MAX)).is_err());
        assert!(limits.check_plane_memory(&shape(1280, 12, 16, 512)).is_ok());
        let e = limits.check_plane_memory(&shape(16_384, 64, 64, 4096)).unwrap_err();
        assert!(e.to_string().contains("--max-plane-mb"), "{e}");
    }

    proptest! {
        #[test]
        fn quote_never_grows_past_its_bound(s in ".{0,300}") {
            let q = quote(&s);
            // 40 characters, each escaped to at most 10 bytes, plus the length note.
            prop_assert!(q.len() <= QUOTE_CHARS * 10 + 32);
        }
    }
}
