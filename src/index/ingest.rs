//! The ingest use case inside the index: items checked one by one, then hashed, sketched and
//! handed to the log writer in one request; deletes.

use super::*;

/// Whether `vector` fits index `def`: its dimension, and values fit to compare.
pub(super) fn check_vector(def: &IndexDef, vector: &[f32]) -> Result<(), String> {
    let dim = def.dim as usize;
    if vector.len() != dim {
        return Err(format!("embedding has {} values, index {:?} has dimension {dim}", vector.len(), def.name));
    }
    check_values(vector)
}

/// Whether `item` can go into index `def`.
pub(super) fn check_item(def: &IndexDef, item: &VectorItem) -> Result<(), String> {
    if item.id.is_empty() {
        return Err("item id is empty".into());
    }
    if item.id.len() > MAX_ID_BYTES {
        return Err(format!("item id is {} bytes, the limit is {MAX_ID_BYTES}", item.id.len()));
    }
    check_vector(def, &item.vector)
}

/// The valid items of a request, and a failure for each invalid one.
pub(super) fn split_valid(def: &IndexDef, items: Vec<(u32, VectorItem)>) -> (Vec<VectorItem>, IngestOutcome) {
    let mut outcome = IngestOutcome::default();
    let mut valid = Vec::with_capacity(items.len());
    for (position, item) in items {
        match check_item(def, &item) {
            Ok(()) => valid.push(item),
            Err(message) => {
                outcome.failures.push(ItemFailure { position, id: item.id, message, reason: RefusalReason::Embedding })
            }
        }
    }
    (valid, outcome)
}

/// Codes (one per table) and sketches of `vectors`, a row each.
pub(super) fn hash_rows(
    planes: &Hyperplanes,
    sketch: Option<&Hyperplanes>,
    vectors: &[&[f32]],
) -> Result<(Array2<u64>, Option<Array2<u64>>), IndexError> {
    let dim = planes.shape().dim;
    let mut flat = Vec::with_capacity(vectors.len() * dim);
    vectors.iter().for_each(|v| flat.extend_from_slice(v));
    let batch =
        Array2::from_shape_vec((vectors.len(), dim), flat).map_err(|e| IndexError::InvalidArgument(e.to_string()))?;
    let codes = planes.codes(batch.view())?;
    let sketches = sketch.map(|s| s.codes(batch.view())).transpose()?;
    Ok((codes, sketches))
}

impl Index {
    /// Indexes the valid items (with their positions in the request) in one atomic write,
    /// durable when this returns; invalid ones come back as failures.
    pub fn ingest(self: &Arc<Self>, items: Vec<(u32, VectorItem)>) -> Result<IngestOutcome, IndexError> {
        let (valid, mut outcome) = split_valid(self.def(), items);
        if valid.is_empty() {
            return Ok(outcome);
        }
        let vectors: Vec<&[f32]> = valid.iter().map(|i| i.vector.as_slice()).collect();
        let (codes, sketches) = hash_rows(&self.planes, self.sketch.as_ref(), &vectors)?;
        let prepared: Vec<PreparedItem> = valid
            .into_iter()
            .enumerate()
            .map(|(row, item)| PreparedItem {
                id: item.id,
                label: item.label,
                metadata: item.metadata,
                codes: codes.row(row).to_vec(),
                sketch: sketches.as_ref().map_or_else(Vec::new, |s| s.row(row).to_vec()),
                vector: item.vector,
                thumbnail: item.thumbnail.filter(|_| self.def().thumbnails),
            })
            .collect();
        let count = prepared.len() as u32;
        self.log.submit(self.clone(), WriteRequest::Upsert(prepared))?;
        outcome.indexed = count;
        Ok(outcome)
    }

    /// Deletes the items with these ids, durably; returns how many existed.
    pub fn delete(self: &Arc<Self>, ids: &[String]) -> Result<usize, IndexError> {
        self.log.submit(self.clone(), WriteRequest::Delete(ids.to_vec()))
    }
}

/// An embedding's values are fit to compare: finite, and with a norm that cosine can divide by.
/// The squared norm must be a normal f32 (so that the product of two norms never underflows to
/// zero) and leave room below f32::MAX (so that no sum in the cosine kernels, whose lanes add in
/// another order than this check, overflows): then no similarity is ever NaN or infinite.
pub(crate) fn check_values(vector: &[f32]) -> Result<(), String> {
    if let Some(i) = vector.iter().position(|x| !x.is_finite()) {
        return Err(format!("embedding value {i} is {}, not a finite number", vector[i]));
    }
    let squared: f32 = vector.iter().map(|x| x * x).sum();
    if squared < f32::MIN_POSITIVE {
        return Err("embedding is all zeros (or too small to have a norm): it has no direction to compare".into());
    }
    if squared > f32::MAX / 16.0 {
        return Err("embedding's norm overflows 32-bit floats: scale it down (cosine ignores scale)".into());
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::check_values;
    use proptest::prelude::*;

    fn any_f32() -> impl Strategy<Value = f32> {
        prop_oneof![
            any::<u32>().prop_map(f32::from_bits),
            -1e3f32..1e3,
            Just(0.0),
            Just(3e38),
            Just(1e-30),
            Just(f32::MIN_POSITIVE),
        ]
    }

    proptest! {
        /// Whatever bits a client sends, two embeddings that pass the check have a finite
        /// cosine in [-1, 1] (up to rounding).
        #[test]
        fn accepted_embeddings_never_give_nan_or_infinite_similarity(
            a in proptest::collection::vec(any_f32(), 1..24),
            b in proptest::collection::vec(any_f32(), 1..24),
        ) {
            let n = a.len().min(b.len());
            let (a, b) = (&a[..n], &b[..n]);
            if check_values(a).is_ok() && check_values(b).is_ok() {
                let c = crate::lsh::cosine(a, b);
                prop_assert!(c.is_finite() && c.abs() <= 1.001, "{c}");
            }
        }
    }

    #[test]
    fn zero_tiny_and_huge_are_refused() {
        assert!(check_values(&[0.0; 8]).is_err());
        assert!(check_values(&[1e-30; 8]).is_err());
        assert!(check_values(&[3e38; 8]).is_err());
        assert!(check_values(&[f32::NAN, 1.0]).is_err());
        assert!(check_values(&[0.0, 1e-3]).is_ok());
    }
}
