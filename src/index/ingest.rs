//! The ingest use case inside the index: items checked one by one, then hashed, sketched and
//! handed to the log writer in one request; deletes.

use super::*;

impl Index {
    pub(super) fn check_vector(&self, vector: &[f32]) -> Result<(), String> {
        let dim = self.def().dim as usize;
        if vector.len() != dim {
            return Err(format!(
                "embedding has {} values, index {:?} has dimension {dim}",
                vector.len(),
                self.def().name
            ));
        }
        if let Some(i) = vector.iter().position(|x| !x.is_finite()) {
            return Err(format!("embedding value {i} is {}, not a finite number", vector[i]));
        }
        // Cosines divide by the norm: a zero vector has none, and one whose squared norm
        // overflows f32 would make every similarity with it NaN.
        let squared: f32 = vector.iter().map(|x| x * x).sum();
        if squared == 0.0 {
            return Err("embedding is all zeros (or too small to have a norm): it has no direction to compare".into());
        }
        if !squared.is_finite() {
            return Err("embedding's norm overflows 32-bit floats: scale it down (cosine ignores scale)".into());
        }
        Ok(())
    }

    fn check_item(&self, item: &VectorItem) -> Result<(), String> {
        if item.id.is_empty() {
            return Err("item id is empty".into());
        }
        if item.id.len() > MAX_ID_BYTES {
            return Err(format!("item id is {} bytes, the limit is {MAX_ID_BYTES}", item.id.len()));
        }
        self.check_vector(&item.vector)
    }

    /// Indexes the valid items (with their positions in the request) in one atomic write,
    /// durable when this returns; invalid ones come back as failures.
    pub fn ingest(self: &Arc<Self>, items: Vec<(u32, VectorItem)>) -> Result<IngestOutcome, IndexError> {
        let mut outcome = IngestOutcome::default();
        let mut valid = Vec::with_capacity(items.len());
        for (position, item) in items {
            match self.check_item(&item) {
                Ok(()) => valid.push(item),
                Err(message) => outcome.failures.push(ItemFailure { position, id: item.id, message }),
            }
        }
        if valid.is_empty() {
            return Ok(outcome);
        }
        let batch = self.batch(valid.iter().map(|i| i.vector.as_slice()), valid.len())?;
        let codes = self.planes.codes(batch.view())?;
        let sketches = self.sketch.as_ref().map(|s| s.codes(batch.view())).transpose()?;
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
            })
            .collect();
        let count = prepared.len() as u32;
        self.log.submit(self.clone(), WriteRequest::Upsert(prepared))?;
        outcome.indexed = count;
        Ok(outcome)
    }

    /// `rows` vectors as one `rows × dim` matrix.
    fn batch<'a>(&self, vectors: impl Iterator<Item = &'a [f32]>, rows: usize) -> Result<Array2<f32>, IndexError> {
        let dim = self.def().dim as usize;
        let mut flat = Vec::with_capacity(rows * dim);
        vectors.for_each(|v| flat.extend_from_slice(v));
        Array2::from_shape_vec((rows, dim), flat).map_err(|e| IndexError::InvalidArgument(e.to_string()))
    }

    /// Deletes the items with these ids, durably; returns how many existed.
    pub fn delete(self: &Arc<Self>, ids: &[String]) -> Result<usize, IndexError> {
        self.log.submit(self.clone(), WriteRequest::Delete(ids.to_vec()))
    }
}
