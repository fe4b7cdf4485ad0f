//! Writes to a shared index: a batch hashed here, then written and acknowledged by the store.

use super::*;
use crate::store::cluster::SharedWrite;
use crate::telemetry;

impl SharedIndex {
    /// Indexes the valid items (with their positions in the request), acknowledged at the
    /// store's level when this returns; invalid ones come back as failures. Of two items with
    /// one id, the later wins.
    pub async fn ingest(&self, items: Vec<(u32, VectorItem)>) -> Result<IngestOutcome, IndexError> {
        let (valid, mut outcome) = super::super::ingest::split_valid(&self.def, items);
        if valid.is_empty() {
            return Ok(outcome);
        }
        let indexed = valid.len() as u32;
        let valid = last_of_each_id(valid);
        let vectors: Vec<&[f32]> = valid.iter().map(|i| i.vector.as_slice()).collect();
        let (codes, sketches) = super::super::ingest::hash_rows(&self.planes, self.sketch.as_ref(), &vectors)?;
        let keeps_vectors = self.def.stores_vectors;
        let keeps_thumbnails = self.def.thumbnails;
        let writes: Vec<SharedWrite> = valid
            .into_iter()
            .enumerate()
            .map(|(row, item)| SharedWrite {
                id: item.id,
                label: item.label,
                metadata: item.metadata,
                codes: codes.row(row).to_vec(),
                sketch: sketches.as_ref().map_or_else(Vec::new, |s| s.row(row).to_vec()),
                vector: keeps_vectors.then_some(item.vector),
                thumbnail: item.thumbnail.filter(|_| keeps_thumbnails),
            })
            .collect();
        let started = std::time::Instant::now();
        let report = self.store.write(self.uid, &writes).await?;
        record_ack(report.ack, started.elapsed());
        outcome.indexed = indexed;
        Ok(outcome)
    }

    /// Deletes the items with these ids; returns how many existed.
    pub async fn delete(&self, ids: &[String]) -> Result<usize, IndexError> {
        let mut distinct: Vec<String> = ids.to_vec();
        distinct.sort_unstable();
        distinct.dedup();
        let started = std::time::Instant::now();
        let (removed, ack) = self.store.delete(self.uid, &distinct).await?;
        record_ack(ack, started.elapsed());
        Ok(removed)
    }
}

/// The items with the last occurrence of each id, in request order.
fn last_of_each_id(items: Vec<VectorItem>) -> Vec<VectorItem> {
    let mut last: HashMap<&str, usize> = HashMap::with_capacity(items.len());
    for (i, item) in items.iter().enumerate() {
        last.insert(item.id.as_str(), i);
    }
    if last.len() == items.len() {
        return items;
    }
    let keep: Vec<bool> = items.iter().enumerate().map(|(i, item)| last.get(item.id.as_str()) == Some(&i)).collect();
    items.into_iter().zip(keep).filter_map(|(item, keep)| keep.then_some(item)).collect()
}

fn record_ack(ack: crate::store::cluster::AckReport, elapsed: std::time::Duration) {
    metrics::counter!(telemetry::CLUSTER_ACKS, "level" => ack.level.as_str()).increment(1);
    metrics::gauge!(telemetry::CLUSTER_ACK_REPLICAS).set(f64::from(ack.replicas));
    telemetry::seconds(telemetry::CLUSTER_ACK, elapsed);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_last_item_of_an_id_wins_and_order_stays() {
        let item = |id: &str, label: &str| VectorItem { id: id.into(), label: label.into(), ..Default::default() };
        let kept = last_of_each_id(vec![item("a", "1"), item("b", "2"), item("a", "3"), item("c", "4")]);
        let kept: Vec<(&str, &str)> = kept.iter().map(|i| (i.id.as_str(), i.label.as_str())).collect();
        assert_eq!(kept, [("b", "2"), ("a", "3"), ("c", "4")]);
    }
}
